"""Seeded random weights for any spec, scaled so activations stay finite.

GPT-2 / nanoGPT style: every matrix ~ N(0, 0.02), and the two projections that write into the
residual stream (attention.wo, feed_forward.w2) ~ N(0, 0.02 / sqrt(2 * n_layers)), so the residual
grows like sqrt(depth) at most and an 80-layer model stays finite in fp16. Norm weights are 1;
qkv biases are drawn too (N(0, 0.02)) so checkpoint round trips exercise them.

Tensors are filled in place, in their own dtype and on their own device, with one generator on
that device: no float32 copy of the model is ever made. Same seed + same device type + same dtype
gives the same weights; CPU and CUDA generators differ, so weights differ across device types.

Tensor parallel (`shard`, a parallel.ShardPlan): every rank draws each *full* tensor from the same
generator stream, in the same order, into a temporary buffer and keeps its slice, so any tp gives
exactly the tp 1 model's weights. Memory: the rank's shard plus one full tensor at a time.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

INIT_STD = 0.02


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int = 0, shard: Any = None) -> None:
    """Fill a Transformer's parameters; `shard` a parallel.ShardPlan or None (typed loosely:
    the model and the sharding plan both import this module)."""
    device = model.tok_embeddings.weight.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    out_std = INIT_STD / math.sqrt(2 * model.spec.n_layers)
    # named_parameters() yields a tied Parameter once (under tok_embeddings), in a fixed order.
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        std = out_std if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) \
            else INIT_STD
        if shard is None or shard.slice_of(name) is None:
            param.normal_(0.0, std, generator=gen)
            continue
        full = torch.empty(shard.full_shape(name, param.shape), dtype=param.dtype, device=device)
        full.normal_(0.0, std, generator=gen)  # the same numbers tp 1 draws for this tensor
        param.copy_(shard.narrow(name, full))
        del full
