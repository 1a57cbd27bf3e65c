"""The gathered experts' products straight from the stacked weights (moe.MOE_KERNELS "triton").

Why: a batch-1 MoE decode step reads only its k chosen experts (Qwen3-30B-A3B: 8 of 128 small
experts a layer), so the step is as fast as those experts' rows are streamed. MoEFeedForward's
torch path indexes the stacked weights [E, ffn, dim] by the routing ids: eagerly that copies the
chosen experts' matrices (read, write, read again), and compiled it leaves inductor to fuse the
gather into the product or not; either way an expert two tokens chose is read twice. These
kernels read each distinct chosen expert's rows where they lie, once a step, by its id, with
gemv.py's tiling (tiles_for's tiles, evict-first weight loads, float32 partial products, one row
sum at the end):

  experts_swiglu  grid (row blocks of ffn, N*k slots): slot s is token s // k's (s % k)-th
                  choice. A program reads the slot's expert id and whether the slot is that
                  expert's first (_sharing_tokens; the others do nothing), then BLOCK_N / 2
                  gate rows of w1 and as many up rows of w3 (so it holds the GEMV's number of
                  weight rows) against the x of every token that chose the expert, and writes
                  silu(gate) * up into each such token's slot of [N, k, ffn].
  experts_down    one token (batch 1): grid (row blocks of dim, 1); the program runs the token's
                  k experts in routing order, each a w2 product over its slot's activation, and
                  sums them weighted by the routing into out [1, dim] (one program owning the
                  token's rows keeps eager's order with no atomics, and no extra kernel).
                  Several tokens: grid (row blocks of dim, N*k slots), an expert's first slot
                  multiplies its w2 rows by every choosing token's activation and writes each
                  weighted term into [N, k, dim]; torch sums the k terms (a small kernel: summing
                  in the weight kernel would need float32 atomics, whose order changes from run
                  to run). ONE_TOKEN_DOWN "terms" runs one token this way too (k times the
                  programs in flight, and a sum kernel after them).
With TOKENS tokens a program keeps TOKENS float32 partial products a weight tile, so its tiles
are BLOCK_K / TOKENS columns wide (as many registers as the GEMV's). The tiles come from
EXPERT_TOKEN_TILES or EXPERT_TILES where a GPU's timings (benchmarks/expert_tiles.py) put an
entry (for that token count, or that width), else tiles_for's,
or from the launchers' `tiles` argument (the benchmark's grid).

Numerics are the eager gathered path's rounding points: gate and up products in float32, each
rounded to the dtype once; silu in float32 as torch's CUDA silu computes it (exact_math.py: an
exact division and libdevice's expf on a GPU), rounded; its product with up rounded (swiglu.py's
points); each expert's down product rounded, times its routing weight (in the dtype) rounded,
and the k of them summed in float32 in routing order, rounded once (`(down * weights).sum(1)`;
several tokens: by that same torch sum). gpt-oss's experts (HAS_BIAS, CLAMPED): gate and up
each plus its bias, rounded; then MoEFeedForward.activation's ops, each rounded as torch rounds
it: the clamps (exact), gate * alpha, sigmoid in float32 (1 / (1 + exp(-x)), exact_math.py's
exact_sigmoid), gate * sigmoid, up + 1, their product; each down product plus its bias,
rounded, before the routing weight. So the two paths part only where a float32 sum order
decides a rounding (the products' order against the batched matmul's). One token's two down
ways hold the same terms (TOKENS = 1 keeps the BLOCK_K of the weighted-sum kernel; each term
rounded, times its weight rounded) and part only in the k terms' float32 sum: the kernel's runs
in routing order; torch's CUDA sum (its reduction kernel's four interleaved accumulators) takes
k <= 4 in routing order but Qwen3's k = 8 as (t0 + t4) + (t1 + t5) + (t2 + t6) + (t3 + t7), as
eager's `.sum(1)` does (torch's CPU sum too, on the output lanes past its vector width's last
multiple). The compiled torch path is one rounding further from eager: inductor fuses the
routing product into the sum and, with emulate_precision_casts off, does not round it first.

Tensor parallelism (experts split by rows): a rank's w1 / w3 hold [E, ffn / tp, dim] and its w2
[E, dim, ffn / tp] (possibly a column slice: any row stride, unit column stride); the kernels
run on the shard as on a whole model, and the MoE block's all-reduce follows as before.
PDL (pdl.py): nothing either kernel reads is independent of the kernel before it (the expert
ids come from the router's top-k, and the rows to read from them), so the PDL twins wait first
and gain only the launch overlap. Measured against the torch path (benchmarks/moe_kernel_ab.py):
faster at one token, slower at batch 4 with the one-token tiles and faster with the H100's
four-token ones (EXPERT_TOKEN_TILES), so the default ("auto", moe.py) runs them at one token
and at a count the GPU has tiles for.
"""

from __future__ import annotations

import torch
from torch import Tensor

from infermeter.engine.kernels import pdl
from infermeter.engine.kernels.exact_math import compiled_for_gpu
from infermeter.engine.kernels.gemv import NUM_STAGES, gpu_name, tiles_for
from infermeter.engine.kernels.pdl import launch
from infermeter.engine.kernels.settings import checked_way
from infermeter.engine.kernels.triton_support import triton, triton_runs_on

if triton is not None:
    import triton.language as tl

    from infermeter.engine.kernels.expert_activation import expert_activation
    from infermeter.engine.kernels.gemv import row_dots

    @triton.jit
    def _sharing_tokens(IDS, slot, expert, n_tokens, top_k, TOKENS: tl.constexpr,
                        TOPK: tl.constexpr):
        """For the expert of `slot`: whether `slot` is the first slot that chose it (its
        program reads the expert for every token), and per token [TOKENS] the slot where that
        token chose it (-1: not chosen)."""
        tokens = tl.arange(0, TOKENS)
        choices = tl.arange(0, TOPK)
        ok = (tokens < n_tokens)[:, None] & (choices < top_k)[None, :]
        slots = tokens[:, None] * top_k + choices[None, :]  # [TOKENS, TOPK]
        hit = ok & (tl.load(IDS + slots, mask=ok, other=-1) == expert)
        where = tl.max(tl.where(hit, slots, -1), 1)  # [TOKENS]
        first = tl.min(tl.min(tl.where(hit, slots, TOKENS * TOPK), 1), 0)
        return first == slot, where

    @triton.jit
    def _experts_swiglu_kernel(X, IDS, W1, W3, B1, B3, OUT, n_rows, n_cols, n_tokens, top_k,
                               stride_x, stride_e1, stride_r1, stride_e3, stride_r3, stride_b1,
                               stride_b3, limit, alpha, TOKENS: tl.constexpr, TOPK: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               HAS_BIAS: tl.constexpr = False, CLAMPED: tl.constexpr = False,
                               LIBDEVICE: tl.constexpr = False, PDL: tl.constexpr = False):
        experts_swiglu_rows(tl.program_id(0), tl.program_id(1), X, IDS, W1, W3, B1, B3, OUT,
                            n_rows, n_cols, n_tokens, top_k, stride_x, stride_e1, stride_r1,
                            stride_e3, stride_r3, stride_b1, stride_b3, limit, alpha, TOKENS,
                            TOPK, BLOCK_N, BLOCK_K, HAS_BIAS, CLAMPED, LIBDEVICE, PDL)

    @triton.jit
    def experts_swiglu_rows(row_block, slot, X, IDS, W1, W3, B1, B3, OUT, n_rows, n_cols,
                            n_tokens, top_k, stride_x, stride_e1, stride_r1, stride_e3,
                            stride_r3, stride_b1, stride_b3, limit, alpha, TOKENS: tl.constexpr,
                            TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            HAS_BIAS: tl.constexpr, CLAMPED: tl.constexpr,
                            LIBDEVICE: tl.constexpr, PDL: tl.constexpr):
        """_experts_swiglu_kernel's program (row_block, slot): BLOCK_N / 2 gate and up rows of
        slot's expert, for every token that chose it."""
        rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        if PDL:  # x and the ids are the previous kernels' outputs, and the rows follow the ids
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        expert = tl.load(IDS + slot)
        owner, where = _sharing_tokens(IDS, slot, expert, n_tokens, top_k, TOKENS, TOPK)
        if owner:  # the expert's first slot: its rows once, for every token that chose it
            chose = where >= 0  # [TOKENS]
            x_rows = X + tl.arange(0, TOKENS).to(tl.int64)[:, None] * stride_x
            gate_at = W1 + expert * stride_e1 + rows[:, None] * stride_r1
            up_at = W3 + expert * stride_e3 + rows[:, None] * stride_r3
            acc_gate = tl.zeros([TOKENS, BLOCK_N, BLOCK_K], tl.float32)
            acc_up = tl.zeros([TOKENS, BLOCK_N, BLOCK_K], tl.float32)
            for k0 in range(0, n_cols, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                col_ok = cols < n_cols
                tile_ok = row_ok[:, None] & col_ok[None, :]
                x = tl.load(x_rows + cols[None, :], mask=chose[:, None] & col_ok[None, :],
                            other=0.0).to(tl.float32)[:, None, :]  # [TOKENS, 1, BLOCK_K]
                gate = tl.load(gate_at + cols[None, :], mask=tile_ok, other=0.0,
                               eviction_policy="evict_first")  # [BLOCK_N, BLOCK_K]
                up = tl.load(up_at + cols[None, :], mask=tile_ok, other=0.0,
                             eviction_policy="evict_first")
                acc_gate += gate.to(tl.float32)[None, :, :] * x
                acc_up += up.to(tl.float32)[None, :, :] * x
            dtype = OUT.dtype.element_ty
            # [TOKENS, BLOCK_N] gate and up sums -> the activation
            act = expert_activation(tl.sum(acc_gate, 2), tl.sum(acc_up, 2), B1, B3, expert,
                                    stride_b1, stride_b3, rows, row_ok, limit, alpha, dtype,
                                    HAS_BIAS, CLAMPED, LIBDEVICE)
            tl.store(OUT + where.to(tl.int64)[:, None] * n_rows + rows[None, :],
                     act.to(dtype), mask=chose[:, None] & row_ok[None, :])

    @triton.jit
    def _experts_down_kernel(ACT, IDS, ROUTE, W2, B2, OUT, RES, n_rows, n_cols, top_k,
                             stride_e, stride_r, stride_b, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr = False,
                             PDL: tl.constexpr = False, HAS_RESIDUAL: tl.constexpr = False):
        experts_down_rows(tl.program_id(0), tl.program_id(1), ACT, IDS, ROUTE, W2, B2, OUT, RES,
                          n_rows, n_cols, top_k, stride_e, stride_r, stride_b, BLOCK_N, BLOCK_K,
                          HAS_BIAS, HAS_RESIDUAL, PDL)

    @triton.jit
    def experts_down_rows(row_block, token, ACT, IDS, ROUTE, W2, B2, OUT, RES, n_rows, n_cols,
                          top_k, stride_e, stride_r, stride_b, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                          HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
        """_experts_down_kernel's program (row_block, token): BLOCK_N rows of the token's k
        experts' weighted sum; HAS_RESIDUAL (the fused step's MoE block): RES's rows [n_rows]
        plus that sum rounded, as the block's residual add rounds it."""
        rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
        token = token.to(tl.int64)
        row_ok = rows < n_rows
        if PDL:  # the activations, ids and routing weights are earlier kernels' outputs
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        dtype = OUT.dtype.element_ty
        out = tl.zeros([BLOCK_N], tl.float32)
        for j in range(0, top_k):  # routing order, as eager's sum over the k
            slot = token * top_k + j
            expert = tl.load(IDS + slot).to(tl.int64)
            down = row_dots(ACT + slot * n_cols, W2 + expert * stride_e, rows, row_ok, n_cols,
                            stride_r, BLOCK_N, BLOCK_K)
            down = down.to(dtype).to(tl.float32)
            if HAS_BIAS:  # eager's `+ bias`, rounded
                bias = tl.load(B2 + expert * stride_b + rows, mask=row_ok, other=0.0)
                down = (down + bias.to(tl.float32)).to(dtype).to(tl.float32)
            route = tl.load(ROUTE + slot).to(tl.float32)
            out += (down * route).to(dtype).to(tl.float32)
        if HAS_RESIDUAL:  # residual + the sum rounded, as two dtype tensors add
            residual = tl.load(RES + token * n_rows + rows, mask=row_ok, other=0.0)
            out = residual.to(tl.float32) + out.to(dtype).to(tl.float32)
        tl.store(OUT + token * n_rows + rows, out.to(dtype), mask=row_ok)

    @triton.jit
    def _experts_down_terms_kernel(ACT, IDS, ROUTE, W2, B2, TERMS, n_rows, n_cols, n_tokens,
                                   top_k, stride_e, stride_r, stride_b, TOKENS: tl.constexpr,
                                   TOPK: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr = False,
                                   PDL: tl.constexpr = False):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        slot = tl.program_id(1)
        row_ok = rows < n_rows
        if PDL:  # the activations, ids and routing weights are earlier kernels' outputs
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        expert = tl.load(IDS + slot)
        owner, where = _sharing_tokens(IDS, slot, expert, n_tokens, top_k, TOKENS, TOPK)
        if owner:  # the expert's first slot: its rows once, for every token that chose it
            chose = where >= 0
            act_rows = ACT + where.to(tl.int64)[:, None] * n_cols  # [TOKENS, 1]
            w_at = W2 + expert * stride_e + rows[:, None] * stride_r
            acc = tl.zeros([TOKENS, BLOCK_N, BLOCK_K], tl.float32)
            for k0 in range(0, n_cols, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                col_ok = cols < n_cols
                act = tl.load(act_rows + cols[None, :], mask=chose[:, None] & col_ok[None, :],
                              other=0.0).to(tl.float32)[:, None, :]  # [TOKENS, 1, BLOCK_K]
                w = tl.load(w_at + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                            other=0.0, eviction_policy="evict_first")  # [BLOCK_N, BLOCK_K]
                acc += w.to(tl.float32)[None, :, :] * act
            dtype = TERMS.dtype.element_ty
            down = tl.sum(acc, 2).to(dtype).to(tl.float32)  # [TOKENS, BLOCK_N]
            if HAS_BIAS:  # eager's `+ bias`, rounded
                bias = tl.load(B2 + expert * stride_b + rows, mask=row_ok, other=0.0)
                down = (down + bias.to(tl.float32)[None, :]).to(dtype).to(tl.float32)
            route = tl.load(ROUTE + where, mask=chose, other=0.0).to(tl.float32)
            tl.store(TERMS + where.to(tl.int64)[:, None] * n_rows + rows[None, :],
                     (down * route[:, None]).to(dtype), mask=chose[:, None] & row_ok[None, :])


# Tiles of the expert kernels where a GPU's own timings (benchmarks/expert_tiles.py) beat
# tiles_for's GEMV tiles: by torch.cuda.get_device_name, kernel ("swiglu": w1 / w3 over dim
# columns; "down": w2 over ffn columns, either way of one token) and that column count, in
# tiles_for's terms (BLOCK_N weight rows, BLOCK_K columns at one token, num_warps; the launchers
# halve BLOCK_N into gate and up rows and divide BLOCK_K among tokens). No entry: tiles_for's.
# The batch-1 bests of benchmarks/expert_tiles.py on an H100 (Qwen3-30B-A3B's widths;
# results/expert-tiles-nvidia-h100-80gb-hbm3.json, 2026-12-06)
EXPERT_TILES: dict[str, dict[str, dict[int, tuple[int, int, int]]]] = {
    "NVIDIA H100 80GB HBM3": {"swiglu": {2048: (2, 2048, 4)}, "down": {768: (2, 1024, 4)}},
}
# Bests at a token count the benchmark timed besides one, by device name, kernel and (column
# count, tokens), in the same terms: they serve that count only, the table above every other.
# The batch-4 bests on an H100 (results/expert-tiles-nvidia-h100-80gb-hbm3.json, 2026-12-06:
# gate/up 156.96 -> 92.99 us, down's terms 120.26 -> 71.23 us against tiles_for's; the batch-1
# bests had made gate/up a little slower there). With them Qwen3-30B-A3B's batch-4 step took
# 0.949x torch's gathering (results/moe-kernel-token-tiles-nvidia-h100-80gb-hbm3.jsonl), so
# moe.py's "auto" takes the Triton kernels at a count listed here for both kernels
# (tiled_token_counts).
EXPERT_TOKEN_TILES: dict[str, dict[str, dict[tuple[int, int], tuple[int, int, int]]]] = {
    "NVIDIA H100 80GB HBM3": {"swiglu": {(2048, 4): (8, 1024, 4)},
                              "down": {(768, 4): (8, 512, 4)}},
}
EXPERT_KERNELS = ("swiglu", "down")


def tiled_token_counts(device: torch.device, dim: int, ffn: int) -> frozenset[int]:
    """The token counts EXPERT_TOKEN_TILES holds for `device`'s GPU at both expert kernels'
    widths: gate/up over dim columns, down over ffn."""
    tiles = EXPERT_TOKEN_TILES.get(gpu_name(device), {})
    swiglu = {n for cols, n in tiles.get("swiglu", {}) if cols == dim}
    down = {n for cols, n in tiles.get("down", {}) if cols == ffn}
    return frozenset(swiglu & down)


# How experts_down runs one token: "sum", a program a row block runs the k experts in turn and
# sums them in the kernel; "terms", as several tokens (a program a row block and slot, each
# writing its weighted term, then torch's sum over k).
DOWN_WAYS = ("sum", "terms")
ONE_TOKEN_DOWN = "sum"


def expert_tiles_for(kernel: str, n_cols: int, gpu: str = "",
                     n_tokens: int = 1) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) of expert kernel `kernel` over weights of n_cols columns on
    GPU `gpu` (a device name) for a forward of n_tokens: EXPERT_TOKEN_TILES' entry for that
    count, else EXPERT_TILES' for the width, else tiles_for's."""
    if kernel not in EXPERT_KERNELS:
        raise ValueError(f"unknown expert kernel {kernel!r}: one of {EXPERT_KERNELS}")
    by_tokens = EXPERT_TOKEN_TILES.get(gpu, {}).get(kernel, {}).get((n_cols, n_tokens))
    return by_tokens or EXPERT_TILES.get(gpu, {}).get(kernel, {}).get(n_cols) \
        or tiles_for(n_cols, gpu)


def _checked_tiles(tiles: tuple[int, int, int]) -> tuple[int, int, int]:
    """An explicit (BLOCK_N, BLOCK_K, num_warps): powers of two (Triton's aranges and warps)."""
    if len(tiles) != 3 or any(int(t) < 1 or int(t) & (int(t) - 1) for t in tiles):
        raise ValueError(f"tiles {tuple(tiles)}: three powers of two (BLOCK_N, BLOCK_K, "
                         "num_warps)")
    return int(tiles[0]), int(tiles[1]), int(tiles[2])


def token_tiles(tiles: tuple[int, int, int], n_tokens: int) -> tuple[int, int, int]:
    """tiles_for's tiles for a program that multiplies its weight tile by n_tokens rows: as
    many float32 partial products as the GEMV's (BLOCK_K / TOKENS columns, at least 16)."""
    block_n, block_k, warps = tiles
    return block_n, max(16, block_k // triton.next_power_of_2(n_tokens)), warps


def _experts_swiglu(x: Tensor, ids: Tensor, w1: Tensor, w3: Tensor, pdl: bool,
                    b1: Tensor | None = None, b3: Tensor | None = None,
                    limit: float | None = None, alpha: float = 1.0, *,
                    tiles: tuple[int, int, int] | None = None) -> Tensor:
    """experts_swiglu's launch; tiles (expert_tiles_for's terms) replace the table's."""
    n_tokens, top_k = ids.shape
    has_bias = b1 is not None
    b1, b3 = (b1, b3) if has_bias else (w1, w3)  # without biases: never read
    hidden, dim = w1.shape[1], w1.shape[2]
    tiles = _checked_tiles(tiles) if tiles is not None else \
        expert_tiles_for("swiglu", dim, gpu_name(w1.device), n_tokens)
    block_n, block_k, warps = token_tiles(tiles, n_tokens)
    block_n = max(1, block_n // 2)  # gate and up rows: the GEMV's number of rows a program
    out = torch.empty(n_tokens, top_k, hidden, dtype=x.dtype, device=x.device)
    launch(_experts_swiglu_kernel, (triton.cdiv(hidden, block_n), n_tokens * top_k), pdl,
           x, ids.contiguous(), w1, w3, b1, b3, out, hidden, dim, n_tokens, top_k, x.stride(0),
           w1.stride(0), w1.stride(1), w3.stride(0), w3.stride(1), b1.stride(0), b3.stride(0),
           0.0 if limit is None else float(limit), float(alpha),
           TOKENS=triton.next_power_of_2(n_tokens), TOPK=triton.next_power_of_2(top_k),
           BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=has_bias, CLAMPED=limit is not None,
           LIBDEVICE=compiled_for_gpu(x), num_warps=warps, num_stages=NUM_STAGES)
    return out


def _experts_down(act: Tensor, ids: Tensor, weights: Tensor, w2: Tensor, pdl: bool,
                  b2: Tensor | None = None, residual: Tensor | None = None, *,
                  tiles: tuple[int, int, int] | None = None,
                  one_token: str | None = None) -> Tensor:
    """experts_down's launch; tiles (expert_tiles_for's terms) replace the table's, one_token
    (DOWN_WAYS) ONE_TOKEN_DOWN. residual [N, dim]: residual + the sum, each rounded (the
    block's residual add: in the kernel for one token's sum way, else by torch)."""
    n_tokens, top_k = ids.shape
    way = ONE_TOKEN_DOWN if one_token is None else one_token
    checked_way(way, "one-token down way", DOWN_WAYS)
    has_bias = b2 is not None
    b2 = b2 if has_bias else w2  # without a bias: never read
    dim, hidden = w2.shape[1], w2.shape[2]
    act, ids, weights = act.contiguous(), ids.contiguous(), weights.contiguous()
    tiles = _checked_tiles(tiles) if tiles is not None else \
        expert_tiles_for("down", hidden, gpu_name(w2.device), n_tokens)
    if n_tokens == 1 and way == "sum":  # k distinct experts: the weighted sum in the kernel
        block_n, block_k, warps = tiles
        out = torch.empty(n_tokens, dim, dtype=act.dtype, device=act.device)
        launch(_experts_down_kernel, (triton.cdiv(dim, block_n), n_tokens), pdl,
               act, ids, weights, w2, b2, out, out if residual is None else residual.contiguous(),
               dim, hidden, top_k, w2.stride(0), w2.stride(1), b2.stride(0), BLOCK_N=block_n,
               BLOCK_K=block_k, HAS_BIAS=has_bias, HAS_RESIDUAL=residual is not None,
               num_warps=warps, num_stages=NUM_STAGES)
        return out
    # Tokens share experts: each expert's program writes every choosing token's weighted term,
    # and torch sums the k terms (float32, rounded once) as the eager path does.
    block_n, block_k, warps = token_tiles(tiles, n_tokens)
    terms = torch.empty(n_tokens, top_k, dim, dtype=act.dtype, device=act.device)
    launch(_experts_down_terms_kernel, (triton.cdiv(dim, block_n), n_tokens * top_k), pdl,
           act, ids, weights, w2, b2, terms, dim, hidden, n_tokens, top_k, w2.stride(0),
           w2.stride(1), b2.stride(0), TOKENS=triton.next_power_of_2(n_tokens),
           TOPK=triton.next_power_of_2(top_k), BLOCK_N=block_n, BLOCK_K=block_k,
           HAS_BIAS=has_bias, num_warps=warps, num_stages=NUM_STAGES)
    return terms.sum(dim=1) if residual is None else residual + terms.sum(dim=1)


# Each op as a torch.library.triton_op (inductor keeps it whole in the compiled CUDA-graph step)
# and a custom_op twin launched with PDL (pdl.py says why both). ids [N, k] are the routing's
# expert ids (int64), weights [N, k] its weights in x's dtype; the stacked weights have unit
# column stride and x's dtype, as have the optional biases (gpt-oss: b1 / b3 [E, ffn], b2
# [E, dim]). limit: gpt-oss's clamped SwiGLU (MoEFeedForward.activation, alpha its sigmoid's
# scale); None: silu(gate) * up.

@torch.library.triton_op("infermeter::experts_swiglu", mutates_args=())
def experts_swiglu(x: Tensor, ids: Tensor, w1: Tensor, w3: Tensor, b1: Tensor | None = None,
                   b3: Tensor | None = None, limit: float | None = None,
                   alpha: float = 1.0) -> Tensor:
    """x [N, dim] (unit column stride), w1 / w3 [E, ffn, dim] -> the activation of
    gate = x @ w1[id]^T (+ b1[id]) and up = x @ w3[id]^T (+ b3[id]), [N, k, ffn], for each
    token's k expert ids: silu(gate) * up, or with limit the clamped SwiGLU."""
    return _experts_swiglu(x, ids, w1, w3, False, b1, b3, limit, alpha)


@torch.library.custom_op("infermeter::experts_swiglu_pdl", mutates_args=())
def experts_swiglu_pdl(x: Tensor, ids: Tensor, w1: Tensor, w3: Tensor, b1: Tensor | None = None,
                       b3: Tensor | None = None, limit: float | None = None,
                       alpha: float = 1.0) -> Tensor:
    return _experts_swiglu(x, ids, w1, w3, True, b1, b3, limit, alpha)


@experts_swiglu_pdl.register_fake
def _(x: Tensor, ids: Tensor, w1: Tensor, w3: Tensor, b1: Tensor | None = None,
      b3: Tensor | None = None, limit: float | None = None, alpha: float = 1.0) -> Tensor:
    return x.new_empty(ids.shape[0], ids.shape[1], w1.shape[1])


@torch.library.triton_op("infermeter::experts_down", mutates_args=())
def experts_down(act: Tensor, ids: Tensor, weights: Tensor, w2: Tensor,
                 b2: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """act [N, k, ffn], w2 [E, dim, ffn] -> sum over the k of weights * (act @ w2[id]^T
    (+ b2[id])): [N, dim]; with residual [N, dim], residual + that sum (the block's add)."""
    return _experts_down(act, ids, weights, w2, False, b2, residual)


@torch.library.custom_op("infermeter::experts_down_pdl", mutates_args=())
def experts_down_pdl(act: Tensor, ids: Tensor, weights: Tensor, w2: Tensor,
                     b2: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    return _experts_down(act, ids, weights, w2, True, b2, residual)


@experts_down_pdl.register_fake
def _(act: Tensor, ids: Tensor, weights: Tensor, w2: Tensor, b2: Tensor | None = None,
      residual: Tensor | None = None) -> Tensor:
    return act.new_empty(ids.shape[0], w2.shape[1])


def gathered_experts(x: Tensor, weights: Tensor, ids: Tensor, w1: Tensor, w3: Tensor,
                     w2: Tensor, b1: Tensor | None = None, b3: Tensor | None = None,
                     b2: Tensor | None = None, limit: float | None = None,
                     alpha: float = 1.0, residual: Tensor | None = None) -> Tensor:
    """MoEFeedForward.gathered's output [N, dim] through the two kernels, as a compiled step
    calls them: with PDL when pdl.enabled(). residual [N, dim]: residual + that output, the
    add in the down kernel (the fused step's MoE block)."""
    on = pdl.enabled()
    act = (experts_swiglu_pdl if on else experts_swiglu)(x, ids, w1, w3, b1, b3, limit, alpha)
    return (experts_down_pdl if on else experts_down)(act, ids, weights, w2, b2, residual)


def experts_kernel_usable(x: Tensor, *weights: Tensor | None) -> bool:
    """Triton runs where x lives, x's rows and the stacked weights (and biases; None: absent)
    have unit column stride, and all share x's dtype (what the kernels read)."""
    return triton_runs_on(x) and x.stride(-1) == 1 and all(
        w is None or (w.stride(-1) == 1 and w.dtype == x.dtype) for w in weights)
