"""Dtype names (as users and Results spell them) to torch dtypes and back, in one place."""

from __future__ import annotations

import torch

from infermeter.errors import InfermeterError
from infermeter.units import canonical_dtype, default_run_dtype

# What the engine computes in; a KV cache that is only stored and moved may also be float8.
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STORED_DTYPES = {**_TORCH_DTYPES, "float8": torch.float8_e4m3fn}
_DTYPE_NAMES = {v: k for k, v in _STORED_DTYPES.items()}


def torch_dtype(dtype: str | torch.dtype, stored: bool = False) -> torch.dtype:
    """'fp16' / 'bfloat16' / torch.float32 -> torch dtype. The engine computes in float32,
    float16 or bfloat16 (others refused with one line); stored=True also takes float8, for
    bytes that are only kept and moved (copy's KV cache)."""
    known = _STORED_DTYPES if stored else _TORCH_DTYPES
    name = _DTYPE_NAMES.get(dtype) if isinstance(dtype, torch.dtype) else canonical_dtype(dtype)
    if name not in known:
        raise InfermeterError(f"dtype {name or dtype} is not supported by the engine yet "
                              f"(use {', '.join(known)})")
    return known[name]


def dtype_name(dtype: torch.dtype | str) -> str:
    """torch.float16 -> 'float16', the spelling sizes.py and Results use."""
    return _DTYPE_NAMES[torch_dtype(dtype, stored=True)]


def run_dtypes(device: torch.device, dtype: str | None,
               kv_dtype: str | None) -> tuple[str, str]:
    """(weights' dtype, KV cache's dtype) of a run, as Results spell them: the asked ones, else
    the device's default for the weights and the weights' for the cache."""
    weights = dtype_name(torch_dtype(dtype or default_run_dtype(device.type)))
    return weights, dtype_name(torch_dtype(kv_dtype)) if kv_dtype else weights
