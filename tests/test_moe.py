"""Mixture-of-experts in the engine: Mixtral and Qwen3-MoE (engine/moe.py).

Parity cases build a tiny random MixtralForCausalLM / Qwen3MoeForCausalLM (float32, eager
attention), save it with save_pretrained and load the folder with the engine. The router is drawn
wide (std 1) so that tokens really spread over the experts, and norm weights around 1.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from infermeter.cli import main
from infermeter.engine.checkpoint.load import load_model, load_weights, save_checkpoint
from infermeter.engine.generator import GenerationConfig, Generator
from infermeter.engine.model import build_model
from infermeter.engine.moe import MoEFeedForward, touched_experts
from infermeter.engine.parallel.sharding import ShardPlan
from infermeter.errors import InfermeterError
from infermeter.generate.memory import case_memory
from infermeter.measure.trace import weight_bytes as trace_weight_bytes
from infermeter.specs.loaders import spec_from_hf_config
from infermeter.specs.model import check_engine_arch
from infermeter.specs.presets import PRESETS, PUBLISHED_PARAMS
from infermeter.specs.sizes import param_count
from tests.hf_reference import (
    assert_matches_transformers,
    assert_written_checkpoint_round_trips,
    tiny_hf_model,
)

transformers = pytest.importorskip("transformers")

VOCAB = 128
COMMON = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
          "num_hidden_layers": 3, "vocab_size": VOCAB, "max_position_embeddings": 256,
          "initializer_range": 0.1, "rope_theta": 1000000.0, "num_experts_per_tok": 2,
          "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
MIXTRAL = {**COMMON, "intermediate_size": 96, "num_local_experts": 4}
# Layer 1 dense (mlp_only_layers), head_dim 32 apart from 64 / 4, 8 experts of 48.
QWEN3_MOE = {**COMMON, "intermediate_size": 96, "moe_intermediate_size": 48, "num_experts": 8,
             "head_dim": 32, "mlp_only_layers": [1]}
SPEC = PRESETS["debug"].with_updates(name="tiny-qwen3-moe", arch="qwen3_moe", head_dim=32,
                                     qk_norm=True, norm_eps=1e-6, n_experts=8,
                                     n_active_experts=2, moe_ffn_dim=48, norm_topk_prob=True)


def _spread(name: str, param: torch.nn.Parameter) -> None:
    if "norm" in name:
        param.normal_(1.0, 0.1)
    elif name.endswith("gate.weight") and param.dim() == 2 and param.shape[0] < 16:
        param.normal_(0.0, 1.0)  # the router: spread tokens over experts


def _hf_model(folder, kind: str, norm_topk_prob: bool = True):
    if kind == "mixtral":
        return tiny_hf_model(folder, transformers.MixtralConfig(**MIXTRAL),
                             transformers.MixtralForCausalLM, _spread)
    config = transformers.Qwen3MoeConfig(**QWEN3_MOE, norm_topk_prob=norm_topk_prob)
    return tiny_hf_model(folder, config, transformers.Qwen3MoeForCausalLM, _spread)




@pytest.mark.parametrize("kind,norm_topk", [("mixtral", True), ("qwen3_moe", True),
                                            ("qwen3_moe", False)])
@torch.inference_mode()
def test_logits_and_greedy_tokens_equal_transformers(kind: str, norm_topk: bool,
                                                     tmp_path) -> None:
    hf = _hf_model(tmp_path, kind, norm_topk)
    model = load_model(tmp_path, max_batch_size=2, max_seq_len=64)
    spec = model.spec
    assert (spec.arch, spec.norm_topk_prob) == (kind, norm_topk)
    moe = [isinstance(layer.feed_forward, MoEFeedForward) for layer in model.layers]
    assert moe == ([True] * 3 if kind == "mixtral" else [True, False, True])
    assert_matches_transformers(model, hf, VOCAB, 10)


def _loop_over_experts(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Reference: every expert on every token, weighted by the routing (zero where unrouted)."""
    weights, ids = moe.route(x)
    out = torch.zeros_like(x)
    for e in range(moe.n_experts):
        h = F.silu(x @ moe.w1.weight[e].T) * (x @ moe.w3.weight[e].T) @ moe.w2.weight[e].T
        routed = (weights * (ids == e)).sum(-1, keepdim=True)  # [N, 1]
        out += routed * h
    return out


@torch.inference_mode()
def test_gathered_equals_grouped_equals_a_loop_over_experts() -> None:
    model = build_model(SPEC, seed=3)
    moe = model.layers[0].feed_forward
    torch.nn.init.normal_(moe.gate.weight, std=1.0)
    for n in (1, 3, 8, 29):
        x = torch.randn(n, SPEC.dim, generator=torch.Generator().manual_seed(n))
        weights, ids = moe.route(x)
        reference = _loop_over_experts(moe, x)
        gathered, grouped = moe.gathered(x, weights, ids), moe.grouped(x, weights, ids)
        assert (gathered - reference).abs().max().item() < 1e-5, n
        assert (grouped - reference).abs().max().item() < 1e-5, n
        every = moe.every_expert(x, weights, ids)  # a compiled step's path for large batches
        assert (every - reference).abs().max().item() < 1e-5, n
        # forward picks one of the two by size, and records the routing it used
        assert torch.allclose(moe(x[None])[0], reference, atol=1e-5)
        assert torch.equal(touched_experts(moe), torch.unique(ids))
    assert touched_experts(moe).numel() > 2  # 29 tokens spread beyond one token's experts


def test_compiled_decode_step_gives_eager_tokens() -> None:
    model = build_model(SPEC, seed=2)
    for layer in model.layers:
        torch.nn.init.normal_(layer.feed_forward.gate.weight, std=1.0)
    # Batch 1: the compiled step gathers its 2 experts (fullgraph); the 6-token prompt's
    # 12 routed pairs > 8 experts run grouped in the compiled prefill, through a graph break.
    # (every_expert, a compiled step's path past E / k sequences: the batch-5 test below.)
    prompts = [[3, 1, 4, 1, 5, 9]]
    eager = Generator(model).generate(prompts, GenerationConfig(max_new_tokens=5))
    compiled = Generator(model).generate(prompts, GenerationConfig(max_new_tokens=5,
                                                                   compile=True))
    assert compiled.output_token_ids == eager.output_token_ids


@torch.inference_mode()
def test_a_batch_1_step_reads_only_its_chosen_experts() -> None:
    """The default torch gathering, eager and compiled (fullgraph): after a batch-1 decode step
    found its experts, every other expert's weights turn NaN; the same step again gives the
    same finite logits (any read of an unrouted expert, even times a zero weight, is NaN)."""
    model, gen = build_model(SPEC, seed=2), torch.Generator().manual_seed(0)
    moes = [layer.feed_forward for layer in model.layers]
    for moe in moes:
        torch.nn.init.normal_(moe.gate.weight, std=1.0, generator=gen)
    model.setup_cache(1, 16)
    model(torch.tensor([[3, 1, 4, 1, 5, 9]]), torch.arange(6))  # the prompt's K/V, clean weights
    token, pos = torch.tensor([[7]]), torch.tensor([6])  # rerun: rewrites the same K/V
    eager = model(token, pos)
    routed = [touched_experts(moe) for moe in moes]
    compiled_step = torch.compile(model, fullgraph=True, dynamic=False)
    compiled = compiled_step(token, pos)
    assert torch.allclose(compiled, eager, atol=1e-5)
    assert [ids.tolist() for ids in routed] == [touched_experts(moe).tolist() for moe in moes]
    for moe, ids in zip(moes, routed):
        unrouted = torch.ones(moe.n_experts, dtype=torch.bool)
        unrouted[ids] = False
        assert int(unrouted.sum()) == SPEC.n_experts - SPEC.n_active_experts
        for stacked in (moe.w1, moe.w2, moe.w3):
            stacked.weight[unrouted] = float("nan")
    again, compiled_again = model(token, pos), compiled_step(token, pos)
    assert torch.isfinite(again).all() and torch.equal(again, eager)
    assert torch.isfinite(compiled_again).all() and torch.equal(compiled_again, compiled)


MIXTRAL_LIKE = PRESETS["debug"].with_updates(name="tiny-mixtral", arch="mixtral", n_experts=8,
                                             n_active_experts=2, moe_ffn_dim=96)


@torch.inference_mode()
def test_a_compiled_batch_5_step_gives_eager_tokens_and_expert_count() -> None:
    """5 sequences x 2 experts > 8: the compiled decode step runs every expert weighted by the
    routing (fullgraph, no host sync) where eager groups tokens by expert; the same greedy
    tokens, and generate counts the same experts a step in both."""
    from infermeter.generate import loop
    from infermeter.generate.cases import plan_cases, prompt_sets
    from infermeter.generate.request import GenerateRequest, Timing

    model, gen = build_model(MIXTRAL_LIKE, seed=3), torch.Generator().manual_seed(1)
    for layer in model.layers:
        torch.nn.init.normal_(layer.feed_forward.gate.weight, std=1.0, generator=gen)
    sets = prompt_sets((5,), (4,), (), MIXTRAL_LIKE.vocab_size, 0, ())
    cases = plan_cases(MIXTRAL_LIKE, sets, ("eager", "compiled"), 6)
    settings = GenerateRequest("random:tiny", sampling=GenerationConfig(max_new_tokens=6),
                               timing=Timing(repeats=1, warmup=0))
    eager, compiled = loop.run_generation(model, cases, settings, {"device_name": "cpu"}, {},
                                          None)
    assert (eager.config["mode"], compiled.config["mode"]) == ("eager", "compiled")
    assert compiled.output_token_ids == eager.output_token_ids
    counted = eager.metrics["moe_experts_per_step"]
    assert 2 < counted <= 8  # 5 tokens spread past one token's experts
    assert compiled.metrics["moe_experts_per_step"] == pytest.approx(counted)


def test_writer_round_trip_and_transformers_reads_it(tmp_path) -> None:
    spec = SPEC.with_updates(moe_dense_layers=(1,))
    source = build_model(spec, seed=4)
    save_checkpoint(source, tmp_path, "hf")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert config["mlp_only_layers"] == [1] and config["num_experts"] == 8
    assert_written_checkpoint_round_trips(source, tmp_path, spec, VOCAB, 12, 16)
    with pytest.raises(InfermeterError, match="experts"):
        save_checkpoint(source, tmp_path / "meta", "meta")


def test_a_missing_expert_is_one_line(tmp_path) -> None:
    _hf_model(tmp_path, "mixtral")
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_local_experts"] = 5  # the files hold 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InfermeterError, match=r"missing tensor model\.layers\.0\.block_sparse_"
                                              r"moe\.experts\.4\.w1\.weight \(and 8 more\)"):
        load_weights(tmp_path)


@pytest.mark.parametrize("name", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_total_and_active_parameters_match_published(name: str) -> None:
    total, active = PUBLISHED_PARAMS[name]
    assert param_count(PRESETS[name]) == pytest.approx(total, rel=0.01)
    assert param_count(PRESETS[name], active=True) == pytest.approx(active, rel=0.02)


def test_published_config_gives_the_preset(tmp_path) -> None:
    # Qwen/Qwen3-30B-A3B's config.json, the fields that shape the model.
    published = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "attention_bias": False, "decoder_sparse_step": 1, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144,
        "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
        "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
        "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(published))
    assert spec_from_hf_config(path).with_updates(name="qwen3-30b-a3b") == \
        PRESETS["qwen3-30b-a3b"]
    published["decoder_sparse_step"] = 2  # experts in layers 1, 3, 5, ...
    path.write_text(json.dumps(published))
    assert spec_from_hf_config(path).moe_dense_layers == tuple(range(0, 48, 2))


def test_tensor_parallel_splits_every_experts_ffn() -> None:
    """(tp 2 equals tp 1 on gloo: test_parallel.py's "moe" source.)"""
    plan = ShardPlan(SPEC, 1, 2)
    assert plan.slice_of("layers.0.feed_forward.w1.weight") == (1, 24, 24, 48)
    assert plan.slice_of("layers.0.feed_forward.w2.weight") == (2, 24, 24, 48)
    assert plan.slice_of("layers.0.feed_forward.gate.weight") is None  # the router: replicated
    with pytest.raises(InfermeterError) as err:
        ShardPlan(SPEC.with_updates(moe_ffn_dim=50), 0, 4)
    assert "\n" not in str(err.value) and "expert FFN size" in str(err.value)


def test_trace_weight_bytes_leave_the_stacked_experts_out() -> None:
    """--trace's per-projection GB/s divides a projection's bytes by its time: an MoE layer's
    experts are not read whole, nor timed in the gate_up / down ranges."""
    spec = SPEC.with_updates(moe_dense_layers=(1,))
    dense = build_model(spec, seed=0).layers[1].feed_forward
    assert trace_weight_bytes(build_model(spec, seed=0))["gate_up"] == \
        dense.w1.weight.nbytes + dense.w3.weight.nbytes


def test_trace_puts_the_moe_blocks_time_in_its_own_category(tmp_path) -> None:
    save_checkpoint(build_model(SPEC.with_updates(moe_dense_layers=(1,)), seed=0),
                    tmp_path / "model", "hf")
    out = tmp_path / "results.jsonl"
    assert main(["generate", "--model", str(tmp_path / "model"), "--device", "cpu",
                 "--max-new-tokens", "10", "--repeats", "1", "--warmup", "0", "--no-roofline",
                 "--trace", str(tmp_path / "trace"), "--output", str(out), "--json"]) == 0
    rows = {row["name"]: row for row in
            json.loads(out.read_text().splitlines()[0])["metrics"]["breakdown"]["categories"]}
    assert rows["MoE experts"]["time_ms"] > 0 and rows["MoE experts"]["gbps"] is None
    assert rows["matmul gate_up"]["time_ms"] > 0  # layer 1's dense FFN keeps its ranges


def test_the_fit_check_counts_the_gathered_experts() -> None:
    """torch's gathered way copies the chosen experts out: at batch 1 and 4 (tp 2: half on
    each rank), not past E / k; "auto", the default, gathers with Triton's kernels at batch 1
    (no copy) and torch's at 4."""
    mixtral = PRESETS["mixtral-8x7b"]  # 2 of 8 experts, each 3 x 4096 x 14336

    def copy(batch: int, kind: str, tp: int = 1) -> int | None:
        return case_memory(mixtral, batch, 16, 256, "bfloat16", "bfloat16", "compiled", tp=tp,
                           moe_kernel=kind).get("gathered expert weights")

    assert copy(1, "torch") == 2 * 3 * 4096 * 14336 * 2
    assert copy(4, "torch", tp=2) == 8 * 3 * 4096 * 14336  # 8 experts, half on each rank
    # 5 x 2 pairs > 8 experts: a step runs every expert (compiled) or groups (eager)
    assert copy(5, "torch") is None
    assert copy(1, "auto") is None and copy(4, "auto", tp=2) == copy(4, "torch", tp=2)
    assert case_memory(mixtral, 1, 16, 256, "bfloat16", "bfloat16", "compiled") == \
        case_memory(mixtral, 1, 16, 256, "bfloat16", "bfloat16", "compiled", moe_kernel="auto")


@pytest.mark.parametrize("name, missing", [
    ("deepseek-v3", "lacks multi-head latent attention"),
    ("llama-4-scout", "lacks chunked attention, NoPE layers, a sigmoid router"),
    ("phi-3-mini", "lacks a loader for its fused qkv_proj and gate_up_proj weights"),
])
def test_a_config_the_engine_cannot_run_is_one_line_naming_what_is_missing(
        name: str, missing: str, tmp_path, capsys) -> None:
    for runs in ("mixtral-8x7b", "qwen3-30b-a3b"):
        check_engine_arch(PRESETS[runs])
    output = tmp_path / "out.jsonl"
    assert main(["generate", "--model", name, "--device", "cpu", "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("infermeter: error: "), err
    arch = PRESETS[name].arch
    assert f"architecture {arch!r} can be sized but not run by the engine, which {missing}" \
        in err[0] and "qwen3_moe" in err[0]  # what is missing, then what does run
    assert not output.exists()


def test_every_sizing_only_architecture_has_its_reason() -> None:
    from infermeter.specs.model import ENGINE_ARCHS, ENGINE_MISSING, SIZING_ARCHS

    assert set(ENGINE_MISSING) == set(SIZING_ARCHS) - set(ENGINE_ARCHS)
    with pytest.raises(InfermeterError, match="'falcon' can be sized but not run by the engine, "
                                              "which lacks a way to build this architecture"):
        check_engine_arch(PRESETS["debug"].with_updates(arch="falcon"))
