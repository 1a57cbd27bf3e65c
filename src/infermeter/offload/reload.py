"""A prefix's KV cache kept in host memory and put back into the engine's cache, whole or
layer by layer while the suffix's forward runs.

HostPrefix holds, per layer, the cache slots a prefix of P tokens filled: K and V
[B, H_kv, n, D] with n = min(P, the layer's slots) (a sliding-window ring keeps at most its
window), plus a ring layer's key_pos [S_layer] (which position each slot holds). On a GPU the
host tensors are pinned, so a non_blocking copy is a DMA that does not block the host; on the
CPU they are a second CPU buffer and every copy is synchronous.

LayerwiseReload is the overlapped schedule: copies go out on a copy stream, each layer's
followed by an event, and a forward pre-hook on every layer's Attention makes the compute stream
wait on that layer's event, so layer i attends as soon as its own K/V have arrived while later
layers' copies are still in flight. The hooks sit outside the model (the engine knows nothing
of offloading). `lookahead` copies are issued ahead of the layer being computed (None: every
layer's at once, when the forward starts: the copy stream never idles).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from infermeter.engine.kv_cache import LayerKVCache
from infermeter.engine.model import Transformer
from infermeter.errors import InfermeterError

# A schedule event: ("copy", i) copy of layer i issued, ("wait", i) layer i's attention made to
# wait for it. Tests read them to check the order.
Trace = list[tuple[str, int]]


def layer_caches(model: Transformer) -> list[LayerKVCache]:
    caches = [layer.attention.kv_cache for layer in model.layers]
    if any(cache is None for cache in caches):
        raise InfermeterError("call setup_cache() before keeping a prefix's KV cache")
    return caches  # type: ignore[return-value]


@dataclass
class LayerKV:
    k: Tensor  # [B, H_kv, n, D] in host memory
    v: Tensor
    key_pos: Tensor | None  # [S_layer] int64, a ring layer's only


class HostPrefix:
    """The KV cache of the first `prefix_len` positions of `model`'s cache, copied to host."""

    def __init__(self, model: Transformer, prefix_len: int) -> None:
        caches = layer_caches(model)
        if not 0 < prefix_len <= model.max_seq_len:
            raise InfermeterError(f"prefix of {prefix_len} tokens does not fit the KV cache of "
                                  f"{model.max_seq_len} tokens")
        self.prefix_len = prefix_len
        pin = caches[0].k.device.type == "cuda"
        self.layers: list[LayerKV] = []
        for cache in caches:
            n = min(prefix_len, cache.size)
            shape = (*cache.k.shape[:2], n, cache.k.shape[3])  # [B, H_kv, n, D], contiguous
            k, v = (torch.empty(shape, dtype=cache.k.dtype, pin_memory=pin) for _ in range(2))
            k.copy_(cache.k[:, :, :n])
            v.copy_(cache.v[:, :, :n])
            key_pos = cache.key_pos.to("cpu").clone() if cache.is_ring else None
            self.layers.append(LayerKV(k, v, key_pos))

    @property
    def nbytes(self) -> int:
        """Bytes one reload moves (K and V of every layer; key_pos is bookkeeping, not payload)."""
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers)

    def copy_layer(self, model: Transformer, index: int) -> None:
        """Layer `index`'s K/V into the cache on the current stream (async from pinned memory).
        Unless n fills the layer, the cache's [B, H_kv, :n] is strided: torch lands the bytes in
        a contiguous device buffer first, then a copy kernel spreads them (the engine's layout)."""
        cache = layer_caches(model)[index]
        layer = self.layers[index]
        n = layer.k.shape[2]
        cache.k[:, :, :n].copy_(layer.k, non_blocking=True)
        cache.v[:, :, :n].copy_(layer.v, non_blocking=True)
        if layer.key_pos is not None:
            cache.key_pos.copy_(layer.key_pos, non_blocking=True)

    def reload(self, model: Transformer) -> None:
        """Every layer back, in order, on the current stream: the serial way."""
        for index in range(len(self.layers)):
            self.copy_layer(model, index)


class LayerwiseReload:
    """Forward pre-hooks that overlap the reload with the forward (a context manager).

        with LayerwiseReload(model, host) as reload:
            reload.start()        # issue the first copies (before the forward is launched)
            model(suffix, positions)
    """

    def __init__(self, model: Transformer, host: HostPrefix, lookahead: int | None = None,
                 trace: Trace | None = None) -> None:
        if lookahead is not None and lookahead < 1:
            raise InfermeterError(f"reload lookahead must be at least 1 layer, got {lookahead}")
        self.model, self.host = model, host
        self.n_layers = len(model.layers)
        self.lookahead = self.n_layers if lookahead is None else lookahead
        self.trace = trace
        device = model.tok_embeddings.weight.device
        self.cuda = device.type == "cuda"
        self.stream: Any = torch.cuda.Stream(device) if self.cuda else None
        self.events: list[Any] = []
        self.issued = 0
        self.handles: list[Any] = []

    def __enter__(self) -> LayerwiseReload:
        for index, layer in enumerate(self.model.layers):
            self.handles.append(layer.attention.register_forward_pre_hook(self._hook(index)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def start(self) -> None:
        """A new reload: issue the first `lookahead` layers' copies. The copy stream first waits
        for the compute stream, so no copy overwrites a cache earlier work still reads."""
        self.events = [None] * self.n_layers
        self.issued = 0
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream())
        self._issue_up_to(min(self.lookahead, self.n_layers))

    def _issue_up_to(self, end: int) -> None:
        while self.issued < end:
            index = self.issued
            if self.cuda:
                with torch.cuda.stream(self.stream):
                    self.host.copy_layer(self.model, index)
                    event = torch.cuda.Event()
                    event.record(self.stream)
                self.events[index] = event
            else:  # a CPU copy is done when it returns
                self.host.copy_layer(self.model, index)
                self.events[index] = True
            if self.trace is not None:
                self.trace.append(("copy", index))
            self.issued += 1

    def _hook(self, index: int) -> Callable[..., None]:
        def wait_for_layer(module: Any, args: Any) -> None:
            if not self.events:
                raise InfermeterError("LayerwiseReload.start() was not called before the forward")
            # Issue ahead first, so the copy stream has the next layers' work while this waits.
            self._issue_up_to(min(index + 1 + self.lookahead, self.n_layers))
            event = self.events[index]
            if self.cuda and event is not None:
                torch.cuda.current_stream().wait_event(event)
                self.events[index] = None  # a later chunk's forward need not wait again
            if self.trace is not None:
                self.trace.append(("wait", index))
        return wait_for_layer
