"""Offloaded decode, FlexGen's way: the KV cache lives in host memory and every decode step
streams each layer's K/V into one of two device buffers ahead of that layer's attention.

Layer i attends in buffer i % 2. Hooks on every layer's Attention (outside the engine):
- before layer i attends, the compute stream waits for layer i's copy into its buffer;
- after it attends, the step's new K/V of layer i (written by the attention into the buffer) is
  kept in a small device store of the tokens decoded since streaming began, and the copy stream,
  once that attention is done, streams layer i + 2's prompt K/V from host memory into the same
  buffer. One buffer fills while the other is read;
- the last two layers refill their buffers with the next step's layers 0 and 1 (the prompt's
  K/V does not change from step to step), so the next step's first copies run under this
  step's tail (the last layers, the head, the sampling) instead of after it: with step_at's
  copies the link idled for that tail every step (2.4 ms of an 82 ms step at 32k on an H100,
  results/traces-offload-decode-nvidia-h100-80gb-hbm3/). A window's first step (the decode's
  first, at the context) streams its own, as a decode's first step must;
- the decoded tokens' K/V go from the store into the buffer on the compute stream, after the
  wait (one strided device copy per K and V): on the copy stream each would be a kernel between
  two DMAs, waiting for SMs the attention holds while the link idled (the decode at 32k on an
  H100 reached 89.9% of the link's bound that way, and 95.2% with them here, in a later run on
  another H100: results/offload-nvidia-h100-80gb-hbm3.jsonl).
The prompt's K/V (positions 0..context-1) live in host memory only; the store holds the few
decoded tokens (a write-back of one strided slot a layer a step would cost a host sync). A step
moves the whole prompt's K/V host-to-device, so the link bounds it: bytes a step / GB/s. Every
copy on the copy stream lands in a contiguous piece of the buffer (streams.slot_pieces: one per
sequence and KV head), a DMA from pinned memory. The pieces' views are made once, and a layer's
DMAs are issued by one call (streams.copy_pieces): the eager decode's host already spends most
of a layer's copy time launching its kernels, and one Python copy_ per piece (16 a layer at
batch 1 for Llama-3.1-8B) added to it. The copies and waits go through streams.py's CopyStream:
on the CPU the copies are synchronous (same order, no overlap), a test can pass a fake clock's.

The whole cache is never on the device: the model's cache is two layer buffers from the start
(streamed_prefill.layer_buffers), and the prompt's prefill writes each layer's K/V back to host
memory through them (streamed_prefill.StreamedPrefill), whose host cache this streams:

    layer_buffers(model, batch, context, steps + 1, None, kv_dtype, device)
    with StreamedPrefill(model, context) as prefill:
        state = generator.prefill(tokens, config)
    with StreamedDecode(model, prefill.host) as streamed:
        streamed.step_at(state.next_pos)   # before each decode step
        generator.decode_step(state, config)

Full-attention layers only (a sliding-window ring keeps its own slot bookkeeping).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from infermeter.engine.model import Transformer
from infermeter.errors import InfermeterError
from infermeter.offload.streamed_prefill import LAYER_BUFFERS, shared_buffers
from infermeter.offload.streams import CopyStream, Trace, copy_stream_for, slot_pieces


class StreamedDecode:
    """A context manager: inside it the model decodes with its KV cache in host memory, `host`
    (per layer (K, V) [B, H_kv, context, D], the prompt's: StreamedPrefill.host), the model's
    cache being two layer buffers (see the module docstring). On leaving, the buffers are
    dropped: the next Generator.prepare() allocates a whole cache."""

    def __init__(self, model: Transformer, host: list[tuple[torch.Tensor, torch.Tensor]],
                 trace: Trace | None = None, stream: CopyStream | None = None) -> None:
        self.buffers = shared_buffers(model, "offloaded decode")
        if len(host) != len(model.layers):
            raise InfermeterError(f"offloaded decode: a host cache of {len(host)} layers for a "
                                  f"model of {len(model.layers)}")
        context = host[0][0].shape[2]
        if not 0 < context < model.max_seq_len:
            raise InfermeterError(f"offloaded decode: context {context} leaves no room to decode "
                                  f"in the KV cache of {model.max_seq_len} tokens")
        self.model, self.context, self.trace, self.host = model, context, trace, host
        first = self.buffers[0].k  # [B, H_kv, S, D]
        self.stream = stream or copy_stream_for(first.device)
        room = first.shape[2] - context
        # decoded tokens, on the device: per layer K and V [B, H_kv, room, D]
        self.recent = [tuple(torch.empty((*first.shape[:2], room, first.shape[3]),
                                         dtype=first.dtype, device=first.device)
                             for _ in range(2)) for _ in model.layers]
        self.events: list[Any] = []  # per layer: the token of its copies this step
        self.issued: list[bool] = []
        # the next step's layers 0 and 1, streamed by this step's last layers: their tokens
        self.ahead: dict[int, Any] = {}
        self.handles: list[Any] = []
        self.pos = context
        # per layer: its copies' (device pieces, host pieces), views made once
        self.pieces: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        for index, held in enumerate(host):
            buffer, dsts, srcs = self.buffers[index % LAYER_BUFFERS], [], []
            for part, cache in zip(held, (buffer.k, buffer.v)):
                for where, piece in slot_pieces(cache, 0, context):  # [context, D] each
                    dsts.append(piece)
                    srcs.append(part[where])
            self.pieces.append((dsts, srcs))

    @property
    def bytes_per_step(self) -> int:
        """K/V bytes a step streams host-to-device (the prompt's, every layer)."""
        return sum(k.nbytes + v.nbytes for k, v in self.host)

    def __enter__(self) -> StreamedDecode:
        for index, layer in enumerate(self.model.layers):
            self.handles.append(layer.attention.register_forward_pre_hook(self._before(index)))
            self.handles.append(layer.attention.register_forward_hook(self._after(index)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        # the last step's copies ahead may still be writing the buffers: the compute stream
        # waits for them before the buffers go back to the allocator
        self.stream.settle()
        self.ahead = {}
        self.pieces = []  # views of the buffers: they would keep them alive
        self.model.drop_cache()

    # ---- the schedule ---------------------------------------------------------------------
    def step_at(self, pos: int) -> None:
        """Before a decode step that writes position `pos`: the first layers, one a buffer,
        streamed in by the step before (its last layers did) or now: at the decode's first
        step, or where no step came before."""
        first = pos == self.context
        self.pos = pos
        self.events = [None] * len(self.model.layers)
        self.issued = [False] * len(self.model.layers)
        ahead, self.ahead = self.ahead, {}
        firsts = range(min(LAYER_BUFFERS, len(self.model.layers)))
        if first or set(ahead) != set(firsts):
            self.stream.follow_compute()
            for index in firsts:
                self._stream_in(index)
            return
        for index, token in ahead.items():
            self.events[index], self.issued[index] = token, True

    def copies_alone(self) -> None:
        """One step's copies with no forward: every layer's prompt K/V streamed in turn through
        the two buffers, the compute stream then waiting for the last. The copy stream runs
        them in order, so a buffer's refill follows the copies before it. Timed by the caller
        (job.py): the floor the copies set in this layout, beside the link's bound; the step's
        time above it is what the overlap with the forward costs. The buffers then hold the
        last layers' prompt K/V: the next step_at() streams its own."""
        layers = len(self.model.layers)
        self.events, self.issued = [None] * layers, [False] * layers
        self.ahead = {}  # the buffers end holding the last layers
        self.stream.follow_compute()
        for index in range(layers):
            self._stream_in(index)
        self.stream.wait(self.events[-1])

    def _stream_in(self, index: int, label: str = "copy") -> Any:
        """Issue layer `index`'s copies into its buffer; their token."""
        self.stream.copy_all(*self.pieces[index])
        token = self.stream.mark()
        if label == "copy":
            self.events[index], self.issued[index] = token, True
        if self.trace is not None:
            self.trace.append((label, index))
        return token

    def _before(self, index: int) -> Callable[..., None]:
        def wait(module: Any, args: Any) -> None:
            if not self.issued or not self.issued[index]:
                raise InfermeterError("StreamedDecode.step_at() was not called before the step")
            self.stream.wait(self.events[index])
            decoded = self.pos - self.context
            if decoded:  # the store's tokens, [B, H_kv, decoded, D], on the compute stream
                buffer, recent = self.buffers[index % LAYER_BUFFERS], self.recent[index]
                for kept, cache in zip(recent, (buffer.k, buffer.v)):
                    cache[:, :, self.context:self.pos].copy_(kept[:, :, :decoded])
            if self.trace is not None:
                self.trace.append(("wait", index))
        return wait

    def _after(self, index: int) -> Callable[..., None]:
        def keep_and_refill(module: Any, args: Any, output: Any) -> None:
            buffer, (rk, rv) = self.buffers[index % LAYER_BUFFERS], self.recent[index]
            slot = self.pos - self.context
            if slot >= rk.shape[2]:
                raise InfermeterError(f"decode position {self.pos} is past the KV cache")
            rk[:, :, slot].copy_(buffer.k[:, :, self.pos])  # on the compute stream: in order
            rv[:, :, slot].copy_(buffer.v[:, :, self.pos])
            if self.trace is not None:
                self.trace.append(("attended", index))
            self.stream.follow_compute()  # the buffer is read until this layer is done
            if index + LAYER_BUFFERS < len(self.model.layers):
                self._stream_in(index + LAYER_BUFFERS)
            else:  # this buffer's last layer this step: the next step's layer that takes it
                following = index % LAYER_BUFFERS
                self.ahead[following] = self._stream_in(following, "ahead")
        return keep_and_refill
