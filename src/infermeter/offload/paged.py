"""A prefix's KV cache kept in host memory in fixed-size blocks, as a paged server keeps it, and
reloaded block by block into the engine's cache.

PagedHostPrefix holds, per layer, a K pool and a V pool [n_blocks, H_kv, block, D] in host
memory (pinned on a GPU), n_blocks = B x ceil(n / block) with n = min(P, the layer's slots).
Sequence b's i-th block sits at the pool slot a seeded block table gives (a random permutation,
so one sequence's blocks are scattered through the pool as in a running server, and no two
neighbours can be merged into one copy). A block keeps its tokens in the engine's own
[H_kv, tokens, D] order, the last, partly filled block's at the start of each head's row.
A reload copies each block whole, K and V of every KV head in one DMA ([H_kv, block, D],
contiguous in the pool), into a device staging buffer [B, blocks, H_kv, block, D] in the
sequence's order, then moves the layer's slots into the cache [B, H_kv, S, D] with two
device-to-device copies (the whole blocks through a view, then the last, partly filled one):
the device's layout differs from a page's, as it would in any engine whose cache is not paged
the same way. The DMAs a reload issues grow as 1 / block size; the staging holds STAGE_SLOTS
layers, used in turn (`fetch_layer` the DMAs into slot index % STAGE_SLOTS: every layer is
staged; `place_layer` the device copies out of it, as reload.py's HostPrefix). A partly filled
last block moves whole, as a paged server moves it; nbytes counts the prefix's tokens only.

It offers what reload.py's HostPrefix offers (prefix_len, nbytes, fetch_layer, place_layer,
reload, slot_of), so the serial way and LayerwiseReload run over it unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from infermeter.engine.model import Transformer
from infermeter.errors import InfermeterError
from infermeter.offload.reload import STAGE_SLOTS, LayerCopies, check_prefix_fits, layer_caches
from infermeter.offload.streams import (
    CURRENT,
    Copy,
    CopyStream,
    copy_piece,
    pinned_like,
    pins_for,
)


@dataclass
class PagedLayer:
    k: Tensor  # [n_blocks, H_kv, block, D] in host memory
    v: Tensor
    blocks: list[tuple[int, int, int, int]]  # (sequence, first slot, end slot, pool slot)
    key_pos: Tensor | None  # [S_layer] int64, a ring layer's only (pinned on a GPU too)
    slots: int  # n: the layer's slots the prefix fills
    # its DMAs, made once: (staging views, pool blocks), each [H_kv, block, D], K's then V's
    pieces: tuple[list[Tensor], list[Tensor]]


class PagedHostPrefix(LayerCopies):
    """The KV cache of the first `prefix_len` positions of `model`'s cache, copied to host in
    blocks of `block_size` tokens."""

    def __init__(self, model: Transformer, prefix_len: int, block_size: int,
                 seed: int = 0) -> None:
        caches = layer_caches(model)
        if block_size < 1:
            raise InfermeterError(f"--block-size must be at least 1 token, got {block_size}")
        check_prefix_fits(model, prefix_len)
        self.prefix_len, self.block_size = prefix_len, block_size
        pin = pins_for(caches[0].k.device)
        rng = torch.Generator().manual_seed(seed)
        self.layers: list[PagedLayer] = []
        first = caches[0].k
        most = max(math.ceil(min(prefix_len, cache.size) / block_size) for cache in caches)
        # [B, blocks, H_kv, block, D] on the device, K and V: one layer's blocks in order
        stage = (first.shape[0], most, first.shape[1], block_size, first.shape[3])
        # slot j's K and V at 2j and 2j + 1
        self.stage = tuple(torch.empty(stage, dtype=first.dtype, device=first.device)
                           for _ in range(2 * STAGE_SLOTS))
        self.slot_of: list[int | None] = [i % STAGE_SLOTS for i in range(len(caches))]
        for cache in caches:
            batch, heads, _, dim = cache.k.shape
            n = min(prefix_len, cache.size)
            per_seq = math.ceil(n / block_size)
            table = torch.randperm(batch * per_seq, generator=rng).view(batch, per_seq).tolist()
            shape = (batch * per_seq, heads, block_size, dim)
            k, v = (torch.empty(shape, dtype=cache.k.dtype, pin_memory=pin) for _ in range(2))
            blocks = [(b, i * block_size, min(n, (i + 1) * block_size), table[b][i])
                      for b in range(batch) for i in range(per_seq)]
            for b, start, end, slot in blocks:
                k[slot, :, :end - start].copy_(cache.k[b, :, start:end])
                v[slot, :, :end - start].copy_(cache.v[b, :, start:end])
            key_pos = pinned_like(cache.key_pos, pin) if cache.is_ring else None
            pieces: tuple[list[Tensor], list[Tensor]] = ([], [])
            for pool, staging in zip((k, v), self._staging(len(self.layers))):
                for b, start, _, at in blocks:
                    pieces[0].append(staging[b, start // block_size])
                    pieces[1].append(pool[at])
            self.layers.append(PagedLayer(k, v, blocks, key_pos, n, pieces))

    @property
    def nbytes(self) -> int:
        """Bytes one reload moves: the tokens the blocks hold, not the unfilled tails."""
        return sum(2 * (end - start) * layer.k[0, :, 0].numel() * layer.k.element_size()
                   for layer in self.layers for _, start, end, _ in layer.blocks)

    @property
    def copies(self) -> int:
        """Host-to-device copies one reload issues (a block of K or of V, every KV head)."""
        return sum(2 * len(layer.blocks) for layer in self.layers)

    def _pools(self, model: Transformer, index: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Layer `index`'s (host pool, cache, staging slot) for K, then for V."""
        cache, layer = layer_caches(model)[index], self.layers[index]
        k_stage, v_stage = self._staging(index)
        return [(layer.k, cache.k, k_stage), (layer.v, cache.v, v_stage)]

    def _staging(self, index: int) -> tuple[Tensor, Tensor]:
        """Layer `index`'s staging slot: its K and V buffers [B, blocks, H_kv, block, D]."""
        first = 2 * self.slot_of[index]
        return self.stage[first], self.stage[first + 1]

    def fetch_layer(self, model: Transformer, index: int,
                    copies: CopyStream = CURRENT) -> None:
        """Layer `index`'s DMAs on `copies` (default: the current stream, async from pinned
        memory), issued from one call: each block of K and of V into its staging slot,
        contiguous on both sides; a ring layer's key_pos straight into the cache."""
        layer = self.layers[index]
        copies.copy_all(*layer.pieces)
        if layer.key_pos is not None:
            copies.copy(layer_caches(model)[index].key_pos, layer.key_pos)

    def place_layer(self, model: Transformer, index: int, copy: Copy = copy_piece) -> None:
        """Layer `index`'s staged slots into the cache (device to device), after its fetch."""
        block, n = self.block_size, self.layers[index].slots
        whole = n // block  # full blocks; a partly filled one after them when n % block
        for _, device, stage in self._pools(model, index):
            if whole:  # [B, H_kv, whole * block, D] seen as [B, whole, H_kv, block, D]
                slots = device[:, :, :whole * block].unflatten(2, (whole, block))
                copy(slots.transpose(1, 2), stage[:, :whole])
            if n > whole * block:  # [B, H_kv, n % block, D]
                copy(device[:, :, whole * block:n], stage[:, whole, :, :n - whole * block])
