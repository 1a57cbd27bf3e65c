"""Spec loaders: published config.json / params.json files must give exactly the presets."""

import dataclasses
import json
import re

import pytest

from infermeter.errors import InfermeterError
from infermeter.specs.loaders import resolve_model, spec_from_hf_config, spec_from_meta_params
from infermeter.specs.model import ModelSpec, check_engine_arch
from infermeter.specs.presets import PRESETS
from infermeter.specs.sizes import kv_bytes_per_token, param_count
from tests import published_configs as published


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def same_shape(a: ModelSpec, b: ModelSpec, ignore=()) -> None:
    """Every field but the name and where it came from (and any listed) must agree."""
    skip = {"name", "source", *ignore}
    for field in dataclasses.fields(ModelSpec):
        if field.name not in skip:
            assert getattr(a, field.name) == getattr(b, field.name), field.name


@pytest.mark.parametrize("config, preset, ignore", [
    (published.LLAMA_31_8B, "llama-3.1-8b", ()),
    (published.MISTRAL_7B, "mistral-7b", ()),
    (published.MIXTRAL_8X7B, "mixtral-8x7b", ()),
    (published.QWEN25_7B, "qwen2.5-7b", ()),
    # Gemma-2's config says float32 although its weights ship as bf16.
    (published.GEMMA2_9B, "gemma-2-9b", ("torch_dtype",)),
    (published.DEEPSEEK_V3, "deepseek-v3", ()),
])
def test_hf_config_gives_the_preset(tmp_path, config, preset, ignore):
    folder = tmp_path / preset
    folder.mkdir()
    write_json(folder / "config.json", config)
    spec = resolve_model(str(folder))  # a folder
    same_shape(spec, PRESETS[preset], ignore)
    assert spec.name == preset
    same_shape(spec_from_hf_config(folder / "config.json"), spec)  # the file itself


def test_hf_config_fields_that_matter(tmp_path):
    gemma = spec_from_hf_config(write_json(tmp_path / "g.json", published.GEMMA2_9B))
    assert gemma.head_dim == 256 != gemma.dim // gemma.n_heads  # explicit head_dim wins
    assert gemma.sliding_window_layers == tuple(range(0, 42, 2)) and gemma.tie_embeddings
    qwen = spec_from_hf_config(write_json(tmp_path / "q.json", published.QWEN25_7B))
    assert qwen.qkv_bias and qwen.sliding_window is None  # use_sliding_window is false
    ds = spec_from_hf_config(write_json(tmp_path / "d.json", published.DEEPSEEK_V3))
    assert ds.is_mla and ds.is_moe and ds.rope_scaling.kind == "yarn"
    assert dict(ds.rope_scaling.extra)["beta_fast"] == 32


def test_qwen2_sliding_window_when_enabled(tmp_path):
    config = dict(published.QWEN25_7B, use_sliding_window=True, max_window_layers=20,
                  sliding_window=4096)
    spec = spec_from_hf_config(write_json(tmp_path / "config.json", config))
    assert spec.sliding_window == 4096 and spec.sliding_window_layers == tuple(range(20, 28))


def test_layer_types_field_wins(tmp_path):
    types = ["sliding_attention", "full_attention"] * 16
    config = dict(published.MISTRAL_7B, layer_types=types)
    spec = spec_from_hf_config(write_json(tmp_path / "config.json", config))
    assert spec.sliding_window_layers == tuple(range(0, 32, 2))


def test_transformers_v5_rope_parameters(tmp_path):
    config = dict(published.LLAMA_31_8B)
    config["rope_parameters"] = dict(config.pop("rope_scaling"), rope_theta=500000.0)
    del config["rope_theta"]
    spec = spec_from_hf_config(write_json(tmp_path / "config.json", config))
    same_shape(spec, PRESETS["llama-3.1-8b"])


@pytest.mark.parametrize("params, preset", [
    (published.META_LLAMA3_8B, "llama-3-8b"),
    (published.META_LLAMA31_70B, "llama-3.1-70b"),
])
def test_meta_params_give_the_preset(tmp_path, params, preset):
    spec = spec_from_meta_params(write_json(tmp_path / "params.json", params))
    same_shape(spec, PRESETS[preset], ignore=("torch_dtype",))


def test_meta_llama2_vocab_comes_from_the_tokenizer_or_shard(tmp_path):
    """Llama 2's params.json says vocab_size -1; a shard's embedding shape tells the truth."""
    torch = pytest.importorskip("torch")
    folder = tmp_path / "llama-2-13b"
    folder.mkdir()
    write_json(folder / "params.json", published.META_LLAMA2_13B)
    # A stand-in shard: only the embedding matters; ParallelEmbedding splits dim 1.
    torch.save({"tok_embeddings.weight": torch.zeros(32000, 4)}, folder / "consolidated.00.pth")
    same_shape(resolve_model(str(folder)), PRESETS["llama-2-13b"], ignore=("torch_dtype",))


def test_meta_params_without_vocab_anywhere(tmp_path):
    """The KV cache is sized without the vocabulary; the weights and the engine need it."""
    write_json(tmp_path / "params.json", published.META_LLAMA2_13B)
    for source in (tmp_path, tmp_path / "params.json"):  # the folder or the file
        spec = resolve_model(str(source))
        assert spec.vocab_size is None and spec.n_kv_heads == 40
        assert kv_bytes_per_token(spec, "fp16") == kv_bytes_per_token(PRESETS["llama-2-13b"],
                                                                       "fp16")
        with pytest.raises(InfermeterError, match="vocabulary size is unknown"):
            param_count(spec)
        with pytest.raises(InfermeterError, match="vocabulary size is unknown"):
            check_engine_arch(spec)


def test_meta_params_json_finds_the_tokenizer_one_folder_up(tmp_path):
    """Meta's downloads keep tokenizer.model beside the model folders; --model .../params.json
    looks there as the folder case does (a tiktoken file: one line a token + 256 specials)."""
    folder = tmp_path / "Llama-2-70b"
    folder.mkdir()
    params = write_json(folder / "params.json", published.META_LLAMA2_70B)
    (tmp_path / "tokenizer.model").write_text("".join(f"dG9r{i} {i}\n" for i in range(1000)))
    spec = resolve_model(str(params))
    assert spec.vocab_size == 1256 and spec.ffn_dim == 28672 and spec.name == "Llama-2-70b"


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"model_type": "gpt2", "n_embd": 768}), "unsupported model_type 'gpt2'"),
    (json.dumps({"model_type": "llama"}), "missing field 'hidden_size'"),
    (json.dumps(dict(published.LLAMA_31_8B, num_hidden_layers=0)),
     "field 'num_hidden_layers' must be a positive integer"),
    (json.dumps(dict(published.LLAMA_31_8B, num_key_value_heads=5)), "not a multiple"),
    (json.dumps(dict(published.LLAMA_31_8B, hidden_size="4096")), "must be an integer"),
    (json.dumps({"foo": 1}), "neither an HF config.json"),
])
def test_bad_config_files(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(InfermeterError, match=message):
        resolve_model(str(path))


def _llama(**changes):
    return {**published.LLAMA_31_8B, **changes}


@pytest.mark.parametrize("config, message", [
    (_llama(num_attention_heads=0), "field 'num_attention_heads' must be a positive integer"),
    (_llama(num_attention_heads=30), "'hidden_size' 4096 is not a multiple of "
     "'num_attention_heads' 30 and there is no 'head_dim'"),
    (_llama(num_key_value_heads=-8), "field 'num_key_value_heads' must be a positive integer"),
    (_llama(intermediate_size=0), "field 'intermediate_size' must be a positive integer"),
    (_llama(num_hidden_layers=10**30), "more layers than any model has"),
    (_llama(rms_norm_eps="small"), "field 'rms_norm_eps' must be a positive number"),
    (_llama(rms_norm_eps=float("nan")), "field 'rms_norm_eps' must be a positive number"),
    (_llama(rope_theta=0), "field 'rope_theta' must be a positive number"),
    (_llama(rope_scaling="yes"), "field 'rope_scaling' must be a JSON object"),
    (_llama(rope_scaling={"rope_type": "linear", "factor": "x"}),
     "field 'rope_scaling.factor' must be a positive number"),
    (_llama(tie_word_embeddings="no"), "field 'tie_word_embeddings' must be true or false"),
    (_llama(torch_dtype="float64"), "field 'torch_dtype' is 'float64'"),
    (_llama(layer_types="full_attention"), "field 'layer_types' must be a list of strings"),
    (_llama(layer_types=["full_attention"] * 3), "'layer_types' has 3 entries for 32 layers"),
    (_llama(layer_types=["sliding_attention"] * 32), "'sliding_window' is missing"),
    (dict(published.MISTRAL_7B, sliding_window="4096"),
     "field 'sliding_window' must be an integer"),
    (dict(published.MIXTRAL_8X7B, num_local_experts=0),
     "field 'num_local_experts' must be a positive integer"),
    (dict(published.MIXTRAL_8X7B, num_experts_per_tok=9), "more than the model's 8 experts"),
    (dict(published.DEEPSEEK_V3, q_lora_rank=-1), "field 'q_lora_rank' must be an integer >= 0"),
])
def test_every_field_a_config_loader_reads_is_checked(tmp_path, config, message):
    """A wrong value is one error naming the file and the field, never a traceback or a
    silently floored head size."""
    path = write_json(tmp_path / "config.json", config)
    with pytest.raises(InfermeterError, match=re.escape(message)) as err:
        resolve_model(str(path))
    assert str(err.value).startswith(f"{path}: ")


@pytest.mark.parametrize("changes, message", [
    ({"n_heads": 0}, "field 'n_heads' must be a positive integer"),
    ({"n_heads": 30, "n_kv_heads": 6}, "'dim' 4096 is not a multiple of 'n_heads' 30"),
    ({"multiple_of": 0}, "field 'multiple_of' must be a positive integer"),
    ({"ffn_dim_multiplier": "big"}, "field 'ffn_dim_multiplier' must be a positive number"),
    ({"norm_eps": -1e-5}, "field 'norm_eps' must be a positive number"),
    ({"use_scaled_rope": "yes"}, "field 'use_scaled_rope' must be true or false"),
    ({"vocab_size": "32000"}, "field 'vocab_size' must be an integer"),
])
def test_every_field_the_meta_loader_reads_is_checked(tmp_path, changes, message):
    path = write_json(tmp_path / "params.json", {**published.META_LLAMA3_8B, **changes})
    with pytest.raises(InfermeterError, match=re.escape(message)) as err:
        resolve_model(str(path))
    assert str(err.value).startswith(f"{path}: ")


def test_a_head_size_that_does_not_divide_needs_head_dim(tmp_path):
    path = write_json(tmp_path / "config.json", _llama(num_attention_heads=32 - 2, head_dim=128,
                                                       num_key_value_heads=6))
    spec = resolve_model(str(path))
    assert (spec.n_heads, spec.head_dim) == (30, 128)


def test_unknown_names_and_paths():
    with pytest.raises(InfermeterError, match="did you mean .*llama-3.1-8b"):
        resolve_model("llama-3.1-8")
    with pytest.raises(InfermeterError, match="no such file"):
        resolve_model("/nonexistent/config.json")
    with pytest.raises(InfermeterError, match="see `infermeter presets`"):
        resolve_model("zzzzzz")
    assert resolve_model("  Llama-2-7B ") is PRESETS["llama-2-7b"]
    for empty in ("", "  "):  # was read as the current folder: "no config.json ... in ."
        with pytest.raises(InfermeterError, match="--model is empty"):
            resolve_model(empty)


def test_folder_without_config(tmp_path):
    with pytest.raises(InfermeterError, match="no config.json or params.json"):
        resolve_model(str(tmp_path))


def test_spec_is_frozen_and_validates():
    spec = PRESETS["debug"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.n_layers = 3
    with pytest.raises(InfermeterError, match="out of range"):
        spec.with_updates(sliding_window=8, sliding_window_layers=(5,))
    with pytest.raises(InfermeterError, match="without a window"):
        spec.with_updates(sliding_window_layers=(0,))


def test_engine_refuses_sizing_only_architectures():
    check_engine_arch(PRESETS["qwen2.5-7b"])
    check_engine_arch(PRESETS["gemma-2-9b"])
    with pytest.raises(InfermeterError, match="phi3.*can be sized but not run"):
        check_engine_arch(PRESETS["phi-3-mini"])


def test_to_dict_is_json_ready():
    data = PRESETS["deepseek-v3"].to_dict()
    assert json.loads(json.dumps(data))["rope_scaling"]["extra"]["mscale"] == 1.0


class _Evil:
    """A pickle that would need code execution to load."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_meta_vocab_probe_refuses_unsafe_shards(tmp_path):
    torch = pytest.importorskip("torch")
    write_json(tmp_path / "params.json", published.META_LLAMA2_13B)
    torch.save({"tok_embeddings.weight": torch.zeros(4, 4), "x": _Evil()},
               tmp_path / "consolidated.00.pth")
    with pytest.raises(InfermeterError, match="arbitrary code execution"):
        resolve_model(str(tmp_path))
