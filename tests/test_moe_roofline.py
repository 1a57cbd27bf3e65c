"""The MoE roofline: bytes per decode step = attention + shared weights + the experts the step
touched (counted after each step of an untimed run) + KV read; the uniform-routing union."""

from __future__ import annotations

import pytest
import torch

from infermeter.engine.generator import GenerationConfig
from infermeter.engine.model import build_model
from infermeter.generate import loop
from infermeter.generate.cases import plan_cases, prompt_sets
from infermeter.generate.request import GenerateRequest, Timing
from infermeter.measure import roofline as rl
from infermeter.specs.presets import PRESETS

QWEN = PRESETS["qwen3-30b-a3b"]
TINY = PRESETS["debug"].with_updates(name="tiny-moe", arch="qwen3_moe", n_layers=3, head_dim=32,
                                     qk_norm=True, n_experts=8, n_active_experts=2, moe_ffn_dim=48,
                                     moe_dense_layers=(1,))


def test_decode_bytes_on_a_synthetic_routing() -> None:
    """Qwen3-30B-A3B in bf16, per layer: attention 18,874,368 + norms 4,352 + router 262,144
    shared parameters, 4,718,592 an expert; the output matrix 311,164,928, the final norm 2,048,
    and the embedding rows the batch looks up (B x 2,048)."""
    # batch 1 touching its 8 experts a layer: the active weights (one embedding row)
    assert rl.decode_weight_bytes(QWEN, "bfloat16", 1, experts=8) == 6_083_739_648
    # batch 16 whose routing touched all 128 experts of every layer
    assert rl.decode_weight_bytes(QWEN, "bfloat16", 16, experts=128) == 2 * (
        48 * (18_874_368 + 4_352 + 262_144) + 48 * 128 * 4_718_592 + 311_164_928 + 2_048
        + 16 * 2_048)
    # no count: the uniform expectation stands in (batch 1: exactly k)
    assert rl.decode_weight_bytes(QWEN, "bfloat16", 1) == 6_083_739_648


def test_expected_union_formula_against_uniform_routing() -> None:
    e, k = QWEN.n_experts, QWEN.n_active_experts
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 4, 16, 64):
        union = [torch.rand(batch, e, generator=gen).topk(k, dim=-1).indices.unique().numel()
                 for _ in range(400)]
        assert sum(union) / len(union) == pytest.approx(rl.expected_experts(QWEN, batch),
                                                        rel=0.02), batch
    assert rl.expected_experts(QWEN, 1) == k
    assert rl.expected_experts(QWEN, 64) == pytest.approx(e * (1 - (1 - k / e) ** 64))


@torch.inference_mode()
def test_the_counter_reads_each_moe_layers_routing() -> None:
    model = build_model(TINY, seed=0)
    counter = loop.ExpertCounter(model)
    assert len(counter.layers) == 2  # layer 1 is dense
    counter.layers[0].last_experts = torch.tensor([[0, 1], [1, 2], [0, 2]])  # 3 distinct
    counter.layers[1].last_experts = torch.tensor([[5, 6], [6, 5], [7, 4]])  # 4 distinct
    counter("prefill", 0)  # not a decode step: not counted
    counter("decode", 1)
    assert counter.per_step == [3.5]


def test_generate_counts_the_experts_of_its_decode_steps() -> None:
    model = build_model(TINY, seed=1)
    for layer in model.layers:  # a wide router: tokens spread over the experts
        if hasattr(layer.feed_forward, "gate"):
            torch.nn.init.normal_(layer.feed_forward.gate.weight, std=1.0)
    sets = prompt_sets((3,), (8,), (), TINY.vocab_size, 0, ())
    cases = plan_cases(TINY, sets, ("eager",), 5)
    settings = GenerateRequest("random:tiny", sampling=GenerationConfig(max_new_tokens=5),
                               timing=Timing(repeats=1, warmup=0))
    (result,) = loop.run_generation(model, cases, settings, {"device_name": "cpu"}, {}, None)
    m = result.metrics
    touched = m["moe_experts_per_step"]
    assert 2 <= touched <= 6  # 3 tokens x 2 experts, a layer
    assert m["moe_experts_uniform"] == pytest.approx(rl.expected_experts(TINY, 3))
    contexts = range(9, 13)  # 4 decode steps after the 8-token prompt
    assert m["bytes_per_decode_step"] == pytest.approx(rl.mean_decode_step_bytes(
        TINY, 3, contexts, "float32", "float32", 1, touched))
    assert m["bytes_per_decode_step"] != pytest.approx(rl.mean_decode_step_bytes(
        TINY, 3, contexts, "float32", "float32", 1, 6.0))  # not the all-distinct bound
