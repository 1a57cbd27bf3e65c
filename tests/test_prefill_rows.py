"""Transformer.forward(rows=...): only the selected rows get the final norm and the output
projection, and their logits equal the same rows of the full forward (float32): with the plain
layers, with the adds fused with their norms (add_norm, the tensor-parallel path, here with the
plain add_then_norm), with a final soft-cap; rows of size 0 compute no logits at all.
"""

from __future__ import annotations

import pytest
import torch

from infermeter.engine.model import add_then_norm, build_model, prefill_from
from infermeter.specs.presets import PRESETS

DEBUG = PRESETS["debug"].with_updates(n_layers=2)
SPECS = {
    "gqa": DEBUG,
    "softcap": DEBUG.with_updates(name="debug-softcap", final_logit_softcap=3.0),
}
T = 11


def forward(model, tokens: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    model.setup_cache(tokens.shape[0], 32)
    with torch.no_grad(), prefill_from(model, 0):
        return model(tokens, torch.arange(tokens.shape[1]), rows=rows)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("fused_adds", [False, True])
def test_selected_rows_equal_the_full_forwards_rows(name, fused_adds):
    model = build_model(SPECS[name], device="cpu", dtype=torch.float32, seed=2)
    if fused_adds:
        model.add_norm = add_then_norm
    tokens = torch.randint(0, DEBUG.vocab_size, (2, T), generator=torch.Generator().manual_seed(5))
    full = forward(model, tokens, None)  # [2, T, V]
    assert full.shape == (2, T, DEBUG.vocab_size)
    for rows in ([T - 1], [0, 4, T - 1], [3]):
        picked = forward(model, tokens, torch.tensor(rows))
        assert picked.shape == (2, len(rows), DEBUG.vocab_size) and picked.dtype == torch.float32
        torch.testing.assert_close(picked, full[:, rows], rtol=1e-5, atol=1e-5)
    assert forward(model, tokens, torch.empty(0, dtype=torch.int64)).shape == \
        (2, 0, DEBUG.vocab_size)


def test_only_the_selected_rows_reach_the_output_projection():
    model = build_model(DEBUG, device="cpu", dtype=torch.float32, seed=2)
    seen: list[tuple[int, ...]] = []
    model.output.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    model.norm.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    tokens = torch.zeros(1, T, dtype=torch.int64)
    forward(model, tokens, torch.tensor([T - 1]))
    forward(model, tokens, torch.empty(0, dtype=torch.int64))
    assert seen == [(1, 1, DEBUG.dim)] * 2 + [(1, 0, DEBUG.dim)] * 2
