"""Where two greedy decodes of the same tokens part, and how close the reference's choice was
there: a swap between two near-equal logits (rounding, on random weights especially) reads
differently from logits far apart (a wrong cache)."""

from __future__ import annotations

import math
from typing import Any


def divergence(want_tokens: list[list[int]], want_logits: Any, got_tokens: list[list[int]],
               got_logits: Any) -> dict[str, Any] | None:
    """None where the tokens agree. Else, with tokens [B][N] and logits [B, N, V] (the logits
    step s's token was chosen from): `step`, the first step at which any sequence's token
    differs, and `sequence`, the first such sequence; `top2_gap`, the reference's highest minus
    its second-highest logit there; `max_logit_diff`, the largest |got - want| over every
    sequence's logits up to and including that step (before it every input agrees, so they are
    the same computation's). The logits may be None (not captured): then only the step and
    sequence are given. A figure that is not finite (a NaN logit: a cache of garbage) is None,
    and `finite` False, so that the Result can still be written as JSON."""
    if want_tokens == got_tokens:
        return None
    steps = len(want_tokens[0])
    step, sequence = min((s, b) for b, (want, got) in enumerate(zip(want_tokens, got_tokens))
                         for s in range(steps) if want[s] != got[s])
    found: dict[str, Any] = {"step": step, "sequence": sequence, "top2_gap": None,
                             "max_logit_diff": None, "finite": True}
    if want_logits is None or got_logits is None:
        return found
    top2 = want_logits[sequence, step].float().topk(2).values
    seen = slice(0, step + 1)
    figures = {"top2_gap": float(top2[0] - top2[1]), "max_logit_diff": float(
        (got_logits[:, seen].float() - want_logits[:, seen].float()).abs().max())}
    for name, value in figures.items():
        found[name] = value if math.isfinite(value) else None
    found["finite"] = all(math.isfinite(value) for value in figures.values())
    return found


def describe(found: dict[str, Any]) -> str:
    """One clause for a warning: where the tokens part and how near the choice was."""
    where = f"first at token {found['step'] + 1} of sequence {found['sequence']}"
    if not found["finite"]:
        return f"{where}; the logits up to there are not all finite (NaN or inf)"
    if found["top2_gap"] is None:
        return where
    return (f"{where}, where recompute's two highest logits are {found['top2_gap']:.3g} apart "
            f"and the logits differ by at most {found['max_logit_diff']:.3g} up to there")
