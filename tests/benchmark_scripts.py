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


def shell_text(script: Path) -> str:
    """A shell script's text, continuations joined and each "${name[@]}" of an array set as
    name=(...) written out, so a line reads as the command it runs."""
    text = re.sub(r"\\\n\s*", " ", script.read_text())
    arrays = {name: " ".join(body.split())  # an array may go on over lines
              for name, body in re.findall(r"^\s*(\w+)=\(([^)]*)\)", text, re.M)}
    return re.sub(r'"\$\{(\w+)\[@\]\}"', lambda m: arrays.get(m.group(1), m.group(0)), text)


def case_branches(script: Path) -> dict[str, str]:
    """The body of each `  name)` branch of the script's last case statement, read by
    shell_text, up to its ';;'."""
    body = shell_text(script).rsplit('case "', 1)[1]
    return dict(re.findall(r"^  ([\w-]+)\)\n(.*?);;", body, re.M | re.S))


def part_body(part: str) -> str:
    """open_targets.sh's branch `part` (case_branches)."""
    return case_branches(BENCHMARKS / "open_targets.sh")[part]


def part_arguments(part: str, script: str):
    """The parsed flags of open_targets.sh's part `part` running benchmarks/<script>.py (its one
    such line), by the script's own parser."""
    body = part_body(part)
    (line,) = re.findall(rf"^\s*python3 benchmarks/{script}\.py ([^\n]*)", body, re.M)
    return load_benchmark(script).arguments().parse_args(line.split())
