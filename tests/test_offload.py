"""`infermeter offload` on the CPU: a prefix's KV cache kept in a second CPU buffer, reloaded
whole (serial) or layer by layer under the suffix's forward, against a prefill of prefix +
suffix. Same greedy tokens all three ways (GQA and a ring layer), the layer-wise schedule's
order from recorded events, the break-even arithmetic on synthetic numbers, one error line for
what cannot fit or is not a length. No speed is asserted."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from infermeter.engine.generator import GenerationConfig, Generator
from infermeter.engine.model import build_model
from infermeter.errors import InfermeterError
from infermeter.measure.result import Result, read_results
from infermeter.offload.breakeven import break_even
from infermeter.offload.case import measure_case
from infermeter.offload.job import break_evens, paged_break_evens
from infermeter.offload.paged import PagedHostPrefix
from infermeter.offload.reload import HostPrefix, LayerwiseReload, layer_caches
from infermeter.offload.request import OffloadRequest
from infermeter.offload.streamed import StreamedDecode
from infermeter.offload.table import render_offload
from infermeter.offload.traffic import CopyTraffic, decode_under_traffic
from infermeter.specs.presets import PRESETS
from tests.cli_in_process import run_cli

DEBUG = PRESETS["debug"]
SPECS = {"gqa": DEBUG,
         # a 12-token window on layer 0: the prefix outgrows it, so that layer is a ring
         "window": DEBUG.with_updates(name="debug-window", sliding_window=12,
                                      sliding_window_layers=(0,))}
PREFIX, SUFFIX = 20, 7


@pytest.fixture(scope="module", params=sorted(SPECS))
def generator(request):
    return Generator(build_model(SPECS[request.param], device="cpu", seed=3), prefill_chunk=None)


ONE = GenerationConfig(max_new_tokens=1)  # a prefill's settings: greedy, no stop ids


def _tokens(batch: int = 2) -> torch.Tensor:
    return torch.randint(DEBUG.vocab_size, (batch, PREFIX + SUFFIX),
                         generator=torch.Generator().manual_seed(5))


# ---- the three ways agree ------------------------------------------------------------------
def test_same_greedy_tokens_all_three_ways(generator):
    request = OffloadRequest("random:debug", (PREFIX,), (SUFFIX,), batch_size=2, new_tokens=5,
                             repeats=1, warmup=0)
    case, raw, notes = measure_case(generator, request, PREFIX, SUFFIX)
    assert case["same_tokens"]
    assert [note for note in notes if "differ" in note] == []
    assert len(case["output_token_ids"]) == 2 and len(case["output_token_ids"][0]) == 5
    assert set(raw) == {"reload", "suffix_prefill", "serial", "layerwise", "recompute"}
    assert all(len(samples) == 1 for samples in raw.values())
    assert case["reload_bytes"] > 0


@pytest.mark.parametrize("way", ["serial", "layerwise"])
def test_reloaded_cache_gives_the_recomputed_logits(generator, way):
    """The suffix's last logits after a reload into a zeroed cache equal recompute's; without
    the reload they do not (so the check can fail)."""
    model, tokens = generator.model, _tokens()
    generator.prepare(2, PREFIX + SUFFIX, 1)
    generator.prefill(tokens[:, :PREFIX], ONE)  # the prefix's cache, as a request left it
    host = HostPrefix(model, PREFIX)
    model.reset_cache()
    whole = model(tokens, torch.arange(PREFIX + SUFFIX))[:, -1]  # [B, V]
    seen = []
    handle = model.register_forward_hook(lambda m, a, out: seen.append(out[:, -1]))
    try:
        model.reset_cache()
        generator.prefill(tokens[:, PREFIX:], ONE, start=PREFIX)  # nothing reloaded
        model.reset_cache()
        if way == "serial":
            host.reload(model)
            generator.prefill(tokens[:, PREFIX:], ONE, start=PREFIX)
        else:
            with LayerwiseReload(model, host) as reload:
                reload.start()
                generator.prefill(tokens[:, PREFIX:], ONE, start=PREFIX)
    finally:
        handle.remove()
    empty, reloaded = seen
    assert not torch.allclose(empty, whole, atol=1e-3)
    torch.testing.assert_close(reloaded, whole, atol=1e-4, rtol=1e-4)


# ---- the layer-wise schedule ---------------------------------------------------------------
def _schedule(generator, lookahead):
    """The events of one layer-wise reload + forward; ("attention", i) when layer i's attention
    first touches its cache (each of LayerKVCache's entry points, wrapped on the instance: a
    forward from a later start calls update_from, a ring layer then update)."""
    model = generator.model
    trace: list[tuple[str, int]] = []
    caches = [layer.attention.kv_cache for layer in model.layers]
    entries = ("update", "update_from", "write_own")
    for i, cache in enumerate(caches):
        for name in entries:
            original = getattr(cache, name)

            def touch(*args, i=i, original=original):
                if ("attention", i) not in trace:
                    trace.append(("attention", i))
                return original(*args)
            setattr(cache, name, touch)
    host = HostPrefix(model, PREFIX)
    try:
        with LayerwiseReload(model, host, lookahead=lookahead, trace=trace) as reload:
            reload.start()
            generator.prefill(_tokens()[:, PREFIX:], ONE, start=PREFIX)
    finally:
        for cache in caches:
            for name in entries:
                delattr(cache, name)
    return trace


@pytest.mark.parametrize("lookahead", [None, 1])
def test_each_layer_attends_after_its_copy_and_copies_go_ahead(generator, lookahead):
    model = generator.model
    generator.prepare(2, PREFIX + SUFFIX, 1)
    trace = _schedule(generator, lookahead)
    n = len(model.layers)
    assert sorted(trace) == sorted([(what, i) for i in range(n)
                                    for what in ("copy", "wait", "attention")])
    for i in range(n):
        assert trace.index(("copy", i)) < trace.index(("wait", i)) < trace.index(("attention", i))
        if i + 1 < n:  # the next layer's copy is in flight while this layer computes
            assert trace.index(("copy", i + 1)) < trace.index(("attention", i))
    copies = [i for what, i in trace if what == "copy"]
    assert copies == list(range(n))
    if lookahead is None:  # every copy issued before the first layer computes
        assert trace[:n] == [("copy", i) for i in range(n)]
    else:
        assert trace[:2] == [("copy", 0), ("copy", 1)]


def test_hooks_leave_with_the_reload_and_a_forward_without_start_is_refused(generator):
    model = generator.model
    generator.prepare(2, PREFIX + SUFFIX, 1)
    reload = LayerwiseReload(model, HostPrefix(model, PREFIX))
    with reload, pytest.raises(InfermeterError, match="start"):
        generator.prefill(_tokens()[:, PREFIX:], ONE, start=PREFIX)
    assert all(not layer.attention._forward_pre_hooks for layer in model.layers)


# ---- break-even arithmetic -----------------------------------------------------------------
def _points(reload, recompute, lengths=(100, 200, 300, 400)):
    return [(p, reload(p), recompute(p)) for p in lengths]


def test_break_even_interpolates_between_the_measured_lengths():
    found = break_even(_points(lambda p: 10 + 0.01 * p, lambda p: 0.05 * p))
    assert found.status == "measured"
    assert found.prefix_len == pytest.approx(250.0)
    # any order in, the same answer
    assert break_even(_points(lambda p: 10 + 0.01 * p, lambda p: 0.05 * p)[::-1]) == found


def test_break_even_outside_the_range_is_not_extrapolated():
    below = break_even(_points(lambda p: 1.0, lambda p: 0.05 * p))
    above = break_even(_points(lambda p: 100.0, lambda p: 0.05 * p))
    assert (below.status, below.prefix_len, below.shortest) == ("below", None, 100)
    assert (above.status, above.prefix_len, above.longest) == ("above", None, 400)
    assert break_even([(64, 1.0, 1.0)]).status == "above"  # a tie is no win


def test_break_even_takes_the_last_crossing():
    # reload wins at 100, loses at 200, wins from there: the crossing between 200 and 300
    gains = {100: 1.0, 200: -3.0, 300: 1.0, 400: 5.0}
    found = break_even([(p, 10.0, 10.0 + g) for p, g in gains.items()])
    assert found.prefix_len == pytest.approx(275.0)


def test_break_evens_per_suffix_and_way():
    cases = [{"prefix_len": p, "suffix_len": s,
              "ttft_ms": {"serial": 10 + 0.01 * p, "layerwise": 5 + 0.01 * p,
                          "recompute": 0.05 * p}}
             for s in (8, 32) for p in (100, 200, 300, 400)]
    rows = break_evens(cases, (8, 32))
    assert [(r["suffix_len"], r["way"], r["prefix_len"]) for r in rows] == [
        (8, "serial", pytest.approx(250.0)), (8, "layerwise", pytest.approx(125.0)),
        (32, "serial", pytest.approx(250.0)), (32, "layerwise", pytest.approx(125.0))]


def test_paged_break_evens_per_suffix_block_and_way():
    # recompute 1, 2, 4 ms at 8, 16, 32 tokens; blocks of 16: serial 3 ms (gains -2, -1, +1:
    # the crossing half way from 16 to 32), layer-wise 5 (recompute always); blocks of 256 0.5
    paged = {16: {"serial": 3.0, "layerwise": 5.0}, 256: {"serial": 0.5, "layerwise": 0.5}}
    cases = [{"prefix_len": p, "suffix_len": 4, "ttft_ms": {"recompute": r},
              "paged": [{"block_size": b, "ttft_ms": t} for b, t in paged.items()]}
             for p, r in ((8, 1.0), (16, 2.0), (32, 4.0))]
    rows = paged_break_evens(cases, (4,), (16, 256))
    assert [(r["block_size"], r["way"], r["status"], r["prefix_len"]) for r in rows] == [
        (16, "serial", "measured", pytest.approx(24.0)), (16, "layerwise", "above", None),
        (256, "serial", "below", None), (256, "layerwise", "below", None)]


# ---- the paged layout ----------------------------------------------------------------------
@pytest.mark.parametrize("block", [7, 16, 64])
def test_a_paged_reload_puts_back_what_a_whole_reload_does(generator, block):
    """Block by block from a scattered pool (the last block partly filled, a ring layer's slots
    too), the cache ends as a whole reload leaves it, bytes and all."""
    model = generator.model
    generator.prepare(2, PREFIX + SUFFIX, 1)
    generator.prefill(_tokens()[:, :PREFIX], ONE)
    host, paged = HostPrefix(model, PREFIX), PagedHostPrefix(model, PREFIX, block, seed=1)
    model.reset_cache()
    host.reload(model)
    whole = [(c.k.clone(), c.v.clone(), c.key_pos.clone()) for c in layer_caches(model)]
    assert whole[0][0].abs().sum() > 0  # a filled cache is compared
    model.reset_cache()
    paged.reload(model)
    for (k, v, key_pos), cache in zip(whole, layer_caches(model)):
        assert torch.equal(cache.k, k) and torch.equal(cache.v, v)
        assert torch.equal(cache.key_pos, key_pos)
    assert paged.nbytes == host.nbytes
    slots = [min(PREFIX, cache.size) for cache in layer_caches(model)]
    assert paged.copies == sum(2 * 2 * math.ceil(n / block) for n in slots)  # B = 2, K and V
    if block == 7:  # the pool's slots are a permutation, not the sequences' order
        pool = [slot for *_, slot in paged.layers[-1].blocks]
        assert sorted(pool) == list(range(len(pool))) and pool != sorted(pool)


def test_same_greedy_tokens_from_the_paged_copy(generator):
    request = OffloadRequest("random:debug", (PREFIX,), (SUFFIX,), batch_size=2, new_tokens=4,
                             repeats=1, warmup=0, block_sizes=(16, 7, 16))
    assert request.block_sizes == (7, 16)
    case, raw, notes = measure_case(generator, request, PREFIX, SUFFIX)
    assert [entry["block_size"] for entry in case["paged"]] == [7, 16]
    assert all(entry["same_tokens"] for entry in case["paged"]) and case["same_tokens"]
    assert [note for note in notes if "differ" in note] == []
    assert {"paged7_reload", "paged7_serial", "paged7_layerwise"} <= set(raw)
    assert case["paged"][0]["reload_bytes"] == case["reload_bytes"]


# ---- bad input: one line, exit 2 -----------------------------------------------------------
@pytest.mark.parametrize("args, says", [
    (["--prefix-len", "300"], "context of 256 tokens"),
    (["--prefix-len", "60", "--max-seq-len", "64"], "KV cache of 64 tokens"),
    (["--prefix-len"], "expected at least one argument"),
    (["--prefix-len", "0"], "must be a positive integer"),
    (["--prefix-len", "8", "--suffix-len", "0"], "must be a positive integer"),
    (["--prefix-len", "8", "--suffix-len"], "expected at least one argument"),
    (["--prefix-len", "8", "--batch-size", "0"], "must be a positive integer"),
    (["--prefix-len", "200", "--batch-size", "1000000000"], "does not fit"),  # sized, not made
    (["--prefix-len", "8", "--traffic", "d2h", "--context", "250"], "decode under copy traffic"),
    (["--prefix-len", "8", "--traffic", "sideways"], "invalid choice"),
    (["--prefix-len", "8", "--block-size", "0"], "must be a positive integer"),
])
def test_bad_input_is_one_error_line(args, says):
    done = run_cli("offload", "--model", "debug", "--suffix-len", "8", *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and says in lines[0], done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("field, value, says", [
    ("prefix_lens", (), "at least one length"), ("suffix_lens", (4, 0), "positive"),
    ("prefix_lens", (8, -1), "positive"), ("traffic", ("up",), "unknown direction"),
    ("decode_steps", 0, "at least 1"), ("block_sizes", (16, 0), "--block-size")])
def test_the_request_refuses_empty_or_non_positive_lengths(field, value, says):
    lengths = {"prefix_lens": (8,), "suffix_lens": (4,), field: value}
    with pytest.raises(InfermeterError, match=says):
        OffloadRequest("random:debug", **lengths)


# ---- decode under copy traffic -------------------------------------------------------------
def test_background_copies_move_the_bytes_and_stop():
    traffic = CopyTraffic(torch.device("cpu"), chunk_bytes=1 << 16)
    device_chunk, host_chunk = traffic.buffers["h2d"]
    host_chunk.copy_(torch.arange(1 << 16, dtype=torch.int64).to(torch.uint8))
    traffic.copy_once("h2d")
    assert torch.equal(device_chunk, host_chunk)
    device_chunk, host_chunk = traffic.buffers["d2h"]
    device_chunk.fill_(7)
    traffic.copy_once("d2h")
    assert torch.equal(host_chunk, device_chunk)
    with traffic.run_threads("both") as threads:
        while min(threads.moved.values()) == 0:
            time.sleep(0.001)
    assert not any(thread.is_alive() for thread in threads.threads)
    assert set(threads.moved) == {"d2h", "h2d"} and threads.gbps > 0


def test_decode_under_traffic_keeps_the_tokens(generator):
    from infermeter.engine.generator import GenerationConfig

    config = GenerationConfig(max_new_tokens=5)
    generator.prepare(2, 16, 5)
    state = generator.prefill(_tokens()[:, :16], config)
    entries, samples, notes = decode_under_traffic(
        generator, state, config, steps=4, directions=("d2h", "both"), repeats=2, warmup=1,
        traffic=CopyTraffic(torch.device("cpu"), chunk_bytes=1 << 16))
    assert [e["direction"] for e in entries] == ["d2h", "both"]
    assert all(e["same_tokens"] and e["method"] == "cpu thread" for e in entries)
    # alone, traffic, alone, traffic, alone: one more alone window than traffic windows
    assert set(samples) == {"d2h", "d2h alone", "both", "both alone"}
    assert all(len(samples[label]) == 2 and len(samples[f"{label} alone"]) == 3
               for label in ("d2h", "both"))
    assert all(e["copy_window_bytes"] > 0 and e["copy_gbps"] > 0 for e in entries)


# ---- the command end to end ----------------------------------------------------------------
def test_command_writes_an_offload_result_and_prints_a_table(tmp_path):
    out = tmp_path / "offload.jsonl"
    common = ("offload", "--model", "debug", "--device", "cpu", "--prefix-len", "24", "8",
              "--suffix-len", "4", "--repeats", "1", "--warmup", "0", "--new-tokens", "3",
              "--prefill-chunk", "16")
    done = run_cli(*common, "--traffic", "both", "--offloaded-decode", "--decode-steps", "3",
                   "--block-size", "16", "--json", "--output", str(out))
    assert done.returncode == 0, done.stderr
    printed = Result.from_dict(json.loads(done.stdout))
    [written] = read_results(out)
    assert printed.to_dict() == written.to_dict()
    assert written.kind == "offload" and written.metrics["same_tokens"] is True
    assert [c["prefix_len"] for c in written.metrics["cases"]] == [8, 24]
    assert {r["way"] for r in written.metrics["break_even"]} == {"serial", "layerwise"}
    assert written.config["host_memory"] == "cpu" and written.config["prefill_chunk"] == 16
    [traffic] = written.metrics["traffic"]
    assert (traffic["direction"], traffic["context"], traffic["same_tokens"]) == ("both", 24, True)
    assert written.config["traffic"] == ["both"] and written.config["decode_steps"] == 3
    table = render_offload(written)
    assert "(b) layer" in table and "suffix 4, (a) serial:" in table
    assert "decode under copy traffic" in table
    streamed = written.metrics["offloaded_decode"]
    assert streamed["same_tokens"] is True and streamed["bytes_per_step"] > 0
    assert "offloaded decode" in table
    assert written.config["block_sizes"] == [16]
    assert [(r["block_size"], r["way"]) for r in written.metrics["paged_break_even"]] == [
        (16, "serial"), (16, "layerwise")]
    assert "suffix 4, blocks of 16, (a) serial:" in table
    shown = run_cli(*common)
    assert shown.returncode == 0 and "(c) recompute" in shown.stdout, shown.stderr


def test_report_shows_an_offload_result_and_still_renders(tmp_path):
    from infermeter.report.build import build_report, render

    request = OffloadRequest("random:debug", (8,), (4,), repeats=1, warmup=0, new_tokens=2)
    cases = [{"prefix_len": 8, "suffix_len": 4, "ttft_ms": {"serial": 1.0, "layerwise": 1.0,
                                                            "recompute": 2.0}}]
    result = Result("offload", DEBUG.to_dict(), {"device": "cpu"}, {}, {
        "cases": cases, "break_even": break_evens(cases, request.suffix_lens)})
    path = tmp_path / "offload.jsonl"
    path.write_text(result.to_json() + "\n")
    report = build_report([str(path)])
    assert f"{path}: offload Result, 'cpu · debug' in the offload tables" in report.notes
    assert report.columns == []
    markdown = render(report, "markdown")
    assert "Reference table" in markdown
    assert "| cpu · debug | 4 | 8 | 1.00 ms | 1.00 ms | 2.00 ms | - | - | - |" in markdown


# ---- offloaded decode ----------------------------------------------------------------------
def test_streamed_decode_gives_the_tokens_of_the_cache_on_the_device_and_leaves_no_cache():
    from infermeter.engine.generator import GenerationConfig
    from infermeter.offload.windows import DecodeWindows

    gen = Generator(build_model(DEBUG.with_updates(n_layers=5), device="cpu", seed=4))
    config = GenerationConfig(max_new_tokens=7)
    gen.prepare(2, 16, 7)
    state = gen.prefill(_tokens()[:, :16], config)
    windows = DecodeWindows(gen, state, config, steps=6)
    logits: list[torch.Tensor] = []  # every step's [B, V]: tokens alone may hide a wrong key
    handle = gen.model.register_forward_hook(lambda m, a, out: logits.append(out[:, -1]))
    windows.run()
    trace: list[tuple[str, int]] = []
    try:
        with StreamedDecode(gen.model, context=16, trace=trace) as streamed:
            # the other layers' caches are gone: the layers share two buffers
            assert gen.model.layers[0].attention.kv_cache is \
                gen.model.layers[4].attention.kv_cache
            windows.run(streamed.step_at)
            assert streamed.bytes_per_step == 5 * 2 * (2 * 2 * 16 * 16 * 4)  # layers, K/V, bytes
    finally:
        handle.remove()
    on_device, streamed_tokens = windows.outputs
    assert streamed_tokens == on_device
    torch.testing.assert_close(torch.stack(logits[6:]), torch.stack(logits[:6]))
    assert all(layer.attention.kv_cache is None for layer in gen.model.layers)
    assert gen.generate(_tokens()[:, :16], config).output_token_ids[0][1:] == on_device[0]
    # one step's schedule: layer i streamed in before it waits and attends; the buffer it used
    # refilled (layer i + 2) only after it attended; the next layer's copy already issued
    step = trace[:trace.index(("attended", 4)) + 1]
    for i in range(5):
        assert step.index(("copy", i)) < step.index(("wait", i)) < step.index(("attended", i))
        if i + 2 < 5:
            assert step.index(("attended", i)) < step.index(("copy", i + 2))
        if i + 1 < 5:
            assert step.index(("copy", i + 1)) < step.index(("attended", i))
    assert len(trace) == 6 * len(step)


def test_streamed_decode_refuses_a_sliding_window_model():
    gen = Generator(build_model(SPECS["window"], device="cpu", seed=4))
    gen.prepare(1, 16, 2)
    with pytest.raises(InfermeterError, match="sliding-window"):
        StreamedDecode(gen.model, context=16)
