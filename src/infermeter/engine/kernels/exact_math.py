"""Float32 maths in Triton kernels as torch's eager CUDA kernels compute it, where a kernel
promises eager's rounding points (fused_step.py, swiglu.py, expert_activation.py) or eager's
function (decode_attention.py's soft cap).

Built for a GPU, Triton's `/` on float32 is div.full.f32 (div.approx.f32 by a constant), within
2 ulp of the quotient, and tl.exp is ex2.approx of x * log2(e); torch's CUDA kernels divide
exactly and call libdevice's expf and tanhf. So:
- silu is x / (1 + exp(-x)) with an IEEE division (div.rn) and libdevice's expf, as torch's
  CUDA silu kernel computes it; sigmoid 1 / (1 + exp(-x)) the same way (torch's CUDA sigmoid);
- tanh is libdevice's tanhf, as torch.tanh on CUDA;
- tanh-GELU is 0.5 x (1 + tanh(beta (x + kappa x^3))) in the order of torch's CUDA kernel
  (ActivationGeluKernel.cu, float32 opmath, its tanhf libdevice's) as nvcc builds it: its
  default contraction makes x + kappa * x^3 one FMA (tl.fma here, whatever Triton's FP fusion
  setting), every other product rounded (PTX mul.rn, uncontracted_product);
- a division by a Python number is a product with its float32 reciprocal, rounded once
  (float32_reciprocal), as torch's CUDA division by a scalar computes it;
- a mean is the sum times 1/n, the reciprocal divided exactly and rounded once (exact_mean),
  as torch's CUDA mean reduces.
LIBDEVICE off (Triton's CPU interpreter, which has no libdevice; compiled_for_gpu says which):
exp is tl.exp and tanh 2 sigmoid(2x) - 1, within a few float32 ulp (of 1, for tanh: near -1
that is many of 1 + tanh's ulp, which GELU's negative tail inherits); products plain (the
interpreter never fuses, and runs no PTX).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from infermeter.engine.kernels.triton_support import triton


def compiled_for_gpu(x: Tensor) -> bool:
    """Whether a kernel launched on x is compiled for a GPU (PTX, libdevice), not run by
    Triton's interpreter."""
    return x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


def float32_reciprocal(value: float) -> float:
    """1 / value as torch's CUDA `tensor / value` multiplies by it: value rounded to float32,
    its reciprocal rounded to float32 once (a float32 number, exact as a constexpr)."""
    one = torch.tensor(1.0, dtype=torch.float32)
    return (one / torch.tensor(value, dtype=torch.float32)).item()


if triton is not None:
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def exact_exp(x, LIBDEVICE: tl.constexpr):
        """float32 exp(x): libdevice's expf (torch's CUDA exp), tl.exp without LIBDEVICE."""
        if LIBDEVICE:
            return libdevice.exp(x)
        return tl.exp(x)

    @triton.jit
    def exact_silu(x, LIBDEVICE: tl.constexpr):
        """float32 x / (1 + exp(-x)), the division rounded once: torch's CUDA silu."""
        return tl.math.div_rn(x, 1.0 + exact_exp(-x, LIBDEVICE))

    @triton.jit
    def exact_sigmoid(x, LIBDEVICE: tl.constexpr):
        """float32 1 / (1 + exp(-x)), the division rounded once: torch's CUDA sigmoid."""
        return tl.math.div_rn(1.0, 1.0 + exact_exp(-x, LIBDEVICE))

    @triton.jit
    def exact_tanh(x, LIBDEVICE: tl.constexpr):
        """float32 tanh(x): libdevice's tanhf (torch.tanh on CUDA); without LIBDEVICE
        2 sigmoid(2x) - 1 (the interpreter has no tanh)."""
        if LIBDEVICE:
            return libdevice.tanh(x)
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def uncontracted_product(a, b, UNCONTRACTED: tl.constexpr):
        """a * b in float32, kept out of an FMA with an add after it when UNCONTRACTED (built
        for a GPU, Triton would fuse a * b + c where eager rounds the product first; PTX's
        mul.rn is never fused, nor flushes subnormals)."""
        if UNCONTRACTED:
            return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b],
                                             dtype=tl.float32, is_pure=True, pack=1)
        return a * b

    @triton.jit
    def exact_gelu_tanh(x, LIBDEVICE: tl.constexpr):
        """float32 tanh-approximate GELU as torch's CUDA kernel computes it: x_cube = x * x * x,
        inner = beta * (x + kappa * x_cube), 0.5 * x * (1 + tanh(inner)), x + kappa * x_cube one
        FMA as nvcc contracts it in torch's build (rounding its product apart parts from
        F.gelu on a few float32 values in a thousand), every other product rounded (mul.rn with
        LIBDEVICE, a GPU build) and tanh exact_tanh. beta is M_SQRT2 * M_2_SQRTPI * 0.5 and
        kappa 0.044715, both as float32 (these literals are those float32 values)."""
        beta = tl.full(x.shape, 0.7978845834732056, tl.float32)
        kappa = tl.full(x.shape, 0.044714998453855515, tl.float32)
        half = tl.full(x.shape, 0.5, tl.float32)
        x_cube = uncontracted_product(uncontracted_product(x, x, LIBDEVICE), x, LIBDEVICE)
        inner = uncontracted_product(beta, tl.fma(kappa, x_cube, x), LIBDEVICE)
        return uncontracted_product(uncontracted_product(half, x, LIBDEVICE),
                                    1.0 + exact_tanh(inner, LIBDEVICE), LIBDEVICE)

    @triton.jit
    def exact_mean(total, n):
        """float32 total / n as torch's CUDA mean: total times 1/n, the reciprocal an exact
        division rounded once (`/ n` would compile to an approximate division)."""
        return total * tl.math.div_rn(1.0, n.to(tl.float32))
