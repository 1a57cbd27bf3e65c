"""gpt-oss-20b/120b and Llama-4-Scout: sized by `kv` (their windowed and chunked layers, their
mxfp4 experts, their active weights); Llama-4-Scout refused by the engine with its one line
(gpt-oss runs: tests/test_gpt_oss.py)."""

import json

import pytest

from infermeter.errors import InfermeterError
from infermeter.kv.job import KvRequest, kv_results, render_kv
from infermeter.specs.loaders import resolve_model
from infermeter.specs.model import check_engine_arch
from infermeter.specs.presets import PRESETS, PUBLISHED_PARAMS
from infermeter.specs.sizes import kv_bytes_per_token, kv_cache_bytes, param_count, weight_bytes
from infermeter.units import dtype_bytes, weight_bytes_of, weight_dtype_bytes
from tests import published_configs as published
from tests.cli_in_process import run_cli

GIB = 2**30


@pytest.mark.parametrize("name, count", [("gpt-oss-20b", 20_914_757_184),
                                         ("gpt-oss-120b", 116_829_156_672),
                                         ("llama-4-scout", 107_769_861_120)])
def test_exact_counts(name, count):
    """What transformers' GptOssForCausalLM / Llama4ForCausalLM hold for the published config
    (counted once on the meta device: too slow to build here): every bias and sink counts."""
    assert param_count(PRESETS[name]) == count


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
def test_gpt_oss_active_parameters_as_the_model_card_counts_them(name):
    """The card's active count leaves out the input embedding (a row lookup a token)."""
    spec = PRESETS[name]
    active = param_count(spec, active=True) - spec.vocab_size * spec.dim
    assert active == pytest.approx(PUBLISHED_PARAMS[name][1], rel=0.01)


@pytest.mark.parametrize("name, checkpoint_gib", [("gpt-oss-20b", 12.8), ("gpt-oss-120b", 60.8)])
def test_gpt_oss_weight_bytes_as_published_match_the_checkpoint_size(name, checkpoint_gib):
    """The model card gives each checkpoint's size to 0.1 GiB: mxfp4 experts (17 bytes per 32
    weights), all else bf16. In bf16 throughout it would be 39.0 and 217.6 GiB."""
    spec = PRESETS[name]
    published = weight_bytes(spec, spec.published_dtype, expert_dtype=spec.expert_weight_dtype)
    assert round(published / GIB, 1) == checkpoint_gib
    assert weight_bytes(spec, "bf16") == 2 * param_count(spec)


def test_gpt_oss_120b_active_parameters_by_hand():
    """A token reads a layer's attention (4 biased projections, 64 sinks), 4 experts (3
    matrices of 2880 x 2880, biases 2 x 2880 + 2880), the router (2880 + a bias per expert)
    and 2 norms; then both embeddings and the final norm."""
    attention = 2 * 2880 * 4096 + 2 * 2880 * 512 + (4096 + 2 * 512 + 2880) + 64
    experts = 4 * (3 * 2880 * 2880 + 3 * 2880)
    layer = attention + experts + 128 * 2881 + 2 * 2880
    active = 36 * layer + 2 * 201088 * 2880 + 2880
    assert param_count(PRESETS["gpt-oss-120b"], active=True) == active == 5_711_982_912


def test_gpt_oss_120b_weights_by_hand():
    spec = PRESETS["gpt-oss-120b"]
    experts = 36 * 128 * 3 * 2880 * 2880  # gate, up [2880 -> 2 x 2880] and down per expert
    rest = param_count(spec) - experts
    assert weight_bytes(spec, "bf16", expert_dtype="mxfp4") == 2 * rest + experts * 17 // 32
    active_experts = 36 * 4 * 3 * 2880 * 2880
    assert weight_bytes(spec, "bf16", active=True, expert_dtype="mxfp4") == \
        2 * (param_count(spec, active=True) - active_experts) + active_experts * 17 // 32


def test_llama4_scout_counts_the_text_model():
    """Meta's checkpoint holds 108,641,793,536 parameters; less its vision encoder and projector
    (871,932,416) that is the text model, to the parameter; active: the card's '17B', which
    means 16.5B to 17.5B."""
    spec = PRESETS["llama-4-scout"]
    assert param_count(spec) == 107_769_861_120 == PUBLISHED_PARAMS["llama-4-scout"][0]
    active = param_count(spec, active=True)  # 1 routed + 1 shared expert a layer
    assert active == 17_172_894_720
    assert abs(active - PUBLISHED_PARAMS["llama-4-scout"][1]) < 0.5e9


def test_gpt_oss_kv_bytes_by_hand():
    per_layer_token = 2 * 8 * 64 * 2  # K and V, 8 KV heads of 64, bf16
    spec = PRESETS["gpt-oss-120b"]
    assert kv_bytes_per_token(spec, "bf16") == 36 * per_layer_token == 72 * 1024
    # 131072 tokens: 18 full layers hold them all, the 18 sliding ones their last 128
    assert kv_cache_bytes(spec, 1, 131072, "bf16") == \
        (18 * 131072 + 18 * 128) * per_layer_token
    assert kv_cache_bytes(spec, 3, 100, "bf16") == 3 * 36 * 100 * per_layer_token
    assert kv_cache_bytes(PRESETS["gpt-oss-20b"], 2, 4096, "fp8") == \
        2 * (12 * 4096 + 12 * 128) * 2 * 8 * 64


def test_llama4_scout_kv_bytes_by_hand():
    per_layer_token = 2 * 8 * 128 * 2
    spec = PRESETS["llama-4-scout"]
    assert spec.window_kind == "chunked"
    assert spec.sliding_window_layers == tuple(i for i in range(48) if i % 4 != 3)
    # 12 global NoPE layers (3, 7, ..., 47) hold every token, 36 chunked ones one chunk
    assert kv_cache_bytes(spec, 1, 131072, "bf16") == \
        (12 * 131072 + 36 * 8192) * per_layer_token
    assert kv_cache_bytes(spec, 1, 8192, "bf16") == 48 * 8192 * per_layer_token


@pytest.mark.parametrize("config, preset", [
    (published.GPT_OSS_20B, "gpt-oss-20b"),
    (published.GPT_OSS_120B, "gpt-oss-120b"),
    (published.LLAMA4_SCOUT, "llama-4-scout"),
    (published.LLAMA4_SCOUT["text_config"], "llama-4-scout"),  # a text-only llama4_text file
])
def test_config_json_sizes_as_the_preset(tmp_path, config, preset):
    folder = tmp_path / preset
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    spec = resolve_model(str(folder))
    assert spec.with_updates(name=preset) == PRESETS[preset]  # every field (source aside)


def test_llama4_layer_rules_without_the_lists(tmp_path):
    """No no_rope_layers / moe_layers: transformers' defaults (a NoPE layer every 4th, experts
    every interleave_moe_layer_step-th layer, dense FFNs of intermediate_size_mlp between)."""
    text = dict(published.LLAMA4_SCOUT["text_config"], no_rope_layers=[],
                interleave_moe_layer_step=2)
    del text["moe_layers"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(text))
    spec = resolve_model(str(path))
    assert spec.sliding_window_layers == PRESETS["llama-4-scout"].sliding_window_layers
    assert spec.moe_dense_layers == tuple(range(0, 48, 2)) and spec.ffn_dim == 16384
    layer_types = ["chunked_attention", "full_attention"] * 24
    path.write_text(json.dumps(dict(text, layer_types=layer_types)))
    assert resolve_model(str(path)).sliding_window_layers == tuple(range(0, 48, 2))


@pytest.mark.parametrize("change, message", [
    ({"text_config": None}, "without a 'text_config' object"),
    ({"text_config": dict(published.LLAMA4_SCOUT["text_config"], no_rope_layers=[1, 0])},
     "'no_rope_layers' must hold one 0 or 1 a layer"),
    ({"text_config": dict(published.LLAMA4_SCOUT["text_config"], moe_layers="all")},
     "'moe_layers' must be a list"),
])
def test_bad_llama4_configs_are_one_line(tmp_path, change, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**published.LLAMA4_SCOUT, **change}))
    with pytest.raises(InfermeterError, match=message):
        resolve_model(str(path))


def test_mxfp4_is_a_weight_format_only():
    assert weight_dtype_bytes("mxfp4") * 32 == 17 and weight_bytes_of(64, "mxfp4") == 34
    assert weight_bytes_of(3, "bf16") == 6
    with pytest.raises(InfermeterError, match="weight storage format"):
        dtype_bytes("mxfp4")


def test_kv_says_chunks_and_the_weights_as_published():
    request = KvRequest(PRESETS["llama-4-scout"], (1,), (65536,), "bf16", "bf16")
    (result,) = kv_results(request, {})
    assert result.model["window_kind"] == "chunked" and result.model["sliding_window"] == 8192
    assert result.metrics["kv_cache_bytes"] == (12 * 65536 + 36 * 8192) * 4096
    assert "chunked attention on 36 of 48 layers" in render_kv(request, [result])
    spec = PRESETS["gpt-oss-20b"]
    request = KvRequest(spec, (1,), (131072,), "bf16", "bf16", expert_dtype="mxfp4")
    (result,) = kv_results(request, {})
    assert result.config["dtype"] == "bfloat16" and result.config["expert_dtype"] == "mxfp4"
    assert result.model["window_kind"] == "sliding"
    assert result.metrics["weight_bytes"] == weight_bytes(spec, "bf16", expert_dtype="mxfp4")
    assert result.metrics["weight_bytes_active"] == \
        weight_bytes(spec, "bf16", active=True, expert_dtype="mxfp4")
    assert result.metrics["kv_cache_bytes"] == (12 * 131072 + 12 * 128) * 2048
    assert "(20.91B params, bfloat16, experts mxfp4)" in render_kv(request, [result])
    with pytest.raises(InfermeterError, match="weight storage format"):
        KvRequest(spec, (1,), (16,), "mxfp4", "bf16")


def test_kv_command_defaults_to_the_published_dtypes():
    """No --dtype: bf16 with mxfp4 experts; --dtype alone: every weight in it."""
    spec = PRESETS["gpt-oss-20b"]
    out = run_cli("kv", "--model", "gpt-oss-20b", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["metrics"]["weight_bytes"] == \
        weight_bytes(spec, "bf16", expert_dtype="mxfp4")
    out = run_cli("kv", "--model", "gpt-oss-20b", "--dtype", "bf16", "--json")
    result = json.loads(out.stdout)
    assert result["config"]["expert_dtype"] is None
    assert result["metrics"]["weight_bytes"] == 2 * param_count(spec)
    out = run_cli("kv", "--model", "qwen3-30b-a3b", "--expert-dtype", "mxfp4", "--json")
    assert json.loads(out.stdout)["metrics"]["weight_bytes"] == weight_bytes(
        PRESETS["qwen3-30b-a3b"], "bf16", expert_dtype="mxfp4")


@pytest.mark.parametrize("name, arch", [("llama-4-scout", "llama4_text")])
def test_the_engine_refuses_them_in_one_line(name, arch):
    with pytest.raises(InfermeterError, match=f"architecture '{arch}' can be sized but not run"):
        check_engine_arch(PRESETS[name])
