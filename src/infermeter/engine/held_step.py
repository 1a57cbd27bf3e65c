"""The recorded decode step's state, held where its graph reads it, so that a step is one
replay and nothing around it.

A recorded step (generator.STEP_GRAPHS "recorded") used to copy its five inputs (token,
position, done flags, stop ids, seed) into the tensors its graph was recorded with, clone its
two outputs (token, done) and add one to the position after it: eight small operations on the
stream a step, each launched from the host between two replays. Here the graph owns the
state instead. It reads the token, position and done flags in place and advances them in
place (generator._decode_in_place), and writes each sampled token into a history row by
position, from which the step returns a view: no copy in, none out.

A DecodeState holds the buffers while it decodes: on its first step its five tensors are
copied into the buffers of the step's key once, and the state's fields point at the buffers
from then on (its done flags and position are the step's, read by the loop's stop checks).
A second state that steps with the same Generator takes the buffers over; the first gets
copies of what it held, so it can go on where it stopped.

A returned token is a row of the history: it keeps its value until a later generation with the
same key samples a token for that position again (the loop stacks its tokens at its end).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

FIELDS = ("token", "input_pos", "done", "stop_ids", "seed")  # a DecodeState's device tensors


@dataclass(frozen=True)
class StepBuffers:
    """What one recorded step reads and writes besides the model's own buffers."""

    token: Tensor  # int64 [B]: the input token; the step writes the one it samples
    input_pos: Tensor  # int64 [1]: the input's position; the step adds one
    done: Tensor  # bool [B]: a stop id sampled; the step ors in the new token's
    stop_ids: Tensor  # int64 [S]
    seed: Tensor  # int64 []
    history: Tensor  # int64 [L + 1, B]: row p, the token sampled to be fed at position p

    def inputs(self) -> tuple[Tensor, ...]:
        """The step's tensor arguments after the model, in _decode_in_place's order."""
        return (self.token, self.input_pos, self.done, self.stop_ids, self.seed, self.history)


class HeldSteps:
    """Per step key, the buffers its graph reads; which decode state holds them now."""

    def __init__(self) -> None:
        self._buffers: dict[Hashable, StepBuffers] = {}
        self._holder: tuple[Any, StepBuffers] | None = None  # (the state, its buffers)

    def hold(self, state: Any, key: Hashable, length: int) -> StepBuffers:
        """The buffers of `key`, holding `state`'s tensors (a DecodeState): copied in once,
        then the state's fields are the buffers. length: the cache's positions L (the
        history's rows, plus one for the token sampled at the last position)."""
        buffers = self._buffers.get(key)
        if buffers is None:
            buffers = self._buffers[key] = _buffers_like(state, length)
        if self._holds(state, buffers):
            return buffers
        if self._holder is not None:  # it keeps what it held, in tensors of its own
            earlier, held = self._holder
            if self._holds(earlier, held):
                for name in FIELDS:
                    setattr(earlier, name, getattr(held, name).clone())
        for name in FIELDS:
            getattr(buffers, name).copy_(getattr(state, name))
            setattr(state, name, getattr(buffers, name))
        self._holder = (state, buffers)
        return buffers

    def _holds(self, state: Any, buffers: StepBuffers) -> bool:
        """Whether state's fields are buffers' tensors (a caller may have set a field anew)."""
        return self._holder is not None and self._holder[0] is state and \
            all(getattr(state, name) is getattr(buffers, name) for name in FIELDS)


def _buffers_like(state: Any, length: int) -> StepBuffers:
    """Buffers shaped as state's tensors, made outside any graph's pool (they outlive every
    replay), and a zeroed history [length + 1, B]."""
    token = state.token
    return StepBuffers(*(torch.empty_like(getattr(state, name)) for name in FIELDS),
                       history=torch.zeros(length + 1, token.shape[0], dtype=token.dtype,
                                           device=token.device))
