"""The prompt's prefill for an offloaded decode: every layer's K/V written back to host memory
as soon as its attention wrote them, so the whole cache is never on the device.

The model's cache is two layer buffers (layer_buffers below: Transformer.setup_cache with
layer_buffers=2), layer i attending in buffer i % 2. Hooks on every layer's Attention (outside
the engine), for each forward of the prefill (a prompt of `context` tokens, in chunks of the
Generator's prefill_chunk, eager):
- after layer i attended (and wrote the chunk's K/V, slots start..end), the copy stream, once
  that attention is done, copies those slots device-to-host into layer i's host cache, then
  the earlier chunks' K/V of layer i + 2 (slots 0..start, from host memory) into the same
  buffer, and marks both;
- before layer i + 2 attends (and writes the buffer), the compute stream waits for that mark:
  the copy out of the buffer is done and the buffer holds what the chunk attends over.
The mirror image of the decode's streaming (streamed.py): the copy stream writes one buffer
back while the other is computed in. Every copy is one contiguous piece (streams.slot_pieces:
one per sequence and KV head), a DMA to or from pinned memory, through streams.py's CopyStream
(CUDA's, the CPU's synchronous one, or a test's fake clock). When the prefill is done the compute
stream waits for the last write-back, so the host cache is whole for whoever streams it next.

A chunk after the first reads the earlier chunks' K/V of every layer back from host memory
(slots 0..start a layer): chunking bounds the activations at the price of that traffic.
Full-attention layers only; eager forwards only (a compiled layer graph or whole-model graph
would have the hooks inside it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from infermeter.engine.kv_cache import LayerKVCache
from infermeter.engine.model import Transformer
from infermeter.engine.recorded_forward import recording
from infermeter.errors import InfermeterError
from infermeter.offload.streams import (
    CopyStream,
    Trace,
    copy_stream_for,
    pins_for,
    slot_pieces,
)
from infermeter.specs.sizes import cache_length

LAYER_BUFFERS = 2  # one buffer is read by the compute while the other is copied


def layer_buffers(model: Transformer, batch_size: int, prompt_len: int, new_tokens: int,
                  fixed_len: int | None, dtype: torch.dtype, device: torch.device) -> None:
    """Set up `model`'s cache as two layer buffers of the length Generator.prepare gives
    (prompt + new tokens, rounded; `fixed_len` if given): the only KV cache on the device."""
    length = cache_length(model.spec, prompt_len, new_tokens, fixed_len)
    model.setup_cache(batch_size, length, dtype=dtype, device=device,
                      layer_buffers=LAYER_BUFFERS)


def shared_buffers(model: Transformer, what: str) -> list[LayerKVCache]:
    """The model's two layer buffers, checked: layer i's cache is buffer i % 2."""
    caches = [layer.attention.kv_cache for layer in model.layers]
    if len(caches) < LAYER_BUFFERS:
        raise InfermeterError(f"{what} needs at least two layers")
    if any(cache is None for cache in caches):
        raise InfermeterError(f"{what}: set up the KV cache as two layer buffers first")
    if any(cache.window is not None for cache in caches):  # type: ignore[union-attr]
        raise InfermeterError(f"{what}: model {model.spec.name} has sliding-window layers, "
                              "which this streaming does not handle yet")
    buffers = caches[:LAYER_BUFFERS]
    if buffers[0] is buffers[1] or any(cache is not buffers[i % LAYER_BUFFERS]
                                       for i, cache in enumerate(caches)):
        raise InfermeterError(f"{what}: the KV cache is not two layer buffers (set it up with "
                              "Transformer.setup_cache(..., layer_buffers=2))")
    return buffers  # type: ignore[return-value]


class StreamedPrefill:
    """A context manager: inside it the prefill of a `context`-token prompt writes every layer's
    K/V back to host memory (`host`) through the two layer buffers.

        with StreamedPrefill(model, context) as prefill:
            state = generator.prefill(tokens, config)     # eager
        prefill.host   # per layer (K, V), each [B, H_kv, context, D] in host memory
    """

    def __init__(self, model: Transformer, context: int, trace: Trace | None = None,
                 stream: CopyStream | None = None) -> None:
        self.buffers = shared_buffers(model, "streamed prefill")
        if not 0 < context < model.max_seq_len:
            raise InfermeterError(f"streamed prefill: context {context} leaves no room to "
                                  f"decode in the KV cache of {model.max_seq_len} tokens")
        self.model, self.context, self.trace = model, context, trace
        first = self.buffers[0].k  # [B, H_kv, S, D]
        self.stream = stream or copy_stream_for(first.device)
        pin = pins_for(first.device)
        shape = (*first.shape[:2], context, first.shape[3])
        self.host = [tuple(torch.empty(shape, dtype=first.dtype, pin_memory=pin)
                           for _ in range(2)) for _ in model.layers]  # [B, H_kv, context, D]
        self.n_layers = len(model.layers)
        self.start = self.end = 0  # the slots the running forward writes
        self.events: list[Any] = []  # per layer: its buffer is free and holds the earlier chunks
        self.handles: list[Any] = []

    def __enter__(self) -> StreamedPrefill:
        self.handles.append(self.model.register_forward_pre_hook(self._forward,
                                                                 with_kwargs=True))
        for index, layer in enumerate(self.model.layers):
            self.handles.append(layer.attention.register_forward_pre_hook(self._before(index)))
            self.handles.append(layer.attention.register_forward_hook(self._after(index)))
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if exc_type is not None:
            return
        if self.end != self.context:
            raise InfermeterError(f"streamed prefill: the forwards wrote {self.end} of the "
                                  f"{self.context} prompt positions")
        self.stream.wait(self.stream.mark())  # the host cache is whole from here on

    def _forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        """The model's forward pre-hook: a new chunk, at slots end..end + T."""
        if torch.compiler.is_compiling() or kwargs.get("block_fn") is not None or recording():
            raise InfermeterError("streamed prefill waits between layers: run it eager (no "
                                  "compiled prefill)")
        tokens = args[0] if args else kwargs["tokens"]  # [B, T]
        self.start, self.end = self.end, self.end + tokens.shape[1]
        if self.end > self.context:
            raise InfermeterError(f"streamed prefill: forwards past the {self.context}-token "
                                  "prompt")
        self.events = [None] * self.n_layers
        self.stream.follow_compute()  # the buffers were last used by the previous chunk
        for index in range(min(LAYER_BUFFERS, self.n_layers)):
            self._fill(index)

    def _fill(self, index: int) -> None:
        """Layer `index`'s earlier chunks (slots 0..start) into its buffer, then a mark that
        also covers the copies issued before (the buffer's write-back)."""
        if self.start:
            buffer, host = self.buffers[index % LAYER_BUFFERS], self.host[index]
            for cache, held in zip((buffer.k, buffer.v), host):
                for where, piece in slot_pieces(cache, 0, self.start):  # [start, D] each
                    self.stream.copy(piece, held[where][..., :self.start, :])
            if self.trace is not None:
                self.trace.append(("in", index))
        self.events[index] = self.stream.mark()

    def _before(self, index: int) -> Callable[..., None]:
        def wait(module: Any, args: Any) -> None:
            if not self.events:
                raise InfermeterError("streamed prefill: a layer ran outside a model forward")
            self.stream.wait(self.events[index])
            if self.trace is not None:
                self.trace.append(("wait", index))
        return wait

    def _after(self, index: int) -> Callable[..., None]:
        def write_back(module: Any, args: Any, output: Any) -> None:
            buffer, host = self.buffers[index % LAYER_BUFFERS], self.host[index]
            if self.trace is not None:
                self.trace.append(("attended", index))
            self.stream.follow_compute()  # the attention wrote the chunk's K/V
            for cache, held in zip((buffer.k, buffer.v), host):
                for where, piece in slot_pieces(cache, self.start, self.end):
                    self.stream.copy(held[where][..., self.start:self.end, :], piece)
            if self.trace is not None:
                self.trace.append(("out", index))
            if index + LAYER_BUFFERS < self.n_layers:
                self._fill(index + LAYER_BUFFERS)
        return write_back
