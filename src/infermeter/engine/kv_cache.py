"""One layer's static KV cache: allocated once, written in place, never resized.

Layout: K and V are each [B, n_kv_heads, S_layer, head_dim] in the cache dtype (heads before
tokens, as scaled_dot_product_attention wants them, so attention reads the cache without a copy).
These two tensors per layer are the whole cache: `Transformer.cache_tensors()` hands exactly them
to the copy benchmark, and their bytes equal `kvsize.kv_cache_bytes`.

S_layer is max_seq_len for a full-attention layer and min(max_seq_len, window) for a
sliding-window layer (kvsize caps windowed layers at the window, and the bytes must match). When
the window is shorter than max_seq_len the layer is a ring buffer: position p lives in slot
p % window.

The attention mask is derived from the absolute position each slot holds, `key_pos` (int64
[S_layer], -1 when empty), which makes full and ring layers one code path and keeps everything
tensor-only (no .item(), no host sync): key j is visible to query t when
    0 <= key_pos[j] <= pos[t]   and   pos[t] - key_pos[j] < window   (if windowed)
(a query sees `window` tokens including itself, as Mistral and transformers define it).
- A ring layer must remember what each slot holds: `key_pos` is written with the K/V (a buffer).
- A full layer's slot j holds position j, so `key_pos` is a constant arange, never written. This
  relies on a sequence filling positions 0, 1, 2, ... without gaps (prefill from 0, then one
  position per step; Generator does that): a stale slot after a reset-free re-run is always
  beyond the new position, hence masked. It saves one tiny kernel per layer per decode step
  (32 launches, ~40 us of a 5.6 ms Llama-2-7B step on an H100, in the committed trace).
It is bookkeeping, not cache payload, so it is not in `cache_tensors()`.

Positions must be < max_seq_len and increase within a call; the caller (generate.py) checks that,
because checking here would need a host sync every step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerKVCache(nn.Module):
    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 window: int | None, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.window = window
        self.size = max_seq_len if window is None else min(max_seq_len, window)
        # A ring buffer only when the window is shorter than the longest sequence.
        self.is_ring = window is not None and window < max_seq_len
        shape = (batch_size, n_kv_heads, self.size, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device),
                             persistent=False)
        # [S_layer] absolute position held by each slot (see the module docstring).
        key_pos = torch.full((self.size,), -1, dtype=torch.int64, device=device) if self.is_ring \
            else torch.arange(self.size, dtype=torch.int64, device=device)
        self.register_buffer("key_pos", key_pos, persistent=False)

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
        if self.is_ring:
            self.key_pos.fill_(-1)

    def _visible(self, key_pos: Tensor, query_pos: Tensor) -> Tensor:
        """Bool [T, S]: query t may attend to key s (causal, inside the window, not empty)."""
        q, k = query_pos[:, None], key_pos[None, :]
        mask = (k >= 0) & (k <= q)
        if self.window is not None:
            mask = mask & (q - k < self.window)
        return mask

    def _write(self, k: Tensor, v: Tensor, input_pos: Tensor) -> None:
        """Store k, v [B, H_kv, T, D] at their slots; a ring keeps only the last `size` tokens."""
        if k.shape[2] > self.size:  # static shapes: a Python branch on sizes, not on values
            self._write_last(k, v, input_pos)
            return
        slots = input_pos % self.size if self.is_ring else input_pos
        self.k.index_copy_(2, slots, k.to(self.k.dtype))
        self.v.index_copy_(2, slots, v.to(self.v.dtype))
        if self.is_ring:
            self.key_pos.index_copy_(0, slots, input_pos)

    def _write_last(self, k: Tensor, v: Tensor, input_pos: Tensor) -> None:
        """A chunk of T > size tokens into a ring: each slot s takes the chunk's latest position
        p_s = last - (last - s) % size, where last is the chunk's highest position, or keeps what
        it holds when p_s comes before the chunk. The chunk's positions are first, first + 1, ...
        and then, for a bucketed prefill's pads, copies of the one position after the prompt
        (prefill_buckets.py): p_s - first is then p_s's index in the chunk, and a pad's slot
        is the first decode step's own."""
        first, last = input_pos[0], input_pos.max()
        slots = torch.arange(self.size, dtype=input_pos.dtype, device=input_pos.device)
        held = last - torch.remainder(last - slots, self.size)  # [size] positions to hold
        index = held - first
        new = index >= 0  # [size]
        index = index.clamp(min=0)
        for cache, fresh in ((self.k, k), (self.v, v)):  # [B, H_kv, size, D]
            picked = fresh.index_select(2, index).to(cache.dtype)
            cache.copy_(torch.where(new[None, None, :, None], picked, cache))
        self.key_pos.copy_(torch.where(new, held, self.key_pos))

    def write_own(self, k: Tensor, v: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Write a forward's k, v [B, H_kv, T, D] and return them as the cache holds them (in its
        dtype, back in k's): what a forward that sees no earlier position attends over."""
        self._write(k, v, input_pos)
        return k.to(self.k.dtype).to(k.dtype), v.to(self.v.dtype).to(v.dtype)

    def write_full(self, k: Tensor, v: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, H_kv, T, D]; the whole cache as keys and values [B, H_kv, S, D] in
        k's dtype (update()'s for a full layer or one token; chunk_attention.py's flex chunks,
        which mask by slot themselves, take it alone)."""
        self._write(k, v, input_pos)
        return self.k.to(k.dtype), self.v.to(v.dtype)

    def update_from(self, k: Tensor, v: Tensor, input_pos: Tensor,
                    start: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """update() for a forward whose first position is `start` (a Python int): the same write,
        with keys/values [B, H_kv, start + T, D] and mask [T, start + T] cut to the slots before
        its end (a full layer's slot j holds position j: every later slot is masked for every
        query). None for a ring layer, or a forward that runs past the cache's last slot."""
        end = start + k.shape[2]
        if self.is_ring or end > self.size:
            return None
        self._write(k, v, input_pos)
        mask = self._visible(self.key_pos[:end], input_pos)
        return self.k[:, :, :end].to(k.dtype), self.v[:, :, :end].to(v.dtype), mask

    def written(self, input_pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """update()'s (keys, values, mask) for a one-token step whose k, v (and a ring's key_pos)
        a kernel wrote itself (kernels/fused_step.py's norm + wqkv + RoPE + cache write)."""
        return self.k.to(dtype), self.v.to(dtype), self._visible(self.key_pos, input_pos)

    def update(self, k: Tensor, v: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Write this step's k, v [B, H_kv, T, D]; return (keys, values, mask) to attend over.

        keys/values: [B, H_kv, S, D] in k's dtype; mask: bool [T, S].
        Full layers and decode (T == 1) write first and attend over the cache. A ring layer with a
        chunk of T > 1 tokens could overwrite slots that earlier queries of the same chunk still
        need, so it attends over cat(old cache, new k/v) and writes afterwards.
        """
        if not self.is_ring or k.shape[2] == 1:
            keys, values = self.write_full(k, v, input_pos)
            return keys, values, self._visible(self.key_pos, input_pos)
        # Old entries at or after this chunk's first position are stale (a re-run without reset).
        old_pos = torch.where(self.key_pos < input_pos[0], self.key_pos, -1)
        keys = torch.cat((self.k.to(k.dtype), k), dim=2)
        values = torch.cat((self.v.to(v.dtype), v), dim=2)
        mask = self._visible(torch.cat((old_pos, input_pos)), input_pos)
        self._write(k, v, input_pos)
        return keys, values, mask
