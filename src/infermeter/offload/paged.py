"""A prefix's KV cache kept in host memory in fixed-size blocks, as a paged server keeps it, and
reloaded block by block into the engine's cache.

PagedHostPrefix holds, per layer, a K pool and a V pool [n_blocks, H_kv, block, D] in host
memory (pinned on a GPU), n_blocks = B x ceil(n / block) with n = min(P, the layer's slots).
Sequence b's i-th block sits at the pool slot a seeded block table gives (a random permutation,
so one sequence's blocks are scattered through the pool as in a running server, and no two
neighbours can be merged into one copy). A block keeps its tokens in the engine's own
[H_kv, tokens, D] order, the last, partly filled block's at the start of each head's row.
A reload copies each block head by head: the cache is [B, H_kv, S, D], so a block's slots
[b, h, start:end] are contiguous for one head only, and every copy lands in a contiguous
destination (a DMA, never a staging buffer and a copy kernel). The copies a reload issues
grow as 1 / block size.

It offers what reload.py's HostPrefix offers (prefix_len, nbytes, copy_layer, reload), so the
serial way and LayerwiseReload run over it unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from infermeter.engine.model import Transformer
from infermeter.errors import InfermeterError
from infermeter.offload.reload import Copy, copy_piece, layer_caches, pinned_like


@dataclass
class PagedLayer:
    k: Tensor  # [n_blocks, H_kv, block, D] in host memory
    v: Tensor
    blocks: list[tuple[int, int, int, int]]  # (sequence, first slot, end slot, pool slot)
    key_pos: Tensor | None  # [S_layer] int64, a ring layer's only (pinned on a GPU too)


class PagedHostPrefix:
    """The KV cache of the first `prefix_len` positions of `model`'s cache, copied to host in
    blocks of `block_size` tokens."""

    def __init__(self, model: Transformer, prefix_len: int, block_size: int,
                 seed: int = 0) -> None:
        caches = layer_caches(model)
        if block_size < 1:
            raise InfermeterError(f"--block-size must be at least 1 token, got {block_size}")
        if not 0 < prefix_len <= model.max_seq_len:
            raise InfermeterError(f"prefix of {prefix_len} tokens does not fit the KV cache of "
                                  f"{model.max_seq_len} tokens")
        self.prefix_len, self.block_size = prefix_len, block_size
        pin = caches[0].k.device.type == "cuda" and torch.cuda.is_available()
        rng = torch.Generator().manual_seed(seed)
        self.layers: list[PagedLayer] = []
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
            self.layers.append(PagedLayer(k, v, blocks, key_pos))

    @property
    def nbytes(self) -> int:
        """Bytes one reload moves: the tokens the blocks hold, not the unfilled tails."""
        return sum(2 * (end - start) * layer.k[0, :, 0].numel() * layer.k.element_size()
                   for layer in self.layers for _, start, end, _ in layer.blocks)

    @property
    def copies(self) -> int:
        """Copies one reload issues (a block of K or of V, one KV head each)."""
        return sum(2 * len(layer.blocks) * layer.k.shape[1] for layer in self.layers)

    def copy_layer(self, model: Transformer, index: int, copy: Copy = copy_piece) -> None:
        """Layer `index`'s blocks into the cache by `copy` (default: on the current stream,
        async from pinned memory), one copy per block and KV head of K and of V: [tokens, D],
        contiguous on both sides."""
        cache = layer_caches(model)[index]
        layer = self.layers[index]
        for b, start, end, slot in layer.blocks:
            for pool, device in ((layer.k, cache.k), (layer.v, cache.v)):
                for h in range(device.shape[1]):
                    copy(device[b, h, start:end], pool[slot, h, :end - start])
        if layer.key_pos is not None:
            copy(cache.key_pos, layer.key_pos)

    def reload(self, model: Transformer, copy: Copy = copy_piece) -> None:
        """Every layer back, in order, on the current stream: the serial way."""
        for index in range(len(self.layers)):
            self.copy_layer(model, index, copy)
