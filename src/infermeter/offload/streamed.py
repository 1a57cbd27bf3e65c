"""Offloaded decode, FlexGen's way: the KV cache lives in host memory and every decode step
streams each layer's K/V into one of two device buffers ahead of that layer's attention.

Layer i attends in buffer i % 2. Hooks on every layer's Attention (outside the engine):
- before layer i attends, the compute stream waits for layer i's copy into its buffer;
- after it attends, the step's new K/V of layer i (written by the attention into the buffer) is
  kept in a small device store of the tokens decoded since streaming began, and the copy stream,
  once that attention is done, streams layer i + 2 into the same buffer: the prompt's K/V from
  host memory, the decoded tokens' from the store. One buffer fills while the other is read.
The prompt's K/V (positions 0..context-1) live in host memory only; the store holds the few
decoded tokens (a write-back of one strided slot a layer a step would cost a host sync). A step
moves the whole prompt's K/V host-to-device, so the link bounds it: bytes a step / GB/s. Every
copy lands in a contiguous piece of the buffer (reload.slot_pieces: one per sequence and KV
head), a DMA from pinned memory. The copies and waits go through reload.py's CopyStream: on the
CPU the copies are synchronous (same order, no overlap), a test can pass a fake clock's.

The engine allocates a cache whole (Transformer.setup_cache), so the prompt is prefilled into a
full device cache first; streaming then keeps two layers on the device and frees the others.
Full-attention layers only (a sliding-window ring keeps its own slot bookkeeping).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from infermeter.engine.model import Transformer
from infermeter.errors import InfermeterError
from infermeter.offload.reload import CopyStream, Trace, copy_stream_for, pinned_like, slot_pieces


class StreamedDecode:
    """A context manager: inside it the model decodes with its KV cache in host memory.

        with StreamedDecode(model, context=state.next_pos) as streamed:
            streamed.step_at(state.next_pos)   # before each decode step
            generator.decode_step(state, config)
    """

    def __init__(self, model: Transformer, context: int, trace: Trace | None = None,
                 stream: CopyStream | None = None) -> None:
        caches = [layer.attention.kv_cache for layer in model.layers]
        if any(cache is None for cache in caches):
            raise InfermeterError("prefill the prompt before streaming its KV cache")
        if any(cache.window is not None for cache in caches):  # type: ignore[union-attr]
            raise InfermeterError(f"offloaded decode: model {model.spec.name} has sliding-window "
                                  "layers, which this streaming does not handle yet")
        if len(caches) < 2:
            raise InfermeterError("offloaded decode needs at least two layers")
        if not 0 < context < model.max_seq_len:
            raise InfermeterError(f"offloaded decode: context {context} leaves no room to decode "
                                  f"in the KV cache of {model.max_seq_len} tokens")
        self.model, self.context, self.trace = model, context, trace
        self.caches = caches
        device = caches[0].k.device  # type: ignore[union-attr]
        self.pin = device.type == "cuda" and torch.cuda.is_available()
        self.stream = stream or copy_stream_for(device)
        self.host: list[tuple[torch.Tensor, torch.Tensor]] = []  # [B, H_kv, context, D] each
        self.recent: list[tuple[torch.Tensor, torch.Tensor]] = []  # decoded tokens, on device
        self.events: list[Any] = []  # per layer: the token of its copies this step
        self.issued: list[bool] = []
        self.handles: list[Any] = []
        self.pos = context

    @property
    def bytes_per_step(self) -> int:
        """K/V bytes a step streams host-to-device (the prompt's, every layer)."""
        return sum(k.nbytes + v.nbytes for k, v in self.host)

    def __enter__(self) -> StreamedDecode:
        context = self.context
        for cache in self.caches:  # the prompt's K/V to host memory (pinned on a GPU)
            k, v = (pinned_like(t[:, :, :context], self.pin)
                    for t in (cache.k, cache.v))  # type: ignore[union-attr]
            self.host.append((k, v))
            room = cache.k.shape[2] - context  # type: ignore[union-attr]
            self.recent.append(tuple(  # type: ignore[arg-type]
                torch.empty((*t.shape[:2], room, t.shape[3]), dtype=t.dtype, device=t.device)
                for t in (cache.k, cache.v)))  # type: ignore[union-attr]
        self.buffers = self.caches[:2]  # two layers' caches become the double buffer
        for index, layer in enumerate(self.model.layers):
            layer.attention.kv_cache = self.buffers[index % 2]
            self.handles.append(layer.attention.register_forward_pre_hook(self._before(index)))
            self.handles.append(layer.attention.register_forward_hook(self._after(index)))
        self.caches = []  # the other layers' device caches are freed here
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        # The layers share two buffers now: no cache is left to reuse, the next
        # Generator.prepare() allocates a new one.
        for layer in self.model.layers:
            layer.attention.kv_cache = None
        self.model.max_batch_size = self.model.max_seq_len = 0

    # ---- the schedule ---------------------------------------------------------------------
    def step_at(self, pos: int) -> None:
        """Before a decode step that writes position `pos`: stream layers 0 and 1 in."""
        self.pos = pos
        self.events = [None] * len(self.model.layers)
        self.issued = [False] * len(self.model.layers)
        self.stream.follow_compute()
        for index in range(2):
            self._stream_in(index)

    def _stream_in(self, index: int) -> None:
        buffer, host, recent = self.buffers[index % 2], self.host[index], self.recent[index]
        context, decoded = self.context, self.pos - self.context
        for held, kept, cache in zip(host, recent, (buffer.k, buffer.v)):
            for where, piece in slot_pieces(cache, 0, context):  # [context, D] each
                self.stream.copy(piece, held[where])
            if decoded:  # tokens decoded since streaming began, device to device
                for where, piece in slot_pieces(cache, context, self.pos):
                    self.stream.copy(piece, kept[where][:decoded])
        self.events[index] = self.stream.mark()
        self.issued[index] = True
        if self.trace is not None:
            self.trace.append(("copy", index))

    def _before(self, index: int) -> Callable[..., None]:
        def wait(module: Any, args: Any) -> None:
            if not self.issued or not self.issued[index]:
                raise InfermeterError("StreamedDecode.step_at() was not called before the step")
            self.stream.wait(self.events[index])
            if self.trace is not None:
                self.trace.append(("wait", index))
        return wait

    def _after(self, index: int) -> Callable[..., None]:
        def keep_and_refill(module: Any, args: Any, output: Any) -> None:
            buffer, (rk, rv) = self.buffers[index % 2], self.recent[index]
            slot = self.pos - self.context
            if slot >= rk.shape[2]:
                raise InfermeterError(f"decode position {self.pos} is past the KV cache")
            rk[:, :, slot].copy_(buffer.k[:, :, self.pos])  # on the compute stream: in order
            rv[:, :, slot].copy_(buffer.v[:, :, self.pos])
            if self.trace is not None:
                self.trace.append(("attended", index))
            if index + 2 < len(self.model.layers):
                self.stream.follow_compute()  # the buffer is read until this layer is done
                self._stream_in(index + 2)
        return keep_and_refill
