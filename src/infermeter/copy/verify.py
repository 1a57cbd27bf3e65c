"""Check the bytes that arrived: a case that moved wrong data fails loudly.

Sources hold a seeded random byte pattern (`DeviceLayout.fill_random`, `fill_host_random`).
After timing, the source gets a fresh pattern, the method runs once more exactly as timed, and
the destination is compared with the source: the layout's bytes, gathered in host order, must
equal the host buffer word for word. Comparisons run on the device in chunks of 64 MiB (the host
part is copied up), so a 40 GB cache needs no 40 GB of scratch memory.
"""

from __future__ import annotations

import torch

from infermeter.copy.chunks import Chunk, plan_chunks
from infermeter.copy.methods import DeviceLayout
from infermeter.errors import InfermeterError

COMPARE_CHUNK = 64 * 2**20


class CopyMismatch(InfermeterError):
    """The bytes that arrived differ from the bytes that were sent."""


def _where(layout: DeviceLayout, chunk: Chunk, host_byte: int) -> str:
    """Name the piece that holds host byte `host_byte`: which tensor/segment and row."""
    for op in chunk.ops:
        if op.host_offset <= host_byte < op.host_offset + op.nbytes:
            seg = layout.plan.segments[op.segment]
            row_bytes = op.byte_end - op.byte_start
            row = op.row_start + (host_byte - op.host_offset) // row_bytes
            return f"segment {op.segment} (buffer {seg.buffer}), row {row}"
    return "an unknown piece"


def verify_layout(layout: DeviceLayout, host: torch.Tensor, what: str) -> int:
    """Raise CopyMismatch unless the layout's bytes, in host order, equal `host` (words); the
    number of bytes compared."""
    word, device = layout.word, layout.device
    chunks = plan_chunks(layout.plan, COMPARE_CHUNK, COMPARE_CHUNK)
    size = max(chunk.nbytes for chunk in chunks) // word
    expected = torch.empty(size, dtype=host.dtype, device=device)
    compared = 0
    for chunk in chunks:
        n, start = chunk.nbytes // word, chunk.host_offset // word
        ref = expected[:n]
        for op in chunk.ops:
            at = (op.host_offset - chunk.host_offset) // word
            layout.gather(op, ref[at: at + op.nbytes // word])
        got = host[start: start + n].to(device)
        if torch.equal(ref, got):
            compared += n * word
            continue
        diff = ref != got
        first = int(diff.nonzero()[0, 0])
        host_byte = (start + first) * word
        raise CopyMismatch(
            f"copy verification failed for {what}: {int(diff.sum()):,} of {n:,} {word}-byte "
            f"words differ in the part at host byte {chunk.host_offset:,}; the first at host "
            f"byte {host_byte:,}, {_where(layout, chunk, host_byte)}")
    return compared


def verify_pieces(sent: list[torch.Tensor], arrived: list[torch.Tensor], what: str) -> int:
    """The seed way: each arrived tensor (a fresh .cpu()/.cuda() result) equals its source; the
    number of bytes compared."""
    if len(sent) != len(arrived):
        raise CopyMismatch(f"copy verification failed for {what}: {len(arrived)} tensors "
                           f"arrived for {len(sent)} sent")
    for index, (src, dst) in enumerate(zip(sent, arrived)):
        if src.shape != dst.shape or not torch.equal(src, dst.to(src.device)):
            raise CopyMismatch(f"copy verification failed for {what}: tensor {index} of "
                               f"{len(sent)} differs from its source")
    return sum(src.numel() * src.element_size() for src in sent)
