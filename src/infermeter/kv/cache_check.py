"""What the engine's cache code allocates for a (batch, length), without using any memory.

`infermeter kv --check-engine` puts this next to the analytic size: the same LayerKVCache
objects `Transformer.setup_cache` builds, made on PyTorch's meta device, where tensors have
shapes, dtypes and nbytes but no storage. A difference would be a bug in one of the two.
"""

from __future__ import annotations

import torch

from infermeter.engine.dtypes import torch_dtype
from infermeter.engine.kv_cache import LayerKVCache
from infermeter.specs.model import ModelSpec, check_engine_arch


def allocated_cache_bytes(spec: ModelSpec, batch_size: int, seq_len: int, kv_dtype: str) -> int:
    """Sum of K and V nbytes over the layers, as setup_cache(batch_size, seq_len) builds them."""
    check_engine_arch(spec, vocab=False)
    dtype = torch_dtype(kv_dtype)
    total = 0
    for layer in range(spec.n_layers):
        cache = LayerKVCache(batch_size, seq_len, spec.n_kv_heads, spec.head_dim,
                             spec.layer_window(layer), dtype, torch.device("meta"))
        total += cache.k.nbytes + cache.v.nbytes
    return total
