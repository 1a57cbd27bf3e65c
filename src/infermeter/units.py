"""Parsing and printing of the units users type: dtypes, byte sizes, percentages.

Pure Python (no torch import) so that sizing works without a GPU stack.
Bandwidth uses GB = 1e9 bytes; capacities print as MiB/GiB (2**30), see docs/design.md.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from infermeter.errors import InfermeterError

# Canonical dtype name -> bytes per element. fp8 means one of the float8 formats (e4m3/e5m2);
# both take one byte, which is all sizing needs.
DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8": 1,
    "int8": 1,
}

# Weight-only block formats: bytes a weight, its block's shared scale included. MXFP4 (OCP
# microscaling; gpt-oss's experts): 32 4-bit values share one 8-bit power-of-two scale, so 32
# weights take 16 + 1 bytes, 4.25 bits a weight. Weights only: no tensor, KV cache or
# activation holds it, so dtype_bytes refuses it.
BLOCK_DTYPE_BYTES = {"mxfp4": Fraction(17, 32)}

_DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float8": "float8", "fp8": "float8", "float8_e4m3fn": "float8", "float8_e5m2": "float8",
    "e4m3": "float8", "e5m2": "float8",
    "int8": "int8", "i8": "int8",
    "mxfp4": "mxfp4",
}


def default_run_dtype(device_type: str) -> str:
    """What the engine computes in when no --dtype is given: float32 on the CPU, bfloat16 on a
    GPU (torch-free, so --dry-run can say it too)."""
    return "float32" if device_type == "cpu" else "bfloat16"


def canonical_dtype(name: str) -> str:
    """Map any accepted spelling ('fp16', 'half', 'torch.float16') to its canonical name."""
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in _DTYPE_ALIASES:
        raise InfermeterError(
            f"unknown dtype {name!r}; use one of fp32, fp16, bf16, fp8, int8 (weights: also mxfp4)"
        )
    return _DTYPE_ALIASES[key]


def dtype_bytes(name: str) -> int:
    """Bytes of one element: what a KV cache, an activation or a torch tensor holds."""
    canonical = canonical_dtype(name)
    if canonical in BLOCK_DTYPE_BYTES:
        raise InfermeterError(f"{canonical} is a weight storage format (4-bit values sharing "
                              "a scale per block of 32), not a dtype a KV cache or a tensor "
                              "can hold; use it for weights (--dtype) only")
    return DTYPE_BYTES[canonical]


def weight_dtype_bytes(name: str) -> Fraction:
    """Bytes one weight takes stored as `name`: 2 for bf16, 17/32 for mxfp4."""
    canonical = canonical_dtype(name)
    if canonical in BLOCK_DTYPE_BYTES:
        return BLOCK_DTYPE_BYTES[canonical]
    return Fraction(DTYPE_BYTES[canonical])


def weight_bytes_of(params: int, name: str) -> int:
    """Bytes `params` weights take stored as `name`, rounded up to a whole byte."""
    return math.ceil(params * weight_dtype_bytes(name))


_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """'80GiB' -> 85899345920, '512MB' -> 512000000, '1024' -> 1024 bytes.

    Decimal units (KB, MB, GB, TB) are powers of 1000 and binary units (KiB, MiB, GiB, TiB) powers
    of 1024, as their names say; a bare letter (80G) is read the way nvidia-smi and most GPU
    datasheets mean it, as GiB.
    """
    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        match = _SIZE_RE.match(str(text))
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise InfermeterError(
                f"cannot read size {text!r}; write it like 80GiB, 512MB or 1024"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(round(value * _SIZE_UNITS[unit]))
    if size <= 0:
        raise InfermeterError(f"size {text!r} must be positive")
    return size


def format_bytes(n: float) -> str:
    """Binary units for capacities: 268435456 -> '256.0 MiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def format_count(n: float) -> str:
    """Parameter counts: 6738415616 -> '6.74B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
