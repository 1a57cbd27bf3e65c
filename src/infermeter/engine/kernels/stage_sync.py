"""Programs of one launch that wait for each other: the one-launch layer step's stages
(layer_step.py) each wait until the stage before has counted all its programs done.

Why it cannot deadlock: a program's place in the launch is a ticket it draws when it starts
(take_ticket), not its program id, and a stage's programs hold lower tickets than the stages
that wait on them. A program that holds ticket t knows every ticket below t was drawn by a
program already running or done, whatever order the GPU hands programs out in (CUDA promises
none), so every program it waits for makes progress. Triton's CPU interpreter runs the programs
one after another, so there the tickets are the program ids and every wait is met on arrival.

Memory order: a program's stores are published by a release on its count, after a barrier
(every thread's stores first). A waiting program polls with acquire loads from one thread (a
scalar atomic: Triton issues it from thread 0 and broadcasts its value), so one load a program
per poll reaches the count's L2 line, and the loads after the wait see what the counted
programs wrote. Each count has a 128-byte line of its own (LINE int32s), so the polls of one
stage never share a line with another stage's counting. Polling instead with PTX's acquire load
from every thread (no atomic) was timed on an H100 and was slower (docs/engine.md).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable

import torch
from torch import Tensor

from infermeter.engine.kernels.triton_support import tl, triton

LINE = 32  # int32s between two counts: a 128-byte L2 line each
_KEPT: dict[tuple[torch.device, int], Tensor] = {}  # kept_counts', kept for good
_TABLES: dict[tuple[torch.device, tuple[int, ...]], Tensor] = {}  # kept_addresses', for good


def kept_counts(device: torch.device, size: int) -> Tensor:
    """int32 [size] zeros for a launch's counts (this module's, the decode attention's "last"
    combine), zero between launches (each launch sets them back): made on the first call for
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


def kept_addresses(device: torch.device, addresses: tuple[int, ...]) -> Tensor:
    """int64 [len(addresses)] on `device`: a launch's table of tensors' addresses (the model
    step's per-layer weights and caches), made on the first call for these addresses and kept
    for good as kept_counts' counts are (a captured CUDA graph holds the table's address; a
    cache allocated anew has new addresses, so a table of its own). Never made during a
    CUDA-graph capture."""
    key = (device, addresses)
    if key not in _TABLES:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("an address table must be made before a CUDA graph is "
                               "captured: run the step once first")
        values = torch.tensor(addresses, dtype=torch.int64)
        _TABLES[key] = _in_no_pool(lambda: values.to(device)) if device.type == "cuda" \
            else values
    return _TABLES[key]


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


if triton is not None:

    @triton.jit
    def take_ticket(TICKET):
        """This program's place in the launch: the int32 at TICKET before this program's add
        (the programs' count of starts so far)."""
        return tl.atomic_add(TICKET, 1, sem="relaxed", scope="gpu")

    @triton.jit
    def wait_count(COUNT, target):
        """Spin until the int32 at COUNT reaches target, each poll an acquire (every thread of
        the program past the wait: a barrier)."""
        seen = tl.atomic_add(COUNT, 0, sem="acquire", scope="gpu")
        while seen < target:
            seen = tl.atomic_add(COUNT, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()

    @triton.jit
    def count_done(COUNT):
        """Add this program to the int32 count at COUNT once every thread's stores are done
        (acq_rel: the program that finds the last count also sees the others' stores); returns
        the count before the add."""
        tl.debug_barrier()
        return tl.atomic_add(COUNT, 1, sem="acq_rel", scope="gpu")

    @triton.jit
    def reset_counts(COUNT, COUNTS: tl.constexpr, LINE: tl.constexpr):
        """The first COUNTS counts (the ticket's included) back to 0 for the next launch: for
        the last program of a launch's last stage, when every program has drawn its ticket and
        passed its wait."""
        for index in range(COUNTS):
            tl.atomic_xchg(COUNT + index * LINE, 0, sem="relaxed", scope="gpu")
