"""How the batched methods cut a layout into chunks (pure Python, so it is tested on a CPU).

The staged method moves the cache through a ring of device staging buffers: chunk i is gathered
from the layout into a staging buffer on one stream while chunk i-1 crosses the link on another
(host-to-device runs the same pipe backwards: DMA in, then scatter). Only the first gather and the
last scatter are not hidden behind a DMA, and every DMA costs the copy engine a few microseconds of
set-up, so chunk sizes ramp up from `smallest` (a short exposed gather) to `largest` (few DMAs)
and back down at the end (a short exposed scatter): 2, 4, 8, ... 64, 64, ..., 64, ... 4, 2 MiB.
On an H200 (PCIe Gen5) 2 -> 64 MiB moved the 256 MiB Llama-2-7B cache at 99.2-99.4% of one
contiguous copy each way; 1 -> 32 MiB and 0.5 -> 16 MiB gave 0.2-0.5% less.

A chunk is a list of `Op`s; an op is a run of whole rows of one segment, or a byte range of a
single-row segment (an engine tensor or the contiguous buffer, which may be cut anywhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from infermeter.copy.cases import LayoutPlan

MiB = 2**20
SMALLEST_CHUNK = 2 * MiB
LARGEST_CHUNK = 64 * MiB


@dataclass(frozen=True)
class Op:
    """Rows [row_start, row_end) of segment `segment`, bytes [byte_start, byte_end) of each row,
    landing at host byte `host_offset` (rows back to back)."""

    segment: int
    row_start: int
    row_end: int
    byte_start: int
    byte_end: int
    host_offset: int

    @property
    def nbytes(self) -> int:
        return (self.row_end - self.row_start) * (self.byte_end - self.byte_start)


@dataclass(frozen=True)
class Chunk:
    host_offset: int
    nbytes: int
    ops: tuple[Op, ...]


def chunk_targets(total: int, smallest: int, largest: int, align: int = 1) -> list[int]:
    """Chunk sizes that sum to `total`: doubling from `smallest` to `largest`, a middle of
    near-equal chunks no larger than `largest`, then the ramp mirrored. Every size but the last
    middle one is a multiple of `align` (the word size: a cut must not split a word)."""
    if total <= 0:
        return []
    largest = max(align, largest // align * align)
    smallest = max(align, min(smallest, largest) // align * align)
    ramp: list[int] = []
    size = smallest
    while size < largest and 2 * (sum(ramp) + size) <= total:
        ramp.append(size)
        size *= 2
    middle = total - 2 * sum(ramp)
    units, extra = divmod(middle, align)  # near-equal parts in whole words
    n_mid = math.ceil(middle / largest) if middle else 0
    mids = [(units // n_mid + (1 if i < units % n_mid else 0)) * align for i in range(n_mid)]
    if mids:
        mids[-1] += extra
    return ramp + mids + ramp[::-1]


def plan_chunks(plan: LayoutPlan, smallest: int = SMALLEST_CHUNK,
                largest: int = LARGEST_CHUNK) -> list[Chunk]:
    """Cut the layout's segments, in host order, into chunks of about `chunk_targets` sizes.

    Multi-row segments are cut between rows only (a row is one paged block), so a chunk can end a
    little short of its target, or hold one row larger than it.
    """
    word = plan.word_bytes()
    largest = max(word, largest // word * word)
    targets = iter(chunk_targets(plan.total_bytes, smallest, largest, word))
    chunks: list[Chunk] = []
    ops: list[Op] = []
    state = {"filled": 0, "host": 0, "target": next(targets, largest)}

    def add(op: Op) -> None:
        ops.append(op)
        state["filled"] += op.nbytes
        state["host"] += op.nbytes

    def close() -> None:
        chunks.append(Chunk(state["host"] - state["filled"], state["filled"], tuple(ops)))
        ops.clear()
        state["filled"] = 0
        state["target"] = next(targets, largest)

    for index, seg in enumerate(plan.segments):
        if seg.n_rows == 1:  # a contiguous tensor: cut anywhere
            pos = 0
            while pos < seg.row_bytes:
                take = min(seg.row_bytes - pos, state["target"] - state["filled"])
                add(Op(index, 0, 1, pos, pos + take, state["host"]))
                pos += take
                if state["filled"] >= state["target"]:
                    close()
            continue
        row = 0
        while row < seg.n_rows:
            room = state["target"] - state["filled"]
            take = min(seg.n_rows - row, room // seg.row_bytes)
            if take == 0 and state["filled"]:
                close()
                continue
            take = max(take, 1)  # a row larger than the whole target goes alone
            add(Op(index, row, row + take, 0, seg.row_bytes, state["host"]))
            row += take
            if state["filled"] + seg.row_bytes > state["target"]:
                close()
    if ops:
        close()
    return chunks


def split_evenly(plan: LayoutPlan, parts: int) -> list[Chunk]:
    """About `parts` chunks of equal size: the pieces of the multi-stream method when the layout
    has fewer tensors than streams (the contiguous buffer)."""
    word = plan.word_bytes()
    size = max(word, math.ceil(plan.total_bytes / parts / word) * word)
    return plan_chunks(plan, size, size)
