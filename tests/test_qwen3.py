"""Qwen3 dense in the engine: q/k norms per head before RoPE, head_dim apart from dim / heads.

Parity cases build a tiny random Qwen3ForCausalLM (float32, eager attention), save it with
save_pretrained and load the folder with the engine. Norm weights (the q/k norms included) are
drawn around 1, not left at 1, so a q/k norm read in the wrong feature order changes the logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from infermeter.engine.checkpoint.load import load_model, save_checkpoint
from infermeter.engine.generator import GenerationConfig, Generator
from infermeter.engine.model import build_model
from infermeter.errors import InfermeterError
from infermeter.generate.hf import build_hf_model
from infermeter.specs.loaders import spec_from_hf_config
from infermeter.specs.model import check_engine_arch
from infermeter.specs.presets import PRESETS
from infermeter.specs.sizes import param_count
from tests.hf_reference import (
    assert_matches_transformers,
    assert_written_checkpoint_round_trips,
    tiny_hf_model,
)
from tests.published_configs import LLAMA4_SCOUT

transformers = pytest.importorskip("transformers")

VOCAB = 128
# head_dim 32 with 4 heads: q has 128 features from a width of 64, as Qwen3-0.6B has 2048 from 1024.
CONFIG = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 3, "vocab_size": VOCAB,
          "max_position_embeddings": 256, "initializer_range": 0.1, "rope_theta": 1000000.0,
          "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
# A spec the engine builds directly (random weights), same shape as CONFIG.
SPEC = PRESETS["debug"].with_updates(name="tiny-qwen3", arch="qwen3", head_dim=32, qk_norm=True,
                                     norm_eps=1e-6, rope_theta=1000000.0)


def _spread_norms(name: str, param: torch.nn.Parameter) -> None:
    if "norm" in name:  # away from 1: a norm used in the wrong place shows in the logits
        param.normal_(1.0, 0.1)


def _hf_qwen3(folder, tie: bool = False):
    return tiny_hf_model(folder, transformers.Qwen3Config(**CONFIG, tie_word_embeddings=tie),
                         transformers.Qwen3ForCausalLM, _spread_norms)




@pytest.mark.parametrize("tie", [False, True])
@torch.inference_mode()
def test_logits_and_greedy_tokens_equal_transformers(tie: bool, tmp_path) -> None:
    hf = _hf_qwen3(tmp_path, tie)
    model = load_model(tmp_path, max_batch_size=2, max_seq_len=64)
    spec = model.spec
    assert (spec.arch, spec.qk_norm, spec.head_dim, spec.tie_embeddings) == \
        ("qwen3", True, 32, tie)
    assert model.layers[0].attention.q_norm.weight.shape == (32,)
    assert_matches_transformers(model, hf, VOCAB, 12)


def test_compiled_decode_step_gives_eager_tokens() -> None:
    """Generator fuses wq/wk/wv (the q/k norms then act on the split parts) and compiles the
    decode step with inductor."""
    model = build_model(SPEC, seed=2)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]]
    eager = Generator(model).generate(prompts, GenerationConfig(max_new_tokens=6))
    compiled = Generator(model).generate(prompts, GenerationConfig(max_new_tokens=6,
                                                                   compile=True))
    assert compiled.output_token_ids == eager.output_token_ids
    assert model.layers[0].attention.wqkv is not None  # the fused path was the one compiled


def test_writer_round_trip_keeps_the_norms_and_transformers_reads_it(tmp_path) -> None:
    source = build_model(SPEC, seed=4)
    with torch.no_grad():  # q/k norm weights apart from 1, so their feature order shows
        for layer in source.layers:
            layer.attention.q_norm.weight.normal_(1.0, 0.2)
            layer.attention.k_norm.weight.normal_(1.0, 0.2)
    save_checkpoint(source, tmp_path, "hf")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["head_dim"] == 32
    assert_written_checkpoint_round_trips(source, tmp_path, SPEC, VOCAB, 12, 16)
    with pytest.raises(InfermeterError, match="q/k norms"):
        save_checkpoint(source, tmp_path / "meta", "meta")


@torch.inference_mode()
def test_generate_hf_mode_builds_the_same_qwen3() -> None:
    """generate's hf mode hands the engine's weights to transformers: the q/k norms go back
    to HF's feature order with q and k."""
    model = build_model(SPEC, seed=5)
    for layer in model.layers:
        layer.attention.q_norm.weight.normal_(1.0, 0.2)
        layer.attention.k_norm.weight.normal_(1.0, 0.2)
    hf = build_hf_model(model)
    tokens = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    model.setup_cache(1, 16)
    assert (model(tokens, torch.arange(9)) - hf(tokens).logits).abs().max().item() < 1e-4


def test_published_config_gives_the_preset(tmp_path) -> None:
    # Qwen/Qwen3-8B's config.json, the fields that shape the model.
    published = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 12288,
        "max_position_embeddings": 40960, "max_window_layers": 36, "num_attention_heads": 32,
        "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
        "vocab_size": 151936}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(published))
    assert spec_from_hf_config(path).with_updates(name="qwen3-8b") == PRESETS["qwen3-8b"]


@pytest.mark.parametrize("name,non_embedding", [("qwen3-0.6b", 0.44e9), ("qwen3-8b", 6.95e9),
                                                ("qwen3-32b", 31.2e9)])
def test_non_embedding_parameters_match_published(name: str, non_embedding: float) -> None:
    """Qwen's model cards give both totals; the non-embedding one has three digits."""
    spec = PRESETS[name]
    embeddings = spec.vocab_size * spec.dim * (1 if spec.tie_embeddings else 2)
    assert param_count(spec) - embeddings == pytest.approx(non_embedding, rel=0.005)
    q_k_norms = 2 * spec.head_dim * spec.n_layers
    assert param_count(spec) - param_count(spec.with_updates(qk_norm=False)) == q_k_norms


def test_a_config_the_engine_cannot_run_is_one_line(tmp_path) -> None:
    deepseek = PRESETS["deepseek-v3"]
    with pytest.raises(InfermeterError) as err:
        check_engine_arch(deepseek)
    assert "\n" not in str(err.value) and "'deepseek_v3'" in str(err.value)
    assert "qwen3" in str(err.value)  # the list of what does run
    # Llama 4 is read (for sizing) but not run: its whole config gives the engine's line
    (tmp_path / "config.json").write_text(json.dumps(LLAMA4_SCOUT))
    with pytest.raises(InfermeterError, match="'llama4_text' can be sized but not run"):
        load_model(f"random:{tmp_path}")
    other = {**CONFIG, "model_type": "falcon_h1", "architectures": ["FalconH1ForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(other))
    with pytest.raises(InfermeterError, match="unsupported model_type 'falcon_h1'"):
        load_model(f"random:{tmp_path}")
