"""Running a tests/ worker script under Triton's CPU interpreter: in a subprocess, since
TRITON_INTERPRET must be set before triton is first imported; run_checks is the worker's side."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def run_under_interpreter(worker: Path, *args: str) -> None:
    """Run `worker` (with `args`) with TRITON_INTERPRET=1 and src/ and the repository on
    PYTHONPATH (a worker may import tests' helpers); it must exit 0 with its output ending in
    "ok"."""
    run_worker(worker, args, {"TRITON_INTERPRET": "1"}, 300)


def run_worker(worker: Path, args: tuple[str, ...], env: dict[str, str], timeout: int) -> None:
    """Run `worker` (with `args`, `env` added) in a subprocess with src/ and the repository on
    PYTHONPATH; it must exit 0 with its output ending in "ok" within `timeout` seconds. On a GPU
    a kernel's wait for a count never reached is a hang: the timeout makes it a failure, not a
    stuck suite."""
    root = worker.resolve().parents[1]
    env = {**os.environ, **env,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "src"), str(root),
                                                       os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(worker), *args], env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def run_checks(*checks: Callable[[], None]) -> None:
    """A worker's main: each check in turn, its seconds on stderr (the slow ones show in a
    failure's output), then the "ok" run_under_interpreter waits for; a failing check's
    assertion ends the worker non-zero before it."""
    for check in checks:
        start = time.perf_counter()
        check()
        print(f"{check.__name__} {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print("ok")
