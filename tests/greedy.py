"""Greedy decoding through a model's forward, as the workers' step checks run it."""

from __future__ import annotations

from collections.abc import Callable

import torch


def greedy_decode(model, ids: torch.Tensor, steps: int,
                  after_prefill: Callable[[], None] = lambda: None):
    """The prompt ids [B, P] prefilled, then `steps` one-token greedy steps at positions P on:
    (ids [B, P + steps], the logits [B, steps, V] each new token was picked from).
    after_prefill runs between the two (a check counting the steps' calls clears them)."""
    prompt = ids.shape[1]
    outs = []
    with torch.inference_mode():
        out = model(ids, torch.arange(prompt))
        after_prefill()
        for i in range(prompt, prompt + steps):
            outs.append(out[:, -1:])
            ids = torch.cat([ids, out[:, -1:].argmax(-1)], dim=1)
            out = model(ids[:, -1:], torch.tensor([i]))
    return ids, torch.cat(outs, dim=1)
