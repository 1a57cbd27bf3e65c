"""Tensor parallelism on CPU: gloo ranks spawned by the tests, checked against tp 1.

Multi-process tests run the real code path (torchrun's environment, init_distributed, sharded
loading, collectives in forward hooks) with 2 and 4 gloo ranks; every one has a timeout, so a
hang fails a test instead of blocking CI. Loading is also checked in one process, rank by rank,
where it needs no process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from infermeter.cli import main as cli_main
from infermeter.engine.checkpoint import hf, meta
from infermeter.engine.checkpoint.load import load_model, load_weights, save_checkpoint
from infermeter.engine.parallel.group import TensorParallel, init_distributed
from infermeter.engine.parallel.sharding import ShardPlan, shard_model
from infermeter.errors import InfermeterError
from infermeter.measure.ranks import slowest
from infermeter.specs import sizes
from infermeter.specs.presets import PRESETS
from tests.tp_workers import compare_with_tp1, run_ranks

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
DEBUG = PRESETS["debug"]  # 2 layers, dim 64, 4 query heads / 2 KV heads of 16, ffn 176, vocab 256
SPECS = {
    "mha": DEBUG.with_updates(n_kv_heads=4),
    "gqa": DEBUG,
    "mqa": DEBUG.with_updates(n_kv_heads=1),  # tp 2 > 1 KV head: replicated on both ranks
    "tied-bias": DEBUG.with_updates(arch="qwen2", qkv_bias=True, tie_embeddings=True),
    "window": DEBUG.with_updates(arch="mistral", sliding_window=5, sliding_window_layers=(1,)),
    # q/k norms per head (replicated on every rank), head_dim 32 != dim 64 / 4 heads.
    "qwen3": DEBUG.with_updates(arch="qwen3", qk_norm=True, head_dim=32, norm_eps=1e-6),
    # Gemma 3: layer 0 slides (local RoPE base), layer 1 is global; 4 norms a layer, q/k norms,
    # tied embeddings, q rescaled (24 != head_dim 32), soft-capped logits.
    "gemma3": DEBUG.with_updates(arch="gemma3_text", qk_norm=True, head_dim=32, norm_eps=1e-6,
                                 tie_embeddings=True, sliding_window=5, sliding_window_layers=(0,),
                                 norms_per_layer=4, rope_local_theta=10000.0,
                                 query_pre_attn_scalar=24.0, final_logit_softcap=30.0),
    # Gemma 2: layer 0 slides, layer 1 is global, one RoPE base, no q/k norms; attention scores
    # capped (each rank caps its own heads' scores).
    "gemma2": DEBUG.with_updates(arch="gemma2", head_dim=32, norm_eps=1e-6, tie_embeddings=True,
                                 sliding_window=5, sliding_window_layers=(0,), norms_per_layer=4,
                                 query_pre_attn_scalar=24.0, final_logit_softcap=30.0,
                                 attn_logit_softcap=0.05),
    # Mixtral: 4 experts of 176 a layer, 2 per token; each rank holds every expert's half.
    "moe": DEBUG.with_updates(arch="mixtral", n_experts=4, n_active_experts=2, moe_ffn_dim=176),
    # gpt-oss: sinks split by head, q/k/v and o_proj biases, YaRN, layer 0 slides; 4 biased
    # experts of 32, 2 a token, clamped SwiGLU; only rank 0 adds the o_proj and down biases.
    "gpt-oss": PRESETS["gpt-oss-20b"].with_updates(
        name="gpt-oss-tiny", n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=16,
        vocab_size=256, n_experts=4, n_active_experts=2, moe_ffn_dim=32, sliding_window=5,
        sliding_window_layers=(0,), max_seq_len=64),
}
WIDE = DEBUG.with_updates(name="wide", n_heads=8, n_kv_heads=2, head_dim=8)  # tp 4 > 2 KV heads


def ranks(world: int) -> list[TensorParallel]:
    """Each rank's place without a process group: enough to load and inspect, not to run."""
    return [TensorParallel(rank, world, rank, CPU) for rank in range(world)]


def assert_slices_of(full, shard, plan: ShardPlan) -> None:
    full_state = full.state_dict()
    for name, tensor in shard.state_dict().items():
        assert torch.equal(tensor, plan.narrow(name, full_state[name])), name


# ---- the plan ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_heads,n_kv,tp", [(4, 4, 2), (4, 2, 2), (4, 1, 2), (8, 2, 4),
                                             (8, 2, 8), (8, 8, 4), (32, 8, 8), (64, 8, 8)])
def test_every_query_head_finds_its_kv_head(n_heads: int, n_kv: int, tp: int) -> None:
    spec = DEBUG.with_updates(n_heads=n_heads, n_kv_heads=n_kv, head_dim=8)
    group = n_heads // n_kv
    for rank in range(tp):
        plan = ShardPlan(spec, rank, tp)
        (q0, nq), (k0, nk) = plan.heads, plan.kv_heads
        assert nq == n_heads // tp and nk == sizes.kv_heads_per_rank(spec, tp)
        for head in range(q0, q0 + nq):
            # The model folds local query head i onto local KV head i // (nq / nk).
            assert k0 + (head - q0) // (nq // nk) == head // group


def test_plan_refuses_what_does_not_split() -> None:
    with pytest.raises(InfermeterError, match="tp=3 does not divide"):
        ShardPlan(DEBUG, 0, 3)
    with pytest.raises(InfermeterError, match="vocabulary"):
        ShardPlan(DEBUG.with_updates(vocab_size=251), 0, 2)
    ShardPlan(DEBUG.with_updates(vocab_size=251, tie_embeddings=True), 1, 2)  # split by features
    with pytest.raises(InfermeterError, match="torchrun"):
        init_distributed("cpu", tp=2)  # not under torchrun


def test_tp_must_match_the_processes_torchrun_started(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(InfermeterError, match="--tp 4, but torchrun started 2"):
        init_distributed("cpu", tp=4)


# ---- loading each rank's shard (one process, no process group) --------------------------------
@pytest.mark.parametrize("name,world", [("gqa", 2), ("mqa", 2), ("tied-bias", 2), ("gqa", 4),
                                        ("window", 4), ("moe", 2), ("gpt-oss", 4)])
def test_random_weights_at_tp_are_slices_of_tp1(name: str, world: int) -> None:
    spec = SPECS[name]
    full = load_weights(spec, seed=3)
    for parallel in ranks(world):
        shard = load_weights(spec, seed=3, parallel=parallel)
        assert_slices_of(full, shard, shard.shard_plan)
        assert shard.layers[0].attention.n_heads == spec.n_heads // world
        if spec.tie_embeddings:
            assert shard.output.weight is shard.tok_embeddings.weight


@pytest.mark.parametrize("name,world", [(n, 2) for n in SPECS] + [("gqa", 4), ("mqa", 4),
                                                                  ("gpt-oss", 4)])
def test_cache_and_weights_per_rank_equal_kvsize(name: str, world: int) -> None:
    spec = SPECS[name]
    for parallel in ranks(world):
        model = load_model(spec, max_batch_size=3, max_seq_len=11, parallel=parallel)
        assert model.cache_bytes() == sizes.kv_cache_bytes(spec, 3, 11, "float32", world)
        weights = sum(t.nbytes for t in model.parameters())
        assert weights == sizes.weight_bytes_per_rank(spec, "float32", world)


def test_sharding_a_loaded_model_rebuilds_its_cache() -> None:
    model = load_model(DEBUG, max_batch_size=2, max_seq_len=8)
    shard_model(model, 1, 2)
    assert model.cache_bytes() == sizes.kv_cache_bytes(DEBUG, 2, 8, "float32", 2)
    with pytest.raises(InfermeterError, match="already sharded"):
        shard_model(model, 1, 2)


@pytest.fixture(scope="module")
def meta_folders(tmp_path_factory) -> dict[str, Path]:
    wide4 = DEBUG.with_updates(name="wide4", n_heads=8, n_kv_heads=4, head_dim=8)
    out = {}
    for key, spec, n in (("gqa-1", DEBUG, 1), ("gqa-2", DEBUG, 2), ("wide-2", WIDE, 2),
                         ("wide4-4", wide4, 4)):
        out[key] = tmp_path_factory.mktemp(key)
        save_checkpoint(load_weights(spec, seed=5), out[key], "meta", n_shards=n)
    return out


def _record_meta_opens(monkeypatch) -> dict[str, dict]:
    opened: dict[str, dict] = {}
    real = meta.load_pth

    def recording(path):
        opened[Path(path).name] = real(path)
        return opened[Path(path).name]
    monkeypatch.setattr(meta, "load_pth", recording)
    return opened


def test_meta_with_one_shard_per_rank_loads_its_file_only(meta_folders, monkeypatch) -> None:
    folder = meta_folders["gqa-2"]
    for parallel in ranks(2):
        opened = _record_meta_opens(monkeypatch)
        shard = load_weights(folder, parallel=parallel)
        assert list(opened) == [f"consolidated.{parallel.rank:02d}.pth"]
        state = opened[f"consolidated.{parallel.rank:02d}.pth"]
        for name, tensor in shard.state_dict().items():
            # Not merged, not even copied: the parameter is the file's own (mmap'd) tensor.
            assert tensor.untyped_storage().data_ptr() == state[name].untyped_storage(
                ).data_ptr(), name


@pytest.mark.parametrize("key,world,files", [
    ("gqa-1", 2, [["00"], ["00"]]),                    # one file, two ranks
    ("wide-2", 4, [["00"], ["00"], ["01"], ["01"]]),   # two files, four ranks (KV replicated)
    ("wide4-4", 2, [["00", "01"], ["02", "03"]]),      # four files, two ranks
])
def test_meta_reshards_other_counts(meta_folders, monkeypatch, key, world, files) -> None:
    full = load_weights(meta_folders[key])
    for parallel, names in zip(ranks(world), files):
        opened = _record_meta_opens(monkeypatch)
        shard = load_weights(meta_folders[key], parallel=parallel)
        assert sorted(opened) == [f"consolidated.{n}.pth" for n in names]
        assert_slices_of(full, shard, shard.shard_plan)


@pytest.mark.parametrize("name", ["gqa", "mqa", "tied-bias", "qwen3", "gemma3", "gemma2", "moe"])
def test_hf_ranks_read_only_their_slices(name: str, tmp_path, monkeypatch) -> None:
    spec = SPECS[name]
    save_checkpoint(load_weights(spec, seed=4), tmp_path, "hf", n_shards=2)
    full = load_weights(tmp_path)
    whole_reads: list[str] = []
    real_open = hf._open

    class Recording:  # safe_open, noting every tensor read whole
        def __init__(self, path):
            self.handle = real_open(path)

        def get_tensor(self, hf_name):
            whole_reads.append(hf_name)
            return self.handle.get_tensor(hf_name)

        def __getattr__(self, attr):
            return getattr(self.handle, attr)
    monkeypatch.setattr(hf, "_open", Recording)
    for parallel in ranks(2):
        whole_reads.clear()
        shard = load_weights(tmp_path, parallel=parallel)
        assert_slices_of(full, shard, shard.shard_plan)
        # norms and MoE routers are replicated; everything else (experts too) is sliced
        assert whole_reads and all(n.endswith(("norm.weight", ".gate.weight"))
                                   for n in whole_reads), whole_reads


# ---- gloo ranks -------------------------------------------------------------------------------
def _check_ranks(results: list[dict], world: int) -> None:
    for rank, per_source in enumerate(results):
        for name, got in per_source.items():
            where = f"rank {rank}/{world}, {name}"
            assert got["diff"] < 1e-5, where
            assert got["fused_diff"] < 1e-5, where
            assert got["tokens_equal"], where
            assert got["cache_bytes"] == got["kvsize_bytes"], where
            assert got.get("compiled_equal", True), where


def test_two_ranks_match_tp1(meta_folders, tmp_path) -> None:
    save_checkpoint(load_weights(SPECS["tied-bias"], seed=6), tmp_path / "qwen2", "hf",
                    n_shards=2)
    gen = torch.Generator().manual_seed(7)
    for name in ("qwen3", "gemma3"):
        model = load_weights(SPECS[name], seed=6)
        with torch.no_grad():  # norms apart from 1: each rank must apply the whole q/k norm
            for param_name, param in model.named_parameters():
                if param_name.endswith("norm.weight"):
                    param.normal_(1.0, 0.2, generator=gen)
        save_checkpoint(model, tmp_path / name, "hf")
    # gpt-oss as transformers writes it, sinks and biases spread wide (test_gpt_oss.py's)
    from tests.hf_reference import tiny_hf_model
    from tests.test_gpt_oss import CONFIG, _spread, transformers

    tiny_hf_model(tmp_path / "gpt-oss", transformers.GptOssConfig(**CONFIG),
                  transformers.GptOssForCausalLM, _spread)
    sources = {**SPECS, "meta-2-files": str(meta_folders["gqa-2"]),
               "hf-qwen2": str(tmp_path / "qwen2"), "hf-qwen3": str(tmp_path / "qwen3"),
               "hf-gemma3": str(tmp_path / "gemma3"), "hf-gpt-oss": str(tmp_path / "gpt-oss")}
    results = run_ranks(compare_with_tp1, 2, sources,
                        ("gqa", "tied-bias", "hf-qwen3", "hf-gemma3", "moe", "gpt-oss"))
    _check_ranks(results, 2)
    assert set(results[0]) == set(sources)


def test_four_ranks_replicate_kv_heads_and_match_tp1(meta_folders) -> None:
    sources = {"wide": WIDE, "wide-meta-2-files": str(meta_folders["wide-2"])}
    _check_ranks(run_ranks(compare_with_tp1, 4, sources), 4)


# ---- the command line: --tp starts torchrun; failures and teardown ------------------------------
def _generate(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infermeter", "generate", "--model", "debug",
                           "--device", "cpu", "--max-new-tokens", "10", "--json", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_generate_tp2_equals_tp1_and_only_rank0_writes(tmp_path, capsys) -> None:
    output = tmp_path / "r.jsonl"
    start = time.monotonic()
    run = _generate("--tp", "2", "--output", str(output))
    assert run.returncode == 0, run.stderr
    assert time.monotonic() - start < 60  # started, ran and tore down: no hang
    assert cli_main(["generate", "--model", "debug", "--device", "cpu", "--max-new-tokens",
                     "10", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1 and len(output.read_text().splitlines()) == 1
    result = json.loads(lines[0])
    assert result["output_token_ids"] == alone["output_token_ids"]
    assert result["config"]["tp"] == 2 and alone["config"]["tp"] == 1
    assert len(result["metrics"]["per_rank"]) == 2
    assert not any("generated other tokens" in w for w in result["warnings"])
    assert "torch.distributed" not in run.stderr  # torchrun's agent logs stay off the terminal


def test_torchrun_by_hand_with_a_c10d_rendezvous(tmp_path) -> None:
    """What a run across hosts does (README: --nnodes / --rdzv-*), on one host: torchrun
    started by the user with a c10d rendezvous instead of --standalone, no --tp flag; the ranks
    take their world from torchrun's environment, only rank 0 prints and writes, tp = 2."""
    import socket

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output = tmp_path / "r.jsonl"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--nproc_per_node", "2", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "infermeter-test"]
    run = subprocess.run([*torchrun, "-m", "infermeter", "generate", "--model", "debug",
                          "--device", "cpu", "--max-new-tokens", "6", "--json", "--output",
                          str(output)], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    (line,) = run.stdout.strip().splitlines()  # rank 0's Result only
    assert output.read_text().splitlines() == [line]
    result = json.loads(line)
    assert result["config"]["tp"] == 2 and len(result["metrics"]["per_rank"]) == 2


def test_copy_tp2_moves_each_ranks_shard_at_once(tmp_path) -> None:
    output = tmp_path / "copy.jsonl"
    args = ["--device", "cpu", "--model", "llama-2-7b", "--seq-len", "64", "--layout", "engine",
            "--host", "pageable", "--direction", "d2h", "--method", "per-tensor", "--repeats",
            "2", "--warmup", "0", "--json", "--tp", "2", "--output", str(output)]
    run = subprocess.run([sys.executable, "-m", "infermeter", "copy", *args],
                         capture_output=True, text=True, timeout=90, cwd=REPO)
    assert run.returncode == 0, run.stderr
    (result,) = [json.loads(line) for line in run.stdout.splitlines()]  # one Result, rank 0's
    assert [json.loads(line) for line in output.read_text().splitlines()] == [result]
    shard = sizes.kv_cache_bytes(PRESETS["llama-2-7b"], 1, 64, "float16", 2)
    assert result["config"]["tp"] == 2 and "rank" not in result["config"]
    m = result["metrics"]
    assert m["kv_cache_bytes"] == shard and len(m["per_rank"]) == 2
    (case,) = m["cases"]
    ranks = case["per_rank"]
    assert [r["rank"] for r in ranks] == [0, 1] and case["ranks"] == 2
    assert all(r["bytes"] == r["bytes_moved"] == shard for r in ranks)
    assert [r["gbps"] for r in ranks] == [p["cases"][0]["gbps"] for p in m["per_rank"]]
    slowest_ms = max(r["moving_time_ms"] for r in ranks)
    assert case["moving_time_ms"] == slowest_ms
    assert case["gbps"] == min(r["gbps"] for r in ranks)
    assert case["total_bytes_moved"] == 2 * shard
    assert case["total_gbps"] == pytest.approx(2 * shard / slowest_ms / 1e6, rel=1e-12)
    label = "engine pageable d2h per-tensor"
    assert len(result["samples"][label]) == 2


def test_copy_tp2_ranks_start_every_case_together(tmp_path) -> None:
    """Under --tp every rank waits for the others before each case it times (one barrier per
    case, none more), so a late rank holds the other back; only rank 0 prints and writes, and
    its table shows each rank's GB/s and the total."""
    output = tmp_path / "copy.jsonl"
    args = ["--device", "cpu", "--model", "debug", "--seq-len", "16", "--layout", "engine",
            "contiguous", "--host", "seed", "pageable", "--direction", "d2h", "--method",
            "per-tensor", "staged", "--repeats", "2", "--warmup", "0", "--tp", "2",
            "--output", str(output)]
    from tests.tp_workers import copy_in_step

    late = 0.1
    runs = run_ranks(copy_in_step, 2, args, 1, late)
    assert [r["code"] for r in runs] == [0, 0], [r["stderr"] for r in runs]
    (result,) = [json.loads(line) for line in output.read_text().splitlines()]
    labels = [f"{c['layout']}{'/' + str(c['block_tokens']) if c['block_tokens'] else ''} "
              f"{c['host_memory']} {c['direction']} {c['method']}"
              for c in result["metrics"]["cases"]]
    assert len(labels) == 6 and len(result["metrics"]["skipped"]) == 2  # seed: per-tensor only
    for run in runs:
        kinds = [(e[0], e[1] if e[0] == "case" else None) for e in run["events"]]
        assert kinds == [pair for label in labels for pair in (("barrier", None),
                                                               ("case", label))]
    # Each case starts on rank 0 only after rank 1, late, has reached the barrier too.
    entered_1 = [e[1] for e in runs[1]["events"] if e[0] == "barrier"]
    started_0 = [e[2] for e in runs[0]["events"] if e[0] == "case"]
    assert all(start >= entered for start, entered in zip(started_0, entered_1, strict=True))
    assert runs[1]["stdout"] == "" and runs[1]["stderr"] == ""
    table = runs[0]["stdout"]
    assert "GB/s per rank" in table and "total GB/s" in table and "tp 2:" in table
    for case in result["metrics"]["cases"]:
        per_rank = " / ".join(f"{r['gbps']:.1f}" for r in case["per_rank"])
        assert f"{per_rank} " in table and f"{case['total_gbps']:.1f}" in table


def _copy_result(nbytes: int, ms: float, warnings: list[str]) -> Any:
    """A rank's copy Result whose only case moved nbytes in ms."""
    from infermeter.copy.diagnosis import targets
    from infermeter.measure.result import Result

    case = {"layout": "contiguous", "block_tokens": None, "host_memory": "pinned",
            "direction": "d2h", "method": "staged", "pieces": 1, "bytes": nbytes,
            "bytes_moved": nbytes, "moving_time_ms": ms, "gbps": nbytes / ms / 1e6,
            "link_pct": 100 * nbytes / ms / 1e6 / 63.0,
            "stats": {"median": ms, "p10": ms, "p90": ms, "cov": 0.0, "n": 2},
            "host_pinned": True, "verified": True}
    link = {"peak_gbps": 63.0, "numa_node": 0, "host_numa_nodes": 1}
    metrics = {"cases": [case], "skipped": [], "kv_cache_bytes": nbytes, "link_peak_gbps": 63.0,
               "link": link, "link_description": "PCIe Gen5 x16", "numa_node": 0,
               "host_numa_nodes": 1, "offload_ms": 1.0, "reload_ms": None,
               "targets": targets([case]), "diagnosis": []}
    config = {"batch_size": 1, "seq_len": 64, "kv_dtype": "float16", "tp": 1, "device": "cuda",
              "rank": 0}
    return Result("copy", {"name": "debug"}, config, {"device_name": "gpu"}, metrics,
                  samples={"contiguous pinned d2h staged": [ms, ms]}, warnings=warnings)


def test_merge_ranks_total_is_every_ranks_bytes_over_the_slowest_time() -> None:
    from infermeter.copy.job import CopyRequest
    from infermeter.copy.ranks import merge_ranks
    from infermeter.copy.table import render_copy
    from infermeter.measure.result import Result

    request = CopyRequest(DEBUG, seq_lens=(64,), kv_dtype="float16")
    shard = 1_000_000_000
    per_rank = [[_copy_result(shard, 40.0, ["shared", "only rank 0"])],
                [_copy_result(shard, 50.0, ["shared"])]]
    (merged,) = merge_ranks(request, per_rank)
    Result.from_dict(json.loads(merged.to_json()))  # valid JSON (no NaN), a valid Result
    assert merged.config["tp"] == 2 and "rank" not in merged.config
    (case,) = merged.metrics["cases"]
    assert case["per_rank"] == [
        {"rank": r, "bytes": shard, "bytes_moved": shard, "moving_time_ms": ms,
         "gbps": shard / ms / 1e6, "link_pct": pytest.approx(100 * shard / ms / 1e6 / 63.0)}
        for r, ms in ((0, 40.0), (1, 50.0))]
    assert case["total_bytes_moved"] == 2 * shard
    assert case["total_gbps"] == pytest.approx(40.0)  # 2 GB in the slowest rank's 50 ms
    assert case["total_gbps"] < sum(r["gbps"] for r in case["per_rank"])  # 25 + 20 = 45
    assert (case["slowest_rank"], case["ranks"], case["moving_time_ms"], case["gbps"]) == (
        1, 2, 50.0, pytest.approx(20.0))
    assert merged.samples == {"contiguous pinned d2h staged": [50.0, 50.0]}  # the slowest's
    assert merged.warnings == ["shared", "rank 0: only rank 0"]
    assert len(merged.metrics["per_rank"]) == 2
    assert merged.metrics["per_rank"][1]["cases"][0]["moving_time_ms"] == 50.0
    assert merged.metrics["offload_ms"] == pytest.approx(
        sizes.kv_cache_bytes(DEBUG, 1, 64, "float16") / (20.0 * 1e6))  # the slowest's GB/s
    text = render_copy(merged)
    assert "25.0 / 20.0" in text and "40.0" in text and "bytes a rank" in text
    assert "link rank 1: PCIe Gen5 x16" in text
    # A case one rank could not run counts the ranks that did, and says so.
    per_rank[1][0].metrics["cases"] = []
    (merged,) = merge_ranks(request, per_rank)
    (case,) = merged.metrics["cases"]
    assert case["ranks"] == 1 and case["total_gbps"] == pytest.approx(25.0)
    assert any("ran on rank 0 only" in w for w in merged.warnings)


def test_kv_under_torchrun_prints_on_rank_0_only(capsys) -> None:
    """cli.main answers kv (host-only) on rank 0 alone: under two torchrun ranks the table is
    printed once, as by one process."""
    args = ["kv", "--model", "debug", "--batch-size", "1", "2"]
    assert cli_main(args) == 0
    alone = capsys.readouterr().out
    code = ("from infermeter.launch import launch; "
            f"raise SystemExit(launch(2, {args!r}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert alone.count("debug: 2 layers") == 1 and run.stdout == alone


def _launch(mode: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    code = ("from infermeter.launch import launch; "
            f"raise SystemExit(launch(2, [{mode!r}], module='tests.tp_entry'))")
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=timeout, cwd=REPO)
    return run, time.monotonic() - start


def test_a_failing_rank_ends_all_ranks_with_its_error_once() -> None:
    run, seconds = _launch("fail")
    assert run.returncode == 2 and seconds < 30
    assert run.stderr.count("rank one broke on purpose") == 1, run.stderr
    assert "infermeter: error: rank 1: rank one broke on purpose" in run.stderr
    assert "Traceback" not in run.stderr and "rank 0 done" not in run.stdout
    run, seconds = _launch("bug")
    assert run.returncode == 1 and seconds < 30
    assert run.stderr.count("RuntimeError: an unexpected bug on rank one") == 1, run.stderr


def test_a_hanging_teardown_is_abandoned_and_the_run_still_exits() -> None:
    run, seconds = _launch("hang")
    assert run.returncode == 0, run.stderr
    assert "hang: rank 0 done" in run.stdout and seconds < 30
    assert "teardown did not finish in 1 s" in run.stderr


# ---- two GPUs (NCCL): run with `pytest -m gpu tests/test_parallel.py` on a 2-GPU host -------
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("mode", ["eager", "compiled", "compiled-one-shot", "eager-triton",
                                  "compiled-triton", "compiled-triton-unfused"])
def test_nccl_tp2_tokens_equal_tp1(mode: str) -> None:
    """float32 greedy tokens of the debug model: NCCL ranks (eager, or compiled with the
    collectives inside inductor's CUDA graph, NCCL's or symmetric-memory one-shot all-reduces,
    or the peer kernel's in both modes) against one GPU, eager."""
    def tokens(*extra: str) -> list:
        run = subprocess.run([sys.executable, "-m", "infermeter", "generate", "--model", "debug",
                              "--device", "cuda", "--dtype", "fp32", "--max-new-tokens", "24",
                              "--repeats", "1", "--warmup", "0", "--no-roofline", "--json",
                              *extra], capture_output=True, text=True, timeout=300, cwd=REPO)
        assert run.returncode == 0, run.stderr
        return [json.loads(line)["output_token_ids"] for line in run.stdout.splitlines()]
    base, _, all_reduce = mode.partition("-")
    how = ["--mode", base] + (["--tp-all-reduce", all_reduce] if all_reduce else [])
    assert tokens("--tp", "2", *how) == tokens("--mode", "eager")


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("extra", [("--mode", "eager"), ("--mode", "compiled"),
                                   ("--mode", "compiled", "--moe-kernel", "triton")])
def test_nccl_tp2_gpt_oss_tokens_equal_tp1(extra: tuple[str, ...], tmp_path) -> None:
    """A tiny transformers-written gpt-oss (test_gpt_oss.py's: sinks, biases, a sliding layer,
    clamped experts) at tp 2 on NCCL ranks, eager and compiled (the split-KV Triton decode
    kernel with each rank's sinks, the peer all-reduce fused with add and norm carrying rank
    0's biases; the expert kernels too): float32 greedy tokens equal one GPU's, eager."""
    from tests.hf_reference import tiny_hf_model
    from tests.test_gpt_oss import CONFIG, _spread, transformers

    tiny_hf_model(tmp_path, transformers.GptOssConfig(**CONFIG), transformers.GptOssForCausalLM,
                  _spread)

    def tokens(*args: str) -> list:
        run = subprocess.run([sys.executable, "-m", "infermeter", "generate", "--model",
                              str(tmp_path), "--device", "cuda", "--dtype", "fp32",
                              "--max-new-tokens", "24", "--repeats", "1", "--warmup", "0",
                              "--no-roofline", "--json", *args], capture_output=True,
                             text=True, timeout=300, cwd=REPO)
        assert run.returncode == 0, run.stderr
        return [json.loads(line)["output_token_ids"] for line in run.stdout.splitlines()]
    assert tokens("--tp", "2", *extra) == tokens("--mode", "eager")


# ---- small pieces -----------------------------------------------------------------------------
def test_one_shot_all_reduce_is_refused_where_it_cannot_run(capsys) -> None:
    """--tp-all-reduce one-shot: CUDA ranks only, tp >= 2, inductor only; each refusal is one
    clear line before any weights load."""
    from infermeter.commands.generate import ALL_REDUCE_KINDS
    from infermeter.engine.parallel.all_reduce import ALL_REDUCE_KINDS as ENGINE_KINDS
    from infermeter.engine.parallel.all_reduce import one_shot_compile_options
    from infermeter.generate.job import _all_reduce_options
    from infermeter.generate.request import build_request

    assert ALL_REDUCE_KINDS == ENGINE_KINDS
    from torch._inductor import config as inductor_config

    from infermeter.engine.parallel.all_reduce import ONE_SHOT_INDUCTOR_OPTIONS
    with inductor_config.patch(ONE_SHOT_INDUCTOR_OPTIONS):  # real options of this torch
        assert inductor_config.triton.cudagraph_trees is False
    cpu_ranks = TensorParallel(0, 2, 0, torch.device("cpu"))
    with pytest.raises(InfermeterError, match="needs CUDA GPUs"):
        one_shot_compile_options(cpu_ranks)
    one_shot = build_request(source="random:debug", tp_all_reduce="one-shot")
    assert _all_reduce_options(build_request(source="random:debug"), None) == {}
    with pytest.raises(InfermeterError, match="needs --tp 2 or more"):
        _all_reduce_options(one_shot, None)
    cudagraphs = build_request(source="random:debug", tp_all_reduce="one-shot",
                                 compile_backend="cudagraphs")
    with pytest.raises(InfermeterError, match="needs the inductor compile backend"):
        _all_reduce_options(cudagraphs, cpu_ranks)
    code = cli_main(["generate", "--model", "debug", "--device", "cpu", "--max-new-tokens", "2",
                     "--tp-all-reduce", "one-shot"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        "infermeter: error: --tp-all-reduce one-shot needs --tp 2 or more"]


def test_enable_symm_mem_silences_only_its_deprecation(monkeypatch) -> None:
    """torch 2.11+ warns that enable_symm_mem_for_group is deprecated, once per rank on every
    generate --tp run; the call stays (torch still takes it) with that warning silenced."""
    import warnings

    import torch.distributed._symmetric_memory as symm_mem

    from infermeter.engine.parallel.peer_all_reduce import enable_symm_mem

    calls = []

    def deprecated(group_name: str) -> None:  # as torch's, plus a warning that must get out
        calls.append(group_name)
        warnings.warn("`enable_symm_mem_for_group` is deprecated. There is no need to call "
                      "this function anymore.", FutureWarning, stacklevel=2)
        warnings.warn("something else", FutureWarning, stacklevel=2)
    monkeypatch.setattr(symm_mem, "enable_symm_mem_for_group", deprecated)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        enable_symm_mem("0")
    assert calls == ["0"] and [str(w.message) for w in seen] == ["something else"]


def test_slowest_rank_rules() -> None:
    ranks_metrics = [{"ttft_ms": 5.0, "decode_tok_per_s": 100.0, "tpot_ms": {"p50": 2.0},
                      "ttft_stats": {"median": 5.0}, "total_tokens": 8, "ok": True},
                     {"ttft_ms": 7.0, "decode_tok_per_s": 90.0, "tpot_ms": {"p50": 3.0},
                      "ttft_stats": {"median": 4.0}, "total_tokens": 8, "ok": False}]
    merged = slowest(ranks_metrics)
    assert merged == {"ttft_ms": 7.0, "decode_tok_per_s": 90.0, "tpot_ms": {"p50": 3.0},
                      "ttft_stats": {"median": 5.0}, "total_tokens": 8, "ok": True}


def test_dry_run_prints_the_per_rank_plan(capsys) -> None:
    spec = PRESETS["llama-2-70b"]
    args = ["generate", "--model", "llama-2-70b", "--dry-run", "--gpu-memory", "80GiB",
            "--batch-size", "16", "--max-seq-len", "4096"]
    for tp in (4, 8):
        assert cli_main([*args, "--tp", str(tp), "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        weights = sizes.weight_bytes_per_rank(spec, "bfloat16", tp)
        cache = sizes.kv_cache_bytes(spec, 16, 4096, "bfloat16", tp)
        assert (plan["weight_bytes_per_rank"], plan["kv_cache_bytes_per_rank"]) == (weights,
                                                                                    cache)
        prefill = plan["prefill_activation_bytes_per_rank"]
        assert prefill == 16 * 6 * (spec.vocab_size * 6 + 3 * spec.ffn_dim // tp * 2)
        # auto's Triton all-reduce: flags, then 2 sites a layer x tp slots of 256 KiB
        peer = plan["all_reduce_buffer_bytes_per_rank"]
        assert peer == 2 * 80 * tp * 256 * 1024 + 2 * 80 * 128 * 4
        assert plan["headroom_bytes"] == 80 * 2**30 - weights - cache - prefill - peer
    assert cli_main([*args, "--tp", "4", "--tp-all-reduce", "nccl", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["all_reduce_buffer_bytes_per_rank"] == 0
    assert cli_main(["generate", "--model", "llama-2-13b", "--dry-run", "--gpu-memory", "80GiB",
                     "--tp", "2"]) == 0
    assert "all-reduce buffer (Triton kernels' symmetric memory)  41,984,000 (40.0 MiB)" \
        in capsys.readouterr().out
    assert cli_main([*args, "--tp", "1"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "symmetric memory)  0 (0 B)" in out


def test_the_harness_retries_one_abort_and_no_more(tmp_path) -> None:
    """run_ranks' single retry (see its docstring) is for one SIGABRT; a second one fails."""
    import torch.multiprocessing as mp

    from tests.tp_workers import abort_always, abort_once

    marker = tmp_path / "aborted-once"
    assert run_ranks(abort_once, 2, str(marker)) == [0, 1] and marker.exists()
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        run_ranks(abort_always, 2)
