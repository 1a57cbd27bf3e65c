"""Decode under copy traffic: the accounting (bytes moved inside a decode window, every
direction's bytes over their combined span, each traffic window against the alone windows
around it) on made-up times; that the copies move the bytes they report; that a copy touching
the cache is caught by the same-tokens check; the warning for copies that do not cover a
window. The GPU tests run the real measurement on the debug model. No speed is asserted."""

from __future__ import annotations

import pytest
import torch

from infermeter.engine.generator import GenerationConfig, Generator
from infermeter.engine.model import build_model
from infermeter.offload import traffic as tr
from infermeter.specs.presets import PRESETS

CPU = torch.device("cpu")
MB = 1_000_000


# ---- bytes inside a window, on made-up marks (ms) ------------------------------------------
def test_in_window_counts_chunks_inside_whole_and_straddling_ones_by_their_share():
    marks = tr.CopyMarks({"d2h": [0.0, 10.0, 20.0, 30.0, 40.0]}, chunk_bytes=1000)
    inside = marks.in_window(15.0, 35.0)
    # (0, 10): none; (10, 20): half; (20, 30): whole; (30, 40): half
    assert inside.bytes == pytest.approx(2000)
    assert inside.ms == pytest.approx(20.0)
    assert inside.gbps == pytest.approx(2000 / 20.0 / 1e6)
    assert not inside.started_late and not inside.ended_early and inside.notes("x") == []
    # a window on chunk edges: only the chunks between them
    assert marks.in_window(10.0, 30.0).bytes == pytest.approx(2000)
    # the whole run's figure would count the four chunks over 40 ms: not what a window sees
    assert marks.span_gbps == pytest.approx(4000 / 40.0 / 1e6)


def test_in_window_adds_both_ways_and_a_chunk_of_no_time_counts_where_it_ended():
    marks = tr.CopyMarks({"d2h": [0.0, 10.0, 20.0], "h2d": [5.0, 25.0, 25.0]}, chunk_bytes=1000)
    inside = marks.in_window(10.0, 20.0)
    # d2h: (10, 20) whole; h2d: (5, 25) for 10 of its 20 ms; (25, 25) outside the window
    assert inside.bytes == pytest.approx(1500)
    assert marks.in_window(10.0, 25.0).bytes == pytest.approx(1000 + 750 + 1000)


@pytest.mark.parametrize(("window", "late", "early", "ms"), [
    ((10.0, 50.0), False, True, 20.0),   # the copies ended at 30: the window ran on alone
    ((-5.0, 20.0), True, False, 20.0),   # they started at 0, after the window did
    ((-5.0, 50.0), True, True, 30.0),
])
def test_copies_that_do_not_cover_the_window_are_flagged(window, late, early, ms):
    marks = tr.CopyMarks({"d2h": [0.0, 10.0, 20.0, 30.0]}, chunk_bytes=1000)
    inside = marks.in_window(*window)
    assert (inside.started_late, inside.ended_early) == (late, early)
    assert inside.ms == pytest.approx(ms)  # the time the copies ran inside the window
    notes = inside.notes("decode under d2h copies")
    assert any("ended before the decode window" in n for n in notes) == early
    assert any("started after the decode window" in n for n in notes) == late


def test_one_way_ending_early_flags_the_window_of_both():
    marks = tr.CopyMarks({"d2h": [0.0, 10.0, 20.0], "h2d": [0.0, 40.0]}, chunk_bytes=1000)
    assert marks.in_window(5.0, 30.0).ended_early


# ---- both directions: total bytes over the combined span ------------------------------------
def test_both_directions_divide_all_bytes_by_the_combined_span():
    # d2h: 1000 MB in 10 ms (100 GB/s on its own); h2d: 1000 MB from 2 to 20 ms (55.6 GB/s)
    marks = tr.CopyMarks({"d2h": [0.0, 5.0, 10.0], "h2d": [2.0, 11.0, 20.0]},
                         chunk_bytes=500 * MB)
    assert marks.moved == 2000 * MB
    assert marks.span_ms == pytest.approx(20.0)
    assert marks.span_gbps == pytest.approx(100.0)  # not 155.6, the two rates added


def test_the_alone_samples_are_sized_and_repeated(monkeypatch):
    """copy_alone on a GPU: a first run of ALONE_CHUNKS sizes each sample to ALONE_MS of
    copying; `repeats` samples follow (the queue stood in by made-up marks at 50 GB/s a way)."""
    runs = []

    class Queued:
        def __init__(self, chunks, ways):
            per_chunk = 64 * MB / 50e9 * 1e3
            self.got = tr.CopyMarks({w: [i * per_chunk for i in range(chunks + 1)] for w in ways},
                                    64 * MB)

        def marks(self):
            return self.got

    traffic = tr.CopyTraffic(CPU, chunk_bytes=1 << 10)
    traffic.cuda, traffic.chunk_bytes = True, 64 * MB
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(traffic, "enqueue", lambda direction, chunks, method: (
        runs.append(chunks), Queued(chunks, tr._ways(direction)))[1])
    samples = tr.copy_alone(traffic, "both", repeats=3)
    assert samples == pytest.approx([100.0] * 3)
    per_chunk_ms = 64 * MB / 50e9 * 1e3
    assert runs[0] == tr.ALONE_CHUNKS
    assert runs[1:] == [runs[1]] * 3 and runs[1] * per_chunk_ms >= tr.ALONE_MS > \
        (runs[1] - 1) * per_chunk_ms


# ---- each traffic window against the alone windows around it --------------------------------
def test_slowdowns_compare_each_traffic_window_with_its_neighbours():
    # the alone windows drift from 10 to 14 ms: a traffic window of 12 between 11 and 13 is 0%
    assert tr.interleaved_slowdowns([10.0, 12.0, 14.0], [11.55, 13.0]) == pytest.approx(
        [5.0, 0.0])
    assert tr.interleaved_slowdowns([10.0, 11.0, 12.0, 13.0], [10.5, 11.5, 12.5]) == \
        pytest.approx([0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="need 3 alone windows"):
        tr.interleaved_slowdowns([10.0, 12.0], [11.0, 12.0])


# ---- the copies move what they report -------------------------------------------------------
def _fill(tensor, seed):
    tensor.copy_(torch.randint(256, tensor.shape, dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(seed)))


def test_threads_move_the_sources_bytes_and_count_every_chunk(monkeypatch):
    traffic = tr.CopyTraffic(CPU, chunk_bytes=1 << 16)
    (d2h_device, d2h_host), (h2d_device, h2d_host) = traffic.buffers["d2h"], \
        traffic.buffers["h2d"]
    _fill(d2h_device, 1)
    _fill(h2d_host, 2)
    d2h_host.zero_()
    h2d_device.zero_()
    copies = {"d2h": 0, "h2d": 0}
    copy_once = traffic.copy_once

    def counted(way, method="dma"):
        copy_once(way, method)
        copies[way] += 1

    monkeypatch.setattr(traffic, "copy_once", counted)
    with traffic.run_threads("both") as threads:
        assert min(copies.values()) >= 1  # entered once every way has copied
    assert torch.equal(d2h_host, d2h_device) and torch.equal(h2d_device, h2d_host)
    marks = threads.marks()
    assert marks.moved == (copies["d2h"] + copies["h2d"]) * traffic.chunk_bytes
    assert threads.moved == {way: n * traffic.chunk_bytes for way, n in copies.items()}
    assert all(a <= b for m in marks.ways.values() for a, b in zip(m, m[1:], strict=False))


# ---- the decode under traffic, on the CPU ----------------------------------------------------
@pytest.fixture(scope="module")
def generator():
    return Generator(build_model(PRESETS["debug"], device="cpu", seed=3), prefill_chunk=None)


def _decode(generator, traffic, directions=("d2h",), repeats=2, warmup=0):
    config = GenerationConfig(max_new_tokens=5)
    generator.prepare(1, 12, 5)
    tokens = torch.randint(PRESETS["debug"].vocab_size, (1, 12),
                           generator=torch.Generator().manual_seed(2))
    state = generator.prefill(tokens.to(generator.device), config)
    return tr.decode_under_traffic(generator, state, config, steps=4, directions=directions,
                                   repeats=repeats, warmup=warmup, traffic=traffic)


def test_windows_alternate_and_each_entry_holds_its_figures(generator):
    entries, samples, _ = _decode(generator, tr.CopyTraffic(CPU, chunk_bytes=1 << 16),
                                  directions=("d2h", "both"), repeats=3, warmup=1)
    assert set(samples) == {"d2h", "d2h alone", "both", "both alone"}
    assert all(len(samples[label]) == 3 and len(samples[f"{label} alone"]) == 4
               for label in ("d2h", "both"))
    for entry in entries:
        label = entry["direction"]
        assert entry["slowdowns_pct"] == pytest.approx(
            tr.interleaved_slowdowns(samples[f"{label} alone"], samples[label]))
        assert entry["copy_stats"]["n"] == 3 and entry["copy_alone_stats"]["n"] == \
            tr.ALONE_REPEATS
        assert entry["copy_window_bytes"] > 0 and entry["same_tokens"]


def test_a_copy_into_the_cache_changes_the_tokens(generator):
    """The same-tokens check can fail: an h2d copy whose device side is the prompt's cache."""
    traffic = tr.CopyTraffic(CPU, chunk_bytes=1 << 12)
    cache = generator.model.cache_tensors()[0]  # layer 0's keys, the prompt's positions first
    host = torch.full((traffic.chunk_bytes,), 0x42, dtype=torch.uint8)  # floats of 48.6
    traffic.buffers["h2d"] = (cache.view(-1).view(torch.uint8)[:traffic.chunk_bytes], host)
    entries, _, _ = _decode(generator, traffic, directions=("h2d",), repeats=1)
    assert [e["same_tokens"] for e in entries] == [False]


def test_copies_ending_before_the_window_are_warned(generator, monkeypatch):
    monkeypatch.setattr(tr._Threads, "marks", lambda self: tr.CopyMarks(
        {"d2h": [0.0, 1.0]}, self.traffic.chunk_bytes))  # on the host clock: long before
    _, _, notes = _decode(generator, tr.CopyTraffic(CPU, chunk_bytes=1 << 16), repeats=1)
    assert "decode under d2h copies: the copies ended before the decode window did" in notes


# ---- on a GPU --------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_queued_copies_move_the_bytes_they_count():
    cuda = torch.device("cuda")
    traffic = tr.CopyTraffic(cuda, chunk_bytes=4 << 20)
    for way, seed in (("d2h", 4), ("h2d", 5)):
        device_chunk, host_chunk = traffic.buffers[way]
        source = device_chunk if way == "d2h" else host_chunk
        source.copy_(torch.randint(256, source.shape, dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(seed)))
        (host_chunk if way == "d2h" else device_chunk).zero_()
    torch.cuda.synchronize()
    queued = traffic.enqueue("both", 3, "dma")
    torch.cuda.synchronize()
    for device_chunk, host_chunk in traffic.buffers.values():
        assert torch.equal(device_chunk.cpu(), host_chunk)
    marks = queued.marks()
    assert marks.moved == 2 * 3 * traffic.chunk_bytes
    assert all(len(m) == 4 and all(a <= b for a, b in zip(m, m[1:], strict=False))
               for m in marks.ways.values())
    assert marks.span_gbps > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_under_dma_traffic_counts_the_window():
    cuda = torch.device("cuda")
    gen = Generator(build_model(PRESETS["debug"], device="cuda", seed=3), prefill_chunk=None)
    entries, samples, notes = _decode(gen, tr.CopyTraffic(cuda, chunk_bytes=8 << 20),
                                      directions=("d2h", "both"), repeats=2, warmup=1)
    assert [(e["direction"], e["method"]) for e in entries] == [("d2h", "dma"), ("both", "dma")]
    for entry in entries:
        assert entry["same_tokens"] and entry["copy_gbps"] > 0 and entry["copy_alone_gbps"] > 0
        assert entry["copy_window_bytes"] > 0 and len(entry["slowdowns_pct"]) == 2
    assert len(samples["both alone"]) == 3
    assert not any("ended before" in n or "started after" in n for n in notes), notes
