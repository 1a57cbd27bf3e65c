"""Run a Python script and write down where its main thread is every few seconds: the whole
stack, outermost frame first, a recursion's repeating frames written once and counted. For a
warm-up that runs long without saying why (`open_targets.sh step-head-stall`): faulthandler's
dumps keep only the innermost 100 frames, which a deep recursion fills, so the caller that
started it is lost.

usage: python benchmarks/stack_watch.py --every S --out FILE -- SCRIPT [ARGS...]

SCRIPT runs in this process as `python SCRIPT ARGS` would (its folder first on sys.path, its
exit status this process's). Each sample is appended to FILE and flushed at once, so a run
killed by a time limit keeps every sample taken before it.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import threading
import time
from types import FrameType

LONGEST_CYCLE = 8  # frames in the longest repeating block folded (a recursion through a few calls)


def stack_lines(frame: FrameType | None) -> list[str]:
    """`path:line in function` for each frame from `frame` out, outermost first."""
    lines = []
    while frame is not None:
        lines.append(f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        frame = frame.f_back
    return lines[::-1]


def folded(lines: list[str], longest: int = LONGEST_CYCLE) -> list[str]:
    """`lines` with each block of up to `longest` lines that repeats back to back written once,
    then a line saying how many times it ran in a row: from the outermost line in, the block
    that covers the most lines wins."""
    out, i = [], 0
    while i < len(lines):
        period, count = 1, 1
        for p in range(1, longest + 1):
            block, k = lines[i:i + p], 1
            while i + (k + 1) * p <= len(lines) and lines[i + k * p:i + (k + 1) * p] == block:
                k += 1
            if k > 1 and k * p > period * count:
                period, count = p, k
        out += lines[i:i + period]
        if count > 1:
            out.append(f"  [the {period} frame(s) above, {count} times in a row]")
        i += period * count
    return out


def watch(thread_id: int, every: float, path: str, done: threading.Event) -> None:
    """Append the thread's folded stack to `path` every `every` seconds until `done`."""
    start = time.monotonic()
    with open(path, "a") as out:
        while not done.wait(every):
            frame = sys._current_frames().get(thread_id)
            if frame is None:
                return
            lines = folded(stack_lines(frame))
            out.write(f"--- {time.monotonic() - start:.1f} s, {len(lines)} lines, outermost "
                      "first\n" + "\n".join(lines) + "\n")
            out.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=float, default=20.0, help="seconds between samples")
    parser.add_argument("--out", required=True, help="the file the samples are appended to")
    parser.add_argument("script", help="the Python script to run, then its arguments")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if not os.path.isfile(args.script):
        parser.error(f"{args.script}: no such file")
    done = threading.Event()
    threading.Thread(target=watch, args=(threading.get_ident(), args.every, args.out, done),
                     daemon=True).start()
    sys.argv = [args.script, *args.args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
    try:
        runpy.run_path(args.script, run_name="__main__")
    except SystemExit as end:  # as the interpreter ends: None 0, a message printed and 1
        if end.code is None or isinstance(end.code, int):
            return end.code or 0
        print(end.code, file=sys.stderr)
        return 1
    finally:
        done.set()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
