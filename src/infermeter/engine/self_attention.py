"""A decoder layer's attention module (Attention, an nn.Module): its projections, q/k norms,
RoPE and KV cache write, and which attention path each forward takes. The attention math it
calls is elsewhere: attention.py (the functional prefill and decode attention), attention_choice.py
("auto"'s rule) and chunk_attention.py (flex attention of a later prefill chunk).

Decisions:
- GQA/MQA without copying K/V: the G query heads that share a KV head are folded into the query
  length, q [B, H, T, D] -> [B, H_kv, G*T, D], so one SDPA call reads each cached KV head once
  (no repeat_interleave of the cache every decode step, no dependence on `enable_gqa`, works on
  torch 2.11 and 2.13 and with every SDPA backend that takes a mask). The price is a bool mask
  of [G*T, S] per layer: negligible for decode, G*T*S bytes for a T-token prefill (prefill
  very long prompts in chunks to bound it; chunked prefill is exact, see kv_cache.py). A
  prefill forward whose start its caller gives (prefill_from) needs less: from position 0 no
  mask at all (its own K/V, causal, enable_gqa: the flash kernel on CUDA), from a later start
  the mask and cache cut to its first start + T slots. A compiled chunk from a later start
  (one graph for every start) reads the whole cache: with a mask, or with chunk_attention.py's
  "flex" through flex_attention's tiles, which skip the slots after the chunk.
- Qwen3's q/k norms act on each head's features after the projections are split (so fused
  wqkv and tensor parallelism leave them alone: they are per head, replicated on every rank)
  and before RoPE, as transformers' Qwen3Attention does.
- Gemma 2 and 3: query_pre_attn_scalar is a rescale of q after RoPE, so every attention path
  (SDPA, math, flex, the Triton kernel) keeps its head_dim ** -0.5. Gemma 2 soft-caps attention
  logits (every path: the math products, flex's score_mod, the Triton kernel; prefill leaves
  SDPA for the math products, which can cap).
- A one-token step attends as its layer's `decode_attention` says (attention.py: "auto" by
  default: decode_kernel.py's Triton kernel in a compiled step where Triton runs, else "math").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infermeter.engine.attention import (
    DECODE_ATTENTION,
    causal_prefill_attention,
    decode_attention,
    flex_decode_attention,
    resolve_attention,
)
from infermeter.engine.chunk_attention import BlockLists, block_lists, chunk_flex_attention
from infermeter.engine.kv_cache import LayerKVCache
from infermeter.engine.linear import Linear
from infermeter.engine.norms import GemmaRMSNorm, RMSNorm, norm_class
from infermeter.engine.opaque_ops import compiling
from infermeter.engine.rope import apply_rope
from infermeter.errors import InfermeterError
from infermeter.specs.model import ModelSpec


# The Triton kernels run only inside a compiled step (compiling()), so their modules are
# imported there: importing one registers its torch.library ops, which pulls in dynamo and
# inductor (seconds), a cost an eager or sizing-only process never needs.
def decode_kernel_usable(q: Tensor) -> bool:
    from infermeter.engine.kernels.decode_attention import kernel_usable

    return kernel_usable(q)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        q_dim, kv_dim = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
        self.wq = Linear(spec.dim, q_dim, bias=spec.qkv_bias)
        self.wk = Linear(spec.dim, kv_dim, bias=spec.qkv_bias)
        self.wv = Linear(spec.dim, kv_dim, bias=spec.qkv_bias)
        self.wo = Linear(q_dim, spec.dim, bias=spec.o_bias)  # gpt-oss's has a bias
        # One weight per head feature, shared by all heads: RMSNorm over q's / k's head_dim.
        norm = norm_class(spec)
        self.q_norm = norm(spec.head_dim, spec.norm_eps) if spec.qk_norm else None
        self.k_norm = norm(spec.head_dim, spec.norm_eps) if spec.qk_norm else None
        # Every attention path scales scores by head_dim ** -0.5; where the model wants
        # query_pre_attn_scalar ** -0.5 (Gemma 3 27B: 168, not 128) q is rescaled to match.
        scalar = spec.query_pre_attn_scalar
        self.q_scale = None if scalar is None or scalar == spec.head_dim \
            else (spec.head_dim / scalar) ** 0.5
        self.window = spec.layer_window(layer)
        # Gemma 3: sliding-window layers take the local RoPE tables (Transformer.forward).
        self.local_rope = spec.rope_local_theta is not None and self.window is not None
        # Gemma 2's attention-logit soft cap: every path applies it to the scaled scores;
        # SDPA cannot, so a capped model never takes it (forward).
        self.softcap = spec.attn_logit_softcap
        # gpt-oss: one learned logit per query head [n_heads] that joins each softmax's
        # denominator (its value weight is zero). The math products, flex (through the lse)
        # and the Triton decode kernel take it; SDPA cannot (forward, _attend).
        self.sinks = nn.Parameter(torch.empty(spec.n_heads)) if spec.attn_sinks else None
        self.kv_cache: LayerKVCache | None = None
        self.wqkv: Linear | None = None  # fusion.py: [q + k + v rows, dim] once fused
        self.qkv_split: list[int] = []  # its row counts (this rank's, under tp)
        self.decode_attention = DECODE_ATTENTION
        # The first position of a multi-token forward when its caller knows it (prefill_from):
        # None attends over the whole cache with a mask, whatever the positions are.
        self.prefill_start: int | None = None

    def fuses_rope_and_cache(self, x: Tensor) -> bool:
        """Whether the fused step's wqkv kernel can also rope q and k and write the cache: fused
        wqkv (and bias), q/k norm weights (Qwen3's, Gemma 3's, normed in the kernel) and cache
        in x's dtype (ropes_in_wqkv), a batch-1 cache with unit feature stride."""
        cache = self.kv_cache
        return cache is not None and self.ropes_in_wqkv(x.dtype, cache.k.dtype) \
            and cache.k.shape[0] == 1 and cache.k.stride(-1) == 1

    def ropes_in_wqkv(self, dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
        """fuses_rope_and_cache's rule before a cache exists: activations in `dtype`, a batch-1
        cache of `cache_dtype` (Generator.prepare's, contiguous). The runner records it."""
        wqkv = self.wqkv
        return wqkv is not None and cache_dtype == dtype \
            and (wqkv.bias is None or wqkv.bias.dtype == dtype) and self._qk_norms_fuse(dtype)

    def qk_norms_apart(self) -> bool:
        """Whether the fused step's q/k norms, RoPE and cache write run in a kernel of their own
        after norm + wqkv (qk_norm_rope.QK_NORM_KERNELS 2; a layer with q/k norms and no wqkv
        bias), not in wqkv's, for a layer where fuses_rope_and_cache holds."""
        from infermeter.engine.kernels import qk_norm_rope

        return self.q_norm is not None and self.wqkv is not None and self.wqkv.bias is None \
            and qk_norm_rope.QK_NORM_KERNELS == 2

    def _qk_norms_fuse(self, dtype: torch.dtype) -> bool:
        """No q/k norms, or both of one kind and eps with weights in `dtype` and a power-of-two
        head_dim (the kernel's program is one head: a Triton block of head_dim rows)."""
        q_norm, k_norm = self.q_norm, self.k_norm
        if q_norm is None and k_norm is None:
            return True
        return q_norm is not None and k_norm is not None and type(q_norm) is type(k_norm) \
            and q_norm.eps == k_norm.eps and q_norm.weight.dtype == k_norm.weight.dtype == dtype \
            and self.head_dim & (self.head_dim - 1) == 0

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor,
                norm: RMSNorm | None = None, residual: Tensor | None = None,
                blocks: BlockLists | None = None,
                ahead: tuple[Tensor | None, ...] = (None, None)) -> Tensor:
        """x [B, T, dim]; cos/sin [T, head_dim/2] at input_pos; returns [B, T, dim].
        The fused batch-1 step (TransformerBlock.forward) passes x un-normed with its norm and
        the residual: the norm runs in wqkv's kernel, the add in wo's (fused_step.py); ahead:
        the weights those two kernels prefetch (kernels/prefetch.py).
        blocks: a later prefill chunk's tile lists (chunk_attention.py), for flex attention
        over a full layer's cache."""
        if self.kv_cache is None:
            raise InfermeterError("call setup_cache() before running the model")
        bsz, seqlen, _ = x.shape
        if norm is not None and self.fuses_rope_and_cache(x):
            # one kernel: the norm, wqkv, the q/k norms (if any), RoPE on q and k, k and v into
            # the cache at input_pos; or, with q/k norms, two (qk_norm_rope.QK_NORM_KERNELS)
            from infermeter.engine.kernels import fused_step, qk_norm_rope

            cache, q_norm, k_norm = self.kv_cache, self.q_norm, self.k_norm
            if self.qk_norms_apart():
                qkv = fused_step.norm_matvec(x.reshape(1, -1), norm.weight, self.wqkv.weight,
                                             norm.eps, isinstance(norm, GemmaRMSNorm), ahead[0])
                q = qk_norm_rope.qk_norm_rope_cache(
                    qkv, cos, sin, input_pos, cache.k, cache.v, cache.key_pos, q_norm.weight,
                    k_norm.weight, self.qkv_split[0], cache.is_ring, q_norm.eps,
                    isinstance(q_norm, GemmaRMSNorm))
            else:
                q = fused_step.norm_qkv_rope_cache(
                    x.reshape(1, -1), norm.weight, self.wqkv.weight, self.wqkv.bias, cos, sin,
                    input_pos, cache.k, cache.v, cache.key_pos, self.qkv_split[0], norm.eps,
                    isinstance(norm, GemmaRMSNorm), cache.is_ring,
                    None if q_norm is None else q_norm.weight,
                    None if k_norm is None else k_norm.weight,
                    0.0 if q_norm is None else q_norm.eps, isinstance(q_norm, GemmaRMSNorm),
                    ahead[0])
            if self.q_scale is not None:
                q = q * self.q_scale
            q = q.view(bsz, self.n_heads, seqlen, self.head_dim)  # [1, H, 1, D]
            return self._attend(q, *cache.written(input_pos, q.dtype), input_pos, residual,
                                ahead[1], fused_step=True)
        if norm is not None and self.wqkv is not None:
            from infermeter.engine.kernels.fused_step import norm_matvec

            qkv = norm_matvec(x.reshape(1, -1), norm.weight, self.wqkv.weight, norm.eps,
                              isinstance(norm, GemmaRMSNorm)).view(bsz, seqlen, -1)
            if self.wqkv.bias is not None:  # Qwen2's: added after the rounding, as Linear does
                qkv = qkv + self.wqkv.bias
            q, k, v = qkv.split(self.qkv_split, dim=-1)
        elif self.wqkv is not None:
            q, k, v = self.wqkv(x).split(self.qkv_split, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(bsz, seqlen, self.n_heads, self.head_dim)
        k = k.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over head_dim, per head and token
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.q_scale is not None:
            q = q * self.q_scale
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, D]
        # A decode step never reads prefill_start (no guard on it in the compiled step).
        start = self.prefill_start if seqlen > 1 else None
        cache = self.kv_cache
        if start == 0 and self.softcap is None and self.sinks is None \
                and (cache.window is None or seqlen <= cache.window):
            # From position 0 (pads, if any, all after the prompt): its own K/V, causal, no
            # mask, so the flash kernel on CUDA; within a window no query reaches its edge.
            out = causal_prefill_attention(q, *cache.write_own(k, v, input_pos))  # [B,H,T,D]
            return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))
        # From a known start: the cache's first start + T slots and a [T, start + T] mask, the
        # causal diagonal at the lower right (SDPA's is_causal aligns it upper left); the fold
        # below keeps heads equal, so a mask reaches CUDA's memory-efficient kernel (flash
        # takes none). Else (ring layers, start unknown) the whole cache: [B, H_kv, S, D], [T, S].
        if blocks is not None and start is None and seqlen > 1 and not cache.is_ring:
            # a later compiled chunk: flex attention skips the tiles no query sees
            out = chunk_flex_attention(q, *cache.write_full(k, v, input_pos), blocks,
                                       self.softcap, self.sinks)  # [B, H, T, D]
            return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))
        if self.sinks is not None and start is not None and seqlen > 1 \
                and cache.window is None and start + seqlen <= cache.size:
            # gpt-oss's full layers: flex with the lse-based sink factor instead of the math
            # products' [B, H_kv, G*T, S] float32 scores. From 0 its own K/V, causal (pads sit
            # after the prompt: by index they see only the prompt and pads before them); from
            # a later start the cache's first start + T slots, slot j visible to query i when
            # j <= start + i, as update_from's mask says.
            if start == 0:
                keys, values = cache.write_own(k, v, input_pos)
            else:
                keys, values, _ = cache.update_from(k, v, input_pos, start)
            lists = block_lists(start, seqlen, keys.shape[2], q.device)
            out = chunk_flex_attention(q, keys, values, lists, self.softcap, self.sinks)
            return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))
        span = cache.update_from(k, v, input_pos, start) if start is not None else None
        keys, values, mask = span or cache.update(k, v, input_pos)
        # the fused step's kernels around it where it was handed a norm or a residual
        return self._attend(q, keys, values, mask, input_pos, residual, ahead[1],
                            fused_step=norm is not None or residual is not None)

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, mask: Tensor,
                input_pos: Tensor, residual: Tensor | None,
                ahead: Tensor | None = None, fused_step: bool = False) -> Tensor:
        """q [B, H, T, D] over keys/values [B, H_kv, S, D] with mask [T, S], then wo (and the
        fused step's residual add, its kernel prefetching `ahead`) -> [B, T, dim].
        fused_step: the step around it is the fused one (the split-KV kernel's EARLY_BLOCK
        "auto" reads it)."""
        bsz, _, seqlen, _ = q.shape
        # Fold the G query heads of each KV head into the query length: [B, H_kv, G*T, D].
        groups = self.n_heads // self.n_kv_heads
        q = q.reshape(bsz, self.n_kv_heads, groups * seqlen, self.head_dim)
        mask = mask.repeat(groups, 1)  # row g*T + t is query t's row
        kind = resolve_attention(self.decode_attention, bsz)  # "auto" picks by batch size
        # gpt-oss's sinks, one per query head, as the folded rows' [H_kv, G*T]
        sinks = None if self.sinks is None else self.sinks.view(
            self.n_kv_heads, groups, 1).expand(-1, -1, seqlen).reshape(self.n_kv_heads, -1)
        if seqlen == 1 and kind == "flex" and compiling():
            out = flex_decode_attention(q, keys, values, self.kv_cache.key_pos, input_pos,
                                        self.kv_cache.window, self.softcap, sinks)
        elif seqlen == 1 and kind == "triton" and compiling() and decode_kernel_usable(q):
            from infermeter.engine.kernels.decode_attention import (
                decode_attention_kernel,
                split_count,
            )

            cache = self.kv_cache
            splits = split_count(bsz * self.n_kv_heads, cache.size, q.device)
            out = decode_attention_kernel(q, keys, values, cache.key_pos, input_pos,
                                          cache.window or 0, cache.is_ring, splits,
                                          self.softcap or 0.0, self.sinks, fused_step=fused_step)
        elif seqlen == 1 and kind in ("math", "flex", "triton") or self.softcap is not None \
                or sinks is not None:
            # a capped or sink model's prefill and "sdpa" steps too (SDPA can do neither):
            # [B, H_kv, G*T, S] float32 scores
            out = decode_attention(q, keys, values, mask, self.softcap, sinks)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.reshape(bsz, self.n_heads, seqlen, self.head_dim).transpose(1, 2)
        out = out.reshape(bsz, seqlen, self.n_heads * self.head_dim)
        if residual is not None:  # the fused step: residual + wo(out) in one kernel
            from infermeter.engine.kernels.fused_step import matvec_add

            return matvec_add(out.reshape(1, -1), self.wo.weight,
                              residual.reshape(1, -1), ahead).view_as(residual)
        return self.wo(out)
