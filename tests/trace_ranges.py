"""The NVTX ranges --trace opens in a model's forward, recorded instead of sent, for the tests
that a model's parts are labelled as what they are."""

from __future__ import annotations

import torch

from infermeter.measure import nvtx


def pushed_ranges(model: torch.nn.Module, monkeypatch) -> list[str]:
    """The range names one two-token forward of `model` (a fresh 8-token cache) pushes, in order,
    with --trace's per-layer ranges installed."""
    pushed: list[str] = []
    monkeypatch.setattr(nvtx, "range_push", pushed.append)
    monkeypatch.setattr(nvtx, "range_pop", lambda: None)
    model.setup_cache(1, 8)
    handles = nvtx.install_layer_ranges(model)
    try:
        model(torch.tensor([[1, 2]]), torch.arange(2))
    finally:
        for handle in handles:
            handle.remove()
    return pushed
