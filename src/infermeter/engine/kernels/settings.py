"""The check every A/B setting of the step's kernels shares: a module-level switch read when a
step is traced (decode_attention.UNSPLIT, fused_step.TILES_FROM, model.FUSED_HEAD, ...) holds
one of its ways, else one error line that names it. No torch here: model.py imports it at its
top, and an eager run imports no kernel module."""

from __future__ import annotations


def checked_way(value: str, name: str, ways: tuple[str, ...]) -> str:
    """`value` where it is one of `ways`, else a ValueError naming `name` and the ways."""
    if value not in ways:
        raise ValueError(f"unknown {name} {value!r}: one of {ways}")
    return value
