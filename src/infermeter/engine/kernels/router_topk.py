"""An MoE block's routing in one Triton kernel (moe.MOE_KERNELS "triton"): softmax, top k and
renormalisation of the router's logits, as MoEFeedForward.route computes them with torch.

Why: torch's route is a softmax kernel, then torch.topk as two CUDA kernels (gatherTopK and
bitonicSortKVInPlace: medians 5.10 and 4.03 us at E = 128 on an H100,
results/traces-moe-qwen3-nvidia-h100-80gb-hbm3/summary.txt), then the renormalisation; at batch
1 that is over a tenth of a Qwen3-30B-A3B layer's 83 us for 128 numbers a token.

  _experts_route_kernel  grid (N tokens,): a program loads its token's E logits (one block of
                         next_power_of_2(E) lanes, E <= MAX_EXPERTS) and writes weights [N, k]
                         in the logits' dtype and ids [N, k] int64, best first (torch.topk's
                         sorted order):
  - default: softmax over the E logits in float32, the top k of those probabilities by k rounds
    of max + argmax (each round masks the lane it chose), renormalised over the k where
    RENORMALIZE, cast to the dtype;
  - SOFTMAX_AFTER_TOPK (gpt-oss): the top k of the float32 logits, then a softmax over the k.

Numerics are torch's CUDA kernels', to the bit on a GPU: the softmax is PersistentSoftmax.cuh's
warp softmax (the max subtracted, exp in float32, exact_math's libdevice expf; the sum as that
kernel orders it: each of W = min(next_power_of_2(E), 32) lanes adds elements lane, lane + W,
... in turn, then a butterfly of xor shuffles over the lanes; an exact division); the
renormalising sum is torch's CUDA sum over k (Reduce.cuh: last_power_of_2(k) lanes, lane t
adding elements t and t + that, then a shfl_down tree, lane pairs (0, 1), (0, 2), ...), then an
exact division. Under Triton's CPU interpreter (tests) exp is numpy's, and a bfloat16 store
rounds toward zero (the interpreter's conversion).
Ties: equal scores are taken lowest index first, so the output is a stable descending order.
torch.topk on CUDA also keeps the lowest indices where ties straddle the k-th value (gatherTopK
collects in index order) but does not promise an order among equal values it returns, nor does
its CPU kernel which of them it keeps; float32 ties take equal logits, or probabilities that
round to one value.
PDL (pdl.py): the logits are the router GEMV's output, so the PDL twin waits first and gains
only the launch overlap.
"""

from __future__ import annotations

import torch
from torch import Tensor

from infermeter.engine.kernels import pdl
from infermeter.engine.kernels.exact_math import compiled_for_gpu
from infermeter.engine.kernels.pdl import launch
from infermeter.engine.kernels.triton_support import triton, triton_runs_on

MAX_EXPERTS = 1024  # one program holds a token's logits in registers (presets: E <= 256)

if triton is not None:
    import triton.language as tl

    from infermeter.engine.kernels.exact_math import exact_exp

    @triton.jit
    def _gather(v, lanes, partner, LANES: tl.constexpr):
        """v[partner] for v [LANES] (0.0 where partner is out of range): a shuffle, exact (one
        value summed with zeros)."""
        hit = lanes[None, :] == partner[:, None]  # [LANES, LANES]
        return tl.sum(tl.where(hit, v[None, :], 0.0), 1)

    @triton.jit
    def _warp_sum(v, LANES: tl.constexpr, LOG2_LANES: tl.constexpr):
        """The sum of v [LANES] as warp_reduce's butterfly adds it: each lane adds lane ^ o's
        value, o = LANES / 2, ..., 1 (every lane ends with the sum)."""
        lanes = tl.arange(0, LANES)
        for step in tl.static_range(LOG2_LANES):
            v = v + _gather(v, lanes, lanes ^ (LANES >> (step + 1)), LANES)
        return tl.max(v, 0)

    @triton.jit
    def _softmax(x, ok, BLOCK: tl.constexpr, LANES: tl.constexpr, LOG2_LANES: tl.constexpr,
                 LIBDEVICE: tl.constexpr):
        """softmax of float32 x [BLOCK] over its `ok` lanes (0 elsewhere) in the order of
        torch's CUDA warp softmax: lane l (of LANES) adds elements l, l + LANES, ... to 0 in
        turn, then _warp_sum; each probability an exact division."""
        top = tl.max(tl.where(ok, x, float("-inf")), 0)
        e = tl.where(ok, exact_exp(x - top, LIBDEVICE), 0.0)
        rows = tl.arange(0, BLOCK // LANES)[:, None]
        grid = tl.reshape(e, [BLOCK // LANES, LANES])  # [it, lane]: element it * LANES + lane
        acc = tl.zeros([LANES], tl.float32)
        for it in tl.static_range(BLOCK // LANES):
            acc += tl.sum(tl.where(rows == it, grid, 0.0), 0)
        return tl.math.div_rn(e, _warp_sum(acc, LANES, LOG2_LANES))

    @triton.jit
    def _topk_sum(v, K: tl.constexpr, TOPK: tl.constexpr, LOG2_WIDTH: tl.constexpr):
        """The sum of v [TOPK] (its first K, the rest 0) as torch's CUDA sum over a last dim of
        K: WIDTH = 2 ** LOG2_WIDTH = last_power_of_2(K) lanes, lane t holding v[t] + v[t + WIDTH]
        (v[t] where K is a power of two), then shfl_down's tree: lane t adds lane t + o's value,
        o = 1, 2, ..., WIDTH / 2; lane 0's."""
        lanes = tl.arange(0, TOPK)
        if TOPK > K:  # K not a power of two: WIDTH = TOPK / 2 lanes, two elements for some
            v = v + _gather(v, lanes, lanes + TOPK // 2, TOPK)
        for step in tl.static_range(LOG2_WIDTH):
            v = v + _gather(v, lanes, lanes + (1 << step), TOPK)
        return tl.sum(tl.where(lanes == 0, v, 0.0), 0)

    @triton.jit
    def _experts_route_kernel(LOGITS, WEIGHTS, IDS, n_experts, stride_row, K: tl.constexpr,
                              BLOCK_E: tl.constexpr, LANES: tl.constexpr,
                              LOG2_LANES: tl.constexpr, TOPK: tl.constexpr,
                              TOPK_LANES: tl.constexpr, LOG2_TOPK_LANES: tl.constexpr,
                              LOG2_WIDTH: tl.constexpr, RENORMALIZE: tl.constexpr,
                              SOFTMAX_AFTER_TOPK: tl.constexpr, LIBDEVICE: tl.constexpr,
                              PDL: tl.constexpr = False):
        experts_route_row(tl.program_id(0), LOGITS, WEIGHTS, IDS, n_experts, stride_row, K,
                          BLOCK_E, LANES, LOG2_LANES, TOPK, TOPK_LANES, LOG2_TOPK_LANES,
                          LOG2_WIDTH, RENORMALIZE, SOFTMAX_AFTER_TOPK, LIBDEVICE, PDL)

    @triton.jit
    def experts_route_row(token, LOGITS, WEIGHTS, IDS, n_experts, stride_row, K: tl.constexpr,
                          BLOCK_E: tl.constexpr, LANES: tl.constexpr, LOG2_LANES: tl.constexpr,
                          TOPK: tl.constexpr, TOPK_LANES: tl.constexpr,
                          LOG2_TOPK_LANES: tl.constexpr, LOG2_WIDTH: tl.constexpr,
                          RENORMALIZE: tl.constexpr, SOFTMAX_AFTER_TOPK: tl.constexpr,
                          LIBDEVICE: tl.constexpr, PDL: tl.constexpr):
        """_experts_route_kernel's program for `token`: its k weights and expert ids."""
        token = token.to(tl.int64)
        if PDL:  # the logits are the router GEMV's output
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        cols = tl.arange(0, BLOCK_E)
        ok = cols < n_experts
        x = tl.load(LOGITS + token * stride_row + cols, mask=ok, other=0.0).to(tl.float32)
        if SOFTMAX_AFTER_TOPK:
            scores = x
        else:
            scores = _softmax(x, ok, BLOCK_E, LANES, LOG2_LANES, LIBDEVICE)
        slots = tl.arange(0, TOPK)
        top = tl.zeros([TOPK], tl.float32)
        ids = tl.zeros([TOPK], tl.int64)
        live = ok
        for j in tl.static_range(K):  # the best live lane, the lowest index among equals
            best = tl.max(tl.where(live, scores, float("-inf")), 0)
            pick = tl.min(tl.where(live & (scores == best), cols, BLOCK_E), 0)
            # a NaN logit makes every score NaN, equal to nothing (a GPU's max skips NaN): the
            # lowest live lane then, weight NaN, so that an id always names an expert (the
            # expert kernels index the weights with it)
            found = pick < BLOCK_E
            pick = tl.where(found, pick, tl.min(tl.where(live, cols, BLOCK_E), 0))
            best = tl.where(found, best, float("nan"))
            top = tl.where(slots == j, best, top)
            ids = tl.where(slots == j, pick.to(tl.int64), ids)
            live = live & (cols != pick)
        chosen = slots < K
        if SOFTMAX_AFTER_TOPK:
            weights = _softmax(top, chosen, TOPK, TOPK_LANES, LOG2_TOPK_LANES, LIBDEVICE)
        elif RENORMALIZE:
            weights = tl.math.div_rn(top, _topk_sum(tl.where(chosen, top, 0.0), K, TOPK,
                                                    LOG2_WIDTH))
        else:
            weights = top
        tl.store(WEIGHTS + token * K + slots, weights.to(WEIGHTS.dtype.element_ty), mask=chosen)
        tl.store(IDS + token * K + slots, ids, mask=chosen)


def _log2(n: int) -> int:
    return n.bit_length() - 1


def _route(logits: Tensor, top_k: int, renormalize: bool, softmax_after_topk: bool,
           pdl_launch: bool) -> tuple[Tensor, Tensor]:
    n_tokens, n_experts = logits.shape
    weights = torch.empty(n_tokens, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(n_tokens, top_k, dtype=torch.int64, device=logits.device)
    if n_tokens == 0:
        return weights, ids
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    launch(_experts_route_kernel, (n_tokens,), pdl_launch, logits, weights, ids, n_experts,
           logits.stride(0), **route_constants(n_experts, top_k, renormalize, softmax_after_topk,
                                               compiled_for_gpu(logits)),
           num_warps=1 if triton.next_power_of_2(n_experts) <= 256 else 4)
    return weights, ids


def route_constants(n_experts: int, top_k: int, renormalize: bool, softmax_after_topk: bool,
                    libdevice: bool) -> dict:
    """experts_route_row's constexprs for E experts and top k (a warp's lanes, as torch's)."""
    block = triton.next_power_of_2(n_experts)
    topk_block = triton.next_power_of_2(top_k)
    lanes, topk_lanes = min(block, 32), min(topk_block, 32)
    return {"K": top_k, "BLOCK_E": block, "LANES": lanes, "LOG2_LANES": _log2(lanes),
            "TOPK": topk_block, "TOPK_LANES": topk_lanes, "LOG2_TOPK_LANES": _log2(topk_lanes),
            "LOG2_WIDTH": _log2(top_k), "RENORMALIZE": renormalize,
            "SOFTMAX_AFTER_TOPK": softmax_after_topk, "LIBDEVICE": libdevice}


# A torch.library.triton_op (inductor keeps it whole in the compiled CUDA-graph step) and a
# custom_op twin launched with PDL (pdl.py says why both).

@torch.library.triton_op("infermeter::router_topk", mutates_args=())
def router_topk(logits: Tensor, top_k: int, renormalize: bool,
                softmax_after_topk: bool) -> tuple[Tensor, Tensor]:
    """logits [N, E] (the router's output) -> (weights [N, k] in the logits' dtype, expert ids
    [N, k] int64), best first: MoEFeedForward.route's softmax, top k and renormalisation, or
    with softmax_after_topk gpt-oss's top k then softmax over them."""
    return _route(logits, top_k, renormalize, softmax_after_topk, False)


@torch.library.custom_op("infermeter::router_topk_pdl", mutates_args=())
def router_topk_pdl(logits: Tensor, top_k: int, renormalize: bool,
                    softmax_after_topk: bool) -> tuple[Tensor, Tensor]:
    return _route(logits, top_k, renormalize, softmax_after_topk, True)


@router_topk_pdl.register_fake
def _(logits: Tensor, top_k: int, renormalize: bool,
      softmax_after_topk: bool) -> tuple[Tensor, Tensor]:
    return (logits.new_empty(logits.shape[0], top_k),
            logits.new_empty(logits.shape[0], top_k, dtype=torch.int64))


def route(logits: Tensor, top_k: int, renormalize: bool,
          softmax_after_topk: bool) -> tuple[Tensor, Tensor]:
    """router_topk as the compiled step calls it: with PDL when pdl.enabled()."""
    op = router_topk_pdl if pdl.enabled() else router_topk
    return op(logits, top_k, renormalize, softmax_after_topk)


def route_usable(logits: Tensor, top_k: int) -> bool:
    """Triton runs where the logits [N, E] live, E fits one program and 1 <= k <= E."""
    n_experts = logits.shape[-1]
    return triton_runs_on(logits) and n_experts <= MAX_EXPERTS and 1 <= top_k <= n_experts
