"""Bubbles in a decode step (measure/gaps.py, through breakdown.py): synthetic GPU traces with
known kernels and gaps (three steps with two layers each, two overlapping streams, no layer
ranges), exact busy / gap / kernel-count figures, the bytes-bound time, the rendering, the
trace command, the per-layer ranges the eager capture opens; compiled steps without layer
ranges split into layers by their kernel pattern (a split step whose layers' kernel names
differ but for a few, the fused step, prologue and epilogue apart) or, where no kernel repeats
once a layer at one spacing, at the most regular name that occurs once a layer, and where none
does, one note and no per-layer figures; a layer's kernels one by one (median duration, and
median time added past the kernels started before it, per position over the layers of the
common kernel count)."""

import gzip
import json

import pytest
import torch

from infermeter.cli import main
from infermeter.engine.model import build_model
from infermeter.generate import loop
from infermeter.generate.request import build_request
from infermeter.measure import breakdown as bd
from infermeter.measure import nvtx, roofline
from infermeter.measure.trace import traced_contexts
from infermeter.specs.presets import PRESETS

# One step, times in us relative to its start. Host: (range start, dur, label); GPU, per kernel:
# (launch at, name, start, dur). Layer 0 runs 6..40 with gaps 3 + 1, layer 1 runs 45..75 with
# a gap of 4 (l1_a and l1_b touch: no gap); outside the layers: 2 before layer 0, 5 between the
# layers, `tail` before the argmax. busy 65 us, 8 kernels.
STEP_RANGES = [(0, 100, "decode_step"), (1, 90, "model"), (10, 30, "layer 0"),
               (40, 30, "layer 1")]
STEP_KERNELS = [(5, "embedding_kernel", 0, 4), (11, "l0_a", 6, 10), (12, "l0_b", 19, 10),
                (13, "l0_c", 30, 10), (41, "l1_a", 45, 10), (42, "l1_b", 55, 10),
                (43, "l1_c", 69, 6)]
TAILS = (0, 10, 50)  # the gap before each step's argmax: spans 80, 90 (the median), 130


def _event(cat, name, ts, dur, pid=1, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid,
            "args": args}


def _kernel(events, corr, at, name, start, dur, stream=7):
    events.append(_event("cuda_runtime", "cudaLaunchKernel", at, 0.5, correlation=corr))
    events.append(_event("kernel", name, start, dur, pid=0, tid=stream, correlation=corr,
                         stream=stream))


def layered_trace(meta=None, layers=True):
    """Three decode steps on one stream; the middle one (span 90 us) is the median."""
    events: list[dict] = []
    for k, tail in enumerate(TAILS):
        host, gpu = 200 * k, 10_000 + 500 * k
        events += [_event("user_annotation", f"im/{label}", host + ts, dur)
                   for ts, dur, label in STEP_RANGES if layers or "layer" not in label]
        kernels = [*STEP_KERNELS, (80, "argmax_kernel", 75 + tail, 5)]
        for j, (at, name, start, dur) in enumerate(kernels):
            _kernel(events, 100 * k + j, host + at, name, gpu + start, dur)
    return {"traceEvents": events, "infermeter": meta or {}}


def test_busy_gaps_and_kernels_per_step_and_layer_are_exact():
    gaps = bd.breakdown(layered_trace())["step_gaps"]
    assert gaps["span_ms"] == pytest.approx(0.090) and gaps["busy_ms"] == pytest.approx(0.065)
    assert gaps["gaps_ms"] == pytest.approx(0.025) and gaps["gaps_pct"] == pytest.approx(25 / 0.9)
    assert (gaps["kernels"], gaps["streams"], gaps["gap_count"]) == (8, 1, 6)
    assert gaps["mean_gap_us"] == pytest.approx(25 / 6)
    layers = [(r["layer"], r["kernels"], r["span_ms"], r["busy_ms"], r["gaps_ms"], r["gap_count"])
              for r in gaps["layers"]]
    assert layers == [pytest.approx((0, 3, 0.034, 0.030, 0.004, 2)),
                      pytest.approx((1, 3, 0.030, 0.026, 0.004, 1))]
    assert gaps["outside_layers"] == pytest.approx({"kernels": 2, "gaps_ms": 0.017, "gap_count": 3})
    largest = [(g["gap_us"], g["before"], g["after"], g["layer"]) for g in gaps["largest_gaps"]]
    assert largest == [(10, "l1_c", "argmax_kernel", None), (5, "l0_c", "l1_a", None),
                       (4, "l1_b", "l1_c", 1), (3, "l0_a", "l0_b", 0),
                       (2, "embedding_kernel", "l0_a", None)]
    # every step's totals, and their medians: the tail gap is all that differs
    assert [s["gaps_ms"] for s in gaps["steps"]] == pytest.approx([0.015, 0.025, 0.065])
    assert gaps["median_of_steps"] == pytest.approx(
        {"span_ms": 0.090, "busy_ms": 0.065, "gaps_ms": 0.025, "kernels": 8})
    assert gaps["bytes_bound_ms"] is None  # no bandwidth in the trace


def test_layer_ranges_do_not_change_the_categories():
    """im/layer N ranges are outer ranges: a kernel's category is still its innermost label (a
    norm kernel launched in the model outside any module range stays "other")."""
    traces = [layered_trace(), layered_trace(layers=False)]
    for trace in traces:
        for e in trace["traceEvents"]:
            e["name"] = "rms_norm_kernel" if e["name"] == "l0_a" else e["name"]
    with_layers, without = (bd.breakdown(trace) for trace in traces)
    assert not any(r["name"] == "norms & rotary" for r in with_layers["categories"])
    assert with_layers["categories"] == without["categories"]
    assert without["step_gaps"]["layers"] == [] and without["step_gaps"]["outside_layers"] is None
    assert without["step_gaps"]["busy_ms"] == with_layers["step_gaps"]["busy_ms"]


def test_overlapping_kernels_on_two_streams_count_once():
    # stream 7: a 0-10, b 20-30; stream 8: c 8-14 (overlaps a), d 40-45.
    # busy = [0,14] + [20,30] + [40,45] = 29 us of 31 us of kernels; gaps 6 + 10.
    events = [_event("user_annotation", "im/decode_step", 0, 50)]
    for corr, (name, start, dur, stream) in enumerate(
            [("a", 0, 10, 7), ("b", 20, 10, 7), ("c", 8, 6, 8), ("d", 40, 5, 8)]):
        _kernel(events, corr, 1 + corr, name, 1000 + start, dur, stream)
    gaps = bd.breakdown({"traceEvents": events})["step_gaps"]
    assert (gaps["span_ms"], gaps["busy_ms"], gaps["gaps_ms"]) == pytest.approx((0.045, 0.029,
                                                                                0.016))
    assert (gaps["kernels"], gaps["streams"], gaps["gap_count"]) == (4, 2, 2)
    largest = [(g["gap_us"], g["before"], g["after"]) for g in gaps["largest_gaps"]]
    assert largest == [(10, "b", "d"), (6, "c", "b")]


def test_bytes_bound_needs_both_bytes_and_bandwidth():
    meta = {"bytes_per_step": 50_000_000, "hbm_gbps": 1000.0}  # 50 MB at 1000 GB/s: 0.05 ms
    assert bd.breakdown(layered_trace(meta))["step_gaps"]["bytes_bound_ms"] == pytest.approx(0.05)
    for partial in ({"bytes_per_step": 50_000_000}, {"hbm_gbps": 1000.0},
                    {"bytes_per_step": "50 MB", "hbm_gbps": 1000.0}):
        assert bd.breakdown(layered_trace(partial))["step_gaps"]["bytes_bound_ms"] is None


def test_rendering_shows_step_layers_and_largest_gaps():
    text = bd.render_breakdown(bd.breakdown(layered_trace({"bytes_per_step": 50_000_000,
                                                           "hbm_gbps": 1000.0})))
    lines = text.splitlines()
    assert "Step 0.09 ms = kernels 0.065 + gaps 0.025 ms (27.8%); bytes alone 0.05 ms " \
           "(47.7 MiB at 1,000 GB/s)" in lines
    assert "8 kernels on 1 stream(s), 6 gaps, mean gap 4.17 us" in lines
    assert "  gap 4 us (layer 1): l1_b -> l1_c" in lines
    assert [line.split() for line in lines if line.startswith(("layer 0", "outside the"))] == [
        ["layer", "0", "3", "0.0340", "0.0300", "0.0040", "11.8"],
        ["outside", "the", "layers", "2", "-", "-", "0.0170", "-"]]
    unknown = bd.render_breakdown(bd.breakdown(layered_trace(layers=False)))
    assert "bytes alone: unknown (no measured bandwidth in the trace)" in unknown
    assert "Per layer: no layer ranges in this trace" in unknown
    short = bd.render_gaps(bd.breakdown(layered_trace())["step_gaps"], max_layer_rows=1)
    assert "layer 1 " not in short and "... 1 more layers (--json lists every one)" in short


def test_trace_command_prints_and_stores_the_gaps(tmp_path, capsys):
    path = tmp_path / "trace-rank0.json.gz"
    path.write_bytes(gzip.compress(json.dumps(layered_trace()).encode()))
    assert main(["trace", str(path), "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)["step_gaps"]
    assert stored["kernels"] == 8 and len(stored["layers"]) == 2
    assert main(["trace", str(path)]) == 0
    assert "Step 0.09 ms = kernels 0.065 + gaps 0.025 ms" in capsys.readouterr().out


def test_odd_kernel_fields_are_skipped_or_read_not_a_traceback(capsys, tmp_path):
    """A foreign trace: a stream given as a list, a negative and a non-finite duration."""
    events = [_event("user_annotation", "im/decode_step", 0, 50)]
    for corr, (start, dur) in enumerate([(0, 10), (15, 5), (30, -3), (40, float("nan"))]):
        _kernel(events, corr, 1 + corr, f"k{corr}", 1000 + start, dur)
    events[2]["args"]["stream"] = [7]
    gaps = bd.breakdown({"traceEvents": events})["step_gaps"]
    assert (gaps["span_ms"], gaps["busy_ms"], gaps["kernels"]) == pytest.approx((0.02, 0.015, 2))
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"traceEvents": events}))  # NaN as JSON's NaN, as Python reads it
    assert main(["trace", str(path)]) == 0
    assert "Step 0.02 ms = kernels 0.015 + gaps 0.005 ms" in capsys.readouterr().out


def test_a_copy_trace_has_no_step_gaps():
    events = [_event("user_annotation", "im/copy pinned d2h", 0, 50)]
    for corr, start in enumerate((0, 20)):
        events.append(_event("cuda_runtime", "cudaMemcpyAsync", 1 + corr, 0.5, correlation=corr))
        events.append(_event("gpu_memcpy", "Memcpy DtoH", 1000 + start, 10, pid=0, tid=7,
                             correlation=corr, bytes=1_000_000))
    found = bd.breakdown({"traceEvents": events})
    assert len(found["copies"]) == 1 and found["step_gaps"] is None


def test_eager_capture_opens_one_range_per_layer_and_cpu_traces_have_no_gaps():
    from torch.profiler import ProfilerActivity, profile

    spec = PRESETS["debug"]
    model = build_model(spec)
    model.setup_cache(1, 8)
    handles = nvtx.install_layer_ranges(model)
    nvtx.set_profiling(True)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof, nvtx.traced("decode_step"):
            model(torch.tensor([[1, 2]]), torch.arange(2))
    finally:
        nvtx.set_profiling(False)
        nvtx.remove_ranges(handles)
    names = [e.name for e in prof.events()]
    assert [n for n in names if n.startswith("im/layer")] == [
        f"im/layer {i}" for i in range(spec.n_layers)]
    found = bd.breakdown({"traceEvents": [
        {"ph": "X", "cat": "cpu_op" if not e.name.startswith("im/") else "user_annotation",
         "name": e.name, "ts": e.time_range.start, "dur": e.time_range.elapsed_us(),
         "pid": 1, "tid": 1} for e in prof.events()]})
    assert found["source"].startswith("cpu ops") and found["step_gaps"] is None


def test_the_trace_gets_the_traced_steps_bytes_and_the_runs_bandwidth():
    spec = PRESETS["debug"]
    model = build_model(spec)
    tokens = torch.ones(2, 4, dtype=torch.int64)
    request = build_request("debug", max_new_tokens=10)
    # prefill of 4, two untraced steps, then 5 traced steps reading 7..11 KV tokens
    assert traced_contexts(4, 10) == range(7, 12) and not traced_contexts(4, 3)
    bound = loop._trace_bound(model, tokens, request, 500.0, None)
    assert bound == {"hbm_gbps": 500.0, "bytes_per_step": roofline.mean_decode_step_bytes(
        spec, 2, range(7, 12), "float32", "float32", 1)}
    assert loop._trace_bound(model, tokens, request, None, None) == {}


# Compiled steps: no ranges but the step's, kernels of 2 us with a 1 us gap before each.
# A split step as inductor names it: layers' kernels differ in name (its fusions rotate) but
# for the ones every layer has; the first of those (the cache-write pointwise) starts a layer.
# A kernel run once a layer back to back (as a real step's hoisted writes) is no layer's start.
SPLIT_PROLOGUE = ["Memcpy DtoD (Device -> Device)"] + ["triton_poi_fused_index_copy_0"] * 3 + [
                  "triton_red_fused_embedding_mean_pow_1",
                  "triton_red_fused__to_copy_add_embedding_mean_mm_mul_pow_rsqrt_2"]
SPLIT_LAYERS = [["triton_poi_fused_index_copy_mm_split_3", "triton_red_fused_bmm_softmax_5",
                 "triton_red_fused_add_mean_mm_rsqrt_10", f"triton_red_fused_mm_silu_{tag}"]
                for tag in (11, 16, 11)]
SPLIT_EPILOGUE = ["triton_red_fused_any_argmax_mm_27", "Memcpy DtoD (Device -> Device)"]
# The fused step (fused_step.py): norm + wqkv + RoPE, split-KV attention, wo + add,
# norm + w13 + SwiGLU, w2 + add; the embedding before, the final norm + head and argmax after.
FUSED_LAYER = ["_norm_qkv_rope_kernel", "_split_kv_kernel", "_combine_kernel",
               "_fused_gemv_kernel", "_fused_gemv_kernel", "_fused_gemv_kernel"]
FUSED_STEP = (["triton_poi_fused_embedding_0"] + FUSED_LAYER * 4
              + ["triton_red_fused_add_mean_mm_rsqrt_1", "triton_red_fused_argmax_2"])


def compiled_trace(names, meta):
    events = [_event("user_annotation", "im/decode_step", 0, 10 * len(names))]
    for k, name in enumerate(names):
        _kernel(events, k, 1 + k, name, 1000 + 3 * k, 2)
    return {"traceEvents": events, "infermeter": meta}


def _rows(gaps):
    return [(r["layer"], r["kernels"], r["span_ms"], r["busy_ms"], r["gaps_ms"], r["gap_count"])
            for r in gaps["layers"]]


def test_a_compiled_split_step_splits_into_layers_by_its_kernel_pattern():
    names = SPLIT_PROLOGUE + [n for layer in SPLIT_LAYERS for n in layer] + SPLIT_EPILOGUE
    gaps = bd.breakdown(compiled_trace(names, {"n_layers": 3}))["step_gaps"]
    assert (gaps["layers_from"], gaps["layers_note"]) == ("kernel pattern", None)
    assert gaps["layer_first_kernel"] == "triton_poi_fused_index_copy_mm_split_3"
    # 4 kernels a layer: span 4 * 2 + 3 gaps of 1 us
    assert _rows(gaps) == [pytest.approx((k, 4, 0.011, 0.008, 0.003, 3)) for k in range(3)]
    # the prologue's 6 and the epilogue's 2 kernels; gaps: 5 inside the prologue, 1 before
    # layer 0, 2 between layers, 1 after the last, 1 inside the epilogue
    assert gaps["outside_layers"] == pytest.approx({"kernels": 8, "gaps_ms": 0.010,
                                                    "gap_count": 10})
    text = bd.render_gaps(gaps)
    assert "Per layer (no layer ranges: found by the kernel pattern, each layer from " \
           "triton_poi_fused_index_copy_mm_split_3):" in text
    assert "layer 2                   4   0.0110   0.0080   0.0030    27.3" in text


def test_the_fused_step_splits_at_its_norm_qkv_rope_kernel():
    """A model preset's layer count serves a trace without one (older traces)."""
    trace = compiled_trace(FUSED_STEP, {"model": "debug"})
    n_layers = PRESETS["debug"].n_layers
    assert n_layers != 4 and bd.breakdown(trace)["step_gaps"]["layers_from"] is None
    trace["infermeter"]["n_layers"] = 4
    found = bd.breakdown(trace)
    gaps = found["step_gaps"]
    assert gaps["layer_first_kernel"] == "_norm_qkv_rope_kernel"
    assert _rows(gaps) == [pytest.approx((k, 6, 0.017, 0.012, 0.005, 5)) for k in range(4)]
    assert gaps["outside_layers"]["kernels"] == 3
    # the fused kernels are products, the attention kernels attention
    times = {r["name"]: r["time_ms"] for r in found["categories"]}
    assert times["matmul (unattributed)"] == pytest.approx(4 * 4 * 0.002 + 0.002)
    assert times["attention"] == pytest.approx(4 * 2 * 0.002)


def test_without_prologue_or_epilogue_the_layers_are_the_whole_step():
    gaps = bd.breakdown(compiled_trace(FUSED_LAYER * 3, {"n_layers": 3}))["step_gaps"]
    assert [r["kernels"] for r in gaps["layers"]] == [6, 6, 6]
    assert gaps["outside_layers"] == {"kernels": 0, "gaps_ms": pytest.approx(0.002),
                                      "gap_count": 2}


def test_a_step_whose_layers_run_an_extra_kernel_here_and_there_still_splits():
    """No name keeps one spacing (an extra kernel before layer 2, two at the end of layer 3):
    the most regular of the names that occur once a layer starts each, the last layer as long
    as the common spacing; the extra kernels belong to the layer they run in."""
    names = (["triton_poi_fused_embedding_0"] + FUSED_LAYER * 2 + ["_extra_kernel"]
             + FUSED_LAYER + FUSED_LAYER + ["_extra_a", "_extra_b"] + FUSED_LAYER
             + ["triton_red_fused_argmax_2"])
    gaps = bd.breakdown(compiled_trace(names, {"n_layers": 5}))["step_gaps"]
    assert (gaps["layers_from"], gaps["layer_first_kernel"]) == ("kernel pattern",
                                                                  "_norm_qkv_rope_kernel")
    assert [r["kernels"] for r in gaps["layers"]] == [6, 7, 6, 8, 6]
    assert gaps["outside_layers"]["kernels"] == 2  # the embedding and the argmax
    assert gaps["layer_kernels_from"] == 3  # the layers of 6 kernels
    assert [r["name"] for r in gaps["layer_kernels"]] == FUSED_LAYER


def test_a_step_that_does_not_repeat_n_layers_times_gets_one_note_and_no_layers():
    for names, meta, why in [
            (FUSED_LAYER * 2, {"n_layers": 3}, "its 12 kernels do not split into 3 layers"),
            (FUSED_LAYER * 3, {"n_layers": 4}, "its 18 kernels do not split into 4 layers"),
            (FUSED_LAYER * 3, {}, "the trace gives no layer count")]:
        gaps = bd.breakdown(compiled_trace(names, meta))["step_gaps"]
        assert gaps["layers"] == [] and gaps["layers_from"] is None
        assert why in gaps["layers_note"]
        text = bd.render_gaps(gaps)
        assert [line for line in text.splitlines() if line.startswith("Per layer")] == [
            gaps["layers_note"]]
        assert "Per layer: no layer ranges in this trace and " + why in text


def test_layer_ranges_win_over_the_kernel_pattern():
    gaps = bd.breakdown(layered_trace({"n_layers": 2}))["step_gaps"]
    assert gaps["layers_from"] == "ranges" and [r["kernels"] for r in gaps["layers"]] == [3, 3]


# A layer's kernels, one by one: 3 layers of kernels a, b, c, d (2, 3, 5, 10 us) with a 1 us
# gap before each; layer 1's c takes 9 us and layer 2 names its b "b_alt".
LAYER_KERNELS = [("a", 2), ("b", 3), ("c", 5), ("d", 10)]


def _layers_items(layers):
    """Items of one step from per layer [(name, dur)], laid end to end with 1 us gaps; each
    layer's items listed last to first (the figures must order them by start)."""
    items, t = [], 0.0
    for k, kernels in enumerate(layers):
        placed = []
        for name, dur in kernels:
            placed.append({"name": name, "start": t + 1, "end": t + 1 + dur, "stream": 7,
                           "layer": k})
            t += 1 + dur
        items += placed[::-1]
    return items


def test_a_layers_kernels_are_the_medians_over_the_layers():
    layers = [list(LAYER_KERNELS) for _ in range(3)]
    layers[1][2] = ("c", 9)
    layers[2][1] = ("b_alt", 3)
    gaps = bd.step_gaps([_layers_items(layers)], 0, {})
    assert gaps["layer_kernels_from"] == 3
    assert [(r["position"], r["name"], r["median_us"]) for r in gaps["layer_kernels"]] == [
        (0, "a", 2), (1, "b", 3), (2, "c", 5), (3, "d", 10)]
    text = bd.render_gaps(gaps)
    assert "A layer's kernels (median over 3 layers; adds: " in text
    # none overlaps: each adds its duration and starts 1 us after the one before it ends (the
    # step's first kernel has none before it: layers 1 and 2 give a's); shares of the adds'
    # sum, 20 us
    assert [line.split() for line in text.splitlines()[-4:]] == [
        ["0", "a", "2.00", "2.00", "1.00", "10"], ["1", "b", "3.00", "3.00", "1.00", "15"],
        ["2", "c", "5.00", "5.00", "1.00", "25"], ["3", "d", "10.00", "10.00", "1.00", "50"]]


def test_a_kernel_adds_only_its_time_past_the_kernels_started_before_it():
    """PDL's overlap: b starts 4 us into a's 10 and ends 3 us after it (adds 3, lasts 9, starts
    6 us before a's end); c starts and ends inside b (adds 0, starts 8 us before b's end); d
    starts after a 2 us gap (adds its 5, not the gap; starts 2 us after). A layer's adds sum
    to its busy time. The step's first kernel starts after none: a's start is layer 1's, 10 us
    after layer 0's d."""
    def layer(k, t):
        return [{"name": name, "start": t + a, "end": t + b, "stream": 7, "layer": k}
                for name, a, b in (("a", 0, 10), ("b", 4, 13), ("c", 5, 8), ("d", 15, 20))]
    gaps = bd.step_gaps([layer(0, 0.0) + layer(1, 30.0)], 0, {})
    rows = gaps["layer_kernels"]
    assert [(r["name"], r["median_us"], r["adds_us"]) for r in rows] == [
        ("a", 10, 10), ("b", 9, 3), ("c", 3, 0), ("d", 5, 5)]
    assert sum(r["adds_us"] for r in rows) == pytest.approx(1e3 * gaps["layers"][0]["busy_ms"])
    assert [r["starts_us"] for r in rows] == [10, -6, -8, 2]
    text = bd.render_gaps(gaps)
    assert "starts: its start less their latest end, below 0 launched early" in text
    assert [line.split()[4] for line in text.splitlines()[-4:]] == ["10.00", "-6.00", "-8.00",
                                                                   "2.00"]


def test_the_step_counts_its_kernels_started_early():
    """The same two PDL layers over the whole step: of the 7 kernels with one before them, b
    and c start early in each layer (4), d 2 us after and layer 1's a 10 us after; the median
    start is -6 us. One kernel alone has nothing to start after: no line."""
    def layer(k, t):
        return [{"name": name, "start": t + a, "end": t + b, "stream": 7, "layer": k}
                for name, a, b in (("a", 0, 10), ("b", 4, 13), ("c", 5, 8), ("d", 15, 20))]
    gaps = bd.step_gaps([layer(0, 0.0) + layer(1, 30.0)], 0, {})
    assert (gaps["early_starts"], gaps["starts_counted"], gaps["median_start_us"]) == (4, 7, -6)
    assert ("4 of 7 kernels started before the one ahead ended (PDL's early launch); median "
            "start -6.00 us after the one ahead") in bd.render_gaps(gaps).splitlines()
    alone = bd.step_gaps([[{"name": "a", "start": 0.0, "end": 5.0, "stream": 7}]], 0, {})
    assert (alone["early_starts"], alone["starts_counted"], alone["median_start_us"]) == \
        (0, 0, None)
    assert "started before the one ahead" not in bd.render_gaps(alone)


def test_a_kernel_with_no_kernel_before_it_in_any_layer_starts_after_none():
    """One layer: its first kernel is the step's first, so nothing starts before it ("-")."""
    gaps = bd.step_gaps([_layers_items([list(LAYER_KERNELS)])], 0, {})
    assert [r["starts_us"] for r in gaps["layer_kernels"]] == [None, 1, 1, 1]
    assert bd.render_gaps(gaps).splitlines()[-4].split()[4] == "-"


def test_layers_of_another_kernel_count_are_left_out_of_a_layers_kernels():
    layers = [list(LAYER_KERNELS) for _ in range(3)]
    layers.insert(1, [("moe", 100)] * 5)  # layer 1: 5 slow kernels, not the common 4
    gaps = bd.step_gaps([_layers_items(layers)], 0, {})
    assert [r["kernels"] for r in gaps["layers"]] == [4, 5, 4, 4]
    assert gaps["layer_kernels_from"] == 3
    assert [(r["name"], r["median_us"]) for r in gaps["layer_kernels"]] == LAYER_KERNELS
    assert "A layer's kernels (median over 3 layers; adds: " in bd.render_gaps(gaps)


def test_a_kernel_pattern_split_gives_a_layers_kernels_by_the_most_common_name():
    layers = [["triton_poi_fused_index_copy_mm_split_3", "triton_red_fused_bmm_softmax_5",
               f"triton_red_fused_mm_silu_{tag}"] for tag in (16, 11, 11)]
    names = SPLIT_PROLOGUE + [n for layer in layers for n in layer] + SPLIT_EPILOGUE
    gaps = bd.breakdown(compiled_trace(names, {"n_layers": 3}))["step_gaps"]
    assert gaps["layers_from"] == "kernel pattern" and gaps["layer_kernels_from"] == 3
    assert [(r["name"], r["median_us"]) for r in gaps["layer_kernels"]] == [
        (n, 2) for n in layers[1]]


def test_a_step_without_layers_has_no_layers_kernels():
    for trace in (layered_trace(layers=False), compiled_trace(FUSED_LAYER * 3, {})):
        gaps = bd.breakdown(trace)["step_gaps"]
        assert gaps["layer_kernels"] is None and gaps["layer_kernels_from"] is None
        assert "A layer's kernels" not in bd.render_gaps(gaps)


def test_trace_command_prints_and_stores_a_layers_kernels(tmp_path, capsys):
    """layered_trace's two layers name every kernel differently: the first layer's names."""
    path = tmp_path / "trace-rank0.json.gz"
    path.write_bytes(gzip.compress(json.dumps(layered_trace()).encode()))
    assert main(["trace", str(path), "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)["step_gaps"]
    assert stored["layer_kernels_from"] == 2
    assert [(r["name"], r["median_us"]) for r in stored["layer_kernels"]] == [
        ("l0_a", 10), ("l0_b", 10), ("l0_c", 8)]
    assert main(["trace", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(k for k, line in enumerate(lines)
              if line.startswith("A layer's kernels (median over 2 layers; adds: "))
    assert lines[at + 1].split() == ["#", "kernel", "median", "us", "adds", "us", "starts", "us",
                                     "share", "%"]
    # starts: the gaps before each kernel, medians over the two layers (the embedding -> l0_a
    # 2 us and l0_c -> l1_a 5 us; l0_a -> l0_b 3 and l1_a -> l1_b 0; l0_b -> l0_c 1 and
    # l1_b -> l1_c 4)
    assert [line.split() for line in lines[at + 3:at + 6]] == [
        ["0", "l0_a", "10.00", "10.00", "3.50", "35.7"],
        ["1", "l0_b", "10.00", "10.00", "1.50", "35.7"],
        ["2", "l0_c", "8.00", "8.00", "2.50", "28.6"]]


# --against: two builds of one step, side by side (measure/against.py)

def _shifted_items(delay: float, slow_c: float = 0.0):
    """LAYER_KERNELS' 3 layers with each kernel's gap before it `delay` us longer (1 + delay)
    and c slow_c us longer."""
    items, t = [], 0.0
    for k in range(3):
        for name, dur in LAYER_KERNELS:
            dur += slow_c if name == "c" else 0.0
            items.append({"name": name, "start": t + 1 + delay, "end": t + 1 + delay + dur,
                          "stream": 7, "layer": k})
            t += 1 + delay + dur
    return items


def test_against_lines_up_a_layers_kernels_and_says_what_changed():
    """The other build starts every kernel 0.5 us later and runs c 2 us longer: the starts
    change by +0.50 everywhere, c's duration and adds by +2.00, nothing else."""
    from infermeter.measure.against import against, render_against

    here = bd.step_gaps([_shifted_items(0.0)], 0, {})
    there = bd.step_gaps([_shifted_items(0.5, slow_c=2.0)], 0, {})
    compared = against(here, there)
    assert compared["note"] is None
    assert [(r["name"], r["median_us"], r["adds_us"], r["starts_us"])
            for r in compared["rows"]] == [
        ("a", [2, 2], [2, 2], [1, 1.5]), ("b", [3, 3], [3, 3], [1, 1.5]),
        ("c", [5, 7], [5, 7], [1, 1.5]), ("d", [10, 10], [10, 10], [1, 1.5])]
    # 12 kernels and 11 gaps inside each step's span: 60 + 11 us here; 2 us longer a layer and
    # 0.5 us longer a gap there
    assert compared["step"]["span_ms"] == pytest.approx([0.071, 0.071 + 0.006 + 0.0055])
    assert compared["step"]["kernels"] == [12, 12]
    text = render_against(compared, "other.json")
    assert text.startswith("Against other.json: step 0.0710 and 0.0825 ms")
    # no kernel overlaps in either: none early, each starting 1 us (0.5 later there) after
    assert compared["step"]["early_starts"] == [0, 0]
    assert text.splitlines()[1] == ("Kernels started before the one ahead ended: 0 and 0; "
                                    "median start 1.00 and 1.50 us (here, there)")
    assert [line.split() for line in text.splitlines()[-4:]] == [
        ["0", "a", "2.00", "2.00", "+0.00", "2.00", "2.00", "+0.00", "1.00", "1.50", "+0.50"],
        ["1", "b", "3.00", "3.00", "+0.00", "3.00", "3.00", "+0.00", "1.00", "1.50", "+0.50"],
        ["2", "c", "5.00", "7.00", "+2.00", "5.00", "7.00", "+2.00", "1.00", "1.50", "+0.50"],
        ["3", "d", "10.00", "10.00", "+0.00", "10.00", "10.00", "+0.00", "1.00", "1.50",
         "+0.50"]]


def test_against_keeps_both_names_and_refuses_layers_of_other_counts():
    from infermeter.measure.against import against, render_against

    here = bd.step_gaps([_shifted_items(0.0)], 0, {})
    renamed = [dict(item, name="b2" if item["name"] == "b" else item["name"])
               for item in _shifted_items(0.0)]
    compared = against(here, bd.step_gaps([renamed], 0, {}))
    assert [(r["name"], r["other_name"]) for r in compared["rows"]][1] == ("b", "b2")
    assert "b | there b2" in render_against(compared, "o")
    longer = [list(LAYER_KERNELS) + [("e", 1)] for _ in range(3)]
    compared = against(here, bd.step_gaps([_layers_items(longer)], 0, {}))
    assert compared["rows"] is None
    assert render_against(compared, "o").splitlines()[-1] == \
        "a layer's kernels not compared: 4 a layer here, 5 in the other trace"
    flat = bd.breakdown(compiled_trace(FUSED_LAYER * 3, {}))["step_gaps"]
    assert against(here, flat)["note"] == \
        "a layer's kernels: none in the other trace (no layers found)"


def test_against_lists_the_kernels_launched_otherwise():
    """Each layer's kernel carries its trace event's launch fields: c runs 4 warps here and 32
    there (inductor's tuning picks), in every layer, and d's registers differ in one layer only
    (the layers' most common launch is compared); a and b launch alike. Under the table one
    line for c, none for the others; a trace without launch fields (a memcpy, an older
    trace) lists nothing."""
    from infermeter.measure.against import against, render_against

    def launched(items, c_block, d_registers_in_layer_1):
        for item in items:
            block = c_block if item["name"] == "c" else [256, 1, 1]
            registers = d_registers_in_layer_1 if (item["name"], item["layer"]) == ("d", 1) \
                else 40
            item["args"] = {"grid": [1, 11, 1], "block": block,
                            "registers per thread": registers, "shared memory": 16}
        return items

    here = bd.step_gaps([launched(_shifted_items(0.0), [128, 1, 1], 99)], 0, {})
    there = bd.step_gaps([launched(_shifted_items(0.0), [1024, 1, 1], 40)], 0, {})
    assert [r["launch"] for r in here["layer_kernels"]][2] == {
        "grid": [1, 11, 1], "block": [128, 1, 1], "registers": 40, "shared_bytes": 16}
    compared = against(here, there)
    assert [r["launch"][0] == r["launch"][1] for r in compared["rows"]] == \
        [True, True, False, True]
    text = render_against(compared, "o").splitlines()
    assert text[-2:] == [
        "Launched otherwise (here; there):",
        " 2  c: grid 1x11x1, block 128x1x1, 40 registers, 16 B shared; grid 1x11x1, "
        "block 1024x1x1, 40 registers, 16 B shared"]
    plain = bd.step_gaps([_shifted_items(0.0)], 0, {})
    assert all(r["launch"] is None for r in plain["layer_kernels"])
    assert "Launched otherwise" not in render_against(against(plain, there), "o")


def test_trace_against_prints_and_stores_the_comparison(tmp_path, capsys):
    here, there = tmp_path / "a.json.gz", tmp_path / "b.json.gz"
    here.write_bytes(gzip.compress(json.dumps(layered_trace()).encode()))
    there.write_bytes(gzip.compress(json.dumps(layered_trace()).encode()))
    assert main(["trace", str(here), "--against", str(there)]) == 0
    out = capsys.readouterr().out
    assert f"Against {there}: step 0.0900 and 0.0900 ms" in out
    assert "A layer's kernels here and there (change: there less here):" in out
    assert main(["trace", str(here), "--against", str(there), "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)["against"]
    assert stored["file"] == str(there) and stored["note"] is None
    assert [r["name"] for r in stored["rows"]] == ["l0_a", "l0_b", "l0_c"]
    # a trace without a GPU decode step: one line, exit 2, nothing printed
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"traceEvents": [_event("cpu_op", "aten::mm", 0, 5)]}))
    assert main(["trace", str(here), "--against", str(cpu)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip().count("\n") == 0
    assert f"--against: {cpu} has no GPU decode step to compare" in captured.err
