"""A matrix-vector product (GEMV) in Triton for one-row linears: out [1, N] = x [1, K] @ W[N, K]^T.

Why: at batch 1 a decode step is a chain of matrix-vector products that read 13 GB of Llama-2-7B
weights. Inductor turns each (with coordinate-descent tuning) into a Triton reduction whose
block sizes its tuner picks anew at every compile: the committed H100 runs read the weights at
2.4-2.6 TB/s and the same code's step varied by ~5% from compile to compile (5.36-5.62 ms).
This kernel has fixed, simple tiling, meant to stream the weights at the HBM's read rate:

  grid (ceil(N / BLOCK_N),): each program owns BLOCK_N output rows and walks K in BLOCK_K
  columns, loading a [BLOCK_N, BLOCK_K] tile of W once (evict-first: weights are read once per
  step, they must not push the activations out of L2) and the matching slice of x, keeping a
  float32 [BLOCK_N, BLOCK_K] partial product; one row sum at the end, rounded to x's dtype.

As a torch.library.triton_op inductor keeps it whole in the compiled CUDA-graph step; the RMSNorm
before it and the residual add after it then fuse into inductor's neighbouring kernels instead
of into the reduction. Numerics: float32 products and sums (as cuBLAS accumulates), one rounding.
The default (linear.MATVEC_KERNEL): with tiles_for's tiles and the Triton attention and
activation kernels, a batch-1 step took 5.11 ms for Llama-2-7B and 9.51 for 13B on an H100,
against 5.68 and 10.43 with inductor's reductions (one run each, see linear.py).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from infermeter.engine.kernels import pdl
from infermeter.engine.kernels.pdl import launch
from infermeter.engine.kernels.triton_support import triton, triton_runs_on

# Tiles by the weight's column count K, from benchmarks/gemv_tiles.py on an H100 (results/gemv-
# tiles-*-nvidia-h100-*.json: each product shape of Llama-2-7B and 13B alone, ~100 tilings):
#   K a multiple of 4096 (7B's 4096)      2 rows x 4096 columns, 16 warps: 2.3-2.9 TB/s
#   K over 8192 (7B's 11008, 13B's 13824)  1 row x 4096 columns, 16 warps (the last step ragged)
#   under 4096 (tp 2's wo: 13B 2560, 7B     4 rows x K rounded up to a power of two (at least
#   2048)                                   1024), 8 warps: 13B's 14.3 us against 14.7 with
#                                           2 x 2048 and 23.3 with 1 x 2048 (bf16, gemv-tiles-
#                                           llama-2-13b-tp2-wide-*.json)
#   otherwise (13B's 5120, tp 2's 6912)    1 row x 2048 columns, 8 warps: 4096 would leave 3/8 of
#                                          5120's second step idle; 2.4-2.9 TB/s. For 13B's w2 at
#                                          tp 2 (6912) 1 x 4096 timed faster alone (28.5 vs 29.2
#                                          us) but slower inside the tp 2 step's trace, so it
#                                          stays here.
# The copy reaches 3.0 TB/s there. In the whole 7B step these tiles beat inductor's reductions
# (5.55 vs 5.65 ms); 13B's with these tiles 9.51 vs 10.43 (with the other Triton kernels). The
# under-4096 rule comes from 13B's wo at tp 2 in the tp 2 step's trace (docs/engine.md).
NUM_STAGES = 2  # 1, 2 and 4 timed within 0.4% of each other

# Where a GPU's own timings (benchmarks/gemv_tiles.py run there) beat the table above, by
# torch.cuda.get_device_name and the table's rule. H200 (HBM3e; results/gemv-tiles-wide-nvidia-
# h200.json, 7B fp16): 2 rows x 4096 columns with 4 warps stream wqkv / wo / w13 / w2 / output
# at 3705 / 2853 / 3904 / 3382 / 4058 GB/s against 3370 / 2648 / 3604 / 3193 / 3733 with the
# table's 16 warps (the step's products 3.64 vs 3.94 ms); on an H100 those 4 warps are 1-2%
# slower than the table (gemv-tiles-wide-nvidia-h100-*.json), so the table stays the default.
# 13B's K = 5120 and tp 2's 6912 ("otherwise") on an H200 (gemv-tiles-llama-2-13b-tp2-wide-
# nvidia-h200.json): 2 x 1024 with 4 warps, wqkv / w13 / w2 / output 3337 / 3567 / 3217 / 3647
# GB/s against the table's 1 x 2048 x 8 warps' 3141 / 3436 / 3047 / 3504 (on an H100 2-3%
# slower). K < 4096 (tp 2's wo, ~11 us) keeps the table's: alone it is timed launch-bound there.
DEVICE_TILES = {"NVIDIA H200": {"multiple of 4096": (2, 4096, 4), "over 8192": (2, 4096, 4),
                                "otherwise": (2, 1024, 4)}}


def tiles_for(n_cols: int, gpu: str = "") -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for a weight of n_cols columns on GPU `gpu` (a device
    name; the table above, with DEVICE_TILES' changes for that GPU)."""
    if n_cols % 4096 == 0:
        rule, tiles = "multiple of 4096", (2, 4096, 16)
    elif n_cols > 8192:
        rule, tiles = "over 8192", (1, 4096, 16)
    elif n_cols < 4096:
        rule, tiles = "under 4096", (4, max(1024, 1 << (n_cols - 1).bit_length()), 8)
    else:
        rule, tiles = "otherwise", (1, 2048, 8)
    return DEVICE_TILES.get(gpu, {}).get(rule, tiles)


@functools.cache
def gpu_name(device: torch.device) -> str:
    """The name tiles_for keys on: the CUDA device's ("NVIDIA H200"), "" elsewhere."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else ""


if triton is not None:
    import triton.language as tl

    @triton.jit
    def row_dots(X, W, rows, row_ok, n_cols, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
                 FIRST_K: tl.constexpr = 0):
        """float32 [BLOCK_N]: x . W[row] for the program's rows (the tiling above).
        FIRST_K > 0 (the PDL launch, pdl.py): the first FIRST_K columns of the rows are loaded
        first, in one [BLOCK_N, FIRST_K] tile, before waiting (PDL) for the kernel that wrote x
        (no kernel writes weights): while that kernel finishes, e.g. a tensor-parallel
        all-reduce waiting ~5 us for its peer, the resident programs stream up to 16 KiB of
        weights each. A first tile wider than BLOCK_K is summed apart from the rest (a
        different summation order from FIRST_K = 0: float32 roundings, not bits); one of
        BLOCK_K columns goes into the accumulator as the loop's first step would. Why both: a
        first tile as wide as BLOCK_K summed apart kept a live, unused accumulator and was
        much slower for tp 2's wo; summed into the accumulator it is faster than without PDL,
        and so are the wide first tiles (docs/engine.md, "Programmatic dependent launch")."""
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        start = 0
        if FIRST_K > 0:  # (names of their own: the loop's would be loop-carried, of other types)
            first = tl.arange(0, FIRST_K)
            first_ok = first < n_cols
            w_first = tl.load(W + rows[:, None] * stride_w + first[None, :],
                              mask=row_ok[:, None] & first_ok[None, :], other=0.0,
                              eviction_policy="evict_first")  # [BLOCK_N, FIRST_K]
            if PDL:
                tl.extra.cuda.gdc_wait()  # x is the previous kernel's output
                tl.extra.cuda.gdc_launch_dependents()
            x_first = tl.load(X + first, mask=first_ok, other=0.0).to(tl.float32)  # [FIRST_K]
            if FIRST_K == BLOCK_K:  # one ordinary tile: into acc, as the loop would
                acc += w_first.to(tl.float32) * x_first[None, :]
            else:
                first_sum = tl.sum(w_first.to(tl.float32) * x_first[None, :], 1)
            start = FIRST_K
        for k0 in range(start, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < n_cols
            x = tl.load(X + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BLOCK_K]
            w = tl.load(W + rows[:, None] * stride_w + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                        eviction_policy="evict_first").to(tl.float32)  # [BLOCK_N, BLOCK_K]
            acc += w * x[None, :]
        dots = tl.sum(acc, 1)
        if FIRST_K > BLOCK_K:  # only a wide first tile is summed apart
            dots += first_sum
        return dots

    @triton.jit
    def _gemv_kernel(X, W, OUT, n_rows, n_cols, stride_w,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
                     FIRST_K: tl.constexpr = 0):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        out = row_dots(X, W, rows, row_ok, n_cols, stride_w, BLOCK_N, BLOCK_K, PDL, FIRST_K)
        tl.store(OUT + rows, out.to(OUT.dtype.element_ty), mask=row_ok)


PREFETCH_ELEMENTS = 8192  # weights a program loads before its PDL wait (16 KiB of 16-bit)


def first_columns(n_cols: int, block_n: int, block_k: int) -> int:
    """FIRST_K of a PDL launch: the columns loaded before the wait, up to PREFETCH_ELEMENTS a
    program (a power of two, never under one BLOCK_K tile, never past K's)."""
    wanted = min(triton.next_power_of_2(n_cols), PREFETCH_ELEMENTS // block_n)
    return max(block_k, wanted)


def _gemv(x: Tensor, weight: Tensor, pdl: bool) -> Tensor:
    n_rows, n_cols = weight.shape
    block_n, block_k, warps = tiles_for(n_cols, gpu_name(weight.device))
    out = torch.empty(1, n_rows, dtype=x.dtype, device=x.device)
    first_k = first_columns(n_cols, block_n, block_k) if pdl else 0
    launch(_gemv_kernel, (triton.cdiv(n_rows, block_n),), pdl,
           x, weight, out, n_rows, n_cols, weight.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
           FIRST_K=first_k, num_warps=warps, num_stages=NUM_STAGES)
    return out


@torch.library.triton_op("infermeter::gemv", mutates_args=())
def gemv(x: Tensor, weight: Tensor) -> Tensor:
    """x [1, K] (unit stride), weight [N, K] (unit column stride) -> [1, N] in x's dtype."""
    return _gemv(x, weight, pdl=False)


@torch.library.custom_op("infermeter::gemv_pdl", mutates_args=())
def gemv_pdl(x: Tensor, weight: Tensor) -> Tensor:
    """gemv, launched with programmatic dependent launch (pdl.py)."""
    return _gemv(x, weight, pdl=True)


@gemv_pdl.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty(1, weight.shape[0])


def matvec(x: Tensor, weight: Tensor) -> Tensor:
    """The GEMV as the compiled step calls it: with PDL when pdl.enabled()."""
    return (gemv_pdl if pdl.enabled() else gemv)(x, weight)


def gemv_usable(x: Tensor, weight: Tensor) -> bool:
    """One row, Triton runs where x lives, and both are laid out as the kernel reads them."""
    return (x.numel() == x.shape[-1] and triton_runs_on(x) and x.stride(-1) == 1
            and weight.stride(-1) == 1 and x.dtype == weight.dtype)
