"""gpt-oss on the engine: a tiny random checkpoint written by transformers' GptOssForCausalLM
gives the same logits and greedy tokens (sinks, biases, YaRN, alternating sliding layers, the
clamped SwiGLU experts); MXFP4 expert weights dequantize as transformers' do; each tensor-
parallel rank holds its heads' sinks and the ranks add the output and down biases once; what the
engine cannot do for it (the hf mode) is one line; --moe-kernel triton takes its experts at
every batch (the kernels' numbers: tests/expert_gemv_worker.py, tests/expert_gemm_worker.py)."""

from __future__ import annotations

import math

import pytest
import torch

from infermeter.cli import main
from infermeter.engine.checkpoint.load import (
    check_checkpoint,
    load_model,
    load_weights,
    save_checkpoint,
)
from infermeter.engine.generator import GenerationConfig, Generator
from infermeter.engine.model import build_model
from infermeter.engine.moe import MoEFeedForward, set_moe_kernel
from infermeter.engine.parallel.group import TensorParallel
from infermeter.engine.rope import attention_factor, inv_frequencies
from infermeter.errors import InfermeterError
from infermeter.specs.loaders import spec_from_hf_config
from infermeter.specs.model import ModelSpec, RopeScaling, check_engine_arch
from infermeter.specs.presets import PRESETS
from infermeter.specs.sizes import param_count
from tests.checkpoint_errors import check_error
from tests.hf_reference import assert_matches_transformers, tiny_hf_model

transformers = pytest.importorskip("transformers")

VOCAB = 96
YARN = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 16, "rope_theta": 150000.0}
# 4 heads of 8 over 2 KV heads, 4 experts (2 a token) of 32, a 6-token window on layer 0
CONFIG = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 32, "head_dim": 8,
          "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
          "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 6,
          "max_position_embeddings": 64, "rope_parameters": YARN}


def _spread(name: str, param: torch.nn.Parameter) -> None:
    """Biases and sinks away from zero, norms away from one, experts large enough that the
    clamps at +-7 bite: a wrong use of any of them shows in the logits."""
    if "sinks" in name:
        param.normal_(0.0, 1.0)
    elif "bias" in name:
        param.normal_(0.0, 0.3)
    elif "norm" in name:
        param.normal_(1.0, 0.2)
    elif "experts" in name:
        param.normal_(0.0, 0.5)


def _small(n_layers: int = 2) -> ModelSpec:
    """The preset's architecture at CONFIG's shapes, the even layers sliding."""
    return PRESETS["gpt-oss-20b"].with_updates(
        n_layers=n_layers, dim=32, n_heads=4, n_kv_heads=2, head_dim=8, vocab_size=VOCAB,
        n_experts=4, n_active_experts=2, moe_ffn_dim=32, sliding_window=6,
        sliding_window_layers=tuple(range(0, n_layers, 2)), max_seq_len=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt_oss")
    config = transformers.GptOssConfig(**CONFIG)
    assert config.layer_types == ["sliding_attention", "full_attention"]
    return folder, tiny_hf_model(folder, config, transformers.GptOssForCausalLM, _spread)


@torch.inference_mode()
def test_logits_and_greedy_tokens_equal_transformers(checkpoint) -> None:
    """Prompts of 1, 5 and 17 tokens (past the 6-token window), 10 greedy steps; logits over
    40 tokens within 1e-4."""
    folder, hf = checkpoint
    model = load_model(folder, max_batch_size=2, max_seq_len=64)
    spec = model.spec
    assert (spec.arch, spec.sliding_window, spec.sliding_window_layers) == ("gpt_oss", 6, (0,))
    assert (spec.attn_sinks, spec.o_bias, spec.moe_bias, spec.qkv_bias) == (True,) * 4
    assert (spec.swiglu_alpha, spec.swiglu_limit) == (1.702, 7.0)
    assert sum(p.numel() for p in model.parameters()) == param_count(spec) \
        == sum(p.numel() for p in hf.parameters())
    assert_matches_transformers(model, hf, VOCAB, 10)


@torch.inference_mode()
def test_every_attention_kind_and_chunked_prefill_give_the_same_tokens() -> None:
    """SDPA cannot take sinks: "sdpa" runs the math products (and says so); "flex" takes them
    in the compiled step, "triton" too where Triton runs (here it does not). A prefill in
    chunks of 4 past the window equals one forward."""
    model = build_model(_small(), seed=1)
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9]] * 2
    config = GenerationConfig(max_new_tokens=8)
    whole = Generator(model).generate(prompt, config).output_token_ids
    assert Generator(model, prefill_chunk=4).generate(prompt, config).output_token_ids == whole
    for kind, used in (("sdpa", "math"), ("flex", "flex"), ("triton", "math")):
        gen = Generator(model, decode_attention=kind)
        assert gen.decode_attention_used(compiled=True, batch_size=2) == used
        assert gen.generate(prompt, config).output_token_ids == whole


def _sink_inputs(length: int, slots: int, seed: int):
    """q [2, 4, length, 8] over keys/values [2, 2, slots, 8] (GQA: 2 query heads a KV head),
    sinks [4] large enough to matter."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, length, 8, generator=gen)
    keys, values = (torch.randn(2, 2, slots, 8, generator=gen) for _ in range(2))
    return q, keys, values, torch.randn(4, generator=gen) * 2


def _math_with_sinks(q, keys, values, mask, sinks):
    """attention.decode_attention on the folded rows (self_attention.py's _attend): [B, H, T, D]."""
    from infermeter.engine.attention import decode_attention

    bsz, heads, length, dim = q.shape
    groups = heads // keys.shape[1]
    rows = sinks.view(keys.shape[1], groups, 1).expand(-1, -1, length).reshape(keys.shape[1], -1)
    out = decode_attention(q.reshape(bsz, keys.shape[1], groups * length, dim), keys, values,
                           mask.repeat(groups, 1), sinks=rows)
    return out.reshape(q.shape)


def test_flex_lse_is_natural_log() -> None:
    """flex_attention's lse, which the sink factor sigmoid(lse - sink) needs in base e."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    q, keys, values, _ = _sink_inputs(5, 5, 0)
    _, aux = flex_attention(q, keys, values, enable_gqa=True, return_aux=AuxRequest(lse=True))
    scores = q @ keys.repeat_interleave(2, dim=1).transpose(-1, -2) * 8 ** -0.5
    assert torch.allclose(aux.lse, torch.logsumexp(scores, dim=-1), atol=1e-5)


def test_flex_with_sinks_equals_the_math_path() -> None:
    """chunk_flex_attention with sinks against the math products: whole prompts from 0 of
    several lengths (causal tiles, more than one 128-wide tile), and a later chunk over a
    cache through the tile lists a compiled chunk gets, its rows all visible ones; and the
    compiled step's flex decode."""
    from infermeter.engine.attention import decode_attention, flex_decode_attention
    from infermeter.engine.chunk_attention import block_lists, chunk_flex_attention

    for length in (1, 7, 130):
        q, keys, values, sinks = _sink_inputs(length, length, length)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        want = _math_with_sinks(q, keys, values, causal, sinks)
        got = chunk_flex_attention(q, keys, values, block_lists(0, length, length, q.device),
                                   sinks=sinks)
        assert (got - want).abs().max() < 1e-5, length
    first, length, slots = 9, 6, 40  # the chunk's queries at 9..14 over a 40-slot cache
    q, keys, values, sinks = _sink_inputs(length, slots, 3)
    mask = torch.arange(slots)[None, :] <= torch.arange(first, first + length)[:, None]
    want = _math_with_sinks(q, keys, values, mask, sinks)
    got = chunk_flex_attention(q, keys, values, block_lists(first, length, slots, q.device),
                               sinks=sinks)
    assert (got - want).abs().max() < 1e-5
    assert (want - _math_with_sinks(q, keys, values, mask, sinks - 50)).abs().max() > 1e-2
    # the compiled step's "flex" decode: one token at 20 over a ring's scattered slots
    key_pos = torch.randperm(slots, generator=torch.Generator().manual_seed(7)) - 10
    visible = (key_pos >= 0) & (key_pos <= 20) & (20 - key_pos < 12)
    q = q[:, :, :1].reshape(2, 2, 2, 8)  # folded: [B, H_kv, G, D]
    got = flex_decode_attention(q, keys, values, key_pos, torch.tensor([20]), 12,
                                sinks=sinks.view(2, 2))
    want = decode_attention(q, keys, values, visible.expand(2, -1), sinks=sinks.view(2, 2))
    assert (got - want).abs().max() < 1e-5


@torch.inference_mode()
def test_flex_prefill_keeps_logits_and_greedy_tokens(checkpoint) -> None:
    """The full layer's prefill on flex (from 0, from later starts, a later chunk's tiles with
    pads after it) gives the math path's logits within 1e-4, and the Generator's greedy tokens
    (prompts prefilled on flex, in chunks of 5) equal transformers'."""
    from infermeter.engine.chunk_attention import block_lists
    from infermeter.engine.model import prefill_from

    folder, hf = checkpoint
    model = load_model(folder, max_batch_size=2, max_seq_len=64)
    tokens = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(5))
    model.setup_cache(2, 64)
    want = model(tokens[:, :17], torch.arange(17))  # no known start: the math products
    with prefill_from(model, 0):
        assert (model(tokens[:, :17], torch.arange(17)) - want).abs().max() < 1e-4
        got = [model(tokens[:, :9], torch.arange(9))]
    with prefill_from(model, 9):
        got.append(model(tokens[:, 9:17], torch.arange(9, 17)))
    assert (torch.cat(got, dim=1) - want).abs().max() < 1e-4
    # a bucketed chunk at 9.. of 8 tokens and 2 pads (copies of the last, at position 17),
    # after 0..8 again (the ring layer holds the last 6 positions written)
    with prefill_from(model, 0):
        model(tokens[:, :9], torch.arange(9))
    piece = torch.cat((tokens[:, 9:17], tokens[:, 16:17].expand(2, 2)), dim=1)
    positions = torch.cat((torch.arange(9, 17), torch.full((2,), 17)))
    padded = model(piece, positions, blocks=block_lists(9, 10, 64, torch.device("cpu")))
    assert (padded[:, :8] - want[:, 9:]).abs().max() < 1e-4
    expected = hf.generate(tokens[:, :17], max_new_tokens=6, do_sample=False,
                           min_new_tokens=6)[:, 17:]
    out = Generator(model, prefill_chunk=5, fuse=False).generate(
        tokens[:, :17].tolist(), GenerationConfig(max_new_tokens=6))
    assert out.output_token_ids == expected.tolist()


@torch.inference_mode()
def test_compiled_decode_step_equals_eager() -> None:
    """A decode step traced whole (fullgraph; aot_eager: the compiled step's paths, sinks on
    the math products and every_expert past E / k tokens, without inductor's build time) gives
    the eager step's logits, after a prompt past the 6-token window."""
    torch._dynamo.reset()
    model = build_model(_small(), seed=2)
    step = torch.compile(model, fullgraph=True, backend="aot_eager")
    prompt = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(6))
    for batch in (3, 1):  # 6 routed pairs > 4 experts: every_expert; then 2: gathered
        model.setup_cache(batch, 16)
        last = model(prompt[:batch], torch.arange(8))[:, -1:].argmax(-1)  # [batch, 1]
        caches = [layer.attention.kv_cache for layer in model.layers]
        saved = [(c.k.clone(), c.v.clone(), c.key_pos.clone()) for c in caches]
        eager = model(last, torch.tensor([8]))
        for cache, (k, v, pos) in zip(caches, saved, strict=True):  # undo the eager write
            cache.k.copy_(k), cache.v.copy_(v), cache.key_pos.copy_(pos)
        assert torch.allclose(step(last, torch.tensor([8])), eager, atol=1e-5), batch


@pytest.mark.parametrize("rope", [
    YARN,  # gpt-oss's: truncate False, the attention factor from factor alone
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707,
     "rope_theta": 10000.0},  # DeepSeek's fields: mscale over mscale_all_dim, truncated
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
     "attention_factor": 1.25, "rope_theta": 1e6},  # Qwen's, an explicit attention factor
])
def test_yarn_equals_transformers(rope, tmp_path) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.GptOssConfig(**{**CONFIG, "rope_parameters": rope,
                                          "max_position_embeddings": 131072})
    config.save_pretrained(tmp_path)
    spec = spec_from_hf_config(tmp_path / "config.json")
    assert spec.rope_scaling is not None and spec.rope_scaling.kind == "yarn"
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    assert torch.equal(inv_frequencies(spec), inv_freq)
    assert attention_factor(spec) == factor != 1.0


def test_yarn_keeps_fast_rotations_and_divides_slow_ones() -> None:
    """By hand, gpt-oss-20b's: the first frequency turns > 32 times in 4096 positions (kept),
    the last < once (divided by 32); cos/sin are scaled by 0.1 ln 32 + 1."""
    spec = PRESETS["gpt-oss-20b"]
    plain = inv_frequencies(spec.with_updates(rope_scaling=None))
    scaled = inv_frequencies(spec)
    assert scaled[0] == plain[0] and torch.allclose(scaled[-1], plain[-1] / 32)
    assert attention_factor(spec) == pytest.approx(0.1 * math.log(32) + 1)
    linear = spec.with_updates(rope_scaling=RopeScaling("linear", 2.0))
    assert attention_factor(linear) == 1.0


def test_experts_equal_transformers_gpt_oss_experts() -> None:
    """The router (top k, then softmax) and the biased, clamped experts on transformers'
    weights, through the gathered, grouped and every-expert paths."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssTopKRouter

    config = transformers.GptOssConfig(**CONFIG)
    torch.manual_seed(0)
    experts, router = GptOssExperts(config), GptOssTopKRouter(config)
    for param in (*experts.parameters(), *router.parameters()):
        torch.nn.init.normal_(param, std=1.0)  # gate and up well past the +-7 clamps
    ours = MoEFeedForward(32, 32, 4, 2, True, bias=True, swiglu_alpha=1.702, swiglu_limit=7.0)
    with torch.no_grad():
        ours.gate.weight.copy_(router.weight)
        ours.gate.bias.copy_(router.bias)
        ours.w1.weight.copy_(experts.gate_up_proj[..., 0::2].transpose(1, 2))
        ours.w3.weight.copy_(experts.gate_up_proj[..., 1::2].transpose(1, 2))
        ours.w2.weight.copy_(experts.down_proj.transpose(1, 2))
        ours.w1.bias.copy_(experts.gate_up_proj_bias[:, 0::2])
        ours.w3.bias.copy_(experts.gate_up_proj_bias[:, 1::2])
        ours.w2.bias.copy_(experts.down_proj_bias)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, scores, ids = router(x)
        expected = experts(x, ids, scores)
        weights, our_ids = ours.route(x)
        assert torch.equal(our_ids, ids) and torch.allclose(weights, scores, atol=1e-6)
        gate = x @ experts.gate_up_proj[0][:, 0::2] + experts.gate_up_proj_bias[0, 0::2]
        assert gate.max() > 7  # the clamp is exercised
        for path in (ours.gathered, ours.grouped, ours.every_expert):
            assert torch.allclose(path(x, weights, our_ids), expected, atol=1e-4), path


def test_mxfp4_experts_load_as_transformers_dequantizes_them(checkpoint, tmp_path) -> None:
    """The published layout: gate_up_proj and down_proj as _blocks [E, rows, in/32, 16] and
    _scales [E, rows, in/32]; the engine's experts equal transformers'
    convert_moe_packed_tensors of them (bf16), split and transposed as the bf16 layout is."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    folder, _ = checkpoint
    tensors = load_file(str(folder / "model.safetensors"))
    gen = torch.Generator().manual_seed(4)
    reference = {}
    for proj, rows in (("gate_up_proj", 64), ("down_proj", 32)):
        name = f"model.layers.1.mlp.experts.{proj}"
        del tensors[name]
        blocks = torch.randint(0, 256, (4, rows, 1, 16), generator=gen, dtype=torch.uint8)
        scales = torch.randint(120, 131, (4, rows, 1), generator=gen, dtype=torch.uint8)
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        reference[proj] = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ffn = load_model(tmp_path, max_batch_size=1, max_seq_len=8).layers[1].feed_forward
    gate_up = reference["gate_up_proj"].float()  # [E, dim, 2 ffn], gate and up interleaved
    assert torch.equal(ffn.w1.weight, gate_up[..., 0::2].transpose(1, 2))
    assert torch.equal(ffn.w3.weight, gate_up[..., 1::2].transpose(1, 2))
    assert torch.equal(ffn.w2.weight, reference["down_proj"].float().transpose(1, 2))
    # blocks that do not pair with their scales, or with config.json's shapes: one line
    tensors["model.layers.1.mlp.experts.down_proj_scales"] = scales[:, :16].contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(InfermeterError, match="MXFP4 tensor .*down_proj: blocks .* do not pair up"):
        load_model(tmp_path, max_batch_size=1, max_seq_len=8)


def test_check_checkpoint_takes_both_layouts_and_refuses_what_the_loader_refuses(
        checkpoint, tmp_path) -> None:
    """`run` calls it before its first stage: the bf16 layout and MXFP4 _blocks / _scales pass;
    a missing half, blocks that do not pair with their scales or with config.json's shape are
    the loader's own line, from the headers (no MXFP4 tensor dequantized)."""
    from safetensors.torch import load_file, save_file

    folder, _ = checkpoint
    check_checkpoint(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.mlp.experts.down_proj"  # [E, ffn, dim]: rows dim 32, 32 inputs
    del tensors[name]
    tensors[f"{name}_blocks"] = torch.zeros(4, 32, 1, 16, dtype=torch.uint8)
    tensors[f"{name}_scales"] = torch.full((4, 32, 1), 127, dtype=torch.uint8)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    path = tmp_path / "model.safetensors"

    def error(changes: dict[str, torch.Tensor | None]) -> str:
        changed = {key: value for key, value in {**tensors, **changes}.items()
                   if value is not None}
        save_file(changed, str(path))
        return check_error(tmp_path)

    save_file(tensors, str(path))
    check_checkpoint(tmp_path)
    assert error({f"{name}_scales": None}) == f"{tmp_path}: missing tensor {name}_scales"
    assert error({f"{name}_scales": torch.zeros(4, 16, 1, dtype=torch.uint8)}) == (
        f"{path}: MXFP4 tensor {name}: blocks [4, 32, 1, 16] (U8) and scales [4, 16, 1] (U8) "
        "do not pair up")
    assert error({f"{name}_blocks": torch.zeros(4, 32, 2, 16, dtype=torch.uint8),
                  f"{name}_scales": torch.zeros(4, 32, 2, dtype=torch.uint8)}) == (
        f"{path}: MXFP4 tensor {name} has shape [4, 64, 32], config.json implies [4, 32, 32]")


def test_mxfp4_dequantize_equals_transformers() -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from infermeter.engine.checkpoint.hf import _dequantize_mxfp4

    gen = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 256, (3, 6, 2, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(100, 150, (3, 6, 2), generator=gen, dtype=torch.uint8)
    ours = _dequantize_mxfp4(blocks, scales)
    assert ours.shape == (3, 64, 6) and ours.dtype == torch.bfloat16
    assert torch.equal(ours, convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16))


def test_what_the_engine_cannot_do_for_it_is_one_line(tmp_path, capsys) -> None:
    spec = PRESETS["gpt-oss-20b"]
    check_engine_arch(spec)  # it runs
    output = tmp_path / "out.jsonl"
    small = build_model(_small(n_layers=1))
    with pytest.raises(InfermeterError, match="writing an HF gpt_oss checkpoint is not supported"):
        save_checkpoint(small, tmp_path / "written", "hf")
    assert main(["generate", "--model", "gpt-oss-20b", "--device", "cpu", "--mode", "hf",
                 "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the hf mode cannot build a gpt_oss model" in err[0], err


@pytest.mark.parametrize("world", [2, 4])  # 4 ranks > 2 KV heads: each KV head on two ranks
@torch.inference_mode()
def test_tp_ranks_hold_their_heads_sinks_and_add_the_biases_once(checkpoint, world) -> None:
    """Every rank's tensors are the plan's slices of tp 1's (sinks by query head, as wq's rows);
    the row-parallel partial sums (wo, the MoE block: forward without the all-reduce hook) of
    all ranks add up to tp 1's output, so wo's bias and the experts' down bias count once.
    One process, no process group: the ranks are only loaded and their products summed here."""
    folder, _ = checkpoint
    full = load_weights(folder)
    full_state = full.state_dict()
    shards = [load_weights(folder, parallel=TensorParallel(r, world, r, torch.device("cpu")))
              for r in range(world)]
    for shard in shards:
        q0, nq = shard.shard_plan.heads
        for i, layer in enumerate(shard.layers):
            assert torch.equal(layer.attention.sinks, full.layers[i].attention.sinks[q0:q0 + nq])
        for name, tensor in shard.state_dict().items():
            assert torch.equal(tensor, shard.shard_plan.narrow(name, full_state[name])), name
    gen = torch.Generator().manual_seed(2)
    head_dim = full.spec.head_dim
    for i, layer in enumerate(full.layers):
        heads = torch.randn(2, 3, full.spec.n_heads * head_dim, generator=gen)
        partial = [s.layers[i].attention.wo.forward(heads.narrow(
            -1, s.shard_plan.heads[0] * head_dim, s.shard_plan.heads[1] * head_dim))
            for s in shards]
        torch.testing.assert_close(sum(partial), layer.attention.wo(heads))
        for tokens in (1, 6):  # N * k <= E: the gathered experts; past it, the grouped ones
            h = torch.randn(1, tokens, full.spec.dim, generator=gen)
            partial = [s.layers[i].feed_forward.forward(h) for s in shards]
            torch.testing.assert_close(sum(partial), layer.feed_forward(h))


def test_triton_experts_take_every_forward(monkeypatch) -> None:
    """--moe-kernel triton: gpt-oss's experts take expert_gemv.py's gathered kernels while
    batch x k <= E and expert_gemm.py's grouped ones past that (both compute its biases and
    clamped SwiGLU; their numbers: tests/expert_gemv_worker.py, tests/expert_gemm_worker.py):
    takes_expert_kernel and the Result's moe_kernel say so at every batch, the compiled prefill
    is bucketed (no host sync), and the fit check sizes it so (the bucketed forward, its sink
    scores and the grouped kernels' intermediates; no gathered copy of the experts)."""
    from infermeter.engine import moe as moe_module
    from infermeter.engine.moe import prefills_without_sync, takes_expert_kernel
    from infermeter.engine.prefill_buckets import prefill_forwards
    from infermeter.generate.cases import plan_cases, prompt_sets
    from infermeter.generate.memory import case_memory
    from infermeter.generate.modes import EngineRunner
    from infermeter.generate.request import EngineChoices, GenerateRequest

    spec = _small(n_layers=1)  # 4 experts, 2 a token
    small = build_model(spec)
    set_moe_kernel(small, "triton")
    (block,) = [m for m in small.modules() if isinstance(m, MoEFeedForward)]
    monkeypatch.setattr(moe_module, "triton_runs_on", lambda x: True)
    assert all(takes_expert_kernel(block, n) for n in (1, 2, 3)) and prefills_without_sync(small)
    assert Generator(small, bucketed_prefill=True).bucketed_prefill
    set_moe_kernel(small, "auto")  # Triton's at one token and past E / k = 2 tokens
    assert [takes_expert_kernel(block, n) for n in (1, 2, 3)] == [True, False, True]
    assert prefills_without_sync(small)
    set_moe_kernel(small, "torch")
    assert not any(takes_expert_kernel(block, n) for n in (1, 2, 3))
    assert not prefills_without_sync(small)
    set_moe_kernel(small, "triton")
    sets = prompt_sets((1,), (4,), (), spec.vocab_size, 0, ())
    (case,) = plan_cases(spec, sets, ("eager",), 4, None, None)
    runner = EngineRunner(small, case, GenerateRequest(
        "random:tiny", engine=EngineChoices(moe_kernel="triton")))
    for batches in ([1, 2], [3], [1, 3]):
        runner.batch_sizes = batches
        assert runner.describe()["moe_kernel"] == "triton", batches
    real = PRESETS["gpt-oss-20b"]  # 32 experts, 4 a token: batch 8 gathered
    prompt = 500
    (padded,) = [n for _, n in prefill_forwards(prompt, None, 1024)]
    assert padded > prompt
    for batch in (1, 8, 9):
        parts = {kind: case_memory(real, batch, prompt, 1024, "bfloat16", "bfloat16",
                                   "compiled", prefill=prefill, moe_kernel=kernel)
                 for kind, prefill, kernel in (("bucketed", "bucketed", "triton"),
                                               ("exact", "exact", "triton"),
                                               ("torch", "bucketed", "torch"))}
        for kind, tokens in (("bucketed", padded), ("exact", prompt)):
            assert parts[kind]["grouped expert activations"] == \
                batch * tokens * 4 * (real.moe_ffn_dim + real.dim) * 2, (batch, kind)
            assert "gathered expert weights" not in parts[kind]
        assert parts["bucketed"]["sink attention scores"] > parts["exact"]["sink attention scores"]
        assert parts["bucketed"]["prefill activations"] > parts["exact"]["prefill activations"]
        # the torch experts: the exact prefill (their grouped loop syncs), no grouped buffers
        assert {k: v for k, v in parts["torch"].items() if k != "gathered expert weights"} == \
            {k: v for k, v in parts["exact"].items() if k != "grouped expert activations"}
        assert ("gathered expert weights" in parts["torch"]) == (batch <= 8)


def test_presets_keep_their_parameter_counts() -> None:
    assert param_count(PRESETS["gpt-oss-20b"]) == 20_914_757_184
    assert param_count(PRESETS["gpt-oss-120b"]) == 116_829_156_672


@pytest.mark.gpu
@torch.no_grad()
def test_sinks_on_cuda_flex_prefill_and_triton_decode_equal_the_math_path() -> None:
    """On a GPU: the eager prefill's flex (compiled on its own) and the split-KV kernel with
    sinks (bfloat16) against the math products."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from infermeter.engine.attention import decode_attention
    from infermeter.engine.chunk_attention import block_lists, chunk_flex_attention
    from infermeter.engine.kernels.decode_attention import split_kv_decode

    q, keys, values, sinks = (t.cuda() for t in _sink_inputs(300, 300, 11))
    q, keys, values = (t.repeat(1, 1, 1, 2) for t in (q, keys, values))  # head_dim 16
    causal = torch.ones(300, 300, dtype=torch.bool, device="cuda").tril()
    want = _math_with_sinks(q, keys, values, causal, sinks)
    got = chunk_flex_attention(q, keys, values, block_lists(0, 300, 300, q.device), sinks=sinks)
    assert (got - want).abs().max() < 1e-3
    one = q[:, :, -1:].reshape(2, 2, 2, 16).bfloat16()  # the last row, folded
    kb, vb = keys.bfloat16(), values.bfloat16()
    want = decode_attention(one.float(), kb.float(), vb.float(),
                            causal[-1:].expand(2, -1), sinks=sinks.view(2, 2))
    got = split_kv_decode(one, kb, vb, torch.arange(300, device="cuda"),
                          torch.tensor([299], device="cuda"), 0, False, 4, 0.0, sinks)
    assert (got.float() - want).abs().max() < 2e-2
