"""NVML, opened for one block of queries and always shut down after: the GPU facts (env.py), the
link (link.py) and the process's GPU memory (generate/memory.py) all go through here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def opened_nvml() -> Iterator[Any]:
    """The initialised pynvml module for the block, or None (not installed, no driver, no GPU).
    Errors of NVML's own types inside the block are the caller's; the shutdown never raises."""
    try:
        import pynvml
    except ImportError:
        yield None
        return
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU: NVML raises its own error types
        yield None
        return
    try:
        yield pynvml
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def device_handle(pynvml: Any, bus_id: str | None, index: int) -> Any:
    """The GPU by PCI bus id (what torch sees, CUDA_VISIBLE_DEVICES applied), else by index."""
    if bus_id:
        with contextlib.suppress(pynvml.NVMLError):
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus_id.encode())
    return pynvml.nvmlDeviceGetHandleByIndex(index)
