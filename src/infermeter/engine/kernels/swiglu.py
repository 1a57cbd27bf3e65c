"""SwiGLU's activation, silu(gate) * up, as one Triton kernel (infermeter::silu_mul_triton).

Why: a compiled one-token step must not let inductor inline this activation into w2's
matrix-vector kernel (opaque_ops.silu_mul says why). The opaque eager op costs two launches
(silu, then the product), ~1.3 us each in a CUDA graph, 64 a Llama-2-7B step; this kernel is
one. As a torch.library.triton_op inductor places the kernel in its graph as is: its inputs are
computed into buffers first, exactly the boundary wanted.

Numerics are eager's, to the bit: silu in float32 as torch's CUDA silu computes it (x / (1 +
exp(-x)) with an IEEE division and libdevice's expf, exact_math.py), rounded to the activation
dtype, then the product in float32, rounded again. Under Triton's interpreter (no libdevice) exp
is tl.exp, within a few float32 ulp.
The default (model.ACTIVATION_KERNEL): beside the GEMV and the Triton attention it is faster
than leaving the activation to inductor (docs/engine.md, "Kernels").
"""

from __future__ import annotations

import torch
from torch import Tensor

from infermeter.engine.kernels import pdl
from infermeter.engine.kernels.exact_math import compiled_for_gpu
from infermeter.engine.kernels.pdl import launch
from infermeter.engine.kernels.triton_support import triton, triton_runs_on

# Columns a program handles, 128 threads (4 warps) a program: BLOCK / 128 columns a thread,
# each an exact silu (an IEEE division with a slow-path branch, and libdevice's expf;
# exact_math). An A/B's setting (set_block; benchmarks/step_kernels_ab.py --silu-block):
# at Llama-2-7B (11,008 columns, 11 programs of 8 columns a thread) this kernel took 4.06 us
# in an H100 trace against 2.61 us before the exact division (docs/engine.md). Recorded in
# the Result as config.silu_block.
DEFAULT_BLOCK = 1024
BLOCK = DEFAULT_BLOCK
BLOCKS = (128, 256, 512, 1024)


def set_block(value: int) -> None:
    """BLOCK = value, one of BLOCKS, else one error line naming it."""
    global BLOCK
    if value not in BLOCKS:
        raise ValueError(f"unknown silu BLOCK {value!r}: one of {BLOCKS}")
    BLOCK = value

if triton is not None:
    import triton.language as tl

    from infermeter.engine.kernels.exact_math import exact_silu

    @triton.jit
    def _silu_mul_kernel(GATE, UP, OUT, n_cols, stride_gate, stride_up, BLOCK: tl.constexpr,
                         LIBDEVICE: tl.constexpr = False, PDL: tl.constexpr = False):
        if PDL:  # gate and up are the previous kernel's (w13's) output (pdl.py)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < n_cols
        up = tl.load(UP + row * stride_up + cols, mask=inside, other=0.0)
        gate = tl.load(GATE + row * stride_gate + cols, mask=inside, other=0.0).to(tl.float32)
        silu = exact_silu(gate, LIBDEVICE).to(up.dtype)  # F.silu's float32 maths, rounded
        out = (silu.to(tl.float32) * up.to(tl.float32)).to(up.dtype)
        tl.store(OUT + row * n_cols + cols, out, mask=inside)


def _silu_mul(gate: Tensor, up: Tensor, pdl: bool) -> Tensor:
    hidden = gate.shape[-1]
    gate_rows, up_rows = gate.reshape(-1, hidden), up.reshape(-1, hidden)  # views when possible
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    launch(_silu_mul_kernel, (gate_rows.shape[0], triton.cdiv(hidden, BLOCK)), pdl,
           gate_rows, up_rows, out, hidden, gate_rows.stride(0), up_rows.stride(0), BLOCK=BLOCK,
           LIBDEVICE=compiled_for_gpu(gate))
    return out


@torch.library.triton_op("infermeter::silu_mul_triton", mutates_args=())
def silu_mul_triton(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up [..., H] with unit column stride (FeedForward passes the two halves of w13's
    output) -> silu(gate) * up, contiguous [..., H] in their dtype."""
    return _silu_mul(gate, up, pdl=False)


@torch.library.custom_op("infermeter::silu_mul_pdl", mutates_args=())
def silu_mul_pdl(gate: Tensor, up: Tensor) -> Tensor:
    """silu_mul_triton, launched with programmatic dependent launch (pdl.py)."""
    return _silu_mul(gate, up, pdl=True)


@silu_mul_pdl.register_fake
def _(gate: Tensor, up: Tensor) -> Tensor:
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


def silu_mul_kernel(gate: Tensor, up: Tensor) -> Tensor:
    """The activation kernel as the compiled step calls it: with PDL when pdl.enabled()."""
    return (silu_mul_pdl if pdl.enabled() else silu_mul_triton)(gate, up)


def swiglu_kernel_usable(gate: Tensor) -> bool:
    return triton_runs_on(gate) and gate.stride(-1) == 1
