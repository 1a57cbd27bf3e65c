"""Fused projections (engine/fusion.py): same function, same weights under Meta's names."""

from __future__ import annotations

import pytest
import torch

from infermeter.engine.checkpoint.load import load_weights, save_checkpoint
from infermeter.engine.fusion import fuse_projections, is_fused, meta_state_dict
from infermeter.engine.generator import GenerationConfig, Generator
from infermeter.engine.model import build_model
from infermeter.measure.trace import weight_bytes
from infermeter.specs.presets import PRESETS

DEBUG = PRESETS["debug"]
SPECS = {"gqa": DEBUG, "qkv-bias-tied": DEBUG.with_updates(arch="qwen2", qkv_bias=True,
                                                          tie_embeddings=True),
         "qk-norm": DEBUG.with_updates(arch="qwen3", qk_norm=True, head_dim=32)}


def _logits(model, tokens):
    """Prefill 6 tokens, then 4 cached decode steps: [B, 10, V]."""
    model.setup_cache(tokens.shape[0], 16)
    outs = [model(tokens[:, :6], torch.arange(6))]
    outs += [model(tokens[:, p:p + 1], torch.tensor([p])) for p in range(6, 10)]
    return torch.cat(outs, dim=1)


@pytest.fixture(params=list(SPECS))
def pair(request):
    """The same random weights twice: one model left alone, one fused."""
    spec = SPECS[request.param]
    plain, fused = build_model(spec, seed=3), build_model(spec, seed=3)
    fuse_projections(fused)
    return plain, fused


@torch.no_grad()
def test_fused_model_computes_the_same_logits(pair):
    plain, fused = pair
    tokens = torch.randint(0, DEBUG.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    assert is_fused(fused) and not is_fused(plain)
    assert (_logits(plain, tokens) - _logits(fused, tokens)).abs().max() < 1e-5


def test_fused_modules_replace_the_originals(pair):
    _, fused = pair
    names = {name for name, _ in fused.named_parameters()}
    assert "layers.0.attention.wqkv.weight" in names and "layers.0.feed_forward.w13.weight" in names
    assert not any(part in name for name in names
                   for part in (".wq.", ".wk.", ".wv.", ".w1.", ".w3."))
    spec = fused.spec
    q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    assert fused.layers[0].attention.wqkv.weight.shape == (q + 2 * kv, DEBUG.dim)
    assert fused.layers[0].feed_forward.w13.weight.shape == (2 * DEBUG.ffn_dim, DEBUG.dim)
    fuse_projections(fused)  # idempotent
    assert fused.layers[0].attention.wqkv.weight.shape == (q + 2 * kv, DEBUG.dim)


def test_meta_state_dict_gives_back_every_weight_by_its_meta_name(pair):
    plain, fused = pair
    want, got = plain.state_dict(), meta_state_dict(fused)
    assert list(sorted(want)) == list(sorted(got))
    for name, tensor in want.items():
        assert torch.equal(tensor, got[name]), name
    assert weight_bytes(plain) == weight_bytes(fused)  # the trace's bytes per projection


@pytest.mark.parametrize("fmt", ["hf", "meta"])
@torch.no_grad()
def test_a_fused_model_saves_a_checkpoint_that_loads_to_the_same_model(pair, fmt, tmp_path):
    plain, fused = pair
    if fmt == "meta" and (plain.spec.qkv_bias or plain.spec.qk_norm):
        pytest.skip("Meta's params.json has no qkv bias or q/k norms (refused with its own "
                    "clear error)")
    save_checkpoint(fused, tmp_path, fmt, n_shards=2)
    loaded = load_weights(str(tmp_path), "cpu", "float32")
    tokens = torch.randint(0, DEBUG.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    assert (_logits(loaded, tokens) - _logits(plain, tokens)).abs().max() < 1e-5


def test_generator_fuses_by_default_and_gives_the_plain_models_tokens():
    plain, other = build_model(DEBUG, seed=5), build_model(DEBUG, seed=5)
    config = GenerationConfig(max_new_tokens=12)
    prompt = [[3, 1, 4, 1, 5, 9]]
    want = Generator(plain, 32, fuse=False).generate(prompt, config).output_token_ids
    got = Generator(other, 32).generate(prompt, config).output_token_ids
    assert not is_fused(plain) and is_fused(other)
    assert got == want
