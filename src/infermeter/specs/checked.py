"""The checks every model-config reader applies to a value it read (HF config.json, GGUF
metadata): each returns the value or raises one error line that starts with where the value was
read (e.g. "<file>: field 'hidden_size'", "<file>: GGUF key llama.block_count")."""

from __future__ import annotations

import math
from typing import Any

from infermeter.errors import InfermeterError

# More layers than any model has; a larger count is a typo (and sizing walks every layer).
MAX_LAYERS = 10_000


def checked_int(value: Any, name: str, minimum: int = 1) -> int:
    """`value` as an integer of at least `minimum` (1: a positive count or size), else one error
    line that starts with `name`, where it was read (e.g. "<file>: field 'hidden_size'")."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InfermeterError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InfermeterError(f"{name} must be {what}, got {value}")
    return value


def checked_number(value: Any, name: str) -> float:
    """`value` as a positive, finite number (norm epsilons, RoPE bases and factors), else one
    error line that starts with `name`, as checked_int's."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise InfermeterError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def checked_layer_count(value: Any, name: str) -> int:
    """A positive layer count of at most MAX_LAYERS, as checked_int's."""
    n_layers = checked_int(value, name)
    if n_layers > MAX_LAYERS:
        raise InfermeterError(f"{name} is {n_layers:,}, more layers than any model has (at most "
                              f"{MAX_LAYERS:,})")
    return n_layers
