"""Per-kernel times of a traced decode step: each kernel name (and grid) with its calls and time
per step, from a trace that `infermeter generate --trace` wrote (tp_sweep.py's tp 2 parts trace
their runs). Where `infermeter trace` sums kernels into categories, this lists them one by one,
e.g. the GEMV per weight shape (its grid is the shape's rows / BLOCK_N).

    python benchmarks/trace_kernels.py results/trace-tp2-*-rank0.json.gz [--top 20]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from infermeter.errors import InfermeterError  # noqa: E402
from infermeter.measure.breakdown import load_trace  # noqa: E402


def kernel_table(trace: dict, steps: int) -> list[tuple[str, str, float, float]]:
    """(name, grid, calls a step, us a step) for every kernel, most time first; the trace holds
    `steps` traced decode steps (generate --trace records 5)."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    calls: dict[tuple[str, str], list[float]] = defaultdict(list)
    for event in events:
        if event.get("cat") == "kernel" and event.get("ph") == "X":
            grid = str(event.get("args", {}).get("grid", "-"))
            calls[(event["name"][:70], grid)].append(event["dur"])
    rows = [(name, grid, len(durs) / steps, sum(durs) / steps)
            for (name, grid), durs in calls.items()]
    return sorted(rows, key=lambda row: -row[3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5, help="decode steps in the trace")
    args = parser.parse_args()
    for path in args.files:
        try:
            trace = load_trace(path)
        except InfermeterError as err:  # a wrong path, not a trace: one line
            print(f"trace_kernels: error: {err}", file=sys.stderr)
            return 2
        print(path)
        for name, grid, per_step, us in kernel_table(trace, args.steps)[:args.top]:
            print(f"  {us:9.1f} us/step  {per_step:6.1f} calls  {us / per_step:7.2f} us/call  "
                  f"grid {grid:<14} {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
