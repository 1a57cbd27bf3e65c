"""Gemma 3's text model in the engine: (1 + w) norms before and after attention and the FFN, q/k
norms, five sliding-window layers to one global with their own RoPE bases, GeGLU (tanh), the
embedding scaled by sqrt(dim), query_pre_attn_scalar, tied embeddings, final logit soft-capping.

Parity cases build a tiny random Gemma3ForCausalLM (float32, eager attention), save it with
save_pretrained and load the folder with the engine. Norm weights are drawn around 0 (Gemma
applies 1 + w) so a norm read in the wrong place or order changes the logits.
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
from infermeter.specs.model import RopeScaling
from infermeter.specs.presets import PRESETS
from infermeter.specs.sizes import kv_cache_bytes, param_count
from tests.hf_reference import (
    assert_written_checkpoint_round_trips,
    greedy_through_cache,
    tiny_hf_model,
)
from tests.trace_ranges import pushed_ranges

transformers = pytest.importorskip("transformers")

VOCAB, WINDOW = 128, 6
# 7 layers: 0-4 and 6 slide over 6 tokens, 5 is global. query_pre_attn_scalar 24 != head_dim 32
# (as 27B's 168 != 128); the global layers' RoPE is scaled (linear x2), as from 4B up.
CONFIG = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 7, "vocab_size": VOCAB,
          "max_position_embeddings": 256, "initializer_range": 0.1, "sliding_window": WINDOW,
          "query_pre_attn_scalar": 24,
          "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                 "rope_theta": 100000.0}},
          "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
SPEC = PRESETS["debug"].with_updates(
    name="tiny-gemma3", arch="gemma3_text", n_layers=7, head_dim=32, ffn_dim=96, vocab_size=VOCAB,
    norm_eps=1e-6, rope_theta=100000.0, rope_scaling=RopeScaling("linear", 2.0), qk_norm=True,
    tie_embeddings=True, sliding_window=WINDOW, sliding_window_layers=(0, 1, 2, 3, 4, 6),
    norms_per_layer=4, rope_local_theta=10000.0, query_pre_attn_scalar=24.0,
    final_logit_softcap=30.0)


def _spread_gemma_norms(name: str, param: torch.nn.Parameter) -> None:
    if "norm" in name:  # stored as w, applied as 1 + w: drawn around 0, not left at it
        param.normal_(0.0, 0.1)


def _hf_gemma3(folder, softcap: float | None):
    config = transformers.Gemma3TextConfig(**CONFIG, final_logit_softcapping=softcap)
    return tiny_hf_model(folder, config, transformers.Gemma3ForCausalLM, _spread_gemma_norms)




def _spread_norms(model, gen: torch.Generator) -> None:
    """Every norm weight (stored as w, applied as 1 + w) drawn around 0 instead of left at 1."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.2, generator=gen)


@pytest.mark.parametrize("softcap", [None, 30.0])
@torch.inference_mode()
def test_logits_and_greedy_tokens_equal_transformers(softcap, tmp_path) -> None:
    hf = _hf_gemma3(tmp_path, softcap)
    model = load_model(tmp_path, max_batch_size=2, max_seq_len=64)
    assert model.spec == SPEC.with_updates(name=tmp_path.name, source=model.spec.source,
                                           final_logit_softcap=softcap,
                                           rope_scaling=RopeScaling("linear", 2.0, 1.0, 4.0,
                                                                    256))
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    reference = hf(tokens).logits
    ours = model(tokens, torch.arange(40))
    assert (ours - reference).abs().max().item() < 1e-4
    if softcap is not None:
        assert ours.abs().max().item() < softcap
    # Prompts shorter than, and past, the 6-token window; 12 decode steps wrap the ring.
    for length in (1, 5, 17):
        prompt = tokens[:, :length]
        expected = hf.generate(prompt, max_new_tokens=12, do_sample=False,
                               min_new_tokens=12)[:, length:]
        assert torch.equal(greedy_through_cache(model, prompt, 12), expected), length


def test_compiled_decode_step_gives_eager_tokens() -> None:
    """Generator fuses the projections and compiles the decode step with inductor; the prompt
    (9) and the new tokens pass the 6-token window. Two layers, one sliding (local RoPE base)
    and one global (scaled RoPE), are SPEC's two kinds of layer: inductor's lowering grows with
    the layers it unrolls (seven took about 20 s on a cold cache, as gemma2's test says)."""
    model = build_model(SPEC.with_updates(n_layers=2, sliding_window_layers=(0,)), seed=2)
    _spread_norms(model, torch.Generator().manual_seed(2))
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7]]
    eager = Generator(model).generate(prompts, GenerationConfig(max_new_tokens=6))
    compiled = Generator(model).generate(prompts, GenerationConfig(max_new_tokens=6,
                                                                   compile=True))
    assert compiled.output_token_ids == eager.output_token_ids


@torch.inference_mode()
def test_writer_round_trip_and_transformers_reads_it(tmp_path) -> None:
    source = build_model(SPEC, seed=4)
    _spread_norms(source, torch.Generator().manual_seed(4))
    save_checkpoint(source, tmp_path, "hf")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    tokens, ours = assert_written_checkpoint_round_trips(source, tmp_path, SPEC, VOCAB, 20, 32)
    # generate's hf mode builds the same model from the engine's weights
    assert (ours - build_hf_model(source)(tokens).logits).abs().max().item() < 1e-4


def test_published_configs_give_the_presets(tmp_path) -> None:
    # google/gemma-3-1b-pt's config.json (transformers 4.x fields), shaping fields.
    one_b = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "attention_bias": False, "attn_logit_softcapping": None, "final_logit_softcapping": None,
        "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
        "intermediate_size": 6912, "max_position_embeddings": 32768, "num_attention_heads": 4,
        "num_hidden_layers": 26, "num_key_value_heads": 1, "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
        "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16", "vocab_size": 262144}
    # google/gemma-3-27b-pt's text_config, as a config.json of its own.
    text_27b = {
        "model_type": "gemma3_text", "head_dim": 128, "hidden_size": 5376,
        "intermediate_size": 21504, "max_position_embeddings": 131072,
        "num_attention_heads": 32, "num_hidden_layers": 62, "num_key_value_heads": 16,
        "query_pre_attn_scalar": 168, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window": 1024,
        "vocab_size": 262208, "torch_dtype": "bfloat16"}
    for name, published in (("gemma-3-1b", one_b), ("gemma-3-27b", text_27b)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(published))
        assert spec_from_hf_config(path).with_updates(name=name) == PRESETS[name]


@pytest.mark.parametrize("name,non_embedding", [("gemma-3-1b", 698e6), ("gemma-3-4b", 3209e6),
                                                ("gemma-3-12b", 10759e6),
                                                ("gemma-3-27b", 25600e6)])
def test_non_embedding_parameters_match_published(name: str, non_embedding: float) -> None:
    """The Gemma 3 report gives the text model's non-embedding count to 3-5 digits."""
    spec = PRESETS[name]
    embeddings = spec.vocab_size * spec.dim
    assert param_count(spec) - embeddings == pytest.approx(non_embedding, rel=0.001)
    assert len(spec.sliding_window_layers) == spec.n_layers - spec.n_layers // 6


def test_sliding_layers_cache_only_their_window() -> None:
    model = build_model(SPEC)
    model.setup_cache(2, 40)
    assert model.cache_bytes() == kv_cache_bytes(SPEC, 2, 40, "float32")
    assert [layer.attention.kv_cache.size for layer in model.layers] == [WINDOW] * 5 + [40, WINDOW]


def test_a_fused_add_and_norm_is_refused() -> None:
    model = build_model(SPEC)
    model.setup_cache(1, 8)
    model.add_norm = lambda residual, delta, norm: (residual + delta, norm(residual + delta))
    with pytest.raises(InfermeterError, match="cannot be fused"):
        model(torch.tensor([[1, 2]]), torch.arange(2))


@torch.inference_mode()
def test_trace_ranges_count_all_four_norms_a_layer(monkeypatch) -> None:
    """--trace labels the post-norms as norms, not as time outside every layer."""
    pushed = pushed_ranges(build_model(SPEC), monkeypatch)
    assert pushed.count("norm") == 4 * SPEC.n_layers + 1
