"""llama.cpp's older Mixtral GGUF layout, one tensor per expert (blk.N.ffn_gate.E.weight, ffn_up,
ffn_down), loads stacked: the same weights and greedy tokens as the stacked layout's file."""

from __future__ import annotations

import pytest
import torch

from infermeter.engine.checkpoint.load import load_weights
from infermeter.engine.fusion import meta_state_dict
from infermeter.engine.generator import GenerationConfig, Generator
from infermeter.engine.model import build_model
from infermeter.errors import InfermeterError
from infermeter.specs.gguf_meta import spec_from_gguf
from infermeter.specs.presets import PRESETS
from tests.gguf_files import write_gguf

SPEC = PRESETS["debug"].with_updates(ffn_dim=128, head_dim=32, norm_eps=1e-6, arch="mixtral",
                                     n_experts=4, n_active_experts=2, moe_ffn_dim=128)
PROJECTIONS = {"w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down"}


def _source() -> torch.nn.Module:
    model = build_model(SPEC, seed=1)
    with torch.no_grad():  # a wide router, so the top-2 choices are far from ties
        for key, param in model.named_parameters():
            if key.endswith("feed_forward.gate.weight"):
                param.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
    return model


def _write_old_layout(model, path, skip=()):
    """The stacked file's tensors but each layer's experts as E tensors [out, in] apiece."""
    stacked, per_expert = [], {}
    for name, tensor in meta_state_dict(model).items():
        layer, _, proj = name.removeprefix("layers.").partition(".feed_forward.")
        if proj.removesuffix(".weight") in PROJECTIONS and tensor.dim() == 3:
            base = f"blk.{layer}.{PROJECTIONS[proj.removesuffix('.weight')]}"
            stacked.append(f"{base}_exps.weight")
            per_expert.update({f"{base}.{e}.weight": tensor[e].float().numpy()
                               for e in range(tensor.shape[0])
                               if f"{base}.{e}.weight" not in skip})
    return write_gguf(model, path, drop=tuple(stacked), extra=per_expert)


def _greedy(model):
    return Generator(model, max_seq_len=32).generate(
        [[5, 17, 42, 99, 3, 250, 7, 8, 9]], GenerationConfig(max_new_tokens=10)).output_token_ids


def test_old_layout_loads_as_the_stacked_layout(tmp_path) -> None:
    source = _source()
    new = write_gguf(source, tmp_path / "stacked.gguf")
    old = _write_old_layout(source, tmp_path / "old.gguf")
    assert spec_from_gguf(old) == spec_from_gguf(new).with_updates(name=spec_from_gguf(old).name)
    from_old, from_new = load_weights(old), load_weights(new)
    old_state, new_state = from_old.state_dict(), from_new.state_dict()
    assert old_state.keys() == new_state.keys()
    for key in old_state:
        assert torch.equal(old_state[key], new_state[key]), key
    assert _greedy(from_old) == _greedy(from_new)


def test_a_missing_expert_of_the_old_layout_is_named(tmp_path) -> None:
    path = _write_old_layout(_source(), tmp_path / "m.gguf", skip=("blk.1.ffn_up.3.weight",))
    with pytest.raises(InfermeterError, match=r"missing tensor blk[.]1[.]ffn_up[.]3[.]weight$"):
        load_weights(path)
