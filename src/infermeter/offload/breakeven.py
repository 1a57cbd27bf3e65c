"""The prefix length from which reloading a prefix's KV cache beats recomputing it.

Per suffix length, the measured TTFTs at each prefix length give gain(P) = recompute(P) -
reload(P) (ms; > 0: reload is faster). The break-even is where gain crosses zero for the last
time going up in P, linearly interpolated between the two measured prefix lengths around it, so
reload wins at every measured length above it. Outside the measured range nothing is
extrapolated: "below" (reload wins at every measured length), "above" (recompute does).
Pure Python, so the arithmetic is tested on synthetic numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class BreakEven:
    prefix_len: float | None  # tokens; None when the crossing is outside the measured lengths
    status: str  # "measured" (between two measured lengths), "below" or "above" the range
    shortest: int  # the measured range, for the reader of "below" / "above"
    longest: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def break_even(points: Sequence[tuple[int, float, float]]) -> BreakEven:
    """points: (prefix_len, reload_ms, recompute_ms), any order, distinct prefix lengths."""
    if not points:
        raise ValueError("break-even of no measurements")
    ordered = sorted(points)
    lengths = [p[0] for p in ordered]
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"prefix lengths measured twice: {lengths}")
    gains = [recompute - reload for _, reload, recompute in ordered]
    shortest, longest = lengths[0], lengths[-1]
    if gains[-1] <= 0:  # recompute at least as fast at the longest measured prefix
        return BreakEven(None, "above", shortest, longest)
    last_loss = max((i for i, gain in enumerate(gains) if gain <= 0), default=None)
    if last_loss is None:
        return BreakEven(None, "below", shortest, longest)
    (p0, g0), (p1, g1) = (lengths[last_loss], gains[last_loss]), \
        (lengths[last_loss + 1], gains[last_loss + 1])
    # g0 <= 0 < g1: the zero of the line through (p0, g0) and (p1, g1)
    crossing = p0 + (p1 - p0) * (-g0) / (g1 - g0)
    return BreakEven(crossing, "measured", shortest, longest)
