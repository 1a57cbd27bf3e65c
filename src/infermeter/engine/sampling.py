"""Token sampling on the device: greedy, temperature and top-p, with no host sync.

Randomness comes from a counter-based hash, not from a torch RNG state: the uniform number for
(seed, position, batch row, token id) is a pure function of those four integers. So

- no generator object or global RNG state enters the compiled graph (torch.compile with
  fullgraph=True and CUDA graphs both take it as plain integer tensor math);
- the eager and the compiled path draw the *same* numbers, so they sample the same tokens, and a
  run is reproducible across devices, batch sizes (row b always gets row b's stream) and restarts;
- changing the seed or the position changes tensor values, not shapes: no recompile.

A token is drawn with the exponential-race form of the Gumbel-max trick: with E_i ~ Exp(1)
independent, argmax_i p_i / E_i is distributed as p. That is one argmax: no torch.multinomial,
no cumulative search, no .item().
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_MASK32 = 0xFFFFFFFF
# How argmax_rows reduces a row: 0, torch.argmax as it is (the default until 2026-12-06); N > 1,
# in N parts, each read by a program of its own, then over the parts' maxima (the default, 64).
# Why: in the compiled step inductor reduces a row of logits in one program, a serial walk over
# the vocabulary: about 9 us a step at SmolLM2-135M's 49,152 logits and 22 us at Qwen2.5-0.5B's
# 151,936 on an H100, where the bytes take well under a microsecond. In parts, the fused
# recorded step took 0.994x its time at 135M and 0.967x at 0.5B on an H100 (docs/engine.md,
# "One replay a step"). Read when a step is traced; the A/B is benchmarks/step_kernels_ab.py
# --argmax-parts.
DEFAULT_ARGMAX_PARTS = 64
ARGMAX_PARTS = DEFAULT_ARGMAX_PARTS


def argmax_rows(x: Tensor) -> Tensor:
    """torch.argmax(x, dim=-1) for x [B, V] (int64 [B]), the same index whatever ARGMAX_PARTS
    says: the first of equal maxima, a NaN counting as the largest (the first NaN). In parts,
    each part's max and its first index (torch.max over a dim returns the first), then the
    first part holding the largest; padding past V is -inf, never picked over a real value
    (an all -inf row gives 0, as torch.argmax does)."""
    parts = ARGMAX_PARTS
    if parts <= 1:
        return torch.argmax(x, dim=-1)
    rows, vocab = x.shape
    size = -(-vocab // parts)
    padded = F.pad(x, (0, parts * size - vocab), value=float("-inf"))
    top, where = padded.view(rows, parts, size).max(dim=-1)  # [B, parts] each
    best = torch.argmax(top, dim=-1, keepdim=True)  # [B, 1]
    return (best * size + where.gather(-1, best)).squeeze(-1)


def _hash32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer mix (Wellons' lowbias32 family), on int64 tensors.

    Values stay in [0, 2^32) and both multipliers are < 2^31, so every product is < 2^63: no
    signed int64 overflow on any backend (CPU, CUDA, inductor-generated code).
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def uniform_noise(seed: Tensor, pos: Tensor, token_ids: Tensor, batch_size: int) -> Tensor:
    """Uniform numbers in (0, 1), float32 [B, K], one per (row, token id).

    seed: int64 [] or [1]; pos: int64 [] or [1] (the position of the token being drawn);
    token_ids: int64 [K] or [B, K] (the vocabulary ids the numbers belong to).
    """
    rows = torch.arange(batch_size, device=token_ids.device, dtype=torch.int64)
    key = _hash32(_hash32(_hash32(seed.reshape(1)) ^ pos.reshape(1)) ^ rows)  # [B]
    bits = _hash32(key[:, None] ^ token_ids)  # [B, K]
    # 24 random bits -> an exact float32 in (0, 1); never 0, so -log() below stays finite.
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample(logits: Tensor, *, greedy: bool, temperature: float, top_p: float, seed: Tensor,
           pos: Tensor) -> Tensor:
    """Next token ids, int64 [B], from logits [B, V] (any float dtype).

    greedy: argmax (temperature and top_p ignored). Otherwise softmax(logits / temperature),
    restricted to the smallest set of most likely tokens whose mass reaches top_p (top_p >= 1:
    the whole vocabulary), then one exponential-race draw keyed by (seed, pos, row, token id).
    Sampling is done in vocabulary order (no gather back from sorted order), so the noise for
    a token does not depend on how ties were sorted.
    `greedy`, `temperature` and `top_p` are Python values: under torch.compile they are constants
    of the graph, so the branches below cost nothing at run time.
    """
    if greedy:
        return argmax_rows(logits)
    batch_size, vocab = logits.shape
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V] float32
    if top_p < 1.0:
        probs = probs.masked_fill(probs < _top_p_threshold(probs, top_p), 0.0)
    token_ids = torch.arange(vocab, device=logits.device, dtype=torch.int64)  # [V]
    exp_noise = -torch.log(uniform_noise(seed, pos, token_ids, batch_size))  # Exp(1) [B, V]
    return argmax_rows(probs / exp_noise)


def _top_p_threshold(probs: Tensor, top_p: float) -> Tensor:
    """The smallest probability inside the nucleus, [B, 1], for probs [B, V].

    The nucleus is the smallest set of most likely tokens whose mass reaches top_p: in
    descending order, every token up to and including the first one where the cumulative mass
    reaches top_p (so the most likely token is always in). Tokens tied with the threshold are all
    kept. The cumulative sum is read only by searchsorted, with a per-row target tensor; two
    other forms break inductor on torch 2.11 CUDA: a reduction over the cumsum of a 128k
    vocabulary ("NYI TritonSplitDimKernel reductions") and a constant searchsorted target
    (a Triton compile error in the fused kernel).
    """
    sorted_probs = torch.sort(probs, dim=-1, descending=True).values  # [B, V]
    mass = torch.cumsum(sorted_probs, dim=-1)  # [B, V], non-decreasing
    # Relative to the row's own total (1 up to rounding), so the target is never past the end.
    target = mass[:, -1:] * top_p  # [B, 1]
    last = torch.searchsorted(mass, target)  # [B, 1]: rank of the first token reaching it
    return torch.gather(sorted_probs, -1, last)
