"""Host memory for the copy benchmark: flat pageable or pinned buffers.

Pinned buffers come from PyTorch's pinned allocator (`pin_memory=True`, cudaHostAlloc); when that
fails the buffer falls back to pageable memory and the case says so in a warning, since pageable
memory moves several times slower and would make the numbers mean something else.

The "mapped" method's device view of a pinned buffer is measure/mapped_host.py's `mapped_view`
(shared with `offload --traffic-method mapped`).
"""

from __future__ import annotations

import torch

from infermeter.copy.methods import WORD_DTYPES


def alloc_host(nbytes: int, word: int, pinned: bool) -> tuple[torch.Tensor, list[str]]:
    """A flat host buffer of `nbytes` as `word`-byte integers, and warnings (pinned fallback)."""
    dtype, notes = WORD_DTYPES[word], []
    if pinned:
        try:
            host = torch.empty(nbytes // word, dtype=dtype, pin_memory=True)
        except RuntimeError as err:
            notes.append(f"pinned allocation of {nbytes:,} bytes failed ({str(err)[:80]}); "
                         f"fell back to pageable memory")
            host = torch.empty(nbytes // word, dtype=dtype)
        if not host.is_pinned() and not notes:
            notes.append("asked for pinned host memory but the buffer is not pinned: "
                         "the pinned cases ran on pageable memory")
        return host, notes
    return torch.empty(nbytes // word, dtype=dtype), notes


def fill_host_random(host: torch.Tensor, seed: int, device: torch.device) -> None:
    """Seeded random bytes into a host buffer; generated on the GPU when there is one (a CPU
    generator fills a few GB/s, the GPU plus one copy is many times faster)."""
    raw = host.view(torch.uint8)
    gen = torch.Generator(device=device).manual_seed(seed)
    step = 256 * 2**20
    for start in range(0, raw.numel(), step):
        part = raw[start: start + step]
        part.copy_(torch.randint(0, 256, part.shape, dtype=torch.uint8, device=device,
                                 generator=gen))


def seed_host_pieces(host: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Separate pageable tensors holding consecutive parts of `host`: what `.cpu()` of each
    tensor would have produced, the source of the seed way's `.cuda()` calls."""
    pieces, offset = [], 0
    for n in sizes:
        pieces.append(host[offset: offset + n].clone())
        offset += n
    return pieces
