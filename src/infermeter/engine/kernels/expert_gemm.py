"""The grouped experts of a long forward in Triton, with no host sync (moe.MOE_KERNELS "triton",
N x k > E: prefill and large decode batches).

Why: MoEFeedForward's torch grouped path sorts the N x k (token, expert) pairs by expert and loops
over the touched experts in Python, so it asks the host how many tokens each expert got (a sync)
and launches a few kernels per expert per layer; no static graph holds it, so an MoE model's
prefill cannot be the compiled bucketed one. Here, as vLLM's fused_moe does, every shape depends
only on N, k, E and the block size:

  align_pairs (torch ops, compiles with fullgraph=True): the pairs sorted by expert (stable: a
      token's pairs in token order within an expert), each expert's group padded to a multiple
      of BLOCK_M, giving sorted_ids [MAX] (pair ids; the pair count P = N x k for a pad) and
      block_expert [MAX / BLOCK_M] (each block's expert; E for the blocks past the used ones,
      whose programs return at once). MAX = BLOCK_M x floor((P + E (BLOCK_M - 1)) / BLOCK_M)
      holds every padded group whatever the routing.
  grouped_swiglu  grid (blocks, ffn tiles): a program multiplies its block's BLOCK_M token rows
      (gathered by pair id: token = pair // k) by a BLOCK_N tile of its expert's w1 and w3 rows
      (tl.dot, float32 accumulation) and writes silu(gate) * up for each pair into act [P, ffn]
      (gpt-oss: gate and up plus their biases, then its clamped SwiGLU).
  grouped_down    grid (blocks, dim tiles): act's rows of the block times its expert's w2 tile
      (gpt-oss: plus its bias) -> down [P, dim], one row a pair; torch then weights each pair by
      its routing weight and sums a token's k pairs (`(down * weights).sum(1)`, as
      MoEFeedForward.gathered does).

Numerics are eager's rounding points (gathered's, as expert_gemv.py's): gate and up products in
float32, each rounded to the dtype; silu in float32 (exact_math.py), rounded; times up, rounded;
the down product rounded; times the routing weight rounded, the k summed in float32 and rounded
once by torch. gpt-oss's experts (HAS_BIAS, CLAMPED) take expert_gemv.py's rounding points:
gate and up each plus its bias, rounded; the clamps, gate * alpha, sigmoid (exact_sigmoid),
gate * sigmoid, up + 1 and their product each rounded as MoEFeedForward.activation's torch ops
round; the down product plus its bias, rounded, before the routing weight. Float32 inputs
multiply in IEEE float32 (no TF32), as torch's default matmul.
So against the eager paths only float32 sum orders differ (and grouped()'s index_add_, which
rounds each of a token's k terms into the dtype in expert order, not routing order).

Tensor parallelism (experts split by rows): w1 / w3 [E, ffn / tp, dim], w2 [E, dim, ffn / tp]
(any row and expert stride, unit column stride); the kernels run on a shard as on a whole model.
PDL (pdl.py): the pair ids come from the router's top-k and the rows to read from them, so the
PDL twins wait first, as expert_gemv.py's. Tiles (block_tiles) are vLLM's defaults' sizes for
bf16; no GPU has timed them here yet.
"""

from __future__ import annotations

import torch
from torch import Tensor

from infermeter.engine.kernels import pdl
from infermeter.engine.kernels.exact_math import compiled_for_gpu
from infermeter.engine.kernels.pdl import launch
from infermeter.engine.kernels.triton_support import triton

if triton is not None:
    import triton.language as tl

    from infermeter.engine.kernels.expert_activation import expert_activation

    @triton.jit
    def _block_pairs(SORTED, BLOCK_EXPERT, n_pairs, top_k, BLOCK_M: tl.constexpr):
        """The block's expert (int64), its pair ids [BLOCK_M], which are real (not pads) and
        their tokens."""
        block = tl.program_id(0)
        expert = tl.load(BLOCK_EXPERT + block).to(tl.int64)
        pairs = tl.load(SORTED + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        real = pairs < n_pairs
        return expert, pairs, real, pairs // top_k

    @triton.jit
    def _grouped_swiglu_kernel(X, SORTED, BLOCK_EXPERT, W1, W3, B1, B3, OUT, n_pairs, n_experts,
                               n_rows, n_cols, top_k, stride_x, stride_e1, stride_r1, stride_e3,
                               stride_r3, stride_b1, stride_b3, limit, alpha,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                               UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr = False,
                               CLAMPED: tl.constexpr = False, LIBDEVICE: tl.constexpr = False,
                               PDL: tl.constexpr = False):
        if PDL:  # the pair ids and x are earlier kernels' outputs, and the rows follow the ids
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        expert, pairs, real, tokens = _block_pairs(SORTED, BLOCK_EXPERT, n_pairs, top_k,
                                                   BLOCK_M)
        if expert >= n_experts:  # past the used blocks
            return
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        x_at = X + tokens[:, None] * stride_x  # [BLOCK_M, 1]
        gate_at = W1 + expert * stride_e1 + rows[None, :] * stride_r1  # [1, BLOCK_N]
        up_at = W3 + expert * stride_e3 + rows[None, :] * stride_r3
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < n_cols
            x = tl.load(x_at + cols[None, :], mask=real[:, None] & col_ok[None, :], other=0.0)
            w_ok = col_ok[:, None] & row_ok[None, :]  # [BLOCK_K, BLOCK_N]: w^T's tile
            gate = tl.load(gate_at + cols[:, None], mask=w_ok, other=0.0)
            up = tl.load(up_at + cols[:, None], mask=w_ok, other=0.0)
            if UPCAST:
                x, gate, up = x.to(tl.float32), gate.to(tl.float32), up.to(tl.float32)
            acc_gate = tl.dot(x, gate, acc_gate, input_precision=PRECISION)
            acc_up = tl.dot(x, up, acc_up, input_precision=PRECISION)
        dtype = OUT.dtype.element_ty
        # h @ w1[e]^T and h @ w3[e]^T [BLOCK_M, BLOCK_N] -> the activation
        act = expert_activation(acc_gate, acc_up, B1, B3, expert, stride_b1, stride_b3, rows,
                                row_ok, limit, alpha, dtype, HAS_BIAS, CLAMPED, LIBDEVICE)
        tl.store(OUT + pairs[:, None] * n_rows + rows[None, :], act.to(dtype),
                 mask=real[:, None] & row_ok[None, :])

    @triton.jit
    def _grouped_down_kernel(ACT, SORTED, BLOCK_EXPERT, W2, B2, OUT, n_pairs, n_experts, n_rows,
                             n_cols, top_k, stride_e, stride_r, stride_b, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                             HAS_BIAS: tl.constexpr = False, PDL: tl.constexpr = False):
        if PDL:  # the activations and pair ids are earlier kernels' outputs
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        expert, pairs, real, tokens = _block_pairs(SORTED, BLOCK_EXPERT, n_pairs, top_k,
                                                   BLOCK_M)
        if expert >= n_experts:  # past the used blocks
            return
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        act_at = ACT + pairs[:, None] * n_cols  # [BLOCK_M, 1]
        w_at = W2 + expert * stride_e + rows[None, :] * stride_r  # [1, BLOCK_N]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < n_cols
            act = tl.load(act_at + cols[None, :], mask=real[:, None] & col_ok[None, :],
                          other=0.0)
            w = tl.load(w_at + cols[:, None], mask=col_ok[:, None] & row_ok[None, :], other=0.0)
            if UPCAST:
                act, w = act.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(act, w, acc, input_precision=PRECISION)
        dtype = OUT.dtype.element_ty
        down = acc.to(dtype)  # act @ w2[e]^T, rounded
        if HAS_BIAS:  # eager's `+ bias`, rounded
            bias = tl.load(B2 + expert * stride_b + rows, mask=row_ok, other=0.0)
            down = (down.to(tl.float32) + bias.to(tl.float32)[None, :]).to(dtype)
        tl.store(OUT + pairs[:, None] * n_rows + rows[None, :], down,
                 mask=real[:, None] & row_ok[None, :])


def block_tiles(n_pairs: int, n_experts: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for P pairs over E experts: blocks of
    16 pairs while an expert's mean group is small (decode batches, short prompts: pads cost
    little), 64 from a mean of 64 pairs an expert (long prefills), as vLLM's default configs
    (tl.dot needs 16 at least a side)."""
    block_m = 64 if n_pairs >= 64 * n_experts else 16
    return block_m, 64, 64, 4, 3


def align_pairs(ids: Tensor, n_experts: int, block_m: int) -> tuple[Tensor, Tensor]:
    """ids [N, k] (pair p = token p // k's (p % k)-th choice) -> (sorted_ids [MAX] int64: pair
    ids by expert, each expert's group padded with P = N x k to a multiple of block_m;
    block_expert [MAX / block_m] int64: each block's expert, n_experts past the used blocks).
    Static shapes and no host sync: compiles with fullgraph=True."""
    flat = ids.reshape(-1)
    n_pairs = flat.numel()
    order = torch.argsort(flat, stable=True)  # [P] pair ids, by expert
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))  # [E]
    blocks = (counts + block_m - 1) // block_m  # [E] blocks an expert
    block_end = torch.cumsum(blocks, 0)  # [E]
    group_start = torch.cumsum(counts, 0) - counts  # [E] each expert's first sorted position
    experts = flat[order]
    rank = torch.arange(n_pairs, device=flat.device) - group_start[experts]  # within its group
    dest = (block_end - blocks)[experts] * block_m + rank  # [P] slot in the padded order
    n_blocks = (n_pairs + n_experts * (block_m - 1)) // block_m  # every padded layout fits
    sorted_ids = torch.full((n_blocks * block_m,), n_pairs, dtype=torch.int64,
                            device=flat.device).scatter(0, dest, order)
    blocks_at = torch.arange(n_blocks, dtype=torch.int64, device=flat.device)
    block_expert = torch.searchsorted(block_end, blocks_at, right=True)  # [n_blocks] 0..E
    return sorted_ids, block_expert


def _dot(x: Tensor) -> dict[str, object]:
    """tl.dot's settings for operands of x's dtype: PRECISION IEEE float32 for float32 operands
    (torch's default matmul, no TF32; 16-bit operands multiply exactly into float32 either way);
    UPCAST where Triton's interpreter runs a bfloat16 dot (it has no bfloat16 dot: the operands
    go to float32 first, exact, the same products)."""
    upcast = x.dtype == torch.bfloat16 and not compiled_for_gpu(x)
    return {"PRECISION": "ieee" if x.dtype == torch.float32 or upcast else "tf32",
            "UPCAST": upcast}


def _grouped_swiglu(x: Tensor, sorted_ids: Tensor, block_expert: Tensor, w1: Tensor, w3: Tensor,
                    top_k: int, pdl: bool, b1: Tensor | None = None, b3: Tensor | None = None,
                    limit: float | None = None, alpha: float = 1.0) -> Tensor:
    n_pairs, (n_experts, hidden, dim) = x.shape[0] * top_k, w1.shape
    has_bias = b1 is not None
    b1, b3 = (b1, b3) if has_bias else (w1, w3)  # without biases: never read
    block_m = sorted_ids.shape[0] // block_expert.shape[0]
    _, block_n, block_k, warps, stages = block_tiles(n_pairs, n_experts)
    out = torch.empty(n_pairs, hidden, dtype=x.dtype, device=x.device)
    launch(_grouped_swiglu_kernel, (block_expert.shape[0], triton.cdiv(hidden, block_n)), pdl,
           x, sorted_ids, block_expert, w1, w3, b1, b3, out, n_pairs, n_experts, hidden, dim,
           top_k, x.stride(0), w1.stride(0), w1.stride(1), w3.stride(0), w3.stride(1),
           b1.stride(0), b3.stride(0), 0.0 if limit is None else float(limit), float(alpha),
           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **_dot(x), HAS_BIAS=has_bias,
           CLAMPED=limit is not None, LIBDEVICE=compiled_for_gpu(x), num_warps=warps,
           num_stages=stages)
    return out


def _grouped_down(act: Tensor, sorted_ids: Tensor, block_expert: Tensor, w2: Tensor,
                  top_k: int, pdl: bool, b2: Tensor | None = None) -> Tensor:
    n_pairs, (n_experts, dim, hidden) = act.shape[0], w2.shape
    has_bias = b2 is not None
    b2 = b2 if has_bias else w2  # without a bias: never read
    act = act.contiguous()
    block_m = sorted_ids.shape[0] // block_expert.shape[0]
    _, block_n, block_k, warps, stages = block_tiles(n_pairs, n_experts)
    out = torch.empty(n_pairs, dim, dtype=act.dtype, device=act.device)
    launch(_grouped_down_kernel, (block_expert.shape[0], triton.cdiv(dim, block_n)), pdl,
           act, sorted_ids, block_expert, w2, b2, out, n_pairs, n_experts, dim, hidden, top_k,
           w2.stride(0), w2.stride(1), b2.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
           BLOCK_K=block_k, **_dot(act), HAS_BIAS=has_bias, num_warps=warps, num_stages=stages)
    return out


# Each op as a torch.library.triton_op (inductor keeps it whole in a compiled graph) and a
# custom_op twin launched with PDL (pdl.py says why both). sorted_ids and block_expert are
# align_pairs'; the stacked weights have unit column stride and x's dtype, as have the optional
# biases (gpt-oss: b1 / b3 [E, ffn], b2 [E, dim]). limit: gpt-oss's clamped SwiGLU
# (MoEFeedForward.activation, alpha its sigmoid's scale); None: silu(gate) * up.

@torch.library.triton_op("infermeter::grouped_swiglu", mutates_args=())
def grouped_swiglu(x: Tensor, sorted_ids: Tensor, block_expert: Tensor, w1: Tensor, w3: Tensor,
                   top_k: int, b1: Tensor | None = None, b3: Tensor | None = None,
                   limit: float | None = None, alpha: float = 1.0) -> Tensor:
    """x [N, dim] (unit column stride), w1 / w3 [E, ffn, dim] -> the activation of
    gate = x @ w1[e]^T (+ b1[e]) and up = x @ w3[e]^T (+ b3[e]), [N x k, ffn], row p for pair p
    (token p // k, its expert e from the blocks): silu(gate) * up, or with limit the clamped
    SwiGLU."""
    return _grouped_swiglu(x, sorted_ids, block_expert, w1, w3, top_k, False, b1, b3, limit,
                           alpha)


@torch.library.custom_op("infermeter::grouped_swiglu_pdl", mutates_args=())
def grouped_swiglu_pdl(x: Tensor, sorted_ids: Tensor, block_expert: Tensor, w1: Tensor,
                       w3: Tensor, top_k: int, b1: Tensor | None = None,
                       b3: Tensor | None = None, limit: float | None = None,
                       alpha: float = 1.0) -> Tensor:
    return _grouped_swiglu(x, sorted_ids, block_expert, w1, w3, top_k, True, b1, b3, limit,
                           alpha)


@grouped_swiglu_pdl.register_fake
def _(x: Tensor, sorted_ids: Tensor, block_expert: Tensor, w1: Tensor, w3: Tensor,
      top_k: int, b1: Tensor | None = None, b3: Tensor | None = None,
      limit: float | None = None, alpha: float = 1.0) -> Tensor:
    return x.new_empty(x.shape[0] * top_k, w1.shape[1])


@torch.library.triton_op("infermeter::grouped_down", mutates_args=())
def grouped_down(act: Tensor, sorted_ids: Tensor, block_expert: Tensor, w2: Tensor,
                 top_k: int, b2: Tensor | None = None) -> Tensor:
    """act [N x k, ffn], w2 [E, dim, ffn] -> act @ w2[e]^T (+ b2[e]) [N x k, dim], one row a
    pair."""
    return _grouped_down(act, sorted_ids, block_expert, w2, top_k, False, b2)


@torch.library.custom_op("infermeter::grouped_down_pdl", mutates_args=())
def grouped_down_pdl(act: Tensor, sorted_ids: Tensor, block_expert: Tensor, w2: Tensor,
                     top_k: int, b2: Tensor | None = None) -> Tensor:
    return _grouped_down(act, sorted_ids, block_expert, w2, top_k, True, b2)


@grouped_down_pdl.register_fake
def _(act: Tensor, sorted_ids: Tensor, block_expert: Tensor, w2: Tensor, top_k: int,
      b2: Tensor | None = None) -> Tensor:
    return act.new_empty(act.shape[0], w2.shape[1])


def grouped_experts(x: Tensor, weights: Tensor, ids: Tensor, w1: Tensor, w3: Tensor,
                    w2: Tensor, b1: Tensor | None = None, b3: Tensor | None = None,
                    b2: Tensor | None = None, limit: float | None = None,
                    alpha: float = 1.0) -> Tensor:
    """MoEFeedForward's experts for x [N, dim] routed to ids [N, k] with weights [N, k] (x's
    dtype) -> [N, dim]: align, the two kernels (with PDL when pdl.enabled()), then each token's
    k pairs weighted and summed in torch as MoEFeedForward.gathered does. b1 / b3 / b2, limit,
    alpha: gpt-oss's biases and clamped SwiGLU (expert_gemv.gathered_experts' arguments)."""
    n_tokens, top_k = ids.shape
    n_experts = w1.shape[0]
    block_m = block_tiles(n_tokens * top_k, n_experts)[0]
    sorted_ids, block_expert = align_pairs(ids, n_experts, block_m)
    on = pdl.enabled()
    act = (grouped_swiglu_pdl if on else grouped_swiglu)(x, sorted_ids, block_expert, w1, w3,
                                                         top_k, b1, b3, limit, alpha)
    down = (grouped_down_pdl if on else grouped_down)(act, sorted_ids, block_expert, w2, top_k,
                                                      b2)
    return (down.view(n_tokens, top_k, -1) * weights.unsqueeze(-1)).sum(dim=1)
