"""The gathered-expert kernels (engine/kernels/expert_gemv.py, --moe-kernel triton).

Under Triton's CPU interpreter in a subprocess (tests/expert_gemv_worker.py): each kernel against
the torch gathered path's rounding points (several E, k and token counts, ragged tiles, experts
shared across tokens; float32, float16, bfloat16), a tensor-parallel rank's shards, the compiled
trace, and greedy tokens of tiny Qwen3-MoE and Mixtral models, Triton against torch. Here: the
PDL launches' PTX keeps pdl.py's rule, the choice reaches every MoE block and the Result, and the
A/B script's CPU check. No GPU: which is faster is benchmarks/moe_kernel_ab.py's to say.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from infermeter.engine.moe import MOE_KERNELS, MoEFeedForward, set_moe_kernel
from infermeter.specs.presets import PRESETS
from tests.test_peer_all_reduce import needs_triton
from tests.triton_interpreter import run_under_interpreter

WORKER = Path(__file__).with_name("expert_gemv_worker.py")
NAMED_KINDS = MOE_KERNELS[1:]  # torch's and Triton's; "auto" picks between them by batch
MIXTRAL = PRESETS["debug"].with_updates(name="tiny-mixtral", arch="mixtral", n_experts=4,
                                        n_active_experts=2, moe_ffn_dim=176)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_expert_kernels_under_the_triton_interpreter():
    run_under_interpreter(WORKER)


@needs_triton
def test_pdl_launches_wait_before_reading_anything(monkeypatch):
    """Every kernel launched with PDL at Qwen3-30B-A3B's shapes, compiled for sm_90 (so they
    build for a GPU at all): gate/up at 1 and 2 tokens, down with its weighted sum (1 token)
    and down's per-expert terms (2 tokens sharing experts); gpt-oss's (biases, the clamped
    SwiGLU with libdevice's expf) at its dim and ffn, 1 and 2 tokens. The wait comes before the
    release and before every global load (the ids say which rows to read)."""
    from infermeter.engine.kernels.expert_gemv import _experts_down, _experts_swiglu
    from tests.test_pdl import first, pdl_launches, pdl_ptx

    dtype = torch.bfloat16
    w13, w2 = torch.zeros(128, 768, 2048, dtype=dtype), torch.zeros(128, 2048, 768, dtype=dtype)
    calls = {}
    for n in (1, 2):
        x, ids = torch.zeros(n, 2048, dtype=dtype), torch.zeros(n, 8, dtype=torch.int64)
        act, weights = torch.zeros(n, 8, 768, dtype=dtype), torch.zeros(n, 8, dtype=dtype)
        calls[f"swiglu {n}"] = lambda x=x, ids=ids: _experts_swiglu(x, ids, w13, w13, pdl=True)
        calls[f"down {n}"] = lambda a=act, ids=ids, w=weights: _experts_down(a, ids, w, w2,
                                                                              pdl=True)
    # gpt-oss-20b's dim and ffn (4 of its 32 experts: only the launches are recorded)
    g13, g2 = torch.empty(4, 2880, 2880, dtype=dtype), torch.empty(4, 2880, 2880, dtype=dtype)
    b13, b2 = torch.empty(4, 2880, dtype=dtype), torch.empty(4, 2880, dtype=dtype)
    for n in (1, 2):
        x, ids = torch.zeros(n, 2880, dtype=dtype), torch.zeros(n, 4, dtype=torch.int64)
        act, weights = torch.zeros(n, 4, 2880, dtype=dtype), torch.zeros(n, 4, dtype=dtype)
        calls[f"gpt-oss swiglu {n}"] = lambda x=x, ids=ids: _experts_swiglu(
            x, ids, g13, g13, True, b13, b13, 7.0, 1.702)
        calls[f"gpt-oss down {n}"] = lambda a=act, ids=ids, w=weights: _experts_down(
            a, ids, w, g2, True, b2)
    for name, call in calls.items():
        (launch,) = pdl_launches(monkeypatch, call)
        if "LIBDEVICE" in launch[2]:  # built for a GPU: libdevice's expf, as on one
            launch[2]["LIBDEVICE"] = True
        lines, wait = pdl_ptx(launch, name)
        assert first(lines, "ld.global") > wait, name
        assert any("evict_first" in line for line in lines if "ld.global" in line), name


@torch.inference_mode()
def test_without_triton_where_the_model_runs_the_choice_changes_nothing():
    """On the CPU without the interpreter Triton cannot run: a model asked for "triton" or
    "auto" runs the torch path, the same logits; an unknown kind is refused."""
    from infermeter.engine.model import build_model

    tokens = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    logits = {}
    for kind in MOE_KERNELS:
        model = build_model(MIXTRAL, seed=1)
        set_moe_kernel(model, kind)
        assert {m.moe_kernel for m in model.modules() if isinstance(m, MoEFeedForward)} == {kind}
        model.setup_cache(1, 8)
        outs = [model(tokens[:, :4], torch.arange(4))]
        outs += [model(tokens[:, i:i + 1], torch.tensor([i])) for i in (4, 5)]
        logits[kind] = torch.cat(outs, dim=1)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert torch.equal(logits["triton"], logits["torch"])
        assert torch.equal(logits["auto"], logits["torch"])
    with pytest.raises(ValueError, match="unknown MoE kernel"):
        set_moe_kernel(model, "cutlass")


def test_moe_kernel_choice_reaches_every_block_and_the_result_says_what_ran(monkeypatch):
    """--moe-kernel: the CLI's choices are the engine's, "auto" by default; the runner sets
    every MoE block; the Result records the kind asked (config.moe_kernel_asked) and what the
    decode steps ran at each batch (config.moe_kernel): "triton" where the Triton kernels run,
    eager or compiled ("triton": the gathered kernels while batch x k <= E, the grouped ones
    past that; "auto": at batch 1 and past E / k only, torch's gathered indexing between),
    "torch" otherwise, both where batches differ, and nothing for a model without experts."""
    from infermeter.cli import build_parser
    from infermeter.commands.generate import MOE_KERNEL as CLI_DEFAULT
    from infermeter.commands.generate import MOE_KERNELS as CLI_KINDS
    from infermeter.engine import moe as moe_module
    from infermeter.engine.checkpoint.load import load_weights
    from infermeter.engine.model import build_model
    from infermeter.generate.cases import plan_cases, prompt_sets
    from infermeter.generate.modes import EngineRunner
    from infermeter.generate.request import EngineChoices, GenerateRequest

    assert CLI_KINDS == MOE_KERNELS and CLI_DEFAULT == moe_module.MOE_KERNEL == "auto"
    assert EngineChoices().moe_kernel == "auto"
    assert build_parser().parse_args(["generate", "--model", "debug"]).moe_kernel == "auto"
    assert build_parser().parse_args(["generate", "--model", "debug", "--moe-kernel",
                                      "torch"]).moe_kernel == "torch"
    model = build_model(MIXTRAL, seed=0)  # 4 experts, 2 a token
    sets = prompt_sets((1,), (4,), (), MIXTRAL.vocab_size, 0, ())
    # (kind asked, batches) -> what the Result says the steps ran where Triton runs
    ran = {("triton", (1, 2)): "triton", ("triton", (3,)): "triton",
           ("auto", (1,)): "triton", ("auto", (2,)): "torch", ("auto", (1, 2)): "triton/torch",
           ("auto", (3,)): "triton", ("torch", (1,)): "torch"}
    for mode in ("compiled", "eager"):
        (case,) = plan_cases(MIXTRAL, sets, (mode,), 4, None, None)
        for (kind, batches), want in ran.items():
            request = GenerateRequest("random:tiny", engine=EngineChoices(moe_kernel=kind))
            runner = EngineRunner(model, case, request)
            assert {m.moe_kernel for m in model.modules()
                    if isinstance(m, MoEFeedForward)} == {kind}
            monkeypatch.setattr(moe_module, "triton_runs_on", lambda x: True)
            runner.batch_sizes = list(batches)
            described = runner.describe()
            assert (described["moe_kernel"], described["moe_kernel_asked"]) == (want, kind), \
                (mode, kind, batches)
            monkeypatch.setattr(moe_module, "triton_runs_on", lambda x: False)
            assert runner.describe()["moe_kernel"] == "torch", mode  # no Triton here
    dense = load_weights("random:debug", "cpu", "float32")
    (case,) = plan_cases(PRESETS["debug"], sets, ("compiled",), 4, None, None)
    described = EngineRunner(dense, case, GenerateRequest("random:tiny")).describe()
    assert described["moe_kernel"] is None and described["moe_kernel_asked"] is None


def test_auto_takes_triton_at_one_token_and_past_e_over_k_only():
    """uses_triton: "triton" at every count, "torch" at none, "auto" at one token and where
    N x k passes E (Qwen3-30B-A3B: 128 experts, 8 a token: 1 and 17 up, not 2 to 16)."""
    from infermeter.engine.moe import uses_triton

    assert all(uses_triton("triton", n, 8, 128) for n in (1, 4, 16, 17, 64))
    assert not any(uses_triton("torch", n, 8, 128) for n in (1, 4, 16, 17, 64))
    assert [n for n in range(1, 20) if uses_triton("auto", n, 8, 128)] == [1, 17, 18, 19]
    # a count the GPU has measured tiles for: "auto" takes Triton's there too, "torch" never
    assert [n for n in range(1, 20) if uses_triton("auto", n, 8, 128, tuned=n == 4)] == [
        1, 4, 17, 18, 19]
    assert not uses_triton("torch", 4, 8, 128, tuned=True)


def test_auto_takes_triton_at_the_token_counts_its_gpu_has_tiles_for(monkeypatch):
    """tiled_token_counts: the counts EXPERT_TOKEN_TILES holds for the device's GPU at both
    kernels' widths (the H100's four tokens at Qwen3-30B-A3B's 2048 and 768 columns; none at
    another width or GPU); a block's tiled_tokens then take "auto" to Triton at four tokens
    (takes_expert_kernel, what the Result records); the Generator notes them, and off a GPU
    there are none."""
    from infermeter.engine import generator as generator_module
    from infermeter.engine import moe as moe_module
    from infermeter.engine.generator import Generator
    from infermeter.engine.kernels import expert_gemv
    from infermeter.engine.moe import MoEFeedForward, takes_expert_kernel

    h100 = "NVIDIA H100 80GB HBM3"
    monkeypatch.setattr(expert_gemv, "gpu_name", lambda device: h100)
    cuda = torch.device("cuda")
    assert expert_gemv.tiled_token_counts(cuda, 2048, 768) == {4}
    assert expert_gemv.tiled_token_counts(cuda, 2048, 1536) == frozenset()  # down's width
    monkeypatch.setattr(expert_gemv, "gpu_name", lambda device: "NVIDIA H200")
    assert expert_gemv.tiled_token_counts(cuda, 2048, 768) == frozenset()
    from infermeter.engine.model import build_model

    spec = PRESETS["debug"].with_updates(  # a Qwen3-MoE of 8 experts, 2 a token: E / k = 4
        arch="qwen3_moe", n_layers=2, head_dim=32, qk_norm=True, n_experts=8,
        n_active_experts=2, moe_ffn_dim=48, norm_topk_prob=True)
    model = build_model(spec, seed=7)
    block = next(m for m in model.modules() if isinstance(m, MoEFeedForward))
    monkeypatch.setattr(moe_module, "triton_runs_on", lambda x: True)
    assert [n for n in range(1, 6) if takes_expert_kernel(block, n)] == [1, 5]
    block.tiled_tokens = frozenset({3})
    assert [n for n in range(1, 6) if takes_expert_kernel(block, n)] == [1, 3, 5]
    noted = []
    monkeypatch.setattr(generator_module, "note_token_tiles", noted.append)
    Generator(model)
    assert noted == [model]
    moe_module.note_token_tiles(model)  # on the CPU: no GPU, no counts
    assert block.tiled_tokens == frozenset()


def _decode_unions(calls: list[tuple[int, int]], n_layers: int, prompt: int,
                   batches: tuple[int, ...]) -> list[tuple[int, float]]:
    """From the router calls in order ((rows, distinct experts) each, n_layers a forward): per
    run of consecutive cases (batch, the mean distinct experts a layer and decode step of that
    case's last run, generate's counting run)."""
    forwards = [calls[i:i + n_layers] for i in range(0, len(calls), n_layers)]
    runs: list[tuple[int, list[float]]] = []  # (batch, per decode step: mean over layers)
    for forward in forwards:
        rows = forward[0][0]
        prefill = [b for b in batches if rows == b * prompt]
        if prefill:
            runs.append((prefill[0], []))
        else:
            assert rows == runs[-1][0], (rows, runs[-1][0])  # a decode step of that batch
            runs[-1][1].append(sum(n for _, n in forward) / n_layers)
    counted: list[tuple[int, float]] = []
    for i, (batch, steps) in enumerate(runs):
        if i + 1 == len(runs) or runs[i + 1][0] != batch:  # a case's last run
            counted.append((batch, sum(steps) / len(steps)))
    return counted


def test_the_ab_script_runs_both_kernels_at_each_batch_and_summarises_them(tmp_path,
                                                                          monkeypatch):
    """benchmarks/moe_kernel_ab.py's CPU check: a request per kind is each MoE model's compiled
    decode at batch 1 and 4 (both gathered: 4 x k <= E); run here eagerly on a tiny random
    Mixtral of 8 experts, torch then triton append a Result per batch, labelled with the kernel
    asked for, with the experts its steps touched (recomputed from the top k of every router
    call's logits), and the summary has a row for each and triton / torch per batch."""
    from infermeter.engine.checkpoint.load import save_checkpoint
    from infermeter.engine.model import build_model
    from infermeter.measure.env import capture_env
    from infermeter.measure.result import read_results
    from tests.benchmark_scripts import load_benchmark

    script = load_benchmark("moe_kernel_ab")
    assert tuple(script.KINDS) == NAMED_KINDS
    for model, dtype in script.MODELS.items():
        spec = PRESETS[model]
        # every batch but the last gathered; the last grouped (its pairs outnumber the experts)
        *gathered, grouped = script.BATCHES
        assert all(batch * spec.n_active_experts <= spec.n_experts for batch in gathered)
        assert grouped * spec.n_active_experts > spec.n_experts
        request = script.ab_request(model, "triton")
        assert (request.source, request.dtype, request.modes, request.batch_sizes) == \
            (f"random:{model}", dtype, ("compiled",), script.BATCHES)
        assert request.engine.moe_kernel == "triton" and request.timing.roofline
    tiny = MIXTRAL.with_updates(n_experts=8)  # batch 4 gathered, 32 grouped, as the real models
    source, gen = build_model(tiny, seed=0), torch.Generator().manual_seed(0)
    for layer in source.layers:  # a wide router: tokens spread over the experts
        torch.nn.init.normal_(layer.feed_forward.gate.weight, std=1.0, generator=gen)
    save_checkpoint(source, tmp_path / "tiny", "hf")
    calls: list[tuple[int, int]] = []  # per router call: rows, distinct top-k experts
    route = MoEFeedForward.route

    def recording_route(self, x):
        calls.append((x.shape[0], self.gate(x).topk(self.top_k, dim=-1).indices.unique().numel()))
        return route(self, x)

    monkeypatch.setattr(MoEFeedForward, "route", recording_route)
    path, prompt = tmp_path / "ab.jsonl", 3  # a prefill's rows (3 B) are never a step's (B)
    script.run_model("mixtral-8x7b", 1, path, capture_env(), source=str(tmp_path / "tiny"),
                     device="cpu", dtype="float32", modes=("eager",), prompt_lens=(prompt,),
                     max_new_tokens=3, max_seq_len=8, repeats=2, warmup=0, roofline=False)
    results = read_results(path)
    assert [(r.config["ab"]["kernel"], r.config["batch_size"]) for r in results] == \
        [(kind, batch) for kind in NAMED_KINDS for batch in script.BATCHES]
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert {r.config["moe_kernel"] for r in results} == {"torch"}  # no Triton here
    assert all(len(script.run_tpots(r)) == 2 for r in results)
    counted = _decode_unions(calls, tiny.n_layers, prompt, script.BATCHES)
    assert [batch for batch, _ in counted] == [r.config["batch_size"] for r in results]
    assert [r.metrics["moe_experts_per_step"] for r in results] == \
        pytest.approx([union for _, union in counted], rel=1e-12)
    assert [union for batch, union in counted if batch == 1] == [tiny.n_active_experts] * 2
    assert all(union > tiny.n_active_experts for batch, union in counted if batch > 1)
    text = script.summary(results)
    name = results[0].model["name"]
    rows = [line.split() for line in text.splitlines()
            if line.startswith(f"{name} ") and "triton / torch" not in line]
    assert [(row[2], row[3]) for row in rows] == [(str(b), k) for k in NAMED_KINDS
                                                  for b in script.BATCHES], text
    for batch in script.BATCHES:
        assert f"{name} batch {batch}: triton / torch TPOT" in text, text


def test_the_ab_script_times_only_the_kernels_and_batches_asked_for(monkeypatch, tmp_path):
    """--kernels and --batches (a case compiles for minutes at Qwen3-30B-A3B: a 10-minute
    command holds about three): each round requests only the kernels asked for, in their order,
    each at only the batches asked for; the defaults are every kernel at every batch."""
    from tests.benchmark_scripts import load_benchmark

    script = load_benchmark("moe_kernel_ab")
    asked = script.arguments().parse_args(["--kernels", "triton", "--batches", "32", "1"])
    assert (asked.kernels, sorted(asked.batches)) == (["triton"], [1, 32])
    default = script.arguments().parse_args([])
    assert (tuple(default.kernels), tuple(default.batches)) == (NAMED_KINDS, script.BATCHES)
    with pytest.raises(SystemExit):
        script.arguments().parse_args(["--batches", "2"])
    ran: list[tuple[str, tuple[int, ...], int]] = []
    monkeypatch.setattr(script, "run_ab_case", lambda request, env, path, model, kind, round_,
                        key, ran_key: ran.append((kind, request.batch_sizes, round_)))
    script.run_model("qwen3-30b-a3b", 2, tmp_path / "ab.jsonl", {}, kinds=("triton", "torch"),
                     batches=(1,), device="cpu")
    assert ran == [("triton", (1,), 0), ("torch", (1,), 0), ("triton", (1,), 1),
                   ("torch", (1,), 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b", "gpt-oss-20b"])
def test_expert_kernels_on_cuda_match_the_torch_path(name):
    """On a GPU, one layer's experts of the real model at its shapes (bf16, random weights;
    gpt-oss's biases and clamped SwiGLU), batch 1 and 4, plain and PDL launches: the Triton
    path within rounding of the torch gathered path (both against the float32 products'
    scale)."""
    from infermeter.engine.kernels import pdl
    from tests.test_pdl import launch_ways

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    spec = PRESETS[name]
    dim, hidden, n_experts, top_k = spec.dim, spec.moe_ffn_dim, spec.n_experts, \
        spec.n_active_experts
    gen = torch.Generator(device="cuda").manual_seed(0)
    moe = MoEFeedForward(dim, hidden, n_experts, top_k, True, spec.moe_bias, spec.swiglu_alpha,
                         spec.swiglu_limit).to("cuda", torch.bfloat16)
    for param in moe.parameters():
        param.data = (torch.randn(param.shape, device="cuda", generator=gen)
                      / param.shape[-1] ** 0.5).to(torch.bfloat16)
    with torch.inference_mode():
        for batch in (1, 4):
            x = torch.randn(batch, dim, device="cuda", generator=gen).to(torch.bfloat16)
            weights, ids = moe.route(x)
            moe.moe_kernel = "torch"
            want = moe.gathered(x, weights, ids).float()
            moe.moe_kernel = "triton"
            for pdl_on in launch_ways(x.device):
                with pdl.launching(pdl_on):
                    got = moe.gathered(x, weights, ids).float()
                err = (got - want).abs().max().item()
                assert err <= 4 * 2 ** -8 * want.abs().max().item(), (batch, pdl_on, err)


def test_the_report_takes_the_experts_asked_for_the_default():
    """Since 2026-12-06 a Result records the experts' kind asked (config.moe_kernel_asked):
    "auto" (the default) is the representative whatever it ran, a kind named is an A/B run.
    That day's earlier Results are judged by what "auto" runs at their batch. Before
    (unrecorded), torch's experts were the default: a Triton Result of then is an A/B run, and
    a column is represented by the torch one. No experts: the default."""
    from infermeter.engine.moe import MOE_KERNEL
    from infermeter.report.select import (
        DEFAULT_MOE_KERNEL,
        Column,
        ColumnKey,
        off_default_kernels,
        pick_generate,
    )
    from tests.report_records import seed_record

    assert DEFAULT_MOE_KERNEL == MOE_KERNEL == "auto"
    torch_run, triton_run = seed_record(1, moe_kernel="torch"), seed_record(2, moe_kernel="triton")
    assert off_default_kernels(triton_run) and not off_default_kernels(torch_run)
    assert not off_default_kernels(seed_record(3))
    assert not off_default_kernels(seed_record(4, moe_kernel=None))
    assert pick_generate(Column(ColumnKey("gpu", "m", 1), generates=[triton_run, torch_run])) \
        is torch_run
    auto_now = seed_record(5, moe_kernel="triton", moe_kernel_asked="auto")
    named_now = seed_record(6, moe_kernel="triton", moe_kernel_asked="triton")
    assert not off_default_kernels(auto_now) and off_default_kernels(named_now)
    assert not off_default_kernels(seed_record(7, moe_kernel="torch", moe_kernel_asked="auto"))
    assert off_default_kernels(seed_record(8, moe_kernel="torch", moe_kernel_asked="torch"))
    assert pick_generate(Column(ColumnKey("gpu", "m", 1), generates=[named_now, auto_now])) \
        is auto_now
    # made on 2026-12-06 before the asked kind was recorded (moe_fused_step present): judged by
    # what "auto" runs at the batch, Triton's at 1 and past E / k, torch's between
    model = {"name": "m", "n_experts": 128, "n_active_experts": 8}

    def that_day(line: int, kernel: str, batch: int):
        record = seed_record(line, moe_kernel=kernel, moe_fused_step=True, batch_size=batch)
        return replace(record, model=model)

    assert not off_default_kernels(that_day(9, "triton", 1))
    assert off_default_kernels(that_day(10, "torch", 1))
    assert not off_default_kernels(that_day(11, "torch", 4))
    assert off_default_kernels(that_day(12, "triton", 4))
    assert not off_default_kernels(that_day(13, "triton", 32))


@pytest.mark.gpu
def test_inductor_compiles_the_expert_ops_on_cuda():
    """On a GPU, a tiny Mixtral MoE block (8 experts) with the Triton choice compiled by inductor
    (fullgraph) at 1 and 3 tokens (the down kernel's weighted sum; then its per-expert terms and
    the torch sum inside the op): the eager block's output within bf16 rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from infermeter.engine.model import build_model

    spec = MIXTRAL.with_updates(n_experts=8)
    moe = build_model(spec, device="cuda", dtype=torch.bfloat16, seed=0).layers[0].feed_forward
    moe.moe_kernel = "triton"
    gen = torch.Generator(device="cuda").manual_seed(1)
    with torch.inference_mode():
        for n_tokens in (1, 3):
            x = torch.randn(n_tokens, 1, spec.dim, device="cuda", generator=gen).to(torch.bfloat16)
            want = moe(x).float()
            got = torch.compile(moe, fullgraph=True, dynamic=False)(x).float()
            assert (got - want).abs().max().item() <= 4 * 2 ** -8 * want.abs().max().item()
            torch._dynamo.reset()
