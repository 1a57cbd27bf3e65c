"""The copy streams the offload schedules put their copies on, and the copies themselves.

A CopyStream is where a schedule (reload.LayerwiseReload, streamed.StreamedDecode,
streamed_prefill.StreamedPrefill) issues its copies and how the compute stream waits for them:
on a GPU a side CUDA stream (CudaCopyStream: DMAs from pinned memory, events between the
streams), on the CPU the current stream (CurrentStream: every copy synchronous, same order, no
overlap), in the tests a fake clock. Host copies of a cache are pinned on a GPU (pins_for,
pinned_like), so that a non_blocking copy is a DMA the host does not wait for. A gather is the
one copy that is a kernel (paged.py's mapped way: blocks read through a host pool's mapping).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from infermeter.measure.mapped_host import kernel_copy

# A schedule event: ("copy", i) copy of layer i issued, ("wait", i) layer i made to wait for
# it. Tests read them to check the order.
Trace = list[tuple[str, int]]
# copy(dst, src): one copy of one shape: host to device, both contiguous (a DMA from pinned
# memory), or device to device out of a staging buffer (dst may be strided)
Copy = Callable[[Tensor, Tensor], None]


def copy_piece(dst: Tensor, src: Tensor) -> None:
    """One copy on the current stream (from pinned memory: a DMA the host does not wait for)."""
    dst.copy_(src, non_blocking=True)


def copy_pieces(dsts: list[Tensor], srcs: list[Tensor]) -> None:
    """One copy per pair on the current stream, issued from one call: torch's foreach copy
    loops over the pairs in C++ (each still a copy_ with its dispatch), so a paged reload's
    thousands of block DMAs skip the Python loop's cost; how much that saves a GPU measures."""
    torch._foreach_copy_(dsts, srcs, non_blocking=True)


def slot_pieces(cache: Tensor, start: int, end: int) -> Iterator[tuple[tuple[int, ...], Tensor]]:
    """Slots start..end of cache [B, H_kv, S, D] as contiguous pieces (index, piece): the whole
    cache at index () when the slots are all S, else cache[b, h, start:end] [end - start, D] at
    index (b, h). A host copy [B, H_kv, end - start, D] of those slots gives each piece's
    source, contiguous and of its shape, at the same index."""
    if start == 0 and end == cache.shape[2]:  # every slot: the cache is one block
        yield (), cache
        return
    for b in range(cache.shape[0]):
        for h in range(cache.shape[1]):
            yield (b, h), cache[b, h, start:end]


def pins_for(device: torch.device) -> bool:
    """Whether host copies of a cache on `device` are pinned: on a GPU, so that their copies
    to and from it are DMAs the host does not wait for."""
    return device.type == "cuda" and torch.cuda.is_available()


def pinned_like(t: Tensor, pin: bool) -> Tensor:
    """A host copy of `t`, pinned when asked (a GPU run): its non_blocking copy back is a DMA."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
    host.copy_(t)
    return host


class CopyStream(Protocol):
    """Where LayerwiseReload and StreamedDecode put their copies, and how the compute waits."""

    def follow_compute(self) -> None:
        """Later copies start after the work queued so far on the compute stream."""

    def copy(self, dst: Tensor, src: Tensor) -> None:
        """Issue one copy on the copy stream."""

    def copy_all(self, dsts: list[Tensor], srcs: list[Tensor]) -> None:
        """Issue one copy per pair on the copy stream, from one call (copy_pieces)."""

    def gather(self, dst: Tensor, src: Tensor, rows: Tensor) -> None:
        """Issue dst = src[rows] on the copy stream: a kernel (it runs on the SMs), its source
        a host pool's device mapping on a GPU (paged.py's mapped way)."""

    def mark(self) -> Any:
        """A token for the copies issued so far (an event)."""

    def wait(self, token: Any) -> None:
        """Later compute starts after the copies `token` marks."""

    def settle(self) -> None:
        """Later compute starts after every copy issued so far (before what they read or write
        goes back to an allocator)."""


class CudaCopyStream:
    """A side CUDA stream: copies by DMA from pinned memory, events between the streams."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def follow_compute(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def copy(self, dst: Tensor, src: Tensor) -> None:
        with torch.cuda.stream(self.stream):
            copy_piece(dst, src)

    def copy_all(self, dsts: list[Tensor], srcs: list[Tensor]) -> None:
        with torch.cuda.stream(self.stream):
            copy_pieces(dsts, srcs)

    def gather(self, dst: Tensor, src: Tensor, rows: Tensor) -> None:
        with torch.cuda.stream(self.stream):
            kernel_copy(dst, src, rows)

    def mark(self) -> Any:
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def wait(self, token: Any) -> None:
        torch.cuda.current_stream(self.device).wait_event(token)

    def settle(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.stream)


class CurrentStream:
    """Copies on the current stream, nothing to wait for: on the CPU a copy is done when it
    returns (the CPU's copy stream); on a GPU they are queued in order with the compute
    (LayerCopies.reload's default: the cache filled before the timed runs)."""

    def follow_compute(self) -> None:
        pass

    def copy(self, dst: Tensor, src: Tensor) -> None:
        copy_piece(dst, src)

    def copy_all(self, dsts: list[Tensor], srcs: list[Tensor]) -> None:
        copy_pieces(dsts, srcs)

    def gather(self, dst: Tensor, src: Tensor, rows: Tensor) -> None:
        kernel_copy(dst, src, rows)

    def mark(self) -> Any:
        return None

    def wait(self, token: Any) -> None:
        pass

    def settle(self) -> None:
        pass


CURRENT = CurrentStream()


def copy_stream_for(device: torch.device) -> CopyStream:
    return CudaCopyStream(device) if device.type == "cuda" else CURRENT
