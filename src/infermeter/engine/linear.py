"""The engine's linear layer: nn.Linear, whose one-row products in a compiled step can go to
gemv_kernel.py's Triton GEMV instead of inductor's own matrix-vector reduction.

A subclass rather than a function call in the model, so the module's forward hooks (the tensor-
parallel all-reduces and all-gathers, parallel.py) still run around whichever product is used,
and checkpoints keep nn.Linear's parameter names.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from infermeter.engine.kernels.triton_support import triton_runs_on
from infermeter.engine.opaque_ops import compiling

# "triton" (the default: gemv_kernel.py, at one row in a compiled step where Triton runs) or
# "inductor" (inductor's coordinate-descent-tuned reduction, fused with the norm before it).
# The GEMV with its per-shape tiles streams the weights faster than inductor's reduction at one
# row (docs/engine.md, "Kernels", has the figures by date and device).
MATVEC_KERNEL = "triton"
MATVEC_KERNELS = ("inductor", "triton")


def takes_gemv(kind: str, rows: int, weight: Tensor) -> bool:
    """Whether a compiled step's product of `rows` rows with `weight` goes to the GEMV: kind
    "triton", one row, Triton runs where the weight is. Linear.forward's rule (it also checks
    the input's layout, which the engine's own tensors meet); the generation runner records
    what ran with it."""
    return kind == "triton" and rows == 1 and triton_runs_on(weight)


class Linear(nn.Linear):
    matvec_kernel = MATVEC_KERNEL  # set per instance (or on every Linear of a model) to change
    # False: the bias is kept (and loaded) but not added. A row-parallel layer's partial sums are
    # all-reduced, so under tensor parallelism only rank 0 adds its bias (sharding.py).
    adds_bias = True

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out]; a single row x [1(, 1), in] in a compiled step with
        matvec_kernel "triton" (where Triton runs) takes the GEMV kernel."""
        rows = x.numel() // x.shape[-1]
        bias = self.bias if self.adds_bias else None
        if compiling() and takes_gemv(self.matvec_kernel, rows, self.weight):
            # imported here: only a compiled step takes it (model.py says why)
            from infermeter.engine.kernels.gemv import gemv_usable, matvec

            if not gemv_usable(x, self.weight):
                return F.linear(x, self.weight, bias)
            out = matvec(x.reshape(1, -1), self.weight).view(*x.shape[:-1], -1)
            return out if bias is None else out + bias
        return F.linear(x, self.weight, bias)


def set_matvec_kernel(model: nn.Module, kind: str) -> None:
    """Every engine Linear of `model` computes its one-row products with `kind`."""
    if kind not in MATVEC_KERNELS:
        raise ValueError(f"unknown matrix-vector kernel {kind!r} (use {MATVEC_KERNELS})")
    for module in model.modules():
        if isinstance(module, Linear):
            module.matvec_kernel = kind
