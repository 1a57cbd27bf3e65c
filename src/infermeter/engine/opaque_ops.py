"""Ops torch.compile must not see into, and the switch that says whether it is compiling.

Inductor inlines pointwise work into the reductions that consume it. For a one-token step each
matrix-vector product is such a reduction, so whatever feeds it is recomputed by every thread
block. An op registered here is a boundary: its input is computed once into a buffer, and the
op runs the eager code (same numerics as eager). Whether each pays is measured on a GPU
(benchmarks/decode_tuning.py); model.py's ACTIVATION_KERNEL and MATERIALIZE_NORM say
which are on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def compiling() -> bool:
    """True while torch.compile traces the model (a function of ours, so tests can patch it)."""
    return torch.compiler.is_compiling()


@torch.library.custom_op("infermeter::silu_mul", mutates_args=())
def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """SwiGLU's activation, silu(gate) * up, as an op torch.compile cannot see into.

    Why: inductor turns a one-token matrix-vector product into a Triton reduction and inlines
    the pointwise ops that feed it, so w2's kernel recomputed silu(gate) * up (and re-read both
    11008-long halves) in every thread block. The H100 traces show w2 as the slowest matrix per
    byte (37-72 us for 90 MB, depending on which block sizes the tuner happened to pick, against
    ~31 us for wqkv's 96 MB). Opaque, the activation is computed once into a buffer that w2's
    kernel reads like any input. Same numerics as eager: this *is* the eager code.
    """
    return F.silu(gate) * up


@silu_mul.register_fake
def _(gate: Tensor, up: Tensor) -> Tensor:
    return gate.new_empty(gate.shape)  # elementwise on a chunk view: a contiguous result


@torch.library.custom_op("infermeter::materialize", mutates_args=())
def materialize(x: Tensor) -> Tensor:
    """A copy of x that torch.compile cannot see through: x is computed into a buffer first.

    Used on the attention norm's output in a one-token compiled step. Otherwise inductor inlines
    the norm into the wqkv matrix-vector kernel, and every one of its thread blocks re-reads x
    and re-derives the norm (some layers even recompute the mean of squares per block): wqkv ran
    at ~2.56 TB/s in the H100 traces while w13, fed the same way, ran at ~3.1 TB/s. The copy is
    one 8 KB kernel (~1.5 us). Measured, it does not pay: 5.54 -> 5.65 ms a Llama-2-7B step on
    an H100 in one run (results/decode-tuning-norm-*.json), so it is off by default
    (MATERIALIZE_NORM) and kept as a decode_tuning variant.
    """
    return x.clone()


@materialize.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)
