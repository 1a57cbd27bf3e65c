"""Gemma 3 from 4B up ships as Gemma3ForConditionalGeneration: config.json of model_type gemma3
with the language model in text_config, its weights under language_model.*, a vision tower and
projector beside them. The engine runs the text model and skips the vision weights.

The folder here is written by transformers' own Gemma3ForConditionalGeneration (a tiny random
one, a tiny vision tower), saved with save_pretrained, as users download it.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from infermeter.cli import main
from infermeter.engine.checkpoint.load import load_model
from infermeter.specs import sizes
from infermeter.specs.loaders import spec_from_hf_config
from infermeter.specs.presets import PRESETS
from tests.hf_reference import greedy_through_cache

transformers = pytest.importorskip("transformers")

VOCAB, WINDOW = 128, 6
# 7 layers: 0-4 and 6 slide over 6 tokens, 5 is global; query scalar 24 apart from head_dim 32.
TEXT = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 7, "vocab_size": VOCAB,
        "max_position_embeddings": 256, "initializer_range": 0.1, "sliding_window": WINDOW,
        "query_pre_attn_scalar": 24}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 2, "image_size": 32, "patch_size": 8}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(folder, transformers' model) of a tiny Gemma3ForConditionalGeneration."""
    config = transformers.Gemma3Config(
        text_config=TEXT, vision_config=VISION, mm_tokens_per_image=4, image_token_index=127,
        boi_token_index=125, eoi_token_index=126)
    config.text_config.bos_token_id = config.text_config.eos_token_id = None
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration._from_config(
        config, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "language_model" in name and "norm" in name:  # applied as 1 + w: away from 0
                param.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("gemma3-4b-like")
    model.save_pretrained(path)
    return path, model


@torch.inference_mode()
def test_text_model_gives_transformers_tokens(folder) -> None:
    path, hf = folder
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        names = list(handle.keys())  # noqa: SIM118 - not a dict
    assert any(name.startswith("vision_tower.") for name in names)  # skipped on load
    assert any(name.startswith("language_model.model.layers.") for name in names)
    model = load_model(path, max_batch_size=2, max_seq_len=64)
    spec = model.spec
    assert (spec.arch, spec.n_layers, spec.qk_norm, spec.tie_embeddings) == \
        ("gemma3_text", 7, True, True)
    assert spec.sliding_window_layers == (0, 1, 2, 3, 4, 6)
    tokens = torch.randint(0, 120, (2, 20), generator=torch.Generator().manual_seed(1))
    reference = hf(input_ids=tokens).logits
    assert (model(tokens, torch.arange(20)) - reference).abs().max().item() < 1e-4
    for length in (5, 17):  # shorter than and past the 6-token window
        prompt = tokens[:, :length]
        expected = hf.generate(input_ids=prompt, max_new_tokens=10, do_sample=False,
                               min_new_tokens=10)[:, length:]
        assert torch.equal(greedy_through_cache(model, prompt, 10), expected), length


def test_kv_sizes_the_text_model_and_says_so(folder, capsys) -> None:
    path, hf = folder
    assert main(["kv", "--model", str(path / "config.json"), "--seq-len", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    spec = spec_from_hf_config(path / "config.json")
    metrics = result["metrics"]
    # 6 window layers of 6 tokens, 1 global of 64; K and V of 2 x 32; float32, as saved
    assert metrics["kv_cache_bytes"] == (6 * WINDOW + 64) * 2 * 2 * 32 * 4
    text_params = sum(p.numel() for n, p in hf.named_parameters() if "language_model" in n)
    assert metrics["param_count"] == sizes.param_count(spec) == text_params
    assert text_params < sum(p.numel() for p in hf.parameters())  # the vision tower's are not
    assert any("text model only" in note for note in result["warnings"])


def test_generate_runs_the_checkpoint(folder, capsys) -> None:
    path, _ = folder
    assert main(["generate", "--checkpoint", str(path), "--prompt-ids", "3,1,4,1,5,9,2,6",
                 "--device", "cpu", "--max-new-tokens", "4", "--repeats", "1", "--warmup",
                 "0", "--no-roofline", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["config"]["weights"] == "checkpoint"
    assert any("text model only" in note for note in result["warnings"])


def test_published_config_gives_the_preset(tmp_path) -> None:
    # google/gemma-3-4b-it's config.json: its text_config leaves the rest to Gemma3TextConfig's
    # defaults (8 heads, 4 KV heads, head_dim 256, query scalar 256, RoPE 1M and 10k, ...).
    published = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
        "mm_tokens_per_image": 256, "torch_dtype": "bfloat16",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                        "model_type": "gemma3_text", "num_hidden_layers": 34,
                        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                          "model_type": "siglip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 27, "patch_size": 14,
                          "vision_use_head": False}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(published))
    assert spec_from_hf_config(path).with_updates(name="gemma-3-4b") == PRESETS["gemma-3-4b"]
