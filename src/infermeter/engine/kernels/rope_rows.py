"""RoPE's cos and sin rows at the step's position, gathered by one Triton kernel
(infermeter::rope_rows_triton, and its PDL twin) for a compiled one-token step with fused layers.

Why: the fused kernels take cos and sin [1, D / 2] as inputs of custom ops, and inductor
gathered the rows again for every few layers, so the model gathers them once through an op
inductor cannot see into. That op was torch's indexing, two `index_elementwise_kernel`s a step
(cos, then sin), launched plainly: in an H100 trace of Qwen2.5-0.5B's recorded step
(results/traces-held-step-nvidia-h100-80gb-hbm3/) they took 8.3 us from the argmax's end to the
embedding's start, a 2.7 us gap between them included. Here both rows are one kernel, launched
with PDL as the rest of the step: it starts while the argmax ends and waits only for it.

The position is read after the wait: the kernel just before (the held step's argmax) writes it.
A position past the table's rows reads zeros instead of memory outside the table; the step's
fit checks keep positions below max_seq_len, the tables' length. Values: the tables' own, copied.
"""

from __future__ import annotations

import torch
from torch import Tensor

from infermeter.engine.kernels import pdl
from infermeter.engine.kernels.pdl import launch
from infermeter.engine.kernels.triton_support import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _rope_rows_kernel(COS, SIN, POS, OUT_COS, OUT_SIN, n_rows, half,
                          BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        """Program t: OUT_COS[t] = COS[POS[t]], OUT_SIN[t] = SIN[POS[t]], rows of `half`."""
        if PDL:  # the position is the previous kernel's (the held step's argmax) output
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        t = tl.program_id(0)
        pos = tl.load(POS + t)
        inside = (pos >= 0) & (pos < n_rows)
        at = tl.where(inside, pos, 0)  # row 0 stands in for a position past the tables
        cols = tl.arange(0, BLOCK)
        ok = cols < half
        cos = tl.load(COS + at * half + cols, mask=ok, other=0.0)
        sin = tl.load(SIN + at * half + cols, mask=ok, other=0.0)
        tl.store(OUT_COS + t * half + cols, tl.where(inside, cos, 0.0), mask=ok)
        tl.store(OUT_SIN + t * half + cols, tl.where(inside, sin, 0.0), mask=ok)


def _rope_rows(cos_table: Tensor, sin_table: Tensor, input_pos: Tensor,
               pdl: bool) -> tuple[Tensor, Tensor]:
    n_rows, half = cos_table.shape
    cos = cos_table.new_empty(input_pos.shape[0], half)
    sin = sin_table.new_empty(input_pos.shape[0], half)
    launch(_rope_rows_kernel, (input_pos.shape[0],), pdl, cos_table, sin_table, input_pos, cos,
           sin, n_rows, half, BLOCK=triton.next_power_of_2(half), num_warps=1)
    return cos, sin


@torch.library.triton_op("infermeter::rope_rows_triton", mutates_args=())
def rope_rows_triton(cos_table: Tensor, sin_table: Tensor,
                     input_pos: Tensor) -> tuple[Tensor, Tensor]:
    """(cos_table[input_pos], sin_table[input_pos]), each [T, D / 2]: tables [S, D / 2]
    contiguous, input_pos [T] integer."""
    return _rope_rows(cos_table, sin_table, input_pos, pdl=False)


@torch.library.custom_op("infermeter::rope_rows_pdl", mutates_args=())
def rope_rows_pdl(cos_table: Tensor, sin_table: Tensor,
                  input_pos: Tensor) -> tuple[Tensor, Tensor]:
    """rope_rows_triton, launched with programmatic dependent launch (pdl.py)."""
    return _rope_rows(cos_table, sin_table, input_pos, pdl=True)


@rope_rows_pdl.register_fake
def _(cos_table: Tensor, sin_table: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
    rows = (input_pos.shape[0], cos_table.shape[1])
    return cos_table.new_empty(rows), sin_table.new_empty(rows)


def rope_rows(cos_table: Tensor, sin_table: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
    """The rows as the compiled step gathers them: with PDL when pdl.enabled()."""
    return (rope_rows_pdl if pdl.enabled() else rope_rows_triton)(cos_table, sin_table, input_pos)
