"""The split-KV attention's combine folded into wo + the residual add: one kernel a layer fewer
in the fused batch-1 step (issue 27: a small model's step is its kernels' count, not its bytes).

Why: the split-KV attention is two kernels (decode_attention.py): the splits, then a combine
that turns their partials into the attention's output [1, H * D]. wo's kernel is next and reads
that row whole in every program. Here wo's programs combine the partials themselves, each the
whole row, so the combine kernel goes: on an H100 at SmolLM2-135M it added 1.3-1.5 us to a
layer of ~14.5 us (results/step-attention-pdl-nvidia-h100-80gb-hbm3-summary.txt).
The price is the combine redone in every program: n_splits x H x D float32 partials read from
L2 each. So a program takes more rows than the GEMV's tiles would give it (at most about one
program an SM: fold_tiles), holds its whole weight tile [BLOCK_N, H_PAD, D] from before the
PDL wait, and reckons the splits' weights once a head over [S_PAD, H_PAD, D] partials.
Measured on an H100 (docs/engine.md, "RoPE's rows in one kernel; the fold rebuilt") it still
lost: the step took 1.200x as long at SmolLM2-135M and 1.112x at Qwen2.5-0.5B, where the first
build (a column at a time inside a loop over column tiles) took 1.60x and 1.33x. Folded, the
combine and wo added 5.73 us to a 0.5B layer where the two kernels added 3.42: every program
reads all the partials again after the wait. So FOLD is off; the kernel stays as the A/B's
other way.

Numerics: the combine's formula (decode_attention._combine_kernel's, a head at a time), its
output rounded to the activation dtype as the combine kernel stores it, then wo's product as
fused_step.py's gemv_add (float32 products and sums, the product rounded, the residual added
and rounded). The combine's float32 sums over the splits, and the product's over the columns,
may run in another order than the two kernels' (other tile shapes), so the two paths agree to
rounding, not bitwise.

PDL: a program loads its weight tile before the wait, as fused_step.py's kernels do their
first tile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from infermeter.engine.kernels import pdl, prefetch
from infermeter.engine.kernels.gemv import NUM_STAGES
from infermeter.engine.kernels.pdl import launch
from infermeter.engine.kernels.settings import checked_way
from infermeter.engine.kernels.triton_support import tl, triton

# Whether the fused step folds the combine into wo: "off" (the default: "on" lost at 135M and
# 0.5B on an H100), "on". Read when the step is traced; benchmarks/step_kernels_ab.py
# --fold-combine sets it for an A/B.
FOLD_WAYS = ("off", "on")
FOLD = "off"
WARPS = 8  # a program holds its whole weight tile and the head's partials [S_PAD, H_PAD, D]


def fold_tiles(n_out: int, sms: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the folded kernel over wo's n_out rows: rows enough for at most
    about one program an SM (each program combines every head's splits again), at least one."""
    return triton.next_power_of_2(-(-n_out // sms)), WARPS


if triton is not None:
    from infermeter.engine.kernels.decode_attention import split_weights

    @triton.jit
    def _combine_gemv_add_kernel(ACC, M, L, SINKS, W, RES, OUT, n_out, stride_w, groups,
                                 n_splits, n_heads, S_PAD: tl.constexpr, H_PAD: tl.constexpr,
                                 D: tl.constexpr, HAS_SINKS: tl.constexpr,
                                 BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
        """Program i: out rows [i * BLOCK_N, (i + 1) * BLOCK_N) = residual + wo @ attention.
        Its weight rows are one tile [BLOCK_N, H_PAD, D] (column h * D + d: head h's feature d),
        loaded before the wait; after it the program combines every head's splits at once, as
        [S_PAD, H_PAD, D] partials (acc[kv, s, g, d] for head h = kv * groups + g), the
        weights of the splits reckoned once a head, not once a column."""
        dtype = OUT.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_out
        h = tl.arange(0, H_PAD)
        d = tl.arange(0, D)
        s = tl.arange(0, S_PAD)
        h_ok = h < n_heads
        # the whole weight tile before anything another kernel wrote: no kernel writes weights
        w = tl.load(W + rows[:, None, None] * stride_w + (h * D)[None, :, None] + d[None, None, :],
                    mask=row_ok[:, None, None] & h_ok[None, :, None], other=0.0,
                    eviction_policy="evict_first")
        if PDL:
            tl.extra.cuda.gdc_wait()  # the partials and the residual are earlier kernels'
            tl.extra.cuda.gdc_launch_dependents()
        used = (s[:, None] < n_splits) & h_ok[None, :]  # [S_PAD, H_PAD]
        at = ((h // groups)[None, :] * n_splits + s[:, None]) * groups + (h % groups)[None, :]
        m = tl.load(M + at, mask=used, other=float("-inf"))
        l_sum = tl.load(L + at, mask=used, other=0.0)
        acc = tl.load(ACC + at[:, :, None] * D + d[None, None, :], mask=used[:, :, None],
                      other=0.0)  # [S_PAD, H_PAD, D]
        residual = tl.load(RES + rows, mask=row_ok, other=0.0).to(tl.float32)
        # decode_attention._combine_kernel's formula, a head at a time
        weight, total = split_weights(m, l_sum, SINKS + h, h_ok, HAS_SINKS)  # [S_PAD, H_PAD]
        x = tl.math.div_rn(tl.sum(acc * weight[:, :, None], 0), total[:, None])  # [H_PAD, D]
        x = x.to(dtype).to(tl.float32)  # rounded as the combine kernel stores it
        product = tl.sum(tl.sum(w.to(tl.float32) * x[None, :, :], 2), 1)  # [BLOCK_N]
        # residual + the product rounded, as two dtype tensors add (fused_step.py's gemv_add)
        out = residual + product.to(dtype).to(tl.float32)
        tl.store(OUT + rows, out.to(dtype), mask=row_ok)


def _combine_gemv_add(acc: Tensor, m: Tensor, l_sum: Tensor, sinks: Tensor | None,
                      weight: Tensor, residual: Tensor, pdl: bool,
                      tiles: tuple[int, int] | None = None) -> Tensor:
    rows, n_splits, groups, head_dim = acc.shape
    n_out, n_cols = weight.shape
    if rows * groups * head_dim != n_cols:
        raise ValueError(f"partials of {rows * groups * head_dim} columns for wo of {n_cols}")
    sms = torch.cuda.get_device_properties(weight.device).multi_processor_count \
        if weight.is_cuda else 132
    block_n, warps = tiles or fold_tiles(n_out, sms)
    out = torch.empty(1, n_out, dtype=residual.dtype, device=residual.device)
    launch(_combine_gemv_add_kernel, (triton.cdiv(n_out, block_n),), pdl,
           acc, m, l_sum, m if sinks is None else sinks, weight, residual, out, n_out,
           weight.stride(0), groups, n_splits, rows * groups,
           S_PAD=triton.next_power_of_2(n_splits), H_PAD=triton.next_power_of_2(rows * groups),
           D=head_dim, HAS_SINKS=sinks is not None, BLOCK_N=block_n, num_warps=warps,
           num_stages=NUM_STAGES)
    return out


@torch.library.triton_op("infermeter::combine_gemv_add", mutates_args=())
def combine_gemv_add(acc: Tensor, m: Tensor, l_sum: Tensor, sinks: Tensor | None,
                     weight: Tensor, residual: Tensor) -> Tensor:
    """residual + attention @ weight^T -> [1, N], the attention [1, K] (K = H * D) combined
    from the split kernel's partials at batch 1 (decode_attention.split_kv_partials: acc
    [H_kv, n_splits, G, D], m and l [H_kv, n_splits, G]; sinks [H] or None, as
    split_kv_decode's); weight [N, K] with unit column stride, residual [1, N] contiguous."""
    return _combine_gemv_add(acc, m, l_sum, sinks, weight, residual, pdl=False)


@torch.library.custom_op("infermeter::combine_gemv_add_pdl", mutates_args=())
def combine_gemv_add_pdl(acc: Tensor, m: Tensor, l_sum: Tensor, sinks: Tensor | None,
                         weight: Tensor, residual: Tensor) -> Tensor:
    return _combine_gemv_add(acc, m, l_sum, sinks, weight, residual, pdl=True)


@combine_gemv_add_pdl.register_fake
def _(acc: Tensor, m: Tensor, l_sum: Tensor, sinks: Tensor | None, weight: Tensor,
      residual: Tensor) -> Tensor:
    return residual.new_empty(1, weight.shape[0])


def combine_matvec_add(acc: Tensor, m: Tensor, l_sum: Tensor, sinks: Tensor | None,
                       weight: Tensor, residual: Tensor) -> Tensor:
    """combine_gemv_add as the compiled step calls it: with PDL when pdl.enabled()."""
    op = combine_gemv_add_pdl if pdl.enabled() else combine_gemv_add
    return op(acc, m, l_sum, sinks, weight, residual)


def folds() -> bool:
    """Whether the fused step folds the combine into wo (FOLD). The folded kernel prefetches
    nothing: with prefetch.DISTANCE above 0 it is refused, not quietly left out."""
    if checked_way(FOLD, "FOLD", FOLD_WAYS) == "on" and prefetch.DISTANCE:
        raise ValueError("the combine folded into wo prefetches nothing: prefetch distance 0")
    return FOLD == "on"
