"""Load a script of benchmarks/ as a module, for the tests of its pure parts."""

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py, executed afresh; benchmarks/ goes on sys.path first, since a script
    may import the one beside it (tp_sweep imports tp_summary)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def part_arguments(part: str, script: str):
    """The parsed flags of open_targets.sh's part `part` running benchmarks/<script>.py (its one
    such line, continuations joined), by the script's own parser."""
    text = re.sub(r"\\\n\s*", " ", (BENCHMARKS / "open_targets.sh").read_text())
    body = re.search(rf"^  {re.escape(part)}\)\n(.*?);;", text, re.M | re.S).group(1)
    (line,) = re.findall(rf"^\s*python3 benchmarks/{script}\.py ([^\n]*)", body, re.M)
    return load_benchmark(script).arguments().parse_args(line.split())
