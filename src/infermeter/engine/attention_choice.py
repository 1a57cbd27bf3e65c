"""Which decode attention "auto" picks for a batch size (torch-free: the report uses it too).

The measurements behind the rule are in attention.py, next to the kinds themselves.
"""

from __future__ import annotations

AUTO_TRITON_MIN_BATCH = 1  # see attention.py: since its combine is a Triton kernel, batch 1 gains


def resolve_attention(kind: str, batch_size: int) -> str:
    """The kind a step of batch_size sequences uses: "auto" picks by batch size; any other kind
    is kept as asked."""
    if kind != "auto":
        return kind
    return "triton" if batch_size >= AUTO_TRITON_MIN_BATCH else "math"
