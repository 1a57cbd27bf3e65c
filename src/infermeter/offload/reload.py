"""A prefix's KV cache kept in host memory and put back into the engine's cache, whole or
layer by layer while the suffix's forward runs.

HostPrefix holds, per layer, the cache slots a prefix of P tokens filled: K and V
[B, H_kv, n, D] with n = min(P, the layer's slots) (a sliding-window ring keeps at most its
window), plus a ring layer's key_pos [S_layer] (which position each slot holds). On a GPU the
host tensors are pinned, so a non_blocking copy is a DMA that does not block the host; on the
CPU they are a second CPU buffer and every copy is synchronous.

The cache is [B, H_kv, S, D], so a layer's first n slots [:, :, :n] are strided unless n == S. A
layer the prefix fills comes back in one DMA per K and V. Any other goes through a device
staging slot: one DMA of the host's contiguous [B, H_kv, n, D] into it (`fetch_layer`), then one
device copy into the cache's slots (`place_layer`). STAGE_SLOTS slots serve the staged layers in
turn, so one layer's DMA can land while the one staged before it is placed. One copy per
(sequence, KV head) instead, DMA only, took 2,048 copies for Llama-2-7B's 512-token prefix and
reloaded at a tenth of the link's speed on an H100: each copy cost more host time to issue than
its 128 KiB took to move. (slot_pieces, which cuts such pieces, serves the streamed decode,
whose pieces are megabytes.)

LayerwiseReload is the overlapped schedule: the DMAs go out on a copy stream, each layer's
followed by an event, and before each layer runs, the compute stream waits on that layer's
event only, so layer i computes as soon as its own K/V have arrived while later layers' DMAs
are still in flight. A staged layer's device copy runs on the compute stream, right after that
wait. On the copy stream it was a kernel queued between two DMAs, which the next DMA waited
for, while the forward held the SMs it needed: on an H100 Llama-3.1-8B's 8k prefix with a
128-token suffix took 1.17x the longer of reload and forward that way
(results/offload-nvidia-h100-80gb-hbm3.jsonl; the cause is our reading, not yet measured).
The DMA into a slot now waits for the compute stream's placement of the slot's last layer, so
the DMAs run at most STAGE_SLOTS staged layers ahead. `whole()` is the same schedule with no
forward between the waits: the reload alone, and the serial way's reload.

The wait sits in the model's Python loop over layers, outside any compiled code: a forward
pre-hook on the model (outside the engine, which knows nothing of offloading) hands it a
block_fn that waits, then runs the layer as the forward would have (the Generator's compiled
layer function when the prefill is compiled, the layer itself when eager). `lookahead` layers'
DMAs are issued ahead of the layer being computed (None: as many as the staging slots allow;
every layer's at once, when the forward starts, where nothing is staged). The stream and event
operations go through a CopyStream (CUDA's, the CPU's synchronous one, or a test's fake clock).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from infermeter.engine.kv_cache import LayerKVCache
from infermeter.engine.model import Transformer
from infermeter.engine.recorded_forward import recording
from infermeter.errors import InfermeterError
from infermeter.offload.streams import (
    CURRENT,
    Copy,
    CopyStream,
    Trace,
    copy_piece,
    copy_stream_for,
    pinned_like,
    pins_for,
)

# staged layers whose K/V can be on the device at once: one placed while the next one lands
STAGE_SLOTS = 2


def layer_caches(model: Transformer) -> list[LayerKVCache]:
    caches = [layer.attention.kv_cache for layer in model.layers]
    if any(cache is None for cache in caches):
        raise InfermeterError("call setup_cache() before keeping a prefix's KV cache")
    return caches  # type: ignore[return-value]


@dataclass
class LayerKV:
    k: Tensor  # [B, H_kv, n, D] in host memory
    v: Tensor
    key_pos: Tensor | None  # [S_layer] int64, a ring layer's only (pinned on a GPU too)


def check_prefix_fits(model: Transformer, prefix_len: int) -> None:
    """One error line when a prefix is empty or longer than the model's cache."""
    if not 0 < prefix_len <= model.max_seq_len:
        raise InfermeterError(f"prefix of {prefix_len} tokens does not fit the KV cache of "
                              f"{model.max_seq_len} tokens")


class LayerCopies:
    """A prefix's KV in host memory that goes back one layer at a time, each layout its own
    way: `fetch_layer` its DMAs (into the cache, or into the layer's staging slot), then
    `place_layer` the staged slots into the cache; the serial reload and the layer-wise one
    (LayerwiseReload) share it. `slot_of`: per layer its staging slot, None where its copies
    go straight into the cache; the staged layers take the slots in turn."""

    layers: list[Any]
    slot_of: list[int | None]

    def reuses(self, index: int) -> int | None:
        """The layer that used layer `index`'s staging slot last (its placement must come
        before this layer's DMAs), None where there is none."""
        slot = self.slot_of[index]
        if slot is None:
            return None
        return next((i for i in range(index - 1, -1, -1) if self.slot_of[i] == slot), None)

    def fetch_layer(self, model: Transformer, index: int,
                    copies: CopyStream = CURRENT) -> None:
        raise NotImplementedError

    def place_layer(self, model: Transformer, index: int, copy: Copy = copy_piece) -> None:
        raise NotImplementedError

    def copy_layer(self, model: Transformer, index: int,
                   copies: CopyStream = CURRENT) -> None:
        """Layer `index` back, both steps on one stream, in order."""
        self.fetch_layer(model, index, copies)
        self.place_layer(model, index, copies.copy)

    def reload(self, model: Transformer, copies: CopyStream = CURRENT) -> None:
        """Every layer back, in order, on one stream (default: the current one)."""
        for index in range(len(self.layers)):
            self.copy_layer(model, index, copies)


class HostPrefix(LayerCopies):
    """The KV cache of the first `prefix_len` positions of `model`'s cache, copied to host, and
    `stage`: STAGE_SLOTS pairs of device buffers (K, V; flat, each the largest staged layer's
    size; slot j's at 2j and 2j + 1; none when the prefix fills every layer) that a layer the
    prefix does not fill comes back through."""

    def __init__(self, model: Transformer, prefix_len: int) -> None:
        caches = layer_caches(model)
        check_prefix_fits(model, prefix_len)
        self.prefix_len = prefix_len
        pin = pins_for(caches[0].k.device)
        self.layers: list[LayerKV] = []
        self.slot_of = []
        staged: list[int] = []  # the staged layers' K sizes, in order
        for cache in caches:
            n = min(prefix_len, cache.size)
            # [B, H_kv, n, D], contiguous: one DMA's source
            k, v = (pinned_like(t[:, :, :n], pin) for t in (cache.k, cache.v))
            key_pos = pinned_like(cache.key_pos, pin) if cache.is_ring else None
            self.layers.append(LayerKV(k, v, key_pos))
            if n < cache.size:  # the cache also holds the suffix: strided slots, staged
                self.slot_of.append(len(staged) % STAGE_SLOTS)
                staged.append(k.numel())
            else:
                self.slot_of.append(None)
        first = caches[0].k
        self.stage: tuple[Tensor, ...] = tuple(
            torch.empty(max(staged), dtype=first.dtype, device=first.device)
            for _ in range(2 * STAGE_SLOTS)) if staged else ()

    @property
    def nbytes(self) -> int:
        """Bytes one reload moves (K and V of every layer; key_pos is bookkeeping, not payload)."""
        return sum(layer.k.nbytes + layer.v.nbytes for layer in self.layers)

    def _staged(self, model: Transformer,
                index: int) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """Per K and V of layer `index`: (host [B, H_kv, n, D], the cache, its view of the
        layer's staging slot, or None where the prefix fills the layer)."""
        cache, layer, slot = layer_caches(model)[index], self.layers[index], self.slot_of[index]
        for i, (host, device) in enumerate(((layer.k, cache.k), (layer.v, cache.v))):
            if slot is None:  # every slot: the cache is one contiguous block
                yield host, device, None
                continue
            flat = self.stage[2 * slot + i]
            yield host, device, flat[:host.numel()].view(host.shape)

    def fetch_layer(self, model: Transformer, index: int,
                    copies: CopyStream = CURRENT) -> None:
        """Layer `index`'s DMAs on `copies` (default: the current stream, async from pinned
        memory): K and V straight into the cache where the prefix fills the layer, else into
        its staging slot; a ring layer's key_pos straight in."""
        for host, device, staged in self._staged(model, index):
            copies.copy(device if staged is None else staged, host)
        key_pos = self.layers[index].key_pos
        if key_pos is not None:
            copies.copy(layer_caches(model)[index].key_pos, key_pos)

    def place_layer(self, model: Transformer, index: int, copy: Copy = copy_piece) -> None:
        """Layer `index`'s staged K and V into the cache's first n slots (device to device,
        strided), after its fetch; nothing where the prefix fills the layer."""
        for host, device, staged in self._staged(model, index):
            if staged is not None:
                copy(device[:, :, :host.shape[2]], staged)


class LayerwiseReload:
    """Overlap the reload with the forward (a context manager):

        with LayerwiseReload(model, host) as reload:
            reload.start()        # issue the first copies (before the forward is launched)
            model(suffix, positions)

    `stream`: where the copies go (default: a side CUDA stream on a GPU, synchronous copies on
    the CPU; a test passes a fake clock's)."""

    def __init__(self, model: Transformer, host: Any, lookahead: int | None = None,
                 trace: Trace | None = None, stream: CopyStream | None = None) -> None:
        if lookahead is not None and lookahead < 1:
            raise InfermeterError(f"reload lookahead must be at least 1 layer, got {lookahead}")
        if model.add_norm is not None:  # its forward takes no block_fn
            raise InfermeterError("layer-wise reload: the model's adds are fused with its norms "
                                  "(tensor parallelism), no per-layer step to wait before")
        self.model, self.host = model, host
        self.n_layers = len(model.layers)
        self.lookahead = self.n_layers if lookahead is None else lookahead
        self.trace = trace
        self.stream = stream or copy_stream_for(model.tok_embeddings.weight.device)
        self.index = {id(layer): i for i, layer in enumerate(model.layers)}
        self.events: list[Any] = []  # per layer: its copies' token
        self.waited: list[bool] = []
        self.issued = 0  # layers whose DMAs are issued
        self.placed = 0  # layers placed into the cache (their staging slot free again)
        self.handles: list[Any] = []

    def __enter__(self) -> LayerwiseReload:
        self.handles.append(self.model.register_forward_pre_hook(self._wrap_layers,
                                                                 with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        # copies issued ahead that no layer waited for (a forward that raised, or stopped
        # early): the compute stream waits for them before the prefix or the cache can be freed
        self.stream.settle()

    def start(self) -> None:
        """A new reload: issue the first `lookahead` layers' copies. The copy stream first waits
        for the compute stream, so no copy overwrites a cache earlier work still reads."""
        self.events = [None] * self.n_layers
        self.waited = [False] * self.n_layers
        self.issued = self.placed = 0
        self.stream.follow_compute()
        self._issue_up_to(min(self.lookahead, self.n_layers))

    def _issue_up_to(self, end: int) -> None:
        """Issue the DMAs of layers up to `end`, in order, as far as the staging slots allow: a
        staged layer's slot is free once the layer that used it last has been placed."""
        while self.issued < end:
            index = self.issued
            last = self.host.reuses(index)
            if last is not None and last >= self.placed:
                break
            self.host.fetch_layer(self.model, index, self.stream)
            self.events[index] = self.stream.mark()
            if self.trace is not None:
                self.trace.append(("copy", index))
            self.issued += 1

    def before_layer(self, index: int) -> None:
        """Before layer `index` runs (once: a later chunk's forward need not wait again): make
        the compute stream wait for this layer's DMAs and place its staged K/V there; then
        issue ahead, the DMAs into the slot just placed after the placement."""
        if not self.events:
            raise InfermeterError("LayerwiseReload.start() was not called before the forward")
        if not self.waited[index]:
            if index >= self.issued:  # layers run in order, each issued by the one before
                raise InfermeterError(f"layer-wise reload: layer {index} ran before its copies "
                                      "were issued")
            self.stream.wait(self.events[index])
            self.host.place_layer(self.model, index)  # on the compute stream
            self.placed = max(self.placed, index + 1)
            self.waited[index] = True
            if self.trace is not None:
                self.trace.append(("wait", index))
            if self.host.slot_of[index] is not None:  # a DMA into its slot follows the placement
                self.stream.follow_compute()
        self._issue_up_to(min(index + 1 + self.lookahead, self.n_layers))

    def whole(self) -> None:
        """Every layer back with no forward between the waits: the same DMAs on the copy stream
        and placements on the compute stream, which ends waiting for the last layer's (the
        reload alone, and the serial way's reload)."""
        self.start()
        for index in range(self.n_layers):
            self.before_layer(index)

    def _wrap_layers(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The model's forward pre-hook: its block_fn (None: the eager layer call) wrapped so
        that the forward's loop waits before each layer, outside the compiled layer."""
        if torch.compiler.is_compiling() or recording():
            raise InfermeterError("layer-wise reload waits between layers: it cannot run inside "
                                  "a compiled forward or a recorded CUDA graph (bucketed "
                                  "prefill)")
        named = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        tokens, input_pos = named.pop("tokens"), named.pop("input_pos")
        inner = named.get("block_fn")

        def run_layer(layer: Any, h: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                      blocks: Any = None) -> Tensor:
            self.before_layer(self.index[id(layer)])
            if inner is not None:
                return inner(layer, h, cos, sin, positions, blocks)
            return layer(h, cos, sin, positions, blocks)

        return (tokens, input_pos), {**named, "block_fn": run_layer}
