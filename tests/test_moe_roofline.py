"""The MoE roofline: bytes per decode step = attention + shared weights + the experts the step
touched (counted after each step of an untimed run) + KV read; the uniform-routing union."""

from __future__ import annotations

import itertools

import pytest
import torch

from infermeter.engine.generator import GenerationConfig
from infermeter.engine.model import build_model
from infermeter.generate import loop
from infermeter.generate.cases import plan_cases, prompt_sets
from infermeter.generate.request import GenerateRequest, Timing
from infermeter.generate.table import MOE_HEADER, render_generate
from infermeter.measure import roofline as rl
from infermeter.measure.result import Result
from infermeter.specs.presets import PRESETS
from infermeter.units import format_bytes

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


def test_expected_union_is_the_mean_over_every_routing() -> None:
    """Exactly: every way B tokens can each choose k of E experts, equally likely."""
    for e, k in ((4, 2), (5, 1), (6, 3)):
        spec = TINY.with_updates(n_experts=e, n_active_experts=k)
        choices = list(itertools.combinations(range(e), k))
        for batch in (1, 2, 3):
            unions = [len(set().union(*picks))
                      for picks in itertools.product(choices, repeat=batch)]
            assert rl.expected_experts(spec, batch) == pytest.approx(
                sum(unions) / len(unions), rel=1e-12), (e, k, batch)


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


class RouterRecorder:
    """The routing the model actually made, recomputed apart from MoEFeedForward: a hook on each
    MoE layer's router keeps the top-k of its logits (softmax keeps their order) per call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: dict[int, list[torch.Tensor]] = {}  # MoE layer -> [N, k] ids a call
        for i, layer in enumerate(model.layers):
            ffn = layer.feed_forward
            if hasattr(ffn, "gate"):
                self.calls[i] = []
                ffn.gate.register_forward_hook(
                    lambda _mod, _args, logits, i=i, k=ffn.top_k:
                    self.calls[i].append(logits.topk(k, dim=-1).indices))

    def decode_runs(self, batch: int, prompt: int) -> list[list[list[int]]]:
        """Per run of `batch` prompts of `prompt` tokens (its prefill: batch x prompt rows into
        the router), per decode step (batch rows), the distinct experts of each MoE layer."""
        runs: list[list[list[int]]] = []
        for calls in zip(*self.calls.values()):  # one forward: every MoE layer's call
            rows = calls[0].shape[0]
            if rows == batch * prompt:
                runs.append([])
            elif rows == batch and runs:
                runs[-1].append([ids.unique().numel() for ids in calls])
        return runs


def _expert_and_shared_bytes(model: torch.nn.Module, batch: int) -> tuple[int, float]:
    """From the model's own tensors: one expert's three matrices (bytes) and what a decode step
    of `batch` tokens reads besides experts and KV (every other weight, the input embedding's
    looked-up rows only)."""
    moe = next(layer.feed_forward for layer in model.layers
               if hasattr(layer.feed_forward, "gate"))
    expert = sum(getattr(moe, w).weight[0].nbytes for w in ("w1", "w2", "w3"))
    shared = 0
    for name, param in model.named_parameters():  # a tied table is named once
        stacked = name.endswith(("feed_forward.w1.weight", "feed_forward.w2.weight",
                                 "feed_forward.w3.weight")) and param.dim() == 3
        if name == "tok_embeddings.weight" and not TINY.tie_embeddings:
            shared += batch * param[0].nbytes
        elif not stacked:
            shared += param.nbytes
    return expert, shared


@torch.inference_mode()
def test_the_batch_sweep_counts_the_union_its_routing_made() -> None:
    """generate at batch 1, 2, 4, 8 on a tiny Qwen3-MoE (8 experts, 2 a token, 2 MoE layers):
    the experts a step touched (as a router hook saw them) and the bytes per step rise with the
    batch, near the uniform-routing union, and the Result and the printed table say so."""
    model, gen = build_model(TINY, seed=1), torch.Generator().manual_seed(0)
    for layer in model.layers:  # a wide router: tokens spread over the experts
        if hasattr(layer.feed_forward, "gate"):
            torch.nn.init.normal_(layer.feed_forward.gate.weight, std=1.0, generator=gen)
    recorder = RouterRecorder(model)
    batches, prompt, new = (1, 2, 4, 8), 5, 9  # prefill rows 5B never equal a step's B
    cases = plan_cases(TINY, prompt_sets(batches, (prompt,), (), TINY.vocab_size, 0, ()),
                       ("eager",), new)
    settings = GenerateRequest("random:tiny", sampling=GenerationConfig(max_new_tokens=new),
                               timing=Timing(repeats=1, warmup=0))
    base = {"dtype": "float32", "kv_dtype": "float32", "repeats": 1, "warmup": 0}
    results = loop.run_generation(model, cases, settings, {"device_name": "cpu"}, base, None)
    assert [r.config["batch_size"] for r in results] == list(batches)
    contexts = range(prompt + 1, prompt + new)  # KV tokens each of the 8 decode steps reads
    counted, step_bytes = [], []
    for batch, result in zip(batches, results):
        m = result.metrics
        # the runner's warm-up run, the timed run, the counting run: greedy, routed alike
        *_, timed, steps = recorder.decode_runs(batch, prompt)
        assert len(steps) == new - 1 and steps == timed, batch
        union = sum(map(sum, steps)) / (len(steps) * len(recorder.calls))  # per layer and step
        assert m["moe_experts_per_step"] == pytest.approx(union, rel=1e-12), batch
        expert, shared = _expert_and_shared_bytes(model, batch)
        kv = sum(rl.decode_kv_bytes(TINY, batch, c, "float32") for c in contexts) / len(contexts)
        want = shared + expert * sum(map(sum, steps)) / len(steps) + kv
        assert m["bytes_per_decode_step"] == pytest.approx(want, abs=2), batch
        uniform = rl.expected_experts(TINY, batch)
        assert m["moe_experts_uniform"] == pytest.approx(uniform)
        # a random model's wide router routes near uniformly (within 10% at router seeds 0-5)
        assert abs(union - uniform) <= 0.15 * uniform, (batch, union, uniform)
        counted.append(union)
        step_bytes.append(m["bytes_per_decode_step"])
    assert counted[0] == TINY.n_active_experts  # batch 1: exactly its k experts a layer
    assert counted == sorted(set(counted)) and step_bytes == sorted(set(step_bytes)), \
        (counted, step_bytes)
    text = render_generate(results)
    header = next(line for line in text.splitlines() if line.startswith("batch"))
    assert all(name in header for name in MOE_HEADER) and header.rstrip().endswith("warnings")
    for batch, result in zip(batches, results):
        row = next(line for line in text.splitlines() if line.split()[:2] == [str(batch),
                                                                              str(prompt)])
        m = result.metrics
        assert f"{m['moe_experts_per_step']:.2f}  " in row and \
            f"{m['moe_experts_uniform']:.2f}  " in row and \
            format_bytes(m["bytes_per_decode_step"]) in row, row
    assert "experts/layer step: the distinct experts" in text


@torch.inference_mode()
def test_the_hf_mode_counts_no_experts() -> None:
    """transformers runs its own modules: the engine's routing ids are an earlier case's, so
    nothing is counted there and the uniform union stands in, in the Result and the table."""
    model = build_model(TINY, seed=1)
    cases = plan_cases(TINY, prompt_sets((1, 4), (5,), (), TINY.vocab_size, 0, ()),
                       ("eager", "hf"), 3)
    settings = GenerateRequest("random:tiny", sampling=GenerationConfig(max_new_tokens=3),
                               timing=Timing(repeats=1, warmup=0))
    base = {"dtype": "float32", "kv_dtype": "float32", "repeats": 1, "warmup": 0}
    results = loop.run_generation(model, cases, settings, {"device_name": "cpu"}, base, None)
    assert [(r.config["batch_size"], r.config["mode"]) for r in results] == \
        [(1, "eager"), (1, "hf"), (4, "eager"), (4, "hf")]
    for result in results:
        m, batch = result.metrics, result.config["batch_size"]
        if result.config["mode"] == "hf":
            assert m["moe_experts_per_step"] is None
            assert m["bytes_per_decode_step"] == pytest.approx(rl.mean_decode_step_bytes(
                TINY, batch, range(6, 8), "float32", "float32", 1, None))
        else:
            assert m["moe_experts_per_step"] is not None
    rows = [line.split() for line in render_generate(results).splitlines()
            if line.split()[3:4] == ["hf"]]
    assert [row[13] for row in rows] == ["-", "-"] and rows[1][14] == "5.47"


def test_a_dense_table_keeps_its_columns() -> None:
    dense = Result("generate", {"name": "llama-2-7b", "n_experts": 0},
                   {"batch_size": 1, "prompt_len": 8, "mode": "eager", "dtype": "fp16",
                    "kv_dtype": "fp16", "repeats": 1, "warmup": 0}, {"device_name": "gpu"},
                   {"bytes_per_decode_step": 1e9})
    text = render_generate([dense])
    header = next(line for line in text.splitlines() if line.startswith("batch"))
    assert header.split("  ")[0] == "batch" and not any(name in text for name in MOE_HEADER)
