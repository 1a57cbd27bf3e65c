"""generate's hf mode (transformers' generate on the engine's own weights) for Gemma 2 and 3 and
the MoE models: transformers 5 holds an MoE layer's experts as gate_up_proj [E, 2 ffn, dim] and
down_proj, Mixtral's router under mlp.gate. Greedy tokens equal the engine's, over prompts past
the sliding window; the fit check counts the concatenated gate/up copy."""

from __future__ import annotations

import json

import pytest
import torch

from infermeter.cli import main
from infermeter.engine.checkpoint.load import save_checkpoint
from infermeter.engine.generator import GenerationConfig, Generator
from infermeter.engine.model import build_model
from infermeter.generate.memory import case_memory
from infermeter.specs.presets import PRESETS

pytest.importorskip("transformers")

BASE = PRESETS["debug"].with_updates(ffn_dim=96, head_dim=32, norm_eps=1e-6)
GEMMA = BASE.with_updates(norms_per_layer=4, tie_embeddings=True, sliding_window=6,
                          query_pre_attn_scalar=24.0)
SPECS = {
    "gemma2": GEMMA.with_updates(arch="gemma2", n_layers=3, sliding_window_layers=(0, 2),
                                 attn_logit_softcap=50.0, final_logit_softcap=30.0),
    "gemma3": GEMMA.with_updates(arch="gemma3_text", n_layers=3, qk_norm=True,
                                 sliding_window_layers=(0, 1), rope_theta=1000000.0,
                                 rope_local_theta=10000.0),
    "mixtral": BASE.with_updates(arch="mixtral", n_experts=4, n_active_experts=2,
                                 moe_ffn_dim=96),
    # layer 1 dense (mlp_only_layers), as Qwen3-MoE's config can say
    "qwen3_moe": BASE.with_updates(arch="qwen3_moe", n_layers=3, qk_norm=True, n_experts=8,
                                   n_active_experts=2, moe_ffn_dim=48, moe_dense_layers=(1,)),
}


def _model(name: str):
    """Seeded weights, norms away from their identity, routers wide enough to spread tokens."""
    spec = SPECS[name]
    model = build_model(spec, seed=3)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("norm.weight"):
                param.normal_(0.0 if name.startswith("gemma") else 1.0, 0.2, generator=gen)
            elif key.endswith("feed_forward.gate.weight"):
                param.normal_(0.0, 1.0, generator=gen)
            elif param.dim() >= 2:  # wider than the init's: no near-ties between greedy choices
                param.normal_(0.0, 0.1, generator=gen)
    return model


@pytest.mark.parametrize("name", list(SPECS))
def test_hf_runner_gives_the_engine_tokens(name) -> None:
    from infermeter.generate.hf import HFRunner

    model = _model(name)
    prompt = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    config = GenerationConfig(max_new_tokens=12)  # 9 + 12 tokens: past the 6-token window
    ours = Generator(model, 32).generate(prompt, config).output_token_ids
    out = HFRunner(model, config, compile=False).run(prompt, lambda event, step: None)
    assert out.output_token_ids == ours
    if model.spec.is_moe:  # the engine's router and w2 are shared with transformers', not copied
        hf = HFRunner(model, config, compile=False).hf
        layer = model.layers[0].feed_forward
        assert hf.model.layers[0].mlp.gate.weight.data_ptr() == layer.gate.weight.data_ptr()
        assert hf.model.layers[0].mlp.experts.down_proj.data_ptr() == \
            layer.w2.weight.data_ptr()


def test_generate_hf_mode_on_an_moe_checkpoint(tmp_path, capsys) -> None:
    save_checkpoint(_model("mixtral"), tmp_path / "m", "hf")
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--device", "cpu", "--mode",
                 "eager", "hf", "--prompt-ids", "3,1,4,1,5,9,2,6", "--max-new-tokens", "6",
                 "--repeats", "1", "--warmup", "0", "--no-roofline", "--json"]) == 0
    eager, hf = (json.loads(line) for line in capsys.readouterr().out.splitlines()[:2])
    assert hf["config"]["mode"] == "hf"
    assert hf["output_token_ids"] == eager["output_token_ids"]


def test_fit_check_counts_the_gate_up_copy() -> None:
    mixtral = PRESETS["mixtral-8x7b"]  # 32 layers x 8 experts x (w1 + w3) of 14336 x 4096
    parts = case_memory(mixtral, 1, 16, 256, "bfloat16", "bfloat16", "hf")
    qk = 32 * (32 + 8) * 128 * 4096 * 2
    assert parts["hf weight copies"] == qk + 32 * 8 * 2 * 14336 * 4096 * 2
