"""Counts a launch's programs share on the GPU (the split-KV attention's "last" combine: the
last of a head's split programs to finish, known by an atomic count, combines the splits), made
once per (device, size) and kept for good: a captured CUDA graph holds their address, so they
must outlive every graph, and live outside every graph's private memory pool."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable

import torch
from torch import Tensor

_KEPT: dict[tuple[torch.device, int], Tensor] = {}  # kept_counts', kept for good


def kept_counts(device: torch.device, size: int) -> Tensor:
    """int32 [size] zeros for a launch's counts (the decode attention's "last" combine), zero
    between launches (each launch sets them back): made on the first call for
    (device, size) and kept for good, since a captured CUDA graph holds its address; launches
    of one size share them, one after another on the step's stream. Never made during a
    CUDA-graph capture, and on a GPU made by a thread of its own (_zeros_in_no_pool), outside
    any graph's private memory pool."""
    key = (device, size)
    if key not in _KEPT:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"kept counts of {size} int32s must be made before a CUDA graph "
                               "is captured: run the step once first")
        _KEPT[key] = _zeros_in_no_pool(size, device) if device.type == "cuda" \
            else torch.zeros(size, device=device, dtype=torch.int32)
    return _KEPT[key]


def _zeros_in_no_pool(size: int, device: torch.device) -> Tensor:
    """torch.zeros(size, int32) on a GPU, made and filled by a thread of its own. Why: inductor's
    graph trees run a step's warm-up (its first, eager call, where the counts are made) with that
    thread's allocations routed to their private pool, and they may later hand a block of that
    pool to another graph when they restore an earlier state of it; the routing is per thread
    (torch.cuda.use_mem_pool's documented rule), so a block made by another thread stays out."""
    return _in_no_pool(lambda: torch.zeros(size, device=device, dtype=torch.int32))


def _in_no_pool(make: Callable[[], Tensor]) -> Tensor:
    """make()'s GPU tensor, made and filled by a thread of its own (_zeros_in_no_pool says
    why), and synchronized: filled before any stream of the step reads it."""
    def made() -> Tensor:
        tensor = make()
        torch.cuda.synchronize(tensor.device)
        return tensor

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(made).result()
