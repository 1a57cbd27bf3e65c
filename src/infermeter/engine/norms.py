"""The decoder's norms: RMSNorm, GemmaRMSNorm and norm_class (which of the two a spec's model
uses). Both the layers (model.py: the attention, FFN, post- and final norms) and attention's
q/k norms (self_attention.py) build them, so they sit below both.

- RMSNorm normalises in float32 and casts back before the weight, as Meta and HF do.
- Gemma 2 and 3 (GEMMA_ARCHS): norms apply (1 + w) in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from infermeter.specs.model import GEMMA_ARCHS, ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the weight is stored as w - 1 and applied as (1 + w), in float32 before
    the cast back (transformers' Gemma3RMSNorm)."""

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


def norm_class(spec: ModelSpec) -> type[RMSNorm]:
    return GemmaRMSNorm if spec.arch in GEMMA_ARCHS else RMSNorm
