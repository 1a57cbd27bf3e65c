"""Fused projections at run time: wq/wk/wv -> wqkv and w1/w3 -> w13 in every layer.

Why: at batch 1 a decode step is a string of matrix-vector products, each reading its weight
once. A 4096 x 4096 fp16 matrix (32 MiB) leaves HBM bandwidth on the table at the start and end
of its kernel (and cuBLAS splits it over K, adding a reduction kernel); one [12288, 4096] read
does not. On an H100, random Llama-2-7B fp16: 6.33 -> 5.89 ms per decode step
(results/decode-tuning-nvidia-h100-80gb-hbm3.json). Prefill's GEMMs get larger too.

How: the loaders and the tensor-parallel sharding work on Meta's names (fusion comes after
them, on this rank's shards), then `fuse_projections` concatenates each layer's rows (one
layer at a time, so memory grows by one layer's q/k/v at most) and drops the originals.
`meta_state_dict` gives a fused model's weights under Meta's names again (row views of the
fused matrices) for saving a checkpoint or handing the weights to transformers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from infermeter.engine.linear import Linear
from infermeter.engine.model import FeedForward, Transformer


def _fused_linear(parts: list[nn.Linear]) -> Linear:
    """One Linear whose rows are the parts' rows, in order (weights and biases concatenated);
    it computes one-row products as the first part did (linear.Linear.matvec_kernel)."""
    weight = torch.cat([p.weight for p in parts])
    has_bias = parts[0].bias is not None
    fused = Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.matvec_kernel = getattr(parts[0], "matvec_kernel", fused.matvec_kernel)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


@torch.no_grad()
def fuse_projections(model: Transformer) -> None:
    """In place, idempotent. Call after loading (and sharding), before compiling."""
    for layer in model.layers:
        attention, ffn = layer.attention, layer.feed_forward
        if attention.wqkv is None:
            parts = [attention.wq, attention.wk, attention.wv]
            attention.qkv_split = [p.weight.shape[0] for p in parts]
            attention.wqkv = _fused_linear(parts)
            del attention.wq, attention.wk, attention.wv
        if isinstance(ffn, FeedForward) and ffn.w13 is None:  # MoE experts stay stacked
            ffn.w13 = _fused_linear([ffn.w1, ffn.w3])
            del ffn.w1, ffn.w3


def is_fused(model: Transformer) -> bool:
    return model.layers[0].attention.wqkv is not None


def meta_state_dict(model: Transformer) -> dict[str, Tensor]:
    """model.state_dict() under Meta's names, fused or not (fused: row views, no copies)."""
    out: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        prefix, _, kind = name.rpartition(".")  # 'layers.3.attention.wqkv', 'weight'
        if prefix.endswith(".attention.wqkv"):
            base = prefix[: -len("wqkv")]
            layer = model.get_submodule(prefix.rsplit(".", 1)[0])
            for part, piece in zip(("wq", "wk", "wv"), tensor.split(layer.qkv_split)):
                out[f"{base}{part}.{kind}"] = piece
        elif prefix.endswith(".feed_forward.w13"):
            base = prefix[: -len("w13")]
            for part, piece in zip(("w1", "w3"), tensor.chunk(2)):
                out[f"{base}{part}.{kind}"] = piece
        else:
            out[name] = tensor
    return out
