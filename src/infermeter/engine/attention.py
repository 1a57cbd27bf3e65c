"""How a one-token decode step attends over the static cache: the choices Attention offers.

Attention.forward (model.py) picks one per layer from its `decode_attention` attribute ("auto"
resolved by batch size, resolve_attention); "flex" and "triton" only while torch.compile traces
the step (outside it, flex_attention is a slow reference and the Triton kernel may have no
device to run on), falling back to "math".
Prefill (more than one token) always uses scaled_dot_product_attention.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import flex_attention

from infermeter.engine.attention_choice import AUTO_TRITON_MIN_BATCH, resolve_attention

__all__ = ["AUTO_TRITON_MIN_BATCH", "resolve_attention"]  # re-exported: model.py, the tests

# The default, "auto": the compiled step of a batch of AUTO_TRITON_MIN_BATCH or more sequences
# (now any batch) attends with "triton" (decode_kernel.py's split-KV kernel) where Triton runs,
# every other step (eager, or no Triton) with "math" (decode_attention below); "sdpa" and "flex"
# (flex_decode_attention below) are the measured alternatives.
# SDPA with a mask dispatches to cuDNN on an H100, one thread block per head: 32 blocks for
# Llama-2-7B's 32 heads on 132 SMs, ~10 us per layer for a 512-token cache. Written as two
# matrix products, inductor turns each into a reduction spread over heads x cache positions
# (4 kernels, ~12.7 us a layer in the committed H100 trace, the PV product fused into wo).
# The Triton kernel is one launch + a combine and stops at the current position: on one H100
# (results/generate-nvidia-h100-80gb-hbm3.jsonl, parts seed and kernel, one run) batch 32 with
# 432 new tokens in a 512-token cache took 7.67 ms a step against math's 9.21. At batch 1 it
# lost in 4 of 5 same-machine pairs (results/attention-ab-*.jsonl, decode-tuning-triton-*.json,
# the sweep): 7B fp16 5.74 vs 5.62 ms (won 5.44 vs 5.46 in another run); bf16 7B 5.58 vs
# 5.47, 13B 10.74 vs 10.17, 13B at tp 2 7.28 vs 6.63 ms: a fixed ~0.1-0.6 ms a step (launch +
# combine) that saving the unread slots repays only with many sequences (math's extra reads
# grow ~0.04 ms a step per sequence there). Batch 4 already gains (7B bf16, one H100, session 5:
# 6.20 vs 6.52 ms, attention-ab-*.jsonl), so attention_choice.AUTO_TRITON_MIN_BATCH was 4.
# Session 6 made the kernel's combine a Triton kernel too (it had been torch code, which inductor
# could inline into wo's matrix-vector reduction) and the GEMV the default, whose opaque wo left
# the math attention's PV product in its own kernel (~20 us a layer): batch 1, one H100, one run
# (decode-tuning-combine-*.json): 7B fp16 5.13 ms with the kernel vs 5.42 with math, both on
# the GEMV; so AUTO_TRITON_MIN_BATCH is 1. With inductor's reductions (--matvec-kernel
# inductor) the new combine is not measured at batch 1.
DECODE_ATTENTION = "auto"
ATTENTION_KINDS = ("auto", "math", "sdpa", "flex", "triton")


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Attention as Meta's reference computes it: q [B, H_kv, G, D] (G query heads per KV head,
    one token), keys/values [B, H_kv, S, D], mask bool [G, S] -> [B, H_kv, G, D]."""
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # [B,Hkv,G,S]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)


def flex_decode_attention(q: Tensor, keys: Tensor, values: Tensor, key_pos: Tensor,
                          query_pos: Tensor, window: int | None) -> Tensor:
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
        return torch.where(seen, score, float("-inf"))

    return flex_attention(q, keys, values, score_mod=visible)
