"""Running a tests/ worker script under Triton's CPU interpreter: in a subprocess, since
TRITON_INTERPRET must be set before triton is first imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_under_interpreter(worker: Path) -> None:
    """Run `worker` with TRITON_INTERPRET=1 and src/ and the repository on PYTHONPATH (a worker
    may import tests' helpers); it must exit 0 with its output ending in "ok"."""
    root = worker.resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "src"), str(root),
                                                       os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(worker)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
