"""The engine's linear layer: nn.Linear, whose one-row products in a compiled step can go to
gemv_kernel.py's Triton GEMV instead of inductor's own matrix-vector reduction.

A subclass rather than a function call in the model, so the module's forward hooks (the tensor-
parallel all-reduces and all-gathers, parallel.py) still run around whichever product is used,
and checkpoints keep nn.Linear's parameter names.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from infermeter.engine.gemv_kernel import gemv, gemv_usable
from infermeter.engine.opaque_ops import compiling

# "inductor" (the default: inductor's coordinate-descent-tuned reduction, fused with the norm
# before it) or "triton" (gemv_kernel.py, at one row in a compiled step where Triton runs).
# Measured on H100s, each pair in one run (results/decode-tuning-gemv*-*.json): Llama-2-7B fp16
# batch-1 step 5.55 ms with the GEMV (tiles tuned on 7B's shapes) against 5.65 with inductor's;
# Llama-2-13B 10.99 against 10.08 with the 7B tiles at every shape; 13B's K = 5120 wants
# 2048-column tiles (gemv-tiles-llama-2-13b-*.json), which gemv_kernel.tiles_for now picks, but
# that 13B step is not measured yet: inductor stays the default until it is.
MATVEC_KERNEL = "inductor"
MATVEC_KERNELS = ("inductor", "triton")


class Linear(nn.Linear):
    matvec_kernel = MATVEC_KERNEL  # set per instance (or on every Linear of a model) to change

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out]; a single row x [1(, 1), in] in a compiled step with
        matvec_kernel "triton" (where Triton runs) takes the GEMV kernel."""
        if self.matvec_kernel == "triton" and compiling() and gemv_usable(x, self.weight):
            out = gemv(x.reshape(1, -1), self.weight).view(*x.shape[:-1], -1)
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)


def set_matvec_kernel(model: nn.Module, kind: str) -> None:
    """Every engine Linear of `model` computes its one-row products with `kind`."""
    if kind not in MATVEC_KERNELS:
        raise ValueError(f"unknown matrix-vector kernel {kind!r} (use {MATVEC_KERNELS})")
    for module in model.modules():
        if isinstance(module, Linear):
            module.matvec_kernel = kind
