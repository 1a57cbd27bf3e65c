"""Traces and the decode-step breakdown (issue 8), on the CPU: a synthetic GPU trace with known
kernels, gaps and copies (exact shares and GB/s), a real torch.profiler trace of the debug model
through `generate --trace`, `copy --trace`, `infermeter trace`, NVTX as no-ops, bad files; the
kernel names of compiled steps (an MoE model's expert products included)."""

import json

import pytest
import torch

from infermeter.cli import main
from infermeter.engine.model import build_model
from infermeter.generate.modes import StepRanges
from infermeter.measure import breakdown as bd
from infermeter.measure import nvtx
from infermeter.specs.presets import PRESETS

# (label range start, dur, label) on the host thread, and per kernel: (launch ts, name,
# kernel start, kernel dur). Step: kernels 1000..1100 us, busy 87 us, 4 gaps of 2+3+3+5 us.
RANGES = [(0, 100, "decode_step"), (1, 80, "model"), (2, 5, "qkv"), (10, 10, "attention"),
          (25, 5, "o"), (31, 3, "norm"), (35, 5, "gate_up"), (41, 4, "down"),
          (50, 5, "lm_head"), (300, 50, "copy pinned d2h")]
KERNELS = [(3, "sm90_gemv_kernel", 1000, 10), (11, "flash_fwd_kernel", 1012, 8),
           (12, "elementwise_kernel<MulFunctor<float>>", 1020, 2),
           (26, "gemv2T_kernel", 1025, 5), (27, "ncclDevKernel_AllReduce_Sum_f16", 1030, 10),
           (32, "rms_norm_kernel", 1040, 2), (36, "gemv_gate_up", 1045, 20),
           (42, "gemv_down", 1065, 10), (51, "gemv_lm_head", 1080, 10),
           (90, "argmax_kernel", 1090, 10)]
COPIES = [(301, 2000, 100), (310, 2200, 100), (320, 2400, 300)]  # 1e6 bytes each


def synthetic_trace() -> dict:
    events = [{"ph": "X", "cat": "user_annotation", "name": f"im/{label}", "ts": ts, "dur": dur,
               "pid": 1, "tid": 1} for ts, dur, label in RANGES]
    launches = [(at, name, start, dur, "kernel", {}) for at, name, start, dur in KERNELS]
    launches += [(at, "Memcpy DtoH (Device -> Pinned)", start, dur, "gpu_memcpy",
                  {"bytes": 1_000_000}) for at, start, dur in COPIES]
    for corr, (at, name, start, dur, cat, args) in enumerate(launches):
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": at,
                       "dur": 0.5, "pid": 1, "tid": 1, "args": {"correlation": corr}})
        events.append({"ph": "X", "cat": cat, "name": name, "ts": start, "dur": dur, "pid": 0,
                       "tid": 7, "args": {"correlation": corr, **args}})
    return {"traceEvents": events,
            "infermeter": {"weight_bytes": {"qkv": 1_000_000, "gate_up": 4_000_000}}}


def test_synthetic_gpu_trace_gives_exact_shares_gaps_and_gbps():
    found = bd.breakdown(synthetic_trace())
    assert found["source"] == "gpu kernels" and found["steps_traced"] == 1
    assert found["step_ms"] == pytest.approx(0.1) and found["idle_ms"] == pytest.approx(0.013)
    shares = {row["name"]: row["share_pct"] for row in found["categories"]}
    assert shares == pytest.approx({
        "matmul qkv": 10, "matmul o": 5, "matmul gate_up": 20, "matmul down": 10,
        "matmul lm_head": 10, "attention": 8, "norms & rotary": 4, "sampling": 10,
        "all-reduce": 10, "gaps (idle)": 13})
    gbps = {row["name"]: row["gbps"] for row in found["categories"]}
    assert gbps["matmul qkv"] == pytest.approx(100) and gbps["matmul gate_up"] == pytest.approx(200)
    assert gbps["matmul o"] is None  # no weight bytes in the trace for it
    (copy,) = found["copies"]  # three 1 MB copies of one case, median 100 us -> 10 GB/s
    assert (copy["case"], copy["bytes"], copy["count"]) == ("pinned d2h", 1_000_000, 3)
    assert copy["median_ms"] == pytest.approx(0.1) and copy["gbps"] == pytest.approx(10)
    assert "matmul gate_up" in bd.render_breakdown(found)


def test_unlabelled_trace_is_one_window_classified_by_kernel_name():
    trace = synthetic_trace()
    trace["traceEvents"] = [e for e in trace["traceEvents"] if e["cat"] != "user_annotation"]
    found = bd.breakdown(trace)
    assert found["window"] == "whole trace" and found["steps_traced"] == 0
    names = {row["name"] for row in found["categories"]}
    assert {"matmul (unattributed)", "attention", "all-reduce", "sampling"} <= names
    assert "Copies:" in bd.render_breakdown(found)


def test_compiled_step_without_layer_ranges_goes_by_kernel_name():
    """Compiled mode: only the im/decode_step range; "outside the model" must not mean sampling."""
    trace = synthetic_trace()
    trace["traceEvents"] = [e for e in trace["traceEvents"] if e["cat"] != "user_annotation"
                            or e["name"] == "im/decode_step"]
    found = bd.breakdown(trace)
    assert found["steps_traced"] == 1
    shares = {row["name"]: row["share_pct"] for row in found["categories"]}
    assert shares["sampling"] == pytest.approx(10)  # the argmax kernel only
    assert shares["matmul (unattributed)"] == pytest.approx(55)  # the 5 gemv kernels


@pytest.fixture(scope="module")
def generate_trace(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trace")
    out = folder / "results.jsonl"
    code = main(["generate", "--model", "debug", "--device", "cpu", "--max-new-tokens", "10",
                 "--repeats", "1", "--warmup", "0", "--no-roofline", "--trace", str(folder),
                 "--output", str(out), "--json"])
    assert code == 0
    return folder, json.loads(out.read_text().splitlines()[0])


def test_generate_trace_writes_a_loadable_trace_and_a_breakdown(generate_trace):
    folder, result = generate_trace
    trace = json.loads((folder / "trace-rank0.json").read_text())  # loadable Chrome JSON
    assert trace["traceEvents"] and trace["infermeter"]["model"] == "debug"
    # what splits a compiled step into layers and finds an MoE model's expert kernels
    assert trace["infermeter"]["n_layers"] == PRESETS["debug"].n_layers
    assert trace["infermeter"]["moe"] is False
    found = result["metrics"]["breakdown"]
    assert found["source"].startswith("cpu ops") and found["steps_traced"] == 5
    names = {row["name"] for row in found["categories"]}
    assert {f"matmul {p}" for p in bd.PROJECTIONS} <= names
    assert {"attention", "norms & rotary", "sampling"} <= names
    assert sum(row["share_pct"] for row in found["categories"]) == pytest.approx(100, rel=0.02)
    qkv = next(row for row in found["categories"] if row["name"] == "matmul qkv")
    spec = PRESETS["debug"]  # wq + wk + wv of every layer, float32
    q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    assert qkv["weight_bytes"] == spec.n_layers * spec.dim * (q + 2 * kv) * 4
    assert qkv["gbps"] > 0


def test_trace_command_summarises_the_file(generate_trace, capsys):
    folder, _ = generate_trace
    assert main(["trace", str(folder / "trace-rank0.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps_traced"] == 5
    assert main(["trace", str(folder / "trace-rank0.json")]) == 0
    assert "Where one decode step goes" in capsys.readouterr().out


def test_a_gzipped_trace_reads_like_the_plain_one(tmp_path, capsys):
    import gzip

    plain = tmp_path / "trace.json"
    plain.write_text(json.dumps(synthetic_trace()))
    packed = tmp_path / "trace.json.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert bd.summarize_trace(packed)["categories"] == bd.summarize_trace(plain)["categories"]
    truncated = tmp_path / "cut.json.gz"
    truncated.write_bytes(packed.read_bytes()[:40])
    assert main(["trace", str(truncated)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("infermeter: error: cannot read trace") and len(err.splitlines()) == 1


@pytest.mark.parametrize("text", [
    "{not json", '{"schema": 1}', "[1, 2", "",
    # JSON with no event a summary can use: once "no kernels ... found" and exit 0
    "[]", "[1, 2, 3]", '{"traceEvents": [1, "x"]}',
    '{"traceEvents": [{"ph": "X", "name": "gemv", "cat": "kernel", "ts": "abc", "dur": 5}]}',
    # a pid or tid that is not a scalar (it was a TypeError: unhashable type): skipped too
    '{"traceEvents": [{"ph": "X", "name": "aten::mm", "cat": "cpu_op", "pid": {}, "tid": 1, '
    '"ts": 0, "dur": 5}]}',
    '{"traceEvents": [{"ph": "X", "name": "aten::mm", "cat": "cpu_op", "pid": 1, "tid": [1], '
    '"ts": 0, "dur": 5}]}',
    # traceEvents not a list; bytes that are not text
    '{"traceEvents": {"ph": "X"}}', "\x00\x01binary",
])
def test_corrupt_trace_is_one_clear_error(tmp_path, capsys, text):
    bad = tmp_path / "trace-rank0.json"
    bad.write_text(text)
    assert main(["trace", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("infermeter: error:") and len(err.splitlines()) == 1
    assert main(["trace", str(tmp_path / "missing.json")]) == 2


def test_an_event_with_a_pid_or_tid_that_is_not_a_scalar_is_skipped(tmp_path):
    """Like any other malformed event: the rest of the trace is summarised as without it (a CPU
    trace groups its ops by (pid, tid): such an op was a TypeError, unhashable type)."""
    from tests.cli_in_process import run_cli

    def op(name, ts, dur, pid=1, tid=1):
        return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "pid": pid,
                "tid": tid}

    events = [{**op("im/decode_step", 0, 100), "cat": "user_annotation"},
              op("aten::mm", 10, 30), op("aten::argmax", 50, 10)]
    good = tmp_path / "good.json"
    good.write_text(json.dumps(events))
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(events + [op("aten::mm", 20, 5, pid={}),
                                          op("aten::add", 70, 5, tid=[1])]))
    out = run_cli("trace", str(mixed), "--json")
    assert out.returncode == 0 and out.stderr == ""
    expected = run_cli("trace", str(good), "--json")
    assert expected.returncode == 0 and json.loads(out.stdout) == json.loads(expected.stdout)
    # a foreign trace without pid and tid (they are optional) is still read, as one thread
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps([{k: v for k, v in e.items() if k not in ("pid", "tid")}
                                for e in events]))
    out = run_cli("trace", str(bare), "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == json.loads(expected.stdout)


def test_copy_trace_lists_each_case_copies(tmp_path):
    out = tmp_path / "copy.jsonl"
    assert main(["copy", "--model", "debug", "--device", "cpu", "--batch-size", "1",
                 "--seq-len", "64", "--layout", "contiguous", "--host", "pageable",
                 "--direction", "d2h", "--method", "per-tensor", "--repeats", "2",
                 "--warmup", "0", "--trace", str(tmp_path), "--output", str(out),
                 "--json"]) == 0
    assert (tmp_path / "trace-rank0.json").is_file()
    copies = json.loads(out.read_text())["metrics"]["breakdown"]["copies"]
    case = [c for c in copies if c["case"] == "contiguous pageable d2h per-tensor"]
    assert case and case[0]["bytes"] == PRESETS["debug"].n_layers * 2 * 64 * 2 * 16 * 4


def test_nvtx_is_a_no_op_without_cuda(monkeypatch):
    def boom(*args):
        raise AssertionError("NVTX called without CUDA")

    monkeypatch.setattr(nvtx, "_CUDA", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", boom)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", boom)
    with nvtx.nvtx_range("x"), nvtx.traced("y"):
        nvtx.range_push("z")
        nvtx.range_pop()
    model = build_model(PRESETS["debug"])
    model.setup_cache(1, 8)
    tokens, pos = torch.tensor([[1, 2]]), torch.arange(2)
    handles = nvtx.install_layer_ranges(model)
    assert handles
    with_hooks = model(tokens, pos)
    nvtx.remove_ranges(handles)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    model.reset_cache()
    assert torch.equal(with_hooks, model(tokens, pos))


def test_step_ranges_name_each_phase_and_balance(monkeypatch):
    calls = []
    monkeypatch.setattr(nvtx, "_CUDA", True)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(name))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append("pop"))
    import infermeter.generate.modes as gm

    monkeypatch.setattr(gm, "range_push", nvtx.range_push)
    seen = []
    ranges = StepRanges(lambda event, step: seen.append(event), max_new_tokens=3)
    for event, step in (("start", 0), ("prefill", 0), ("decode", 1), ("decode", 2)):
        ranges(event, step)
    ranges.close()
    assert seen == ["start", "prefill", "decode", "decode"]
    assert calls == ["prefill", "pop", "decode 1", "pop", "decode 2", "pop"]


@pytest.mark.parametrize(("name", "category"), [
    # kernel names seen in the H100 trace of Llama-2-7B's compiled decode step
    ("triton_red_fused__to_copy_add_mean_mm_mul_pow_rsqrt_t_view_17", "matmul (unattributed)"),
    ("triton_red_fused_bmm_mm_t_transpose_view_9", "matmul (unattributed)"),
    ("triton_red_fused__softmax__to_copy_bitwise_and_bitwise_not_bmm_exp_ge_le_masked_fill_mul_"
     "sub_unsqueeze_view_7", "attention"),
    ("triton_poi_fused__to_copy__unsafe_view_add_index_index_copy_mm_mul_select_split_with_sizes"
     "_stack_sub_transpose_unsqueeze", "attention"),  # pointwise: the KV write, not a matmul
    ("triton_red_fused__to_copy__unsafe_view_add_mean_mul_pow_rsqrt_12", "norms & rotary"),
    ("triton_poi_fused__unsafe_view_mul_silu_6", "other (residual, activation, embedding)"),
    ("triton_red_fused_argmax_5", "sampling"),
    # the recorded step's argmax, whose kernel also writes the token into its history row
    # (an index_copy, as the KV write's) and advances the state (H100, 2026-12-06)
    ("triton_per_fused_add_any_argmax_bitwise_or_copy__eq_gather_index_copy_mul_squeeze_"
     "unsqueeze_3", "sampling"),
    ("nvjet_sm90_hsh_64x8_64x16_2x1_v_bz_splitK_TNT", "matmul (unattributed)"),  # cuBLAS
    ("nvjet_sm90_hsh_128x8_64x12_4x1_v_bz_TNT", "matmul (unattributed)"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __half>", "matmul (unattributed)"),
    # tensor parallelism (2xH100 traces): NCCL's and ours, the fused one included
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "all-reduce"),
    ("_peer_all_reduce_kernel", "all-reduce"),
    ("_peer_add_norm_kernel", "all-reduce"),  # all-reduce + residual add + RMSNorm in one
    # the engine's own Triton kernels
    ("_split_kv_kernel", "attention"), ("_combine_kernel", "attention"),
    ("_split_kv_last_kernel", "attention"),  # the one-launch combine (removed 2026-12-06)
    ("_gemv_kernel", "matmul (unattributed)"),
    ("_silu_mul_kernel", "other (residual, activation, embedding)"),
    # the fused step's (fused_step.py): each reads a weight matrix
    ("_norm_qkv_rope_kernel", "matmul (unattributed)"), ("_fused_gemv_kernel",
                                                         "matmul (unattributed)"),
    # one launch a layer (removed 2026-12-06; older traces): the layer's products and all
    ("_layer_kernel", "matmul (unattributed)"),
    # expert_gemv.py's and router_topk.py's, in any trace
    ("_experts_swiglu_kernel", "MoE experts"), ("_experts_down_terms_kernel", "MoE experts"),
    ("_experts_route_kernel", "MoE experts"),
    ("_moe_kernel", "MoE experts"),  # one launch of an MoE block (removed; older traces)
    # the engine's GEMV with the residual add and the next norm fused into its reduction (a
    # Qwen3-30B-A3B layer's wqkv on an H100, results/traces-moe-qwen3-nvidia-h100-80gb-hbm3/):
    # the product is its cost; a pointwise kernel beside a gemv is not the product
    ("triton_red_fused__to_copy_add_gemv_pdl_mean_mul_pow_rsqrt_view_15",
     "matmul (unattributed)"),
    ("triton_per_fused__to_copy_add_embedding_gemv_pdl_mean_mul_pow_rsqrt_unsqueeze_view_0",
     "matmul (unattributed)"),
])
def test_inductor_and_library_kernel_names(name, category):
    assert bd._by_name(name) == category


# a compiled MoE step's gathered experts (moe.py): the stacked rows indexed by the routing ids
# feed the batched products, which inductor fuses into one kernel with the gather
EXPERT_KERNELS = ("triton_red_fused_bmm_index_mul_silu_unsqueeze_view_7",
                  "triton_red_fused_bmm_index_mul_squeeze_sum_unsqueeze_8")


@pytest.mark.parametrize("name", EXPERT_KERNELS)
def test_expert_products_are_moe_experts_only_in_an_moe_model(name):
    assert bd._by_name(name, moe=True) == "MoE experts"
    assert bd._by_name(name) == "attention"  # a dense model's bmm: attention's
    # a cache write indexes too, here fused into attention's q . k: attention's, MoE or not
    write = "triton_red_fused__to_copy_bmm_index_index_copy_transpose_view_4"
    assert bd._by_name(write, moe=True) == "attention"
    attention = "triton_red_fused__to_copy_bmm_transpose_view_5"  # q . k: no gather
    assert bd._by_name(attention, moe=True) == "attention"


def test_a_compiled_moe_trace_puts_the_expert_products_under_moe_experts():
    """The trace's metadata (or its model's preset) says MoE: the expert kernels' time is the
    experts' row, not attention's."""
    trace = synthetic_trace()
    trace["traceEvents"] = [e for e in trace["traceEvents"] if e["cat"] != "user_annotation"
                            or e["name"] == "im/decode_step"]
    for e in trace["traceEvents"]:  # gemv_gate_up (20 us) and gemv_down (10 us): the experts'
        e["name"] = {"gemv_gate_up": EXPERT_KERNELS[0], "gemv_down": EXPERT_KERNELS[1]}.get(
            e["name"], e["name"])
    for meta, experts_ms in (({"moe": True}, 0.030), ({"model": "mixtral-8x7b"}, 0.030),
                             ({"moe": False, "model": "mixtral-8x7b"}, None), ({}, None)):
        found = bd.breakdown({**trace, "infermeter": meta})
        times = {row["name"]: row["time_ms"] for row in found["categories"]}
        assert times.get("MoE experts") == (None if experts_ms is None
                                            else pytest.approx(experts_ms)), meta
        assert times["attention"] == pytest.approx(0.008 if experts_ms else 0.038), meta


def test_compiled_matmuls_get_the_whole_steps_weight_bytes():
    """No projection ranges (compiled): the unattributed matmul time reads every weight."""
    trace = synthetic_trace()
    trace["traceEvents"] = [e for e in trace["traceEvents"] if e["cat"] != "user_annotation"
                            or e["name"] == "im/decode_step"]
    found = bd.breakdown(trace)
    (row,) = [r for r in found["categories"] if r["name"] == "matmul (unattributed)"]
    assert row["weight_bytes"] == 5_000_000
    assert row["gbps"] == pytest.approx(5_000_000 / (row["time_ms"] * 1e-3) / 1e9)


@pytest.mark.parametrize("command", [
    ["generate", "--model", "debug", "--device", "cpu", "--max-new-tokens", "4"],
    ["copy", "--model", "debug", "--device", "cpu", "--seq-len", "16"],
    ["run"],
])
def test_a_trace_folder_that_cannot_exist_is_one_line_before_anything_runs(
        command, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("infermeter.copy.job.gpu_available", lambda: False)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = tmp_path / "out"
    extra = ["--out", str(out)] if command == ["run"] else []
    assert main([*command, *extra, "--trace", str(blocker / "traces")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("infermeter: error: --trace") and len(err.splitlines()) == 1
    assert not out.exists()  # run: no results folder, no half-written results
