"""Gemma 2 in the engine: Gemma 3's layer ((1 + w) norms before and after attention and the FFN,
GeGLU (tanh), the embedding scaled by sqrt(dim), query_pre_attn_scalar, tied embeddings) without
q/k norms and with one RoPE base, a sliding window on layers 0, 2, 4, ..., and soft caps on the
attention logits (scores = cap * tanh(scores / cap), before mask and softmax) and the final
logits.

Parity cases build a tiny random Gemma2ForCausalLM (float32, eager attention), save it and load
the folder with the engine. The caps are small (1.5 on attention scores, 5 on logits) so that
a path that skips one, or caps before the scale, changes the tokens; norm weights are drawn
around 0 (applied as 1 + w). The Triton kernel's cap runs under Triton's interpreter in a
subprocess (tests/gemma2_kernel_worker.py).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from infermeter.engine.attention import decode_attention, flex_decode_attention
from infermeter.engine.checkpoint.load import load_model, save_checkpoint
from infermeter.engine.generator import GenerationConfig, Generator
from infermeter.engine.model import build_model
from infermeter.generate.hf import build_hf_model
from infermeter.kv.cache_check import allocated_cache_bytes
from infermeter.specs.loaders import spec_from_hf_config
from infermeter.specs.presets import PRESETS
from infermeter.specs.sizes import kv_cache_bytes
from tests.hf_reference import (
    assert_matches_transformers,
    assert_written_checkpoint_round_trips,
    tiny_hf_model,
)
from tests.trace_ranges import pushed_ranges
from tests.triton_interpreter import run_under_interpreter

transformers = pytest.importorskip("transformers")

VOCAB, WINDOW = 128, 6
WORKER = Path(__file__).with_name("gemma2_kernel_worker.py")
# 4 layers: 0 and 2 slide over 6 tokens, 1 and 3 are global. query_pre_attn_scalar 24 != head_dim
# 32 (as 27B's 144 != 128); a RoPE base apart from the default.
CONFIG = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 32, "num_hidden_layers": 4, "vocab_size": VOCAB,
          "max_position_embeddings": 256, "initializer_range": 0.1, "sliding_window": WINDOW,
          "query_pre_attn_scalar": 24, "attn_logit_softcapping": 1.5,
          "final_logit_softcapping": 5.0,
          "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0},
          "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
SPEC = PRESETS["debug"].with_updates(
    name="tiny-gemma2", arch="gemma2", n_layers=4, head_dim=32, ffn_dim=96, vocab_size=VOCAB,
    norm_eps=1e-6, rope_theta=20000.0, tie_embeddings=True, sliding_window=WINDOW,
    sliding_window_layers=(0, 2), norms_per_layer=4, query_pre_attn_scalar=24.0,
    final_logit_softcap=5.0, attn_logit_softcap=1.5)


def _spread_norms(name: str, param: torch.nn.Parameter) -> None:
    if "norm" in name:  # stored as w, applied as 1 + w: drawn around 0, not left at it
        param.normal_(0.0, 0.1)


def _random_model(seed: int, spec=SPEC, qk_scale: float = 1.0):
    """spec's engine model, seeded, with its norm weights drawn around 0. Random weights give
    attention scores near 0.1, far under a cap of 1.5; qk_scale multiplies wq and wk so that
    they reach past it (8: a step that drops the cap gives other tokens)."""
    model = build_model(spec, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.2, generator=gen)
            elif name.endswith(("attention.wq.weight", "attention.wk.weight")):
                param.mul_(qk_scale)
    return model


@torch.inference_mode()
def test_logits_and_greedy_tokens_equal_transformers(tmp_path) -> None:
    """Prompts of 1, 5 and 17 tokens (past the 6-token window), 12 greedy steps wrapping the
    ring; logits over 40 tokens within 1e-4."""
    config = transformers.Gemma2Config(**CONFIG)
    assert config.layer_types[:2] == ["sliding_attention", "full_attention"]
    hf = tiny_hf_model(tmp_path, config, transformers.Gemma2ForCausalLM, _spread_norms)
    model = load_model(tmp_path, max_batch_size=2, max_seq_len=64)
    assert model.spec == SPEC.with_updates(name=tmp_path.name, source=model.spec.source)
    assert all(layer.attention.q_norm is None for layer in model.layers)
    assert_matches_transformers(model, hf, VOCAB, 12)


@torch.inference_mode()
def test_chunked_prefill_and_every_decode_path_give_the_same_tokens() -> None:
    """Chunks of 4 over a 15-token prompt (past the window) equal one forward; decode steps
    with "sdpa" (which falls back to the capped math products) equal "math"."""
    model = _random_model(3, qk_scale=8.0)
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9]] * 2
    config = GenerationConfig(max_new_tokens=8)
    whole = Generator(model).generate(prompt, config).output_token_ids
    chunked = Generator(model, prefill_chunk=4).generate(prompt, config).output_token_ids
    assert chunked == whole
    gen = Generator(model, decode_attention="sdpa")
    assert gen.decode_attention_used(compiled=False, batch_size=2) == "math"
    assert gen.generate(prompt, config).output_token_ids == whole


@torch.inference_mode()
def test_flex_score_mod_caps_as_the_math_path_does() -> None:
    """flex_decode_attention (eager: its reference implementation) against decode_attention,
    capped, over a ring cache of scattered positions with a window."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 16, 32, generator=gen) * 3  # scores well past the cap of 1.5
    keys, values = (torch.randn(2, 2, 16, 32, generator=gen) for _ in range(2))
    key_pos = torch.randperm(16, generator=gen) + 4
    pos = torch.tensor([15])
    visible = (key_pos <= 15) & (15 - key_pos < 6)
    want = decode_attention(q, keys, values, visible.expand(16, -1), softcap=1.5)
    got = flex_decode_attention(q, keys, values, key_pos, pos, 6, softcap=1.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    uncapped = decode_attention(q, keys, values, visible.expand(16, -1))
    assert (uncapped - want).abs().max() > 0.1  # the cap matters at these scores


def test_compiled_decode_step_gives_eager_tokens() -> None:
    """Generator fuses the projections and compiles the decode step with inductor (the math
    attention on a CPU); the prompt (9) and the new tokens pass the 6-token window. Two
    layers (one sliding, one global) keep the compile short."""
    model = _random_model(2, SPEC.with_updates(n_layers=2, sliding_window_layers=(0,)),
                          qk_scale=8.0)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7]]
    eager = Generator(model).generate(prompts, GenerationConfig(max_new_tokens=6))
    compiled = Generator(model).generate(prompts, GenerationConfig(max_new_tokens=6,
                                                                   compile=True))
    assert compiled.output_token_ids == eager.output_token_ids


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_kernel_caps_under_the_triton_interpreter() -> None:
    run_under_interpreter(WORKER)


@torch.inference_mode()
def test_writer_round_trip_and_transformers_reads_it(tmp_path) -> None:
    source = _random_model(4)
    save_checkpoint(source, tmp_path, "hf")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Gemma2ForCausalLM"]
    assert config["attn_logit_softcapping"] == 1.5 and "rope_local_base_freq" not in config
    tokens, ours = assert_written_checkpoint_round_trips(source, tmp_path, SPEC, VOCAB, 20, 32)
    # generate's hf mode builds the same model from the engine's weights
    assert (ours - build_hf_model(source)(tokens).logits).abs().max().item() < 1e-4


def test_published_configs_give_the_presets(tmp_path) -> None:
    """google/gemma-2-2b's and google/gemma-2-27b's config.json, shaping fields (the 9B's is
    tests/published_configs.py's); torch_dtype float32 there, bf16 weights."""
    common = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
              "attention_bias": False, "attn_logit_softcapping": 50.0,
              "final_logit_softcapping": 30.0, "hidden_act": "gelu_pytorch_tanh",
              "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
              "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
              "torch_dtype": "float32", "vocab_size": 256000}
    published = {
        "gemma-2-2b": {"head_dim": 256, "hidden_size": 2304, "intermediate_size": 9216,
                       "num_attention_heads": 8, "num_hidden_layers": 26,
                       "num_key_value_heads": 4, "query_pre_attn_scalar": 256},
        "gemma-2-27b": {"head_dim": 128, "hidden_size": 4608, "intermediate_size": 36864,
                        "num_attention_heads": 32, "num_hidden_layers": 46,
                        "num_key_value_heads": 16, "query_pre_attn_scalar": 144}}
    for name, shape in published.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**common, **shape}))
        spec = spec_from_hf_config(path).with_updates(name=name, torch_dtype="bfloat16")
        assert spec == PRESETS[name]


def test_every_other_layer_caches_only_its_window() -> None:
    model = build_model(SPEC)
    model.setup_cache(2, 40)
    assert model.cache_bytes() == kv_cache_bytes(SPEC, 2, 40, "float32")
    assert [layer.attention.kv_cache.size for layer in model.layers] == [WINDOW, 40] * 2
    assert not any(layer.attention.local_rope for layer in model.layers)  # one RoPE base
    # kv --check-engine and the copy stage's engine layout: the preset's cache as allocated
    big = PRESETS["gemma-2-27b"]
    assert allocated_cache_bytes(big, 2, 10_000, "bf16") == kv_cache_bytes(big, 2, 10_000, "bf16")


@torch.inference_mode()
def test_trace_ranges_count_all_four_norms_a_layer(monkeypatch) -> None:
    """--trace labels the post-norms as norms, not as time outside every layer."""
    pushed = pushed_ranges(build_model(SPEC), monkeypatch)
    assert pushed.count("norm") == 4 * SPEC.n_layers + 1


def test_fit_check_counts_the_capped_prefill_scores() -> None:
    """A Gemma 2 prefill holds float32 scores and their softmax, [B, heads, T, keys] each (SDPA
    cannot cap): a ring layer's keys are its 4096-token window and the T new ones, a full
    layer's the slots before the forward's end; a prefill chunk bounds T, tensor parallelism
    the heads."""
    from infermeter.generate.memory import case_memory

    spec = PRESETS["gemma-2-9b"]
    whole = case_memory(spec, 1, 8192, 8192, "bf16", "bf16", "eager")
    assert whole["capped attention scores"] == 2 * 16 * 8192 * (4096 + 8192) * 4
    short = case_memory(spec, 1, 2048, 8192, "bf16", "bf16", "eager")
    assert short["capped attention scores"] == 2 * 16 * 2048 * (4096 + 2048) * 4
    chunked = case_memory(spec, 1, 8192, 8192, "bf16", "bf16", "eager", tp=2, prefill_chunk=512)
    assert chunked["capped attention scores"] == 2 * 8 * 512 * 8192 * 4
    assert "capped attention scores" not in case_memory(PRESETS["gemma-3-1b"], 1, 8192, 8192,
                                                        "bf16", "bf16", "eager")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("attention", ["flex", "triton"])
def test_compiled_capped_attention_on_cuda_gives_the_eager_tokens(attention, dtype) -> None:
    """The CUDA-graph decode step with inductor's flex-decoding kernel (score_mod caps) or the
    split-KV kernel (SOFTCAP constexpr), scores past the cap (wq, wk x 8): eager's greedy tokens.
    No final cap here: it would flatten the peaked head that keeps greedy choices off ties."""
    from tests.test_generate import assert_compiled_gives_eager_tokens, peaked_cuda_model

    model = peaked_cuda_model(SPEC.with_updates(final_logit_softcap=None), dtype)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight.mul_(8)
            layer.attention.wk.weight.mul_(8)
            layer.attention.decode_attention = attention
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7]]  # past the window
    assert_compiled_gives_eager_tokens(Generator(model, max_seq_len=64), prompts)


@torch.inference_mode()
def test_bucketed_prefill_gives_the_eager_tokens() -> None:
    """The compiled mode's bucketed prefill (its forward run eagerly here, as
    test_bucketed_prefill does): a 17-token prompt padded to 32, past the 6-token window, attends
    through the capped products and then decodes eager's greedy tokens."""
    from infermeter.engine.generator import _block_step, _prefill_forward

    model = _random_model(5, qk_scale=8.0)
    prompt = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(5))
    eager = GenerationConfig(max_new_tokens=6)
    want = Generator(model, max_seq_len=64).generate(prompt, eager).output_token_ids
    gen = Generator(model, max_seq_len=64, bucketed_prefill=True)
    gen._compiled_prefill = _prefill_forward  # the compiled graph's function, run eagerly
    gen._compiled_layer = _block_step  # the layer graphs' function, eagerly
    gen.prepare(2, 17, 6)
    state = gen.prefill(prompt, GenerationConfig(max_new_tokens=6, compile=True))
    assert gen.prefill_lengths(17, True) == [32]
    steps = [state.token.tolist()] + [gen.decode_step(state, eager).tolist() for _ in range(5)]
    assert [list(seq) for seq in zip(*steps)] == want
