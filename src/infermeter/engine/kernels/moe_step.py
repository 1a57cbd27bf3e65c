"""An MoE block's batch-1 decode step in one launch (the "layer" step kernels, with Triton's
experts): its norm, router, routing, the chosen experts' gate/up and down products and the
residual add, as stages that wait on each other (stage_sync.py), in ticket order:

  stage    programs                 waits for               writes
  router   cdiv(E, BLOCK_N)         nothing (h is the       the router's logits [E] of the
                                    previous launch's)      normed h; program 0 the normed h
  route    1                        every router program    the k weights and expert ids
  swiglu   cdiv(ffn, BLOCK_N) x k   the route               silu(gate) * up [k, ffn]
  down     cdiv(dim, BLOCK_N)       every swiglu program    h + the weighted sum of the k
                                                            experts' down products [dim]

Why: an MoE layer's FFN side is seven kernels of the split step (norm, router, routing, the
two expert kernels, the residual add and what inductor adds), each a launch and a drain at
batch 1, where the step's bytes are a few experts' rows. With the attention side's launch
(layer_step.py) an MoE layer is two launches.

The stages are the engine's own kernels' code: fused_step.fused_gemv_rows (the norm + router
product, eager's norm rounding) and normed_row, router_topk.experts_route_row,
expert_gemv.experts_swiglu_rows and experts_down_rows (its residual add as the block's), at
their own tiles; so the routing and the experts' numbers are theirs, and the router's logits
are a norm + GEMV's (fused_step's tiles), not gemv.py's. Each expert stage's rows follow from
the route, so none loads a weight before its wait.

For Qwen3-MoE and Mixtral (softmax, top k, their renormalisation); gpt-oss's top k then
softmax, biases and clamped SwiGLU are not taken (MoEFeedForward.takes_step_kernel).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from infermeter.engine.kernels.exact_math import compiled_for_gpu
from infermeter.engine.kernels.expert_gemv import expert_tiles_for, token_tiles
from infermeter.engine.kernels.fused_step import fused_tiles_for
from infermeter.engine.kernels.gemv import NUM_STAGES, gpu_name
from infermeter.engine.kernels.router_topk import route_constants
from infermeter.engine.kernels.stage_sync import LINE, kept_counts
from infermeter.engine.kernels.triton_support import tl, triton

STAGE_COUNTS = 4  # counts after the ticket: router, route, swiglu, down

if triton is not None:
    from infermeter.engine.kernels.expert_gemv import experts_down_rows, experts_swiglu_rows
    from infermeter.engine.kernels.fused_step import fused_gemv_rows, normed_row
    from infermeter.engine.kernels.router_topk import experts_route_row
    from infermeter.engine.kernels.stage_sync import (
        count_done,
        reset_counts,
        take_ticket,
        wait_count,
    )

    @triton.jit
    def _moe_kernel(
            H, NORM_W, WR, LOGITS, XN, WEIGHTS, IDS, W1, W3, ACT, W2, OUT, COUNT,
            dim, ffn, n_experts, stride_wr, stride_e1, stride_r1, stride_e3, stride_r3,
            stride_e2, stride_r2, swiglu_blocks, end_router, end_route, end_swiglu, end_down,
            EPS: tl.constexpr, BN_R: tl.constexpr, BK_R: tl.constexpr, BN_S: tl.constexpr,
            BK_S: tl.constexpr, BN_D: tl.constexpr, BK_D: tl.constexpr, K: tl.constexpr,
            BLOCK_E: tl.constexpr, LANES: tl.constexpr, LOG2_LANES: tl.constexpr,
            TOPK: tl.constexpr, TOPK_LANES: tl.constexpr, LOG2_TOPK_LANES: tl.constexpr,
            LOG2_WIDTH: tl.constexpr, RENORMALIZE: tl.constexpr,
            SOFTMAX_AFTER_TOPK: tl.constexpr, LIBDEVICE: tl.constexpr, LINE: tl.constexpr,
            STAGES: tl.constexpr):
        # COUNT [(1 + STAGES) x LINE] int32: the ticket, then each stage's count; the one
        # token's index is pid * 0 (a tensor, as a program id is)
        pid = take_ticket(COUNT)
        if pid < end_router:  # logits = router(norm(h)); program 0 also stores norm(h)
            fused_gemv_rows(pid, H, NORM_W, WR, H, LOGITS, n_experts, dim, stride_wr,
                            n_experts, COUNT, 0, EPS, True, False, False, False, BN_R, BK_R,
                            LIBDEVICE, False, False, False)
            if pid == 0:
                normed_row(H, NORM_W, XN, dim, EPS, False, BK_R)
            count_done(COUNT + LINE)
        elif pid < end_route:
            wait_count(COUNT + LINE, end_router)
            experts_route_row(pid * 0, LOGITS, WEIGHTS, IDS, n_experts, n_experts, K, BLOCK_E,
                              LANES, LOG2_LANES, TOPK, TOPK_LANES, LOG2_TOPK_LANES,
                              LOG2_WIDTH, RENORMALIZE, SOFTMAX_AFTER_TOPK, LIBDEVICE, False)
            count_done(COUNT + 2 * LINE)
        elif pid < end_swiglu:  # a row block of one chosen expert's gate and up
            part = pid - end_route
            wait_count(COUNT + 2 * LINE, end_route - end_router)
            experts_swiglu_rows(part % swiglu_blocks, part // swiglu_blocks, XN, IDS, W1, W3,
                                W1, W3, ACT, ffn, dim, 1, K, dim, stride_e1, stride_r1,
                                stride_e3, stride_r3, 0, 0, 0.0, 1.0, 1, TOPK, BN_S, BK_S,
                                False, False, LIBDEVICE, False)
            count_done(COUNT + 3 * LINE)
        else:  # out = h + the weighted sum of the k experts' down rows
            wait_count(COUNT + 3 * LINE, end_swiglu - end_route)
            experts_down_rows(pid - end_swiglu, pid * 0, ACT, IDS, WEIGHTS, W2, W2, OUT, H,
                              dim, ffn, K, stride_e2, stride_r2, 0, BN_D, BK_D, False, True,
                              False)
            if count_done(COUNT + 4 * LINE) == end_down - end_swiglu - 1:
                reset_counts(COUNT, 1 + STAGES, LINE)


def moe_tiles(dim: int, ffn: int, gpu: str) -> dict[str, tuple[int, int, int]]:
    """Each stage's (BLOCK_N, BLOCK_K, num_warps): the router's as the fused norm + GEMV's, the
    experts' as their kernels' at one token (gate and up rows halving BLOCK_N)."""
    swiglu = token_tiles(expert_tiles_for("swiglu", dim, gpu), 1)  # as experts_swiglu's
    return {"router": fused_tiles_for("norm_gemv", dim, gpu),
            "swiglu": (max(1, swiglu[0] // 2), swiglu[1], swiglu[2]),
            "down": expert_tiles_for("down", ffn, gpu)}


def moe_programs(n_experts: int, top_k: int, dim: int, ffn: int,
                 tiles: dict[str, tuple[int, int, int]]) -> tuple[int, int, int, int]:
    """The ticket ends of the four stages (router, route, swiglu, down), the last the grid."""
    ends, end = [], 0
    for programs in (math.ceil(n_experts / tiles["router"][0]), 1,
                     math.ceil(ffn / tiles["swiglu"][0]) * top_k,
                     math.ceil(dim / tiles["down"][0])):
        end += programs
        ends.append(end)
    return tuple(ends)


def _moe_step(h: Tensor, norm_weight: Tensor, router: Tensor, w1: Tensor, w3: Tensor,
              w2: Tensor, eps: float, top_k: int,
              renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """h [1, dim], router [E, dim], w1 / w3 [E, ffn, dim], w2 [E, dim, ffn] -> (h + the
    block's output [1, dim], the expert ids [1, k] int64, the normed h [1, dim] the experts
    read)."""
    dim, (n_experts, ffn) = h.shape[-1], w1.shape[:2]
    tiles = moe_tiles(dim, ffn, gpu_name(h.device))
    ends = moe_programs(n_experts, top_k, dim, ffn, tiles)
    logits = torch.empty(1, n_experts, dtype=h.dtype, device=h.device)
    normed, out = torch.empty_like(h), torch.empty_like(h)
    weights = torch.empty(1, top_k, dtype=h.dtype, device=h.device)
    ids = torch.empty(1, top_k, dtype=torch.int64, device=h.device)
    act = torch.empty(1, top_k, ffn, dtype=h.dtype, device=h.device)
    counts = kept_counts(h.device, (1 + STAGE_COUNTS) * LINE)
    _moe_kernel[(ends[-1],)](
        h, norm_weight, router, logits, normed, weights, ids, w1, w3, act, w2, out, counts,
        dim, ffn, n_experts, router.stride(0), w1.stride(0), w1.stride(1), w3.stride(0),
        w3.stride(1), w2.stride(0), w2.stride(1), math.ceil(ffn / tiles["swiglu"][0]), *ends,
        EPS=eps, BN_R=tiles["router"][0], BK_R=tiles["router"][1], BN_S=tiles["swiglu"][0],
        BK_S=tiles["swiglu"][1], BN_D=tiles["down"][0], BK_D=tiles["down"][1],
        **route_constants(n_experts, top_k, renormalize, False, compiled_for_gpu(h)),
        LINE=LINE, STAGES=STAGE_COUNTS, num_warps=max(t[2] for t in tiles.values()),
        num_stages=NUM_STAGES)
    return out, ids, normed


@torch.library.custom_op("infermeter::moe_step", mutates_args=())
def moe_step(h: Tensor, norm_weight: Tensor, router: Tensor, w1: Tensor, w3: Tensor,
             w2: Tensor, eps: float, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """The MoE block's batch-1 step and its residual add in one launch (module docstring):
    (h + the block's output [1, dim], the expert ids [1, k]). An opaque custom op: its body
    reads stage_sync's kept counts (kept_counts), which a fake-tensor trace could not."""
    out, ids, _ = _moe_step(h, norm_weight, router, w1, w3, w2, eps, top_k, renormalize)
    return out, ids


@moe_step.register_fake
def _(h: Tensor, norm_weight: Tensor, router: Tensor, w1: Tensor, w3: Tensor, w2: Tensor,
      eps: float, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    return torch.empty_like(h), h.new_empty(1, top_k, dtype=torch.int64)
