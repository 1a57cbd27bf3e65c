"""How a one-token decode step attends over the static cache: the choices Attention offers.

Attention.forward (self_attention.py) picks one per layer from its `decode_attention`
attribute ("auto" resolved by batch size, resolve_attention); "flex" and "triton" only while
torch.compile traces the step (outside it, flex_attention is a slow reference and the Triton
kernel may have no device to run on), falling back to "math".
Prefill (more than one token) uses scaled_dot_product_attention, except in a model that
soft-caps its attention logits (Gemma 2), which SDPA cannot do: there prefill, and a decode step
asked for "sdpa", run decode_attention's matrix products (it takes any query length). A prefill
forward from position 0 attends to its own K/V, causal with no mask (causal_prefill_attention:
the flash kernel on CUDA); one from a known later start over the cache's first start + T slots
with a mask (Attention.forward says when each applies).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import flex_attention as flex_module
from torch.nn.attention.flex_attention import flex_attention

from infermeter.engine.attention_choice import AUTO_TRITON_MIN_BATCH, resolve_attention
from infermeter.engine.opaque_ops import compiling

__all__ = ["AUTO_TRITON_MIN_BATCH", "resolve_attention"]  # re-exported: self_attention.py, tests

# The default, "auto": the compiled step of a batch of AUTO_TRITON_MIN_BATCH or more sequences
# (now any batch) attends with "triton" (decode_kernel.py's split-KV kernel) where Triton runs,
# every other step (eager, or no Triton) with "math" (decode_attention below); "sdpa" and "flex"
# (flex_decode_attention below) are the measured alternatives.
# SDPA with a mask dispatches to cuDNN on an H100, one thread block per head: 32 blocks for
# Llama-2-7B's 32 heads on 132 SMs, ~10 us per layer for a 512-token cache. Written as two
# matrix products, inductor turns each into a reduction spread over heads x cache positions
# (4 kernels, ~12.7 us a layer in the committed H100 trace, the PV product fused into wo).
# The Triton kernel is one launch + a combine and stops at the current position, so it never
# reads the unused cache slots; beside the GEMV it is faster from batch 1 up on the GPUs
# measured, so "auto" picks it wherever it runs (AUTO_TRITON_MIN_BATCH). The figures, by date
# and device: docs/engine.md, "Kernels".
DECODE_ATTENTION = "auto"
ATTENTION_KINDS = ("auto", "math", "sdpa", "flex", "triton")


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor,
                     softcap: float | None = None, sinks: Tensor | None = None) -> Tensor:
    """Attention as Meta's reference computes it: q [B, H_kv, G, D] (G query heads per KV head,
    one token; or G*T rows of a T-token prefill), keys/values [B, H_kv, S, D], mask bool [G, S]
    -> [B, H_kv, G, D]. softcap: scores become softcap * tanh(scores / softcap) before the mask
    (Gemma 2), in float32. sinks [H_kv, G]: a logit per row that joins the softmax's
    denominator and is then dropped (gpt-oss, as transformers' eager attention: softmax over
    [scores, sink], the sink's column cut off)."""
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # [B,Hkv,G,S]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        return torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)
    sink = sinks.float()[..., None].expand(*scores.shape[:-1], 1)  # [B, H_kv, G, 1]
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs.to(values.dtype), values)


def causal_prefill_attention(q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """A forward that sees no earlier position (its prompt starts at 0) attending to its own
    tokens: q [B, H, T, D], keys/values [B, H_kv, T, D] -> [B, H, T, D]. is_causal and no mask,
    so SDPA takes its flash kernel on CUDA (fp16/bf16; flash takes no mask), which reads K/V in
    tiles and never holds a [T, T] score matrix; enable_gqa lets query head h read KV head
    h // (H / H_kv), as the folded path does, without copying K/V (flash accepts it, the
    memory-efficient kernel does not)."""
    return F.scaled_dot_product_attention(q, keys, values, is_causal=True,
                                          enable_gqa=q.shape[1] != keys.shape[1])


@functools.cache
def _compiled_flex() -> Any:
    """flex_attention compiled once a process, with dynamic shapes (prompt lengths vary)."""
    return torch.compile(flex_attention, dynamic=True)


def sink_flex_attention(q: Tensor, keys: Tensor, values: Tensor, sinks: Tensor | None,
                        score_mod=None, block_mask=None, enable_gqa: bool = False,
                        kernel_options: dict | None = None) -> Tensor:
    """flex_attention(q [B, H, L, D], keys/values [B, H_kv, S, D]) -> [B, H, L, D], with
    gpt-oss's sinks when given (a logit per row, broadcast against [B, H, L]: [H, 1] per query
    head, or [H_kv, G] for the folded decode): softmax over [scores, sink] without the sink's
    column is the sinkless output times sigmoid(lse - sink), lse the row's natural-log
    log-sum-exp of its scaled, masked scores (flex returns it in base e), computed in float32.
    A row that sees nothing (lse = -inf) gives 0, as the math path does.
    Inside torch.compile flex is one fused kernel; on CUDA outside it, this compiles flex on
    its own (flex's eager form is a reference that holds every score); elsewhere (the CPU
    tests) it runs that reference."""
    attend = _compiled_flex() if q.device.type == "cuda" and not compiling() else flex_attention
    if sinks is None:
        return attend(q, keys, values, score_mod=score_mod, block_mask=block_mask,
                      enable_gqa=enable_gqa, kernel_options=kernel_options)
    # torch 2.11 and 2.13 both take return_aux (return_lse warns as deprecated); an older
    # torch has only return_lse
    aux_request = getattr(flex_module, "AuxRequest", None)
    if aux_request is not None:
        out, aux = attend(q, keys, values, score_mod=score_mod, block_mask=block_mask,
                          enable_gqa=enable_gqa, return_aux=aux_request(lse=True),
                          kernel_options=kernel_options)
        lse = aux.lse
    else:
        out, lse = attend(q, keys, values, score_mod=score_mod, block_mask=block_mask,
                          enable_gqa=enable_gqa, return_lse=True,
                          kernel_options=kernel_options)
    keep = torch.sigmoid(lse.float() - sinks.float())  # [B, H, L]: 1 - the sink's weight
    return (out.float() * keep[..., None]).to(q.dtype)


def flex_decode_attention(q: Tensor, keys: Tensor, values: Tensor, key_pos: Tensor,
                          query_pos: Tensor, window: int | None,
                          softcap: float | None = None, sinks: Tensor | None = None) -> Tensor:
    """The same attention as decode_attention, as one flex_attention call.

    q [B, H_kv, G, D], keys/values [B, H_kv, S, D], key_pos int64 [S] (the absolute position
    each cache slot holds, -1 when empty), query_pos int64 [1] -> [B, H_kv, G, D].
    Compiled, inductor emits its split-KV decoding kernel (the cache read spread over
    heads x blocks of positions, one kernel plus a small combine) with the mask computed inside
    it from key_pos; outside torch.compile flex_attention is a slow reference, so the model
    uses this only while compiling (Attention.forward).
    """
    pos = query_pos[0]

    def visible(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        held = key_pos[kv_idx]  # the same rule as LayerKVCache._visible
        seen = (held >= 0) & (held <= pos)
        if window is not None:
            seen = seen & (pos - held < window)
        if softcap is not None:  # score is already scaled by head_dim ** -0.5
            score = torch.tanh(score / softcap) * softcap
        return torch.where(seen, score, float("-inf"))

    return sink_flex_attention(q, keys, values, sinks, score_mod=visible)
