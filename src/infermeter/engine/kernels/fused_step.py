"""The batch-1 decode step in fewer kernels: a layer's RMSNorms, SwiGLU, residual adds, RoPE and
K/V cache write folded into its matrix-vector products (the "fused" step, model.STEP_KERNELS).

Why: a small model's batch-1 step is hundreds of short kernels, and the gaps between them cost
as much as its weight bytes (issue 27: Llama-3.2-1B at 65.6% MBU on an H200, 7-8B at 87-90%).
The split step runs, a layer: (the previous layer's) add + norm, wqkv GEMV, (RoPE and cache
write, attention), wo GEMV, add + norm, w13 GEMV, activation, w2 GEMV (inductor fuses each add
with the norm after it). The fused one runs, a layer: norm + wqkv + RoPE + cache write, (the
same attention kernels), wo + add, norm + w13 + activation, w2 + add: 4 kernels where there were
7 and RoPE's and the cache write's (and, for Qwen3, its per-head q/k norms' between wqkv and
RoPE: the first kernel norms them too).

One kernel, five constexpr switches, gemv.py's tiling (evict-first weight loads, a float32
[BLOCK_N, BLOCK_K] partial product, one row sum at the end; the tiles fused_tiles_for's: a GPU's
FUSED_TILES entry, else the GEMV's tiles_for tiles adapted as below):
  HAS_NORM      x is RMS-normed on the way in. Every program first sums x's squares over K
                itself (x is a few thousand values, read from L2, cheap against its weight rows;
                no extra kernel, no grid-wide sync), then normalises each x tile it multiplies.
  GEMMA         the norm applies (1 + w) in float32, as GemmaRMSNorm does.
  SWIGLU        the weight is w13 [2H, K]: a program computes gate rows r and up rows H + r from
                the same x tiles and writes silu(gate) * up [1, H] (BLOCK_N / 2 of each, so its
                registers hold what the GEMV's program would).
  GELU          with SWIGLU, GeGLU's tanh-approximate gelu(gate) * up instead (Gemma 2 and 3).
  HAS_RESIDUAL  out = residual + x @ W^T (wo's and w2's products and the add after them).
And _norm_qkv_rope_kernel, the same tiling for norm + wqkv: a program's rows are adjacent pairs
(rope.py's interleaved pairs), even and odd rows in two accumulators as SWIGLU's gate and up, so
it rotates q's and k's pairs in registers and stores q, and k and v into the cache's slot
(position % window and key_pos for a ring layer). With per-head q/k norms (QK_NORM: Qwen3,
Gemma 3) a program's rows are one whole head (BLOCK_N = head_dim, BLOCK_K as many columns as
keep the GEMV's tile size): its pairs' products give the head's RMS over head_dim before RoPE,
with no other program's rows needed; v's heads are not normed. Off, the kernel is the one above.
The fused step takes that QK_NORM way only where asked (qk_norm_rope.QK_NORM_KERNELS 1); by
default such a layer runs norm_gemv, then qk_norm_rope.py's kernel,
which shares this kernel's epilogue (rope_and_store).

Numerics: the eager path's rounding points, so that a fused step stays as near eager as it can:
- the normed x is rounded as eager's RMSNorm rounds it, not kept in float32 into the product:
  x * rsqrt(mean(x^2) + eps) (the mean as torch's CUDA mean: sum * (1 / n)) rounded to the
  activation dtype, times its weight in that dtype, rounded again (GemmaRMSNorm: times
  (1 + w) in float32, rounded once). The split compiled step does not quite: inductor fuses
  the norm and, with its emulate_precision_casts off, rounds x * rsqrt(...) * w once (as its
  CPU backend does, tried on a bf16 row: a fifth of the values one unit off eager's). Only
  the sum of squares runs in another order than torch's mean (float32 both).
- products and sums in float32, each product rounded to the dtype once (as gemv.py); gate and
  up rounded, silu (or GELU) in float32 rounded, its product with up rounded (swiglu.py's and
  eager's points); GELU as torch's CUDA kernel orders and contracts it (x + kappa * x^3 one
  FMA, every other product rounded: mul.rn on a GPU; exact_math.exact_gelu_tanh) and tanh
  libdevice's tanhf, torch's; the residual add is of the rounded product, rounded again
  (eager adds two dtype tensors; so does the split step); wqkv's product rounded, Qwen2's
  bias added and rounded, the q/k norms as the input norm (float32 sum of squares over the
  head's rounded values, x * rsqrt(mean + eps) rounded, times w rounded; Gemma's (1 + w)
  rounded once), RoPE in float32 from those values, each of its four products rounded to
  float32 before the add (PTX mul.rn on a GPU, which Triton's FP fusion cannot fold into an
  FMA), rounded once.
So fused and eager part only where a float32 sum order decides a rounding (the norms' sums of
squares; the products' order against cuBLAS's); fused and split also where inductor's single
norm rounding differs from eager's two. Random weights make such ties flip greedy tokens now
and then (docs/engine.md, "Correctness of the fast paths").

PDL (pdl.py): a program loads its first [BLOCK_N, BLOCK_K] weight tile (both for SWIGLU) and
the norm's weights for it before waiting for the kernel that wrote x; unlike gemv.py's
up-to-16-KiB first tile this one is an ordinary tile going into the accumulator as the loop's
first step would, so PDL changes no bit here. After the wait every load the first tile needs
(x, the residual, RoPE's cos, sin and position) goes out before the first reduction: a
reduction's barrier keeps the compiler from moving a load above it, so a load written after
one waited a round trip of its own (at one column tile, a small model's case, that was two or
three round trips after the wait where one will do). Which model sizes PDL pays for was
measured by benchmarks/step_kernels_ab.py; generate's "auto" runs it for small dense models
(engine/step_choice.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from infermeter.engine.kernels import pdl
from infermeter.engine.kernels.exact_math import compiled_for_gpu
from infermeter.engine.kernels.gemv import NUM_STAGES, gpu_name, tiles_for
from infermeter.engine.kernels.pdl import attention_release, early_release, launch
from infermeter.engine.kernels.prefetch import ahead_bytes, prefetchable
from infermeter.engine.kernels.settings import checked_way
from infermeter.engine.kernels.triton_support import triton, triton_runs_on

if triton is not None:
    import triton.language as tl

    from infermeter.engine.kernels.exact_math import (
        exact_gelu_tanh,
        exact_mean,
        exact_silu,
        uncontracted_product,
    )
    from infermeter.engine.kernels.prefetch import prefetch_share

    # Exact where eager is (built for sm_90, Triton's `/` on float32 is div.full.f32 or
    # div.approx.f32, within 2 ulp of the quotient):
    # - a mean is sum * (1 / n), the reciprocal rounded once (div.rn): torch's CUDA mean kernel
    #   multiplies its sum by a float32 factor 1 / n (MeanOps), not a division;
    # - SiLU is x / (1 + exp(-x)) with an IEEE division (div.rn) and libdevice's expf, as
    #   torch's CUDA silu kernel computes it (exact_math.exact_silu; Triton's tl.exp is
    #   ex2.approx of x * log2(e)); LIBDEVICE off (Triton's interpreter, which has no
    #   libdevice): tl.exp;
    # - tanh-GELU is torch's CUDA kernel's float32 formula in its order with libdevice's tanhf
    #   and its one FMA, its other products mul.rn (exact_math.exact_gelu_tanh);
    # - rsqrt stays tl.rsqrt, rsqrt.approx.ftz.f32: torch.rsqrt on CUDA is rsqrtf, the same
    #   approximation (rsqrt.approx.f32); ftz differs only for subnormal inputs and outputs,
    #   and mean(x^2) + eps >= eps is normal.

    @triton.jit
    def _inv_rms(X, n_cols, EPS: tl.constexpr, BLOCK_K: tl.constexpr):
        """float32 rsqrt(mean(x^2) + eps) over x's n_cols values (RMSNorm's scale)."""
        squares = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            squares += x * x
        return tl.rsqrt(exact_mean(tl.sum(squares, axis=0), n_cols) + EPS)

    @triton.jit
    def _input_tile(X, NORM_W, cols, col_ok, inv_rms, HAS_NORM: tl.constexpr,
                    GEMMA: tl.constexpr):
        """float32 [BLOCK_K]: x's columns `cols`, normed and rounded as eager's RMSNorm rounds
        them (module docstring) when HAS_NORM."""
        w = 0.0
        if HAS_NORM:
            w = tl.load(NORM_W + cols, mask=col_ok, other=0.0)
        return _normed_tile(tl.load(X + cols, mask=col_ok, other=0.0), w, inv_rms, HAS_NORM,
                            GEMMA)

    @triton.jit
    def _normed_tile(x, w, inv_rms, HAS_NORM: tl.constexpr, GEMMA: tl.constexpr):
        """_input_tile of x's loaded tile and the norm weight's w (both [BLOCK_K])."""
        if HAS_NORM:
            w = w.to(tl.float32)
            normed = x.to(tl.float32) * inv_rms
            if GEMMA:  # (normed * (1 + w)).type_as(x)
                tile = (normed * (1.0 + w)).to(x.dtype).to(tl.float32)
            else:  # normed.type_as(x) * w, a product of two dtype tensors
                tile = (normed.to(x.dtype).to(tl.float32) * w).to(x.dtype).to(tl.float32)
        else:
            tile = x.to(tl.float32)
        return tile

    @triton.jit
    def normed_row(X, NORM_W, OUT, n_cols, EPS: tl.constexpr, GEMMA: tl.constexpr,
                   BLOCK_K: tl.constexpr):
        """Store RMSNorm(x) [n_cols] to OUT as the fused kernels norm it (eager's rounding
        points): what a later kernel reads where the normed row itself is the input (the fused
        step's MoE experts)."""
        inv_rms = _inv_rms(X, n_cols, EPS, BLOCK_K)
        for k0 in range(0, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < n_cols
            tile = _input_tile(X, NORM_W, cols, col_ok, inv_rms, True, GEMMA)
            tl.store(OUT + cols, tile.to(OUT.dtype.element_ty), mask=col_ok)

    @triton.jit
    def _fused_gemv_kernel(X, NORM_W, W, RES, OUT, NORMED, AHEAD, n_out, n_cols, stride_w,
                           up_row, ahead_total, EPS: tl.constexpr, HAS_NORM: tl.constexpr,
                           GEMMA: tl.constexpr, SWIGLU: tl.constexpr,
                           HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, LIBDEVICE: tl.constexpr = False,
                           PDL: tl.constexpr = False, GELU: tl.constexpr = False,
                           STORE_NORMED: tl.constexpr = False, AHEAD_ON: tl.constexpr = False,
                           EARLY_RELEASE: tl.constexpr = False):
        pid = tl.program_id(0)
        if AHEAD_ON:  # a later product's first bytes into L2 (prefetch.py), before anything
            pid += prefetch_share(AHEAD, ahead_total, pid, tl.num_programs(0))
        fused_gemv_rows(pid, X, NORM_W, W, RES, OUT, n_out, n_cols, stride_w,
                         up_row, EPS, HAS_NORM, GEMMA, SWIGLU, HAS_RESIDUAL, BLOCK_N,
                         BLOCK_K, LIBDEVICE, PDL, GELU, EARLY_RELEASE)
        if STORE_NORMED:  # the normed x itself for a later kernel (an MoE block's experts)
            if tl.program_id(0) == 0:
                normed_row(X, NORM_W, NORMED, n_cols, EPS, GEMMA, BLOCK_K)

    @triton.jit
    def fused_gemv_rows(pid, X, NORM_W, W, RES, OUT, n_out, n_cols, stride_w, up_row,
                         EPS: tl.constexpr, HAS_NORM: tl.constexpr, GEMMA: tl.constexpr,
                         SWIGLU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LIBDEVICE: tl.constexpr,
                         PDL: tl.constexpr, GELU: tl.constexpr,
                         EARLY_RELEASE: tl.constexpr = False):
        """Program pid's BLOCK_N output rows of _fused_gemv_kernel. EARLY_RELEASE (with PDL):
        the next kernel may start before this one's wait, not after it (pdl.EARLY_RELEASE)."""
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_out
        cols = tl.arange(0, BLOCK_K)
        col_ok = cols < n_cols
        tile_ok = row_ok[:, None] & col_ok[None, :]
        w_at = W + rows[:, None] * stride_w + cols[None, :]
        # The first weight tile (gate's and up's with SWIGLU), and the norm's weights for it,
        # before anything another kernel wrote: no kernel writes weights.
        w = tl.load(w_at, mask=tile_ok, other=0.0, eviction_policy="evict_first")
        if SWIGLU:
            w_up = tl.load(w_at + up_row * stride_w, mask=tile_ok, other=0.0,
                           eviction_policy="evict_first")
        w_norm = 0.0
        if HAS_NORM:
            w_norm = tl.load(NORM_W + cols, mask=col_ok, other=0.0)
        if PDL:
            if EARLY_RELEASE:  # the next kernel's weights start while this one still waits
                tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()  # x (and the residual) are earlier kernels' outputs
            if not EARLY_RELEASE:
                tl.extra.cuda.gdc_launch_dependents()
        # Every load after the wait is issued before the first value is used: each one left
        # behind a reduction would wait a round trip of its own (a reduction's barrier keeps
        # the compiler from moving loads above it).
        if HAS_RESIDUAL:
            residual = tl.load(RES + rows, mask=row_ok, other=0.0).to(tl.float32)
        x = tl.load(X + cols, mask=col_ok, other=0.0)
        inv_rms = 1.0
        if HAS_NORM:
            inv_rms = _inv_rms(X, n_cols, EPS, BLOCK_K)
        x = _normed_tile(x, w_norm, inv_rms, HAS_NORM, GEMMA)
        acc = w.to(tl.float32) * x[None, :]  # [BLOCK_N, BLOCK_K]
        if SWIGLU:
            acc_up = w_up.to(tl.float32) * x[None, :]
        for k0 in range(BLOCK_K, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < n_cols
            tile_ok = row_ok[:, None] & col_ok[None, :]
            x = _input_tile(X, NORM_W, cols, col_ok, inv_rms, HAS_NORM, GEMMA)
            w_at = W + rows[:, None] * stride_w + cols[None, :]
            w = tl.load(w_at, mask=tile_ok, other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * x[None, :]
            if SWIGLU:
                w_up = tl.load(w_at + up_row * stride_w, mask=tile_ok, other=0.0,
                               eviction_policy="evict_first")
                acc_up += w_up.to(tl.float32) * x[None, :]
        dtype = OUT.dtype.element_ty
        out = tl.sum(acc, 1)
        if SWIGLU:  # eager's roundings: gate and up, the activation, their product (swiglu.py)
            gate = out.to(dtype).to(tl.float32)
            up = tl.sum(acc_up, 1).to(dtype).to(tl.float32)
            if GELU:  # F.gelu(gate, approximate="tanh") * up
                act = exact_gelu_tanh(gate, LIBDEVICE)
            else:
                act = exact_silu(gate, LIBDEVICE)
            out = act.to(dtype).to(tl.float32) * up
        if HAS_RESIDUAL:  # residual + the product rounded, as two dtype tensors add
            out = residual + out.to(dtype).to(tl.float32)
        tl.store(OUT + rows, out.to(dtype), mask=row_ok)

    @triton.jit
    def _norm_qkv_rope_kernel(X, NORM_W, W, BIAS, COS, SIN, POS, Q_OUT, K_CACHE, V_CACHE,
                              KEY_POS, Q_NORM_W, K_NORM_W, n_q, n_kv, n_cols, stride_w,
                              stride_ch, stride_cs, cache_size, AHEAD, ahead_total,
                              EPS: tl.constexpr, GEMMA: tl.constexpr, HAS_BIAS: tl.constexpr,
                              IS_RING: tl.constexpr, HEAD_DIM: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              UNCONTRACTED: tl.constexpr, QK_NORM: tl.constexpr,
                              QK_GEMMA: tl.constexpr, QK_EPS: tl.constexpr,
                              PDL: tl.constexpr = False, AHEAD_ON: tl.constexpr = False,
                              EARLY_RELEASE: tl.constexpr = False):
        pid = tl.program_id(0)
        if AHEAD_ON:  # a later product's first bytes into L2 (prefetch.py)
            pid += prefetch_share(AHEAD, ahead_total, pid, tl.num_programs(0))
        norm_qkv_rope_rows(pid, X, NORM_W, W, BIAS, COS, SIN, POS, Q_OUT,
                            K_CACHE, V_CACHE, KEY_POS, Q_NORM_W, K_NORM_W, n_q, n_kv, n_cols,
                            stride_w, stride_ch, stride_cs, cache_size, EPS, GEMMA, HAS_BIAS,
                            IS_RING, HEAD_DIM, BLOCK_N, BLOCK_K, UNCONTRACTED, QK_NORM,
                            QK_GEMMA, QK_EPS, PDL, EARLY_RELEASE)

    @triton.jit
    def norm_qkv_rope_rows(pid, X, NORM_W, W, BIAS, COS, SIN, POS, Q_OUT, K_CACHE, V_CACHE,
                            KEY_POS, Q_NORM_W, K_NORM_W, n_q, n_kv, n_cols, stride_w,
                            stride_ch, stride_cs, cache_size, EPS: tl.constexpr,
                            GEMMA: tl.constexpr, HAS_BIAS: tl.constexpr, IS_RING: tl.constexpr,
                            HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, UNCONTRACTED: tl.constexpr,
                            QK_NORM: tl.constexpr, QK_GEMMA: tl.constexpr,
                            QK_EPS: tl.constexpr, PDL: tl.constexpr,
                            EARLY_RELEASE: tl.constexpr = False):
        """norm + wqkv + RoPE + cache write, program pid's: its BLOCK_N rows are BLOCK_N / 2
        adjacent pairs (2p, 2p + 1) of wqkv's q, k and v rows [n_q + 2 n_kv] (rope.py's pairs: a
        head's features (2i, 2i + 1); heads and q/k/v start at even rows, so no pair straddles
        them). Two accumulators, even rows and odd rows (SWIGLU's gate and up), hold both members of
        each pair, rotated in registers. q goes to Q_OUT [n_q], k and v to the cache's slot. QK_NORM
        (Qwen3's, Gemma 3's per-head q/k norms, weights Q_NORM_W / K_NORM_W [HEAD_DIM]): BLOCK_N ==
        HEAD_DIM, so a program's rows are one whole head of q, k or v; q's and k's head is RMS-
        normed over its HEAD_DIM values before RoPE (QK_GEMMA: (1 + w)), v's not. EARLY_RELEASE
        (with PDL): the attention may start before this kernel's wait (pdl.ATTENTION_RELEASE)."""
        pairs = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        rows = 2 * pairs  # the even member of each pair; the odd one is rows + 1
        n_out = n_q + 2 * n_kv
        row_ok = rows < n_out
        cols = tl.arange(0, BLOCK_K)
        col_ok = cols < n_cols
        tile_ok = row_ok[:, None] & col_ok[None, :]
        w_at = W + rows[:, None] * stride_w + cols[None, :]
        # The first weight tiles before anything another kernel wrote (x, the cache, the
        # position): no kernel writes weights.
        w_even = tl.load(w_at, mask=tile_ok, other=0.0, eviction_policy="evict_first")
        w_odd = tl.load(w_at + stride_w, mask=tile_ok, other=0.0, eviction_policy="evict_first")
        w_norm = tl.load(NORM_W + cols, mask=col_ok, other=0.0)
        if PDL:
            if EARLY_RELEASE:  # the attention's old cache slots start while this one waits
                tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
            if not EARLY_RELEASE:
                tl.extra.cuda.gdc_launch_dependents()
        # RoPE's inputs with x, before any value is used (as fused_gemv_rows' loads)
        cos, sin, pos = rope_inputs(COS, SIN, POS, rows, row_ok, HEAD_DIM)
        x = tl.load(X + cols, mask=col_ok, other=0.0)
        inv_rms = _inv_rms(X, n_cols, EPS, BLOCK_K)
        x = _normed_tile(x, w_norm, inv_rms, True, GEMMA)
        acc_even = w_even.to(tl.float32) * x[None, :]  # [BLOCK_N / 2, BLOCK_K]
        acc_odd = w_odd.to(tl.float32) * x[None, :]
        for k0 in range(BLOCK_K, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < n_cols
            tile_ok = row_ok[:, None] & col_ok[None, :]
            x = _input_tile(X, NORM_W, cols, col_ok, inv_rms, True, GEMMA)
            w_at = W + rows[:, None] * stride_w + cols[None, :]
            w_even = tl.load(w_at, mask=tile_ok, other=0.0, eviction_policy="evict_first")
            w_odd = tl.load(w_at + stride_w, mask=tile_ok, other=0.0,
                            eviction_policy="evict_first")
            acc_even += w_even.to(tl.float32) * x[None, :]
            acc_odd += w_odd.to(tl.float32) * x[None, :]
        dtype = Q_OUT.dtype.element_ty
        # eager's roundings: the product (Linear), then the bias added in the dtype (Qwen2)
        a = tl.sum(acc_even, 1).to(dtype).to(tl.float32)
        b = tl.sum(acc_odd, 1).to(dtype).to(tl.float32)
        if HAS_BIAS:
            a = (a + tl.load(BIAS + rows, mask=row_ok, other=0.0).to(tl.float32)).to(dtype)
            b = (b + tl.load(BIAS + rows + 1, mask=row_ok, other=0.0).to(tl.float32)).to(dtype)
            a, b = a.to(tl.float32), b.to(tl.float32)
        rope_and_store(pid, a, b, rows, row_ok, cos, sin, pos, Q_OUT, K_CACHE, V_CACHE,
                       KEY_POS, Q_NORM_W, K_NORM_W, n_q, n_kv, stride_ch, stride_cs,
                       cache_size, IS_RING, HEAD_DIM, UNCONTRACTED, QK_NORM, QK_GEMMA, QK_EPS)

    @triton.jit
    def rope_inputs(COS, SIN, POS, rows, row_ok, HEAD_DIM: tl.constexpr):
        """The cos and sin [BLOCK_N / 2] of pairs (rows, rows + 1) at the step's position, and
        that position: what rope_and_store takes, all earlier kernels' outputs."""
        angle = (rows % HEAD_DIM) // 2  # the pair's feature index, the same for q's and k's
        cos = tl.load(COS + angle, mask=row_ok, other=1.0)
        sin = tl.load(SIN + angle, mask=row_ok, other=0.0)
        return cos, sin, tl.load(POS)

    @triton.jit
    def rope_and_store(pid, a, b, rows, row_ok, cos, sin, pos, Q_OUT, K_CACHE, V_CACHE,
                       KEY_POS, Q_NORM_W, K_NORM_W, n_q, n_kv, stride_ch, stride_cs,
                       cache_size, IS_RING: tl.constexpr, HEAD_DIM: tl.constexpr,
                       UNCONTRACTED: tl.constexpr, QK_NORM: tl.constexpr,
                       QK_GEMMA: tl.constexpr, QK_EPS: tl.constexpr):
        """What follows wqkv's product for pairs (rows, rows + 1) of q, k and v (a, b: float32
        [BLOCK_N / 2], the dtype's values; cos, sin, pos: rope_inputs'): with QK_NORM (rows
        one whole head) q's and k's head RMS-normed, RoPE on q and k, q stored to Q_OUT, k and
        v to the cache's slot (and a ring's key_pos from program 0)."""
        dtype = Q_OUT.dtype.element_ty
        is_v = rows >= n_q + n_kv
        is_q = rows < n_q
        if QK_NORM:  # the head's RMSNorm with eager's roundings (as _input_tile's); each
            # square rounded as torch's pow(2) rounds it, not folded into the sum's adds
            squares = uncontracted_product(a, a, UNCONTRACTED) + \
                uncontracted_product(b, b, UNCONTRACTED)
            # torch's CUDA mean: sum * (1 / HEAD_DIM), the factor folded here (HEAD_DIM a
            # power of two: exact)
            head_inv_rms = tl.rsqrt(tl.sum(squares, 0) * (1.0 / HEAD_DIM) + QK_EPS)
            feature = rows % HEAD_DIM  # the even member's; weights [HEAD_DIM], shared by heads
            w_a = tl.where(is_q, tl.load(Q_NORM_W + feature), tl.load(K_NORM_W + feature))
            w_b = tl.where(is_q, tl.load(Q_NORM_W + feature + 1),
                           tl.load(K_NORM_W + feature + 1))
            w_a, w_b = w_a.to(tl.float32), w_b.to(tl.float32)
            if QK_GEMMA:  # (normed * (1 + w)).type_as(x)
                a_normed = (a * head_inv_rms * (1.0 + w_a)).to(dtype)
                b_normed = (b * head_inv_rms * (1.0 + w_b)).to(dtype)
            else:  # normed.type_as(x) * w, a product of two dtype tensors
                a_normed = ((a * head_inv_rms).to(dtype).to(tl.float32) * w_a).to(dtype)
                b_normed = ((b * head_inv_rms).to(dtype).to(tl.float32) * w_b).to(dtype)
            a = tl.where(is_v, a, a_normed.to(tl.float32))  # v: no norm
            b = tl.where(is_v, b, b_normed.to(tl.float32))
        # apply_rope in float32 (q and k rows; v keeps a, b): (a + ib)(cos + i sin)
        # each product rounded before its add, as eager's (mul.rn on a GPU: never an FMA)
        a_cos = uncontracted_product(a, cos, UNCONTRACTED)
        b_sin = uncontracted_product(b, sin, UNCONTRACTED)
        a_sin = uncontracted_product(a, sin, UNCONTRACTED)
        b_cos = uncontracted_product(b, cos, UNCONTRACTED)
        even = tl.where(is_v, a, a_cos - b_sin).to(dtype)
        odd = tl.where(is_v, b, a_sin + b_cos).to(dtype)
        tl.store(Q_OUT + rows, even, mask=row_ok & is_q)
        tl.store(Q_OUT + rows + 1, odd, mask=row_ok & is_q)
        # k and v into the cache [1, H_kv, S, HEAD_DIM] (unit feature stride) at the step's slot
        slot = pos % cache_size if IS_RING else pos
        kv_row = tl.where(is_v, rows - n_q - n_kv, rows - n_q)  # head * HEAD_DIM + feature
        at = (kv_row // HEAD_DIM) * stride_ch + slot * stride_cs + kv_row % HEAD_DIM
        # a position past a full layer's cache (generate.py refuses one) writes nothing there
        slots = rows * 0 + slot  # [BLOCK_N / 2] (a scalar in a mask fails in the interpreter)
        in_cache = (slots >= 0) & (slots < cache_size)
        is_k = row_ok & ~is_q & ~is_v & in_cache
        is_v = row_ok & is_v & in_cache
        cache_dtype = K_CACHE.dtype.element_ty
        tl.store(K_CACHE + at, even.to(cache_dtype), mask=is_k)
        tl.store(K_CACHE + at + 1, odd.to(cache_dtype), mask=is_k)
        tl.store(V_CACHE + at, even.to(cache_dtype), mask=is_v)
        tl.store(V_CACHE + at + 1, odd.to(cache_dtype), mask=is_v)
        if IS_RING:  # the slot's position, for the attention's mask (kv_cache.py)
            if pid == 0:
                tl.store(KEY_POS + slot, pos)


# Tiles of the fused kernels where a GPU's own timings (benchmarks/fused_tiles.py) beat the
# GEMV's: by torch.cuda.get_device_name, kernel (FUSED_KERNELS) and the weight's column count K,
# in the launch's own terms: (BLOCK_N, BLOCK_K, num_warps), BLOCK_N the output rows a program
# writes (gemv_swiglu: gate rows, each with its up row; norm_qkv_rope: whole pairs, so >= 2).
# With q/k norms norm_qkv_rope takes no entry: the GEMV's tiles, reshaped to one head a
# program (fused_tiles_for).
# A GPU, kernel or width without an entry runs the GEMV's tiles (adapted as fused_tiles_for says).
# The bests of benchmarks/fused_tiles.py at Llama-3.2-1B's, Qwen2.5-0.5B's and SmolLM2-135M's
# widths: on an H100 (results/fused-tiles-quick-nvidia-h100-80gb-hbm3.json, 2026-12-06) and on
# an H200 (results/fused-tiles-quick-nvidia-h200.json, 2026-12-07; in the step they took 0.92,
# 0.82 and 0.85 of the GEMV's tiles' TPOT, results/step-tiles-58787a6-nvidia-h200.jsonl)
FUSED_TILES: dict[str, dict[str, dict[int, tuple[int, int, int]]]] = {
    "NVIDIA H100 80GB HBM3": {
        "norm_qkv_rope": {2048: (2, 1024, 4), 896: (2, 1024, 4), 576: (2, 1024, 4)},
        "gemv_add": {2048: (1, 2048, 4), 1536: (2, 2048, 8)},
        "gemv_swiglu": {2048: (1, 2048, 4), 896: (4, 256, 4), 576: (2, 1024, 4)},
    },
    "NVIDIA H200": {
        "norm_qkv_rope": {2048: (4, 1024, 4), 896: (2, 1024, 4), 576: (4, 1024, 4)},
        "gemv_add": {2048: (1, 1024, 4), 8192: (1, 1024, 4), 4864: (1, 2048, 8),
                     1536: (2, 2048, 4)},
        "gemv_swiglu": {2048: (2, 2048, 4), 896: (4, 256, 4), 576: (2, 1024, 4)},
    },
}
FUSED_KERNELS = ("norm_gemv", "gemv_swiglu", "gemv_add", "norm_qkv_rope")
# Where the fused kernels take their tiles from (an A/B's setting, benchmarks/step_kernels_ab.py
# --fused-tiles): "table", FUSED_TILES (the default); "gemv", no entry at all, the GEMV's tiles
# adapted as on a GPU nobody measured; "file", FILE_ENTRY, the entry a benchmarks/fused_tiles.py
# run suggests for this GPU, timed in the step before it is committed. Recorded in the Result
# (config.fused_tiles_from and config.fused_tiles).
TILES_FROM_WAYS = ("table", "gemv", "file")
TILES_FROM = "table"
FILE_ENTRY: dict[str, dict[int, tuple[int, int, int]]] = {}


def tile_entry(gpu: str) -> dict[str, dict[int, tuple[int, int, int]]]:
    """The entry (kernel -> column count -> tiles) the fused kernels take on GPU `gpu` under
    TILES_FROM; {} where they take the GEMV's tiles."""
    way = checked_way(TILES_FROM, "TILES_FROM", TILES_FROM_WAYS)
    return {"table": FUSED_TILES.get(gpu, {}), "gemv": {}, "file": FILE_ENTRY}[way]


def fused_tiles_for(kernel: str, n_cols: int, gpu: str = "", head_dim: int | None = None,
                    qk_norm: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) of fused kernel `kernel` over a weight of n_cols columns on
    GPU `gpu` (a device name): tile_entry's (FUSED_TILES' by default), else tiles_for's adapted
    to the kernel (gemv_swiglu: half the rows, gate and up; norm_qkv_rope: at least one pair).
    qk_norm (norm_qkv_rope only, with head_dim): one head a program, BLOCK_N = head_dim and
    BLOCK_K as many columns as keep tiles_for's element count (at least 16); no entry applies."""
    if kernel not in FUSED_KERNELS:
        raise ValueError(f"unknown fused kernel {kernel!r}: one of {FUSED_KERNELS}")
    if qk_norm and (kernel != "norm_qkv_rope" or head_dim is None):
        raise ValueError("q/k norms are norm_qkv_rope's, with its head_dim")
    # An entry times the pairs' kernel, never the one-head-a-program kernel q/k norms take:
    # reshaped to one head, a (2, 1024) best would be a 16-column sliver. Those keep the GEMV's.
    entry = None if qk_norm else tile_entry(gpu).get(kernel, {}).get(n_cols)
    if entry is not None:
        block_n, block_k, warps = _checked_tiles(kernel, entry)
    else:
        block_n, block_k, warps = tiles_for(n_cols, gpu)
        if kernel == "gemv_swiglu":  # a program holds as many weight rows as the GEMV's would
            block_n = max(1, block_n // 2)
    if qk_norm:
        block_n, block_k = head_dim, max(16, block_n * block_k // head_dim)
    if kernel == "norm_qkv_rope":  # whole pairs: the GEMV's rows, or one pair where it takes one
        block_n = max(2, block_n)
    return block_n, block_k, warps


def _checked_tiles(kernel: str, tiles: tuple[int, int, int], head_dim: int | None = None,
                   qk_norm: bool = False) -> tuple[int, int, int]:
    """An explicit (BLOCK_N, BLOCK_K, num_warps) for `kernel`'s launch: powers of two (Triton's
    aranges and warps); norm_qkv_rope's BLOCK_N whole pairs, one head (head_dim) with q/k norms."""
    if len(tiles) != 3 or any(int(t) != t or t < 1 or int(t) & (int(t) - 1) for t in tiles):
        raise ValueError(f"{kernel} tiles {tuple(tiles)}: three powers of two (BLOCK_N, "
                         "BLOCK_K, num_warps)")
    block_n, block_k, warps = (int(t) for t in tiles)
    if kernel == "norm_qkv_rope" and block_n < 2:
        raise ValueError(f"{kernel} tiles {tuple(tiles)}: BLOCK_N holds whole pairs, >= 2")
    if qk_norm and block_n != head_dim:
        raise ValueError(f"{kernel} tiles {tuple(tiles)}: with q/k norms a program is one "
                         f"head, BLOCK_N = head_dim {head_dim}")
    return block_n, block_k, warps


def _fused_gemv(x: Tensor, weight: Tensor, norm_weight: Tensor | None, residual: Tensor | None,
                eps: float, gemma: bool, swiglu: bool, pdl: bool, gelu: bool = False, *,
                tiles: tuple[int, int, int] | None = None,
                normed: Tensor | None = None, ahead: Tensor | None = None) -> Tensor:
    """x [1, K], weight [N, K] (w13 [2H, K] with swiglu) -> [1, N] (or [1, H]: silu(gate) * up,
    tanh-GELU's with gelu) in x's dtype. tiles (fused_tiles_for's terms) replace the table's.
    normed ([1, K], with norm_weight): also filled with the normed x the product read.
    ahead: a later product's weight, whose first bytes the programs prefetch into L2 (on a GPU;
    prefetch.py)."""
    n_rows, n_cols = weight.shape
    n_out = n_rows // 2 if swiglu else n_rows
    kernel = "gemv_swiglu" if swiglu else "gemv_add" if residual is not None else "norm_gemv"
    block_n, block_k, warps = fused_tiles_for(kernel, n_cols, gpu_name(weight.device)) \
        if tiles is None else _checked_tiles(kernel, tiles)
    out = torch.empty(1, n_out, dtype=x.dtype, device=x.device)
    ahead, total = _ahead(x, ahead)
    early = pdl and kernel != "norm_gemv" and early_release()  # wo, w13, w2
    launch(_fused_gemv_kernel, (triton.cdiv(n_out, block_n),), pdl,
           x, x if norm_weight is None else norm_weight, weight,
           x if residual is None else residual, out, x if normed is None else normed, ahead,
           n_out, n_cols, weight.stride(0), n_out, total, EPS=eps,
           HAS_NORM=norm_weight is not None, GEMMA=gemma, SWIGLU=swiglu,
           HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k,
           LIBDEVICE=compiled_for_gpu(x), GELU=swiglu and gelu,
           STORE_NORMED=normed is not None and norm_weight is not None, AHEAD_ON=total > 0,
           EARLY_RELEASE=early, num_warps=warps, num_stages=NUM_STAGES)
    return out


def _ahead(x: Tensor, ahead: Tensor | None) -> tuple[Tensor, int]:
    """The kernel's AHEAD pointer and byte count: `ahead`'s first bytes (prefetch.ahead_bytes)
    where a GPU build can prefetch them, else x and 0 (no prefetch: the interpreter runs no
    PTX)."""
    if ahead is None or not compiled_for_gpu(x) or not prefetchable(ahead):
        return x, 0
    return ahead, ahead_bytes(ahead)


def _norm_qkv_rope(x: Tensor, norm_weight: Tensor, weight: Tensor, bias: Tensor | None,
                   cos: Tensor, sin: Tensor, input_pos: Tensor, k_cache: Tensor,
                   v_cache: Tensor, key_pos: Tensor, n_q: int, eps: float, gemma: bool,
                   is_ring: bool, q_norm_weight: Tensor | None = None,
                   k_norm_weight: Tensor | None = None, qk_eps: float = 0.0,
                   qk_gemma: bool = False, *, pdl: bool,
                   tiles: tuple[int, int, int] | None = None,
                   ahead: Tensor | None = None) -> Tensor:
    """x [1, K], wqkv weight [n_q + 2 n_kv, K], cos/sin [1, D / 2] float32 at the step's
    position input_pos [1]; k_cache/v_cache [1, H_kv, S, D] (key_pos [S], written for a ring)
    -> the roped q [1, n_q], k and v written at the slot. q_norm_weight/k_norm_weight [D] (both
    or neither; D a power of two): q's and k's heads RMS-normed (eps qk_eps, Gemma's (1 + w)
    with qk_gemma) before RoPE. tiles (fused_tiles_for's terms) replace the table's. ahead:
    as _fused_gemv's."""
    n_rows, n_cols = weight.shape
    head_dim = k_cache.shape[-1]
    qk_norm = q_norm_weight is not None and k_norm_weight is not None
    block_n, block_k, warps = \
        fused_tiles_for("norm_qkv_rope", n_cols, gpu_name(weight.device), head_dim, qk_norm) \
        if tiles is None else _checked_tiles("norm_qkv_rope", tiles, head_dim, qk_norm)
    q = torch.empty(1, n_q, dtype=x.dtype, device=x.device)
    ahead, total = _ahead(x, ahead)
    launch(_norm_qkv_rope_kernel, (triton.cdiv(n_rows, block_n),), pdl,
           x, norm_weight, weight, x if bias is None else bias, cos, sin, input_pos, q,
           k_cache, v_cache, key_pos, q_norm_weight if qk_norm else x,
           k_norm_weight if qk_norm else x, n_q, (n_rows - n_q) // 2, n_cols,
           weight.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.shape[2], ahead,
           total, EPS=eps, GEMMA=gemma, HAS_BIAS=bias is not None, IS_RING=is_ring,
           HEAD_DIM=head_dim, BLOCK_N=block_n, BLOCK_K=block_k, UNCONTRACTED=compiled_for_gpu(x),
           QK_NORM=qk_norm, QK_GEMMA=qk_norm and qk_gemma, QK_EPS=qk_eps if qk_norm else 0.0,
           AHEAD_ON=total > 0, EARLY_RELEASE=pdl and attention_release("wqkv"), num_warps=warps,
           num_stages=NUM_STAGES)
    return q


# Each op as a torch.library.triton_op (inductor keeps it whole in the compiled CUDA-graph step)
# and a custom_op twin launched with PDL (pdl.py says why both). Inputs: x, residual [1, K] /
# [1, N] contiguous rows; norm_weight [K]; weight [N, K] with unit column stride (a fused
# matrix's rows are fine); all of x's dtype.

@torch.library.triton_op("infermeter::norm_gemv", mutates_args=())
def norm_gemv(x: Tensor, norm_weight: Tensor, weight: Tensor, eps: float, gemma: bool,
              ahead: Tensor | None = None) -> Tensor:
    """(rmsnorm(x) * norm_weight) @ weight^T -> [1, N]: the norm before wqkv and its product.
    ahead (every op here): a later product's weight to prefetch into L2 (prefetch.py)."""
    return _fused_gemv(x, weight, norm_weight, None, eps, gemma, False, pdl=False, ahead=ahead)


@torch.library.custom_op("infermeter::norm_gemv_pdl", mutates_args=())
def norm_gemv_pdl(x: Tensor, norm_weight: Tensor, weight: Tensor, eps: float,
                  gemma: bool, ahead: Tensor | None = None) -> Tensor:
    return _fused_gemv(x, weight, norm_weight, None, eps, gemma, False, pdl=True, ahead=ahead)


@norm_gemv_pdl.register_fake
def _(x: Tensor, norm_weight: Tensor, weight: Tensor, eps: float, gemma: bool,
      ahead: Tensor | None = None) -> Tensor:
    return x.new_empty(1, weight.shape[0])


def _norm_gemv_keeping(x: Tensor, norm_weight: Tensor, weight: Tensor, eps: float, gemma: bool,
                       pdl: bool) -> tuple[Tensor, Tensor]:
    normed = torch.empty_like(x)
    return _fused_gemv(x, weight, norm_weight, None, eps, gemma, False, pdl=pdl,
                       normed=normed), normed


@torch.library.triton_op("infermeter::norm_gemv_keeping", mutates_args=())
def norm_gemv_keeping(x: Tensor, norm_weight: Tensor, weight: Tensor, eps: float,
                      gemma: bool) -> tuple[Tensor, Tensor]:
    """norm_gemv's product [1, N] and the normed x [1, K] it read (program 0 stores it): an
    MoE block's norm, its router's product, and the row its experts read."""
    return _norm_gemv_keeping(x, norm_weight, weight, eps, gemma, False)


@torch.library.custom_op("infermeter::norm_gemv_keeping_pdl", mutates_args=())
def norm_gemv_keeping_pdl(x: Tensor, norm_weight: Tensor, weight: Tensor, eps: float,
                          gemma: bool) -> tuple[Tensor, Tensor]:
    return _norm_gemv_keeping(x, norm_weight, weight, eps, gemma, True)


@norm_gemv_keeping_pdl.register_fake
def _(x: Tensor, norm_weight: Tensor, weight: Tensor, eps: float,
      gemma: bool) -> tuple[Tensor, Tensor]:
    return x.new_empty(1, weight.shape[0]), torch.empty_like(x)

@torch.library.triton_op("infermeter::gemv_swiglu", mutates_args=())
def gemv_swiglu(x: Tensor, norm_weight: Tensor | None, weight: Tensor, eps: float,
                gemma: bool, gelu: bool = False, ahead: Tensor | None = None) -> Tensor:
    """silu(gate) * up [1, H] for w13 = weight [2H, K] (gate rows, then up rows), of x RMS-
    normed first when norm_weight is given: the norm before w13, w13 and the activation. gelu:
    GeGLU's gelu(gate, approximate="tanh") * up instead (Gemma)."""
    return _fused_gemv(x, weight, norm_weight, None, eps, gemma, True, pdl=False, gelu=gelu,
                       ahead=ahead)


@torch.library.custom_op("infermeter::gemv_swiglu_pdl", mutates_args=())
def gemv_swiglu_pdl(x: Tensor, norm_weight: Tensor | None, weight: Tensor, eps: float,
                    gemma: bool, gelu: bool = False, ahead: Tensor | None = None) -> Tensor:
    return _fused_gemv(x, weight, norm_weight, None, eps, gemma, True, pdl=True, gelu=gelu,
                       ahead=ahead)


@gemv_swiglu_pdl.register_fake
def _(x: Tensor, norm_weight: Tensor | None, weight: Tensor, eps: float, gemma: bool,
      gelu: bool = False, ahead: Tensor | None = None) -> Tensor:
    return x.new_empty(1, weight.shape[0] // 2)


@torch.library.triton_op("infermeter::gemv_add", mutates_args=())
def gemv_add(x: Tensor, weight: Tensor, residual: Tensor,
             ahead: Tensor | None = None) -> Tensor:
    """residual + x @ weight^T -> [1, N]: wo or w2 and the residual add after it."""
    return _fused_gemv(x, weight, None, residual, 0.0, False, False, pdl=False, ahead=ahead)


@torch.library.custom_op("infermeter::gemv_add_pdl", mutates_args=())
def gemv_add_pdl(x: Tensor, weight: Tensor, residual: Tensor,
                 ahead: Tensor | None = None) -> Tensor:
    return _fused_gemv(x, weight, None, residual, 0.0, False, False, pdl=True, ahead=ahead)


@gemv_add_pdl.register_fake
def _(x: Tensor, weight: Tensor, residual: Tensor, ahead: Tensor | None = None) -> Tensor:
    return x.new_empty(1, weight.shape[0])


_CACHE_ARGS = ("k_cache", "v_cache", "key_pos")


@torch.library.triton_op("infermeter::norm_qkv_rope", mutates_args=_CACHE_ARGS)
def norm_qkv_rope(x: Tensor, norm_weight: Tensor, weight: Tensor, bias: Tensor | None,
                  cos: Tensor, sin: Tensor, input_pos: Tensor, k_cache: Tensor,
                  v_cache: Tensor, key_pos: Tensor, n_q: int, eps: float, gemma: bool,
                  is_ring: bool, q_norm_weight: Tensor | None = None,
                  k_norm_weight: Tensor | None = None, qk_eps: float = 0.0,
                  qk_gemma: bool = False, ahead: Tensor | None = None) -> Tensor:
    """The norm before wqkv, wqkv (and its bias), the per-head q/k norms where their weights
    are given (Qwen3, Gemma 3), RoPE on q and k, and the cache write of k and v at input_pos
    (slot input_pos % S for a ring, key_pos too) -> the roped q [1, n_q]."""
    return _norm_qkv_rope(x, norm_weight, weight, bias, cos, sin, input_pos, k_cache, v_cache,
                          key_pos, n_q, eps, gemma, is_ring, q_norm_weight, k_norm_weight,
                          qk_eps, qk_gemma, pdl=False, ahead=ahead)


@torch.library.custom_op("infermeter::norm_qkv_rope_pdl", mutates_args=_CACHE_ARGS)
def norm_qkv_rope_pdl(x: Tensor, norm_weight: Tensor, weight: Tensor, bias: Tensor | None,
                      cos: Tensor, sin: Tensor, input_pos: Tensor, k_cache: Tensor,
                      v_cache: Tensor, key_pos: Tensor, n_q: int, eps: float, gemma: bool,
                      is_ring: bool, q_norm_weight: Tensor | None = None,
                      k_norm_weight: Tensor | None = None, qk_eps: float = 0.0,
                      qk_gemma: bool = False, ahead: Tensor | None = None) -> Tensor:
    return _norm_qkv_rope(x, norm_weight, weight, bias, cos, sin, input_pos, k_cache, v_cache,
                          key_pos, n_q, eps, gemma, is_ring, q_norm_weight, k_norm_weight,
                          qk_eps, qk_gemma, pdl=True, ahead=ahead)


@norm_qkv_rope_pdl.register_fake
def _(x: Tensor, norm_weight: Tensor, weight: Tensor, bias: Tensor | None, cos: Tensor,
      sin: Tensor, input_pos: Tensor, k_cache: Tensor, v_cache: Tensor, key_pos: Tensor,
      n_q: int, eps: float, gemma: bool, is_ring: bool, q_norm_weight: Tensor | None = None,
      k_norm_weight: Tensor | None = None, qk_eps: float = 0.0,
      qk_gemma: bool = False, ahead: Tensor | None = None) -> Tensor:
    return x.new_empty(1, n_q)


# As the compiled step calls them: with PDL when pdl.enabled().

def norm_matvec(x: Tensor, norm_weight: Tensor, weight: Tensor, eps: float,
                gemma: bool, ahead: Tensor | None = None) -> Tensor:
    return (norm_gemv_pdl if pdl.enabled() else norm_gemv)(x, norm_weight, weight, eps, gemma,
                                                           ahead)


def norm_matvec_keeping(x: Tensor, norm_weight: Tensor, weight: Tensor, eps: float,
                        gemma: bool) -> tuple[Tensor, Tensor]:
    """norm_matvec's product and the normed x (norm_gemv_keeping)."""
    op = norm_gemv_keeping_pdl if pdl.enabled() else norm_gemv_keeping
    return op(x, norm_weight, weight, eps, gemma)

def norm_matvec_swiglu(x: Tensor, norm_weight: Tensor | None, weight: Tensor, eps: float,
                       gemma: bool, gelu: bool = False, ahead: Tensor | None = None) -> Tensor:
    """The norm, w13 and act(gate) * up: SwiGLU, or GeGLU's tanh-GELU with gelu."""
    return (gemv_swiglu_pdl if pdl.enabled() else gemv_swiglu)(x, norm_weight, weight, eps,
                                                                 gemma, gelu, ahead)


def norm_qkv_rope_cache(x: Tensor, norm_weight: Tensor, weight: Tensor, bias: Tensor | None,
                        cos: Tensor, sin: Tensor, input_pos: Tensor, k_cache: Tensor,
                        v_cache: Tensor, key_pos: Tensor, n_q: int, eps: float, gemma: bool,
                        is_ring: bool, q_norm_weight: Tensor | None = None,
                        k_norm_weight: Tensor | None = None, qk_eps: float = 0.0,
                        qk_gemma: bool = False, ahead: Tensor | None = None) -> Tensor:
    op = norm_qkv_rope_pdl if pdl.enabled() else norm_qkv_rope
    return op(x, norm_weight, weight, bias, cos, sin, input_pos, k_cache, v_cache, key_pos,
              n_q, eps, gemma, is_ring, q_norm_weight, k_norm_weight, qk_eps, qk_gemma, ahead)


def matvec_add(x: Tensor, weight: Tensor, residual: Tensor,
               ahead: Tensor | None = None) -> Tensor:
    return (gemv_add_pdl if pdl.enabled() else gemv_add)(x, weight, residual, ahead)


def fused_step_usable(x: Tensor, *params: Tensor) -> bool:
    """One contiguous row where Triton runs, and every weight in its dtype with unit column
    stride (what the kernel reads)."""
    return (x.numel() == x.shape[-1] and triton_runs_on(x) and x.is_contiguous()
            and all(p.stride(-1) == 1 and p.dtype == x.dtype for p in params))
