"""Timed windows of decode steps that all start from the same state, so every window generates
the same tokens unless something disturbed the cache (what the traffic and offloaded-decode
measurements check)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


class DecodeWindows:
    """`steps` decode steps from `state` (the Generator's DecodeState after a prefill), rewound to
    its token and position before every window: the cache needs steps + 1 slots past it."""

    def __init__(self, generator: Any, state: Any, config: Any, steps: int) -> None:
        self.generator, self.state, self.config, self.steps = generator, state, config, steps
        self.start_pos = state.next_pos
        self.first, self.done = state.token.clone(), state.done.clone()
        self.cuda = generator.device.type == "cuda"
        self.outputs: list[list[list[int]]] = []  # per window, its tokens [B, steps]
        # the last window's start and end: CUDA events on a GPU, host-clock ms on the CPU (what
        # traffic.py places the background copies' own marks against)
        self.span: tuple[Any, Any] | None = None

    def run(self, before_step: Callable[[int], None] | None = None) -> float:
        """One window, in ms (CUDA events on a GPU, the host clock on the CPU);
        before_step(position) runs before each step."""
        state = self.state
        state.input_pos.fill_(self.start_pos)
        state.next_pos, state.token, state.done = self.start_pos, self.first.clone(), \
            self.done.clone()
        tokens = []
        if self.cuda:
            begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            begin.record()
        else:
            t0 = time.perf_counter()
        for _ in range(self.steps):
            if before_step is not None:
                before_step(state.next_pos)
            tokens.append(self.generator.decode_step(state, self.config))
        if self.cuda:
            end.record()
            end.synchronize()
            took = begin.elapsed_time(end)
            self.span = (begin, end)
        else:
            t1 = time.perf_counter()
            took = (t1 - t0) * 1e3
            self.span = (t0 * 1e3, t1 * 1e3)
        self.outputs.append(torch.stack(tokens, dim=1).tolist())
        return took
