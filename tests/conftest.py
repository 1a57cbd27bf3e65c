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

import gc
import os

import pytest
import torch

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))

if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_FROZEN_UP_TO: list = [None]  # the test file whose first test last froze the heap


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before a test file's first test (and its fixtures), what is alive moves out of the
    garbage collector's reach (gc.collect, then gc.freeze): the modules imported so far, the
    collected tests, caches such as the GGUF readers' numpy views (250,000 after the GGUF
    tests). None of it is garbage, yet every full collection walked all of it, up to a million
    objects and 0.5 s a time, and the engine collects after every generate case
    (generate/memory.py): 126 s of the two workers' time in a full run went to that, 13 s with
    the freeze. What a test file makes is collected as before (only what outlives the file is
    frozen), so checks that memory is given back still see it go; peak memory is unchanged."""
    if item.path != _FROZEN_UP_TO[0]:
        _FROZEN_UP_TO[0] = item.path
        gc.collect()
        gc.freeze()


def pytest_collection_modifyitems(items: list) -> None:
    """A test marked gpu skips, saying why, where no CUDA GPU is visible (`pytest -m gpu` on a
    CPU machine), rather than failing inside the code it means to check on a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
