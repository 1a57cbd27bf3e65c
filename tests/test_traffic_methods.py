"""`offload --traffic-method dma|mapped`: the decode-under-traffic copies by the copy engines
(dma) or by an SM kernel on mapped pinned host memory (mapped, copy's method of that name).
On the CPU the mapped method is refused with one line (asked for) or left out with the reason
recorded (by default); the mapped copy's direction logic runs on the CPU with the mapping
stood in by the host buffer itself; the GPU tests check the real mapping, that the copy is a
kernel and not a memcpy, and the decode under both methods. No speed is asserted."""

from __future__ import annotations

import pytest
import torch

from infermeter.engine.generator import GenerationConfig, Generator
from infermeter.engine.model import build_model
from infermeter.errors import InfermeterError
from infermeter.measure.mapped_host import kernel_copy
from infermeter.measure.result import Result
from infermeter.offload import traffic as tr
from infermeter.offload.job import traffic_methods_for
from infermeter.offload.request import OffloadRequest
from infermeter.specs.presets import PRESETS
from tests.cli_in_process import run_cli

CPU = torch.device("cpu")


def _request(**kw):
    return OffloadRequest("random:debug", (8,), (4,), **kw)


# ---- the request and the command -------------------------------------------------------------
def test_the_request_orders_methods_and_refuses_unknown_or_idle_ones():
    assert _request(traffic=("d2h",), traffic_methods=("mapped", "dma", "mapped")
                    ).traffic_methods == ("dma", "mapped")
    with pytest.raises(InfermeterError, match="unknown method 'sm'"):
        _request(traffic=("d2h",), traffic_methods=("sm",))
    with pytest.raises(InfermeterError, match="give --traffic"):
        _request(traffic_methods=("dma",))


def test_the_cpu_refuses_mapped_when_asked_and_leaves_it_out_by_default():
    with pytest.raises(InfermeterError, match="needs a CUDA device"):
        traffic_methods_for(_request(traffic=("d2h",), traffic_methods=("mapped",)), CPU)
    assert traffic_methods_for(_request(traffic=("d2h",), traffic_methods=("dma",)), CPU) == (
        ("dma",), [])
    methods, notes = traffic_methods_for(_request(traffic=("both",)), CPU)
    assert methods == ("dma",)
    assert len(notes) == 1 and "mapped method (SM copy kernel) was not measured" in notes[0]
    assert traffic_methods_for(_request(), CPU) == ((), [])  # no --traffic: nothing to run
    with pytest.raises(InfermeterError, match="needs a CUDA device"):
        tr.CopyTraffic(CPU, chunk_bytes=1 << 16, mapped=True)


def test_the_command_refuses_mapped_on_the_cpu_in_one_line(monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("the weights must not load before the refusal")

    monkeypatch.setattr("infermeter.engine.checkpoint.load.load_weights", no_weights)
    done = run_cli("offload", "--model", "debug", "--device", "cpu", "--prefix-len", "8",
                   "--suffix-len", "4", "--traffic", "d2h", "--traffic-method", "mapped")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--traffic-method mapped" in lines[0] \
        and "needs a CUDA device" in lines[0] and "Traceback" not in done.stderr


# ---- the mapped copy's logic, the mapping stood in by the host buffer -------------------------
def _hand_mapped(monkeypatch, chunk_bytes: int) -> tr.CopyTraffic:
    """A CPU CopyTraffic whose "mapped view" of each host chunk is the chunk itself, so the
    mapped method's kernel_copy runs its rows and directions on the CPU."""
    monkeypatch.setattr(tr, "mapped_view", lambda host, device: (host, "the host buffer"))
    traffic = tr.CopyTraffic(CPU, chunk_bytes=chunk_bytes)
    traffic._map()
    return traffic


def test_kernel_copy_copies_every_row():
    src = torch.arange(6 * 5, dtype=torch.int64).view(6, 5)
    dst = torch.zeros_like(src)
    kernel_copy(dst, src, torch.arange(6))
    assert torch.equal(dst, src)


def test_the_mapped_copy_moves_each_way_in_its_direction(monkeypatch):
    traffic = _hand_mapped(monkeypatch, chunk_bytes=tr.MAPPED_ROW_BYTES * 2)
    device_rows, host_rows = traffic.mapped["h2d"]
    assert device_rows.shape == host_rows.shape == (2, tr.MAPPED_ROW_BYTES // 8)
    device_chunk, host_chunk = traffic.buffers["h2d"]
    host_chunk.copy_(torch.randint(256, host_chunk.shape, dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(1)))
    sent = host_chunk.clone()
    device_chunk.zero_()
    traffic.copy_once("h2d", "mapped")
    assert torch.equal(device_chunk, sent) and torch.equal(host_chunk, sent)
    device_chunk, host_chunk = traffic.buffers["d2h"]
    device_chunk.fill_(7)
    host_chunk.zero_()
    traffic.copy_once("d2h", "mapped")
    assert bool((host_chunk == 7).all()) and bool((device_chunk == 7).all())


@pytest.fixture(scope="module")
def generator():
    return Generator(build_model(PRESETS["debug"], device="cpu", seed=3), prefill_chunk=None)


def _decode(generator, traffic, methods):
    config = GenerationConfig(max_new_tokens=4)
    generator.prepare(1, 12, 4)
    tokens = torch.randint(PRESETS["debug"].vocab_size, (1, 12),
                           generator=torch.Generator().manual_seed(2))
    state = generator.prefill(tokens.to(generator.device), config)
    return tr.decode_under_traffic(generator, state, config, steps=3, directions=("d2h", "both"),
                                   repeats=1, warmup=0, traffic=traffic, methods=methods)


def test_decode_runs_each_direction_by_each_method(generator, monkeypatch):
    traffic = _hand_mapped(monkeypatch, chunk_bytes=tr.MAPPED_ROW_BYTES)
    entries, samples, _ = _decode(generator, traffic, ("dma", "mapped"))
    assert [e["direction"] for e in entries] == ["d2h", "d2h", "both", "both"]
    assert set(samples) == {"d2h", "d2h mapped", "both", "both mapped", "d2h alone",
                            "d2h mapped alone", "both alone", "both mapped alone"}
    assert all(e["same_tokens"] and e["copy_gbps"] > 0 for e in entries)


def test_decode_refuses_mapped_without_a_mapping(generator):
    with pytest.raises(InfermeterError, match="needs a CUDA device"):
        _decode(generator, tr.CopyTraffic(CPU, chunk_bytes=1 << 16), ("mapped",))


# ---- the tables ------------------------------------------------------------------------------
TRAFFIC = [{"direction": "d2h", "method": method, "tpot_ms": tpot, "tpot_alone_ms": 10.0,
            "slowdown_pct": (tpot / 10.0 - 1) * 100, "copy_gbps": gbps, "copy_alone_gbps": 50.0,
            "same_tokens": True, "context": 4096, "batch_size": 8}
           for method, tpot, gbps in (("dma", 10.2, 49.0), ("mapped", 11.5, 44.0))]


def test_the_tables_show_each_method_beside_the_other(tmp_path):
    from infermeter.measure.result import append_jsonl
    from infermeter.offload.table import render_traffic
    from infermeter.report.build import build_report

    config = {"batch_size": 8, "context": 4096, "decode_steps": 32, "device": "cuda"}
    printed = render_traffic(TRAFFIC, config).splitlines()
    assert "mapped: an SM copy kernel" in printed[0]
    assert [line.split()[:2] for line in printed[-2:]] == [["d2h", "dma"], ["d2h", "mapped"]]
    result = Result("offload", {"name": "m"}, config, {"device_name": "gpu-x"},
                    {"cases": [], "traffic": TRAFFIC}, {}, [])
    append_jsonl(tmp_path / "r.jsonl", [result])
    report = build_report([str(tmp_path / "r.jsonl")])
    (table,) = [t for t in report.tables if t.key == "offload-traffic"]
    assert [row[3:7] for row in table.rows] == [["dma", "10.0 ms", "10.2 ms", "+2.0%"],
                                                ["mapped", "10.0 ms", "11.5 ms", "+15.0%"]]
    assert "mapped: an SM copy kernel" in table.caption


# ---- on a GPU --------------------------------------------------------------------------------
@pytest.mark.parametrize("way", ["d2h", "h2d"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_mapped_copy_is_a_kernel_and_moves_the_bytes(way):
    cuda = torch.device("cuda")
    traffic = tr.CopyTraffic(cuda, chunk_bytes=4 << 20, mapped=True)
    device_chunk, host_chunk = traffic.buffers[way]
    source = device_chunk if way == "d2h" else host_chunk
    source.copy_(torch.randint(256, source.shape, dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(3)))
    (host_chunk if way == "d2h" else device_chunk).zero_()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        traffic.copy_once(way, "mapped")
        torch.cuda.synchronize()
    assert torch.equal(device_chunk.cpu(), host_chunk)
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert names and not any("memcpy" in n.lower() for n in names), names


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_under_dma_and_mapped_copies():
    cuda = torch.device("cuda")
    assert tr.mapped_refusal(cuda) is None
    gen = Generator(build_model(PRESETS["debug"], device="cuda", seed=3), prefill_chunk=None)
    entries, samples, _ = _decode(gen, tr.CopyTraffic(cuda, chunk_bytes=8 << 20, mapped=True),
                                  ("dma", "mapped"))
    assert [(e["direction"], e["method"]) for e in entries] == [
        ("d2h", "dma"), ("d2h", "mapped"), ("both", "dma"), ("both", "mapped")]
    assert all(e["same_tokens"] and e["copy_gbps"] > 0 and e["copy_alone_gbps"] > 0
               for e in entries)
    assert set(samples) == {"d2h", "d2h mapped", "both", "both mapped", "d2h alone",
                            "d2h mapped alone", "both alone", "both mapped alone"}
