"""The shell scripts a GPU run of the open targets starts from: the offload targets' command lines
parse with today's flags (a renamed flag would otherwise surface only on the device), and the
parts script refuses an unknown part with its usage."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from infermeter.cli import build_parser

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _command_lines(script: Path) -> list[list[str]]:
    """`python3 -m infermeter ...` lines (continuations joined), "${name[@]}" arrays expanded,
    other shell variables (file paths there) given a placeholder."""
    text = re.sub(r"\\\n\s*", " ", script.read_text())
    arrays = {name: body for name, body in re.findall(r"^\s*(\w+)=\((.*?)\)\s*$", text, re.M)}
    lines = []
    for line in text.splitlines():
        if "-m infermeter " not in line or line.lstrip().startswith("#"):
            continue
        line = line.split("-m infermeter ", 1)[1].split(">", 1)[0].split("||", 1)[0]
        line = line.split(";;", 1)[0]  # a case branch's end
        line = re.sub(r'"\$\{(\w+)\[@\]\}"', lambda m: arrays[m.group(1)], line)
        line = re.sub(r'"[^"]*\$[^"]*"', "x", line)  # a quoted word holding a variable
        line = re.sub(r'\$\{?\w+\}?(/[\w./-]*)?', "x", line)
        lines.append(shlex.split(line))
    return lines


def test_the_offload_targets_parse_and_cover_the_issue_s_three_measurements():
    lines = _command_lines(BENCHMARKS / "offload_targets.sh")
    parser = build_parser()
    for argv in lines:
        args = parser.parse_args(argv)  # a bad flag exits 2 (SystemExit fails the test)
        assert args.output == "x" and args.dtype == "bf16"
    assert len(lines) == 3
    flags = {flag for argv in lines for flag in argv if flag.startswith("--")}
    assert {"--block-size", "--traffic", "--traffic-method", "--offloaded-decode"} <= flags
    assert all(argv[0] == "offload" and "llama-3.1-8b" in argv for argv in lines)


def test_the_parts_script_refuses_an_unknown_part():
    run = subprocess.run(["bash", str(BENCHMARKS / "open_targets.sh"), "nope"],
                         capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ""})
    assert run.returncode == 2 and "usage:" in run.stderr


def test_the_dense_part_s_generate_lines_parse_and_run_compiled_bf16_at_batch_1():
    lines = [argv for argv in _command_lines(BENCHMARKS / "open_targets.sh")
             if argv[0] == "generate"]
    parser = build_parser()
    assert lines, "the parts script names no generate command"
    for argv in lines:
        args = parser.parse_args(argv)
        assert argv[0] == "generate" and args.dtype == "bf16" and args.batch_size == [1]
    models = re.search(r"for model in ([\w.\- ]+); do", (BENCHMARKS / "open_targets.sh")
                       .read_text()).group(1).split()
    assert {"qwen3-8b", "gemma-3-12b"} <= set(models)


def test_the_run_part_runs_the_main_job_on_its_default_into_a_device_folder():
    lines = [argv for argv in _command_lines(BENCHMARKS / "open_targets.sh") if argv[0] == "run"]
    assert len(lines) == 1
    args = build_parser().parse_args(lines[0])
    assert args.out == "x" and args.model is None and args.checkpoint is None


def test_every_part_names_only_models_its_script_knows():
    """`benchmarks/X.py ... --models A B` lines of the parts script: A and B are X's MODELS
    (a typo would otherwise fail on the device, after the machine started); together the step
    parts, and the MoE parts, cover every model of their A/B."""
    from tests.benchmark_scripts import load_benchmark

    text = re.sub(r"\\\n\s*", " ", (BENCHMARKS / "open_targets.sh").read_text())
    lines = re.findall(r"benchmarks/(\w+)\.py [^\n]*--models ([\w.\- ]+)", text)
    assert {script for script, _ in lines} >= {"step_kernels_ab", "moe_kernel_ab"}
    named: dict[str, set[str]] = {}
    for script, models in lines:
        known = load_benchmark(script).MODELS
        assert set(models.split()) <= set(known), (script, models)
        named.setdefault(script, set()).update(models.split())
    for script in ("step_kernels_ab", "moe_kernel_ab"):
        assert named[script] == set(load_benchmark(script).MODELS), script
