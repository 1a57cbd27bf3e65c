"""Test-run settings shared by every test file.

Under pytest-xdist (pyproject's `-n auto`) every core already runs a worker process. torch's
default of one intra-op thread per core then puts cores x cores threads on the machine, whose
OpenMP threads spin while waiting for one another: on 2 cores that took two to four times the
CPU time in the model tests. So each worker, and each process a test starts (CLI subprocesses,
spawned ranks, Triton-interpreter workers, which read OMP_NUM_THREADS), gets its share of the
cores. Results do not depend on it: the tests pass with one process per core or one process on
all of them.
"""

from __future__ import annotations

import os

import torch

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))

if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# The slowest tests (Triton's interpreter, spawned ranks, the trained model: 10-40 s each, a
# few dozen seconds of the CPU suite's minutes) go first and are dealt to every worker: xdist's
# worksteal scheduler gives each worker an even, contiguous share of the collection order and
# steals from the ends, so slow tests left in one share, or at the end, make the run's tail.
SLOW = ("under_the_triton_interpreter", "tests/test_parallel.py", "tests/test_peer_all_reduce.py",
        "tests/test_trained_model.py", "tests/test_fit_before_allocation.py")


def pytest_collection_modifyitems(items) -> None:
    if _WORKERS < 2:
        return
    slow = [item for item in items if any(s in item.nodeid for s in SLOW)]
    fast = [item for item in items if not any(s in item.nodeid for s in SLOW)]
    share = -(-len(fast) // _WORKERS)
    items[:] = [item for w in range(_WORKERS)
                for item in slow[w::_WORKERS] + fast[w * share:(w + 1) * share]]
