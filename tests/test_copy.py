"""`infermeter copy` on a CPU: case planning, chunking, link arithmetic, diagnosis and
verification (the command line is in test_cli_copy.py)."""

import pytest
import torch

from infermeter.copy import methods as cm
from infermeter.copy.cases import (
    Case,
    engine_shapes,
    enumerate_cases,
    plan_layout,
    skip_reason,
)
from infermeter.copy.chunks import chunk_targets, plan_chunks, split_evenly
from infermeter.copy.diagnosis import diagnose, targets
from infermeter.copy.timing import Timing, case_metrics
from infermeter.copy.verify import CopyMismatch, verify_layout
from infermeter.errors import InfermeterError
from infermeter.measure.link import numa_node_of, pcie_peak_gbps, process_on_node, sysfs_bus_id
from infermeter.specs import sizes
from infermeter.specs.presets import PRESETS

MiB = 2**20
CPU = torch.device("cpu")
MODELS = ["llama-2-7b", "llama-3.1-8b", "mistral-7b", "gemma-2-9b", "phi-3-mini",
          "qwen2.5-0.5b", "deepseek-v3", "debug"]


# ---- case planning --------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("batch,seq_len", [(1, 512), (3, 5000), (2, 37)])
def test_every_layout_moves_exactly_the_sized_bytes(model, batch, seq_len):
    spec = PRESETS[model]
    expected = sizes.kv_cache_bytes(spec, batch, seq_len, "bf16")
    for layout, block in [("engine", None), ("contiguous", None), ("paged", 1), ("paged", 16),
                          ("paged", 7), ("paged", 256)]:
        plan = plan_layout(spec, batch, seq_len, "bf16", layout, block)
        assert plan.total_bytes == expected, (layout, block)
        assert plan.allocated_bytes >= expected


def test_seed_case_shapes_and_pieces():
    spec = PRESETS["llama-2-7b"]
    shapes = engine_shapes(spec, 1, 512)
    assert len(shapes) == 64 and set(shapes) == {(1, 32, 512, 128)}
    engine = plan_layout(spec, 1, 512, "fp16", "engine")
    assert engine.total_bytes == 268_435_456 and engine.n_pieces == 64
    paged = plan_layout(spec, 1, 512, "fp16", "paged", 16)
    assert paged.n_pieces == 32 * 2 * 32  # layers x (K, V) x blocks
    assert {seg.row_bytes for seg in paged.segments} == {128 * 1024}  # 128 KiB pieces
    assert paged.buffers[0] == (2, 32, 16, 32, 128)  # vLLM: [K/V, blocks, tokens, heads, dim]
    assert plan_layout(spec, 1, 512, "fp16", "contiguous").n_pieces == 1


def test_sliding_window_and_partial_blocks():
    spec = PRESETS["gemma-2-9b"]  # every other layer keeps 4096 tokens
    shapes = engine_shapes(spec, 2, 5000)
    assert shapes[0] == (2, 8, 4096, 256) and shapes[2] == (2, 8, 5000, 256)
    paged = plan_layout(spec, 2, 5000, "bf16", "paged", 16)  # 5000 = 312 x 16 + 8
    last = [seg for seg in paged.segments if seg.last]
    assert last and all(seg.row_bytes == 8 * 8 * 256 * 2 and seg.n_rows == 2 for seg in last)


def test_engine_shapes_mirror_the_engine_cache():
    kv_cache = pytest.importorskip("infermeter.engine.kv_cache")
    spec = PRESETS["mistral-7b"]
    for layer in (0, 5):
        cache = kv_cache.LayerKVCache(2, 40, spec.n_kv_heads, spec.head_dim, 16,
                                      torch.float16, "cpu")
        mine = engine_shapes(spec.with_updates(sliding_window=16), 2, 40)
        assert tuple(cache.k.shape) == mine[2 * layer] == mine[2 * layer + 1]


def test_bad_cases_are_one_clear_error():
    with pytest.raises(InfermeterError, match="unknown layout"):
        enumerate_cases(("ring",), ("pinned",), ("d2h",), ("staged",), (16,))
    with pytest.raises(InfermeterError, match="block tokens must be positive"):
        enumerate_cases(("paged",), ("pinned",), ("d2h",), ("staged",), (0,))
    with pytest.raises(InfermeterError):
        plan_layout(PRESETS["debug"], 1, 8, "fp12", "engine")


def test_skip_rules():
    assert skip_reason(Case("engine", None, "seed", "d2h", "staged"), 64, "cuda")
    assert skip_reason(Case("engine", None, "seed", "both", "per-tensor"), 64, "cuda")
    assert skip_reason(Case("engine", None, "pageable", "d2h", "mapped"), 64, "cuda")
    assert skip_reason(Case("paged", 1, "pinned", "d2h", "per-tensor"), 10**6, "cuda")
    assert skip_reason(Case("engine", None, "pinned", "d2h", "per-tensor"), 64, "cpu")
    assert skip_reason(Case("engine", None, "pinned", "both", "staged"), 64, "cuda") is None


# ---- chunking ---------------------------------------------------------------------------------
def test_chunk_targets_ramp_up_and_down():
    sizes = chunk_targets(256 * MiB, 1 * MiB, 32 * MiB)
    assert sum(sizes) == 256 * MiB and max(sizes) <= 32 * MiB
    assert sizes[:3] == [MiB, 2 * MiB, 4 * MiB] and sizes[-3:] == [4 * MiB, 2 * MiB, MiB]
    assert chunk_targets(5, 1, 32) == [1, 3, 1] and chunk_targets(0, 1, 2) == []


@pytest.mark.parametrize("layout,block", [("engine", None), ("contiguous", None), ("paged", 16),
                                          ("paged", 5)])
def test_chunks_cover_every_byte_once_in_host_order(layout, block):
    plan = plan_layout(PRESETS["gemma-2-9b"], 2, 37, "bf16", layout, block)
    chunks = plan_chunks(plan, 4096, 65536)
    offset = 0
    for chunk in chunks:
        assert chunk.host_offset == offset and chunk.nbytes == sum(op.nbytes for op in chunk.ops)
        inner = offset
        for op in chunk.ops:
            assert op.host_offset == inner
            inner += op.nbytes
        offset += chunk.nbytes
    assert offset == plan.total_bytes
    assert len(split_evenly(plan, 4)) >= 1


@pytest.mark.parametrize("smallest,largest", [(1000, 3000), (MiB, 32 * MiB), (7, 7)])
@pytest.mark.parametrize("seq_len,block", [(512, 16), (16, 16), (37, 5)])
def test_chunk_cuts_never_split_a_word(smallest, largest, seq_len, block):
    # Llama-2-7B's pieces (fp16, head_dim 128) in two of its layers: cutting 7-byte chunks out of
    # all 32 layers tests nothing more and takes seconds
    plan = plan_layout(PRESETS["llama-2-7b"].with_updates(n_layers=2), 1, seq_len, "fp16",
                       "paged", block)
    word = plan.word_bytes()
    assert word == 8
    for chunk in plan_chunks(plan, smallest, largest):
        assert chunk.host_offset % word == 0 and chunk.nbytes % word == 0
        for op in chunk.ops:
            assert op.byte_start % word == 0 and op.byte_end % word == 0
    assert all(c.nbytes % word == 0 for c in split_evenly(plan, 3))


# ---- copies and verification on the CPU -------------------------------------------------------
def _layout(block=5):
    plan = plan_layout(PRESETS["debug"], 3, 11, "fp32", "paged", block)
    layout = cm.DeviceLayout(plan, CPU, torch.float32)
    layout.fill_random(3)
    return plan, layout


@pytest.mark.parametrize("block", [1, 5, 16])
def test_methods_agree_and_round_trip(block):
    plan, layout = _layout(block)
    outs = []
    for mover_of in (lambda h: cm.PerPiece(cm.piece_pairs(layout, h, "d2h"), CPU),
                     lambda h: cm.Staged(layout, h, plan_chunks(plan, 200, 1000), "d2h")):
        host = torch.zeros(plan.total_bytes // layout.word, dtype=cm.WORD_DTYPES[layout.word])
        mover_of(host).enqueue(None)
        verify_layout(layout, host, "cpu d2h")
        outs.append(host)
    assert torch.equal(outs[0], outs[1])
    back = cm.DeviceLayout(plan, CPU, torch.float32)  # h2d into a fresh layout
    cm.Staged(back, outs[0], plan_chunks(plan, 200, 1000), "h2d").enqueue(None)
    verify_layout(back, outs[0], "cpu h2d")


@pytest.mark.parametrize("layout_kind", ["contiguous", "engine", "paged"])
def test_mapped_copies_every_row_by_index_even_where_rows_are_contiguous(layout_kind,
                                                                          monkeypatch):
    # The mapped method must stay a kernel: a plain copy_ between a GPU tensor and mapped host
    # memory is a cudaMemcpyAsync that the driver may run on a copy engine (DMA).
    plan = plan_layout(PRESETS["debug"], 2, 11, "fp32", layout_kind,
                       5 if layout_kind == "paged" else None)
    layout = cm.DeviceLayout(plan, CPU, torch.float32)
    layout.fill_random(5)
    calls = {"copy_": 0}
    real_copy = torch.Tensor.copy_

    def counted(self, *args, **kwargs):
        calls["copy_"] += 1
        return real_copy(self, *args, **kwargs)

    host = torch.zeros(plan.total_bytes // layout.word, dtype=cm.WORD_DTYPES[layout.word])
    whole = plan_chunks(plan, plan.total_bytes, plan.total_bytes)
    back = cm.DeviceLayout(plan, CPU, torch.float32)
    movers = [cm.Mapped(layout, host, whole, "d2h"), cm.Mapped(back, host, whole, "h2d")]
    monkeypatch.setattr(torch.Tensor, "copy_", counted)
    for mover in movers:
        mover.enqueue(None)
    monkeypatch.undo()
    assert calls["copy_"] == 0
    verify_layout(layout, host, "mapped d2h")
    verify_layout(back, host, "mapped h2d")


def test_paged_pieces_follow_the_block_table():
    plan, layout = _layout(5)
    rows = layout.slot_list(0)  # layer 0, K, full blocks: a permutation's first columns
    assert sorted(rows) != rows or len(rows) < 3
    piece = layout.piece_views()[0]
    block0 = layout.tensors[0][0, rows[0]].reshape(-1).view(torch.uint8).view(piece.dtype)
    assert torch.equal(piece, block0)


def test_verification_catches_one_corrupted_byte():
    plan, layout = _layout(5)
    host = torch.zeros(plan.total_bytes // layout.word, dtype=cm.WORD_DTYPES[layout.word])
    cm.PerPiece(cm.piece_pairs(layout, host, "d2h"), CPU).enqueue(None)
    verify_layout(layout, host, "good")
    host.view(torch.uint8)[plan.total_bytes // 2] ^= 0x01
    with pytest.raises(CopyMismatch, match="1 of .* words differ"):
        verify_layout(layout, host, "corrupted")


# ---- the runner: every row carries the check that ran ------------------------------------------
def _run_cpu_cases(**changes):
    from infermeter.copy.harness import CopyRunner
    from infermeter.copy.job import CopyRequest
    from infermeter.measure.link import LinkInfo

    base = {"spec": PRESETS["debug"], "batch_sizes": (2,), "seq_lens": (11,),
            "kv_dtype": "fp32", "layouts": ("engine", "contiguous", "paged"),
            "hosts": ("seed", "pageable"), "directions": ("d2h", "h2d", "both"),
            "methods": ("per-tensor", "staged"), "block_tokens": (4,), "repeats": 2,
            "warmup": 0, "device": "cpu"}
    req = CopyRequest(**{**base, **changes})
    runner = CopyRunner(CPU, req.kv_dtype, req.repeats, req.warmup, LinkInfo())
    return runner, req


def test_every_row_names_the_check_that_compared_its_bytes(monkeypatch):
    from infermeter.copy import harness

    calls = {"verify_layout": [], "verify_pieces": []}

    def spy(name):
        real = getattr(harness, name)

        def call(*args):
            calls[name].append(args[-1])  # the case's label
            return real(*args)
        return call

    for name in calls:
        monkeypatch.setattr(harness, name, spy(name))
    runner, req = _run_cpu_cases()
    out = runner.run(req.cases(), req.plans(2, 11))
    total = sizes.kv_cache_bytes(PRESETS["debug"], 2, 11, "fp32")
    # per layout: pageable 3 directions x 2 methods; seed per-tensor, one direction at a time
    assert len(out.cases) == 3 * (3 * 2 + 2)
    for row in out.cases:
        check = "pieces" if row["host_memory"] == "seed" else "bytes"
        assert row["verified"] == {"check": check, "bytes": row["bytes_moved"]}, row
        assert row["bytes_moved"] == total * (2 if row["direction"] == "both" else 1)
    # the checks ran: once per seed case, once per direction of every other case
    seed = [r for r in out.cases if r["host_memory"] == "seed"]
    ways = sum(2 if r["direction"] == "both" else 1 for r in out.cases if r not in seed)
    assert len(calls["verify_pieces"]) == len(seed) and len(calls["verify_layout"]) == ways


class _Corrupting:
    """A mover that copies, then flips one bit of the destination's middle byte."""

    def __init__(self, inner, destination):
        self.inner, self.destination, self.streams = inner, destination, inner.streams

    def enqueue(self, start):
        self.inner.enqueue(start)
        flat = self.destination.reshape(-1).view(torch.uint8)
        flat[flat.numel() // 2] ^= 0x01


@pytest.mark.parametrize("direction", ["d2h", "h2d", "both"])
def test_a_mover_that_corrupts_one_byte_is_an_error_not_a_figure(monkeypatch, direction):
    from infermeter.copy.harness import CopyRunner

    real = CopyRunner._mover

    def corrupting(self, method, way, buf):
        inner = real(self, method, way, buf)
        target = buf.host_out if way == "d2h" else buf.dst.tensors[0]  # contiguous: one tensor
        return _Corrupting(inner, target) if way == direction or direction == "both" and \
            way == "h2d" else inner

    monkeypatch.setattr(CopyRunner, "_mover", corrupting)
    runner, req = _run_cpu_cases(layouts=("contiguous",), hosts=("pageable",),
                                 directions=(direction,), methods=("staged",))
    with pytest.raises(CopyMismatch, match="copy verification failed for contiguous pageable"):
        runner.run(req.cases(), req.plans(2, 11))
    assert runner.out.cases == []  # no row, no GB/s


def test_a_corrupted_copy_ends_the_command_with_one_error_line(monkeypatch, tmp_path, capsys):
    from infermeter.cli import main
    from infermeter.copy.harness import CopyRunner

    real = CopyRunner._mover
    monkeypatch.setattr(CopyRunner, "_mover", lambda self, method, way, buf: _Corrupting(
        real(self, method, way, buf), buf.host_out))
    out = tmp_path / "copy.jsonl"
    code = main(["copy", "--device", "cpu", "--model", "debug", "--seq-len", "8",
                 "--layout", "contiguous", "--host", "pageable", "--direction", "d2h",
                 "--method", "staged", "--repeats", "2", "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(err) == 1 and err[0].startswith("infermeter: error: copy verification failed")


# ---- statistics, link peak, NUMA --------------------------------------------------------------
def test_case_metrics_from_samples():
    timing = Timing([5.0, 5.0, 4.0, 6.0, 5.0], 1.0, "cuda-events+hold")
    m = case_metrics(268_435_456, 1, timing, 63.0)
    assert m["moving_time_ms"] == 5.0 and m["gbps"] == pytest.approx(53.687, rel=1e-4)
    assert m["link_pct"] == pytest.approx(100 * 53.687 / 63.0, rel=1e-4)
    both = case_metrics(268_435_456, 2, timing, 63.0)
    assert both["bytes_moved"] == 2 * 268_435_456 and both["link_pct"] == m["link_pct"]
    assert m["stats"]["p10"] == pytest.approx(4.4) and m["stats"]["n"] == 5


@pytest.mark.parametrize("gen,width,gbps", [(3, 16, 15.76), (4, 16, 31.504), (5, 16, 63.008),
                                            (6, 16, 121.008), (5, 8, 31.504), (4, 4, 7.876),
                                            (1, 1, 0.25)])
def test_pcie_peak(gen, width, gbps):
    assert pcie_peak_gbps(gen, width) == pytest.approx(gbps)


def test_pcie_peak_unknown():
    assert pcie_peak_gbps(None, 16) is None and pcie_peak_gbps(7, 16) is None


def test_numa_from_sysfs(tmp_path):
    assert sysfs_bus_id("00000000:1B:00.0") == "0000:1b:00.0"
    dev = tmp_path / "0000:1b:00.0"
    dev.mkdir()
    (dev / "numa_node").write_text("1\n")
    assert numa_node_of("00000000:1B:00.0", str(tmp_path)) == 1
    (dev / "numa_node").write_text("-1\n")
    assert numa_node_of("00000000:1B:00.0", str(tmp_path)) is None
    node = tmp_path / "nodes" / "node0"
    node.mkdir(parents=True)
    (node / "cpulist").write_text("0-4095\n")
    assert process_on_node(0, str(tmp_path / "nodes")) is True


# ---- diagnosis from synthetic timings ---------------------------------------------------------
def _case(layout, host, direction, method, gbps, block=None, pieces=64, pinned=None):
    return {"layout": layout, "block_tokens": block, "host_memory": host,
            "direction": direction, "method": method, "gbps": gbps, "bytes": 268_435_456,
            "pieces": pieces, "host_pinned": pinned if pinned is not None else host == "pinned",
            "link_pct": 100 * gbps / 63.0, "stats": {"cov": 0.01}}


def _synthetic(contiguous=55.0):
    cases = []
    for d in ("d2h", "h2d"):
        cases += [_case("contiguous", "pinned", d, "per-tensor", contiguous, pieces=1),
                  _case("engine", "pinned", d, "per-tensor", 53.4),
                  _case("engine", "pinned", d, "staged", 54.6),
                  _case("paged", "pinned", d, "per-tensor", 30.0, block=16, pieces=2048),
                  _case("paged", "pinned", d, "staged", 53.0, block=16, pieces=2048),
                  _case("engine", "pageable", d, "per-tensor", 8.4),
                  _case("engine", "seed", d, "per-tensor", 1.47)]
    cases.append(_case("contiguous", "pinned", "both", "per-tensor", 100.0, pieces=1))
    return cases


LINK = {"kind": "pcie", "gen": 5, "width": 16, "gen_current": 5, "width_current": 16,
        "peak_gbps": 63.008, "numa_node": 0, "host_numa_nodes": 2, "process_on_gpu_node": True}


def test_diagnosis_in_plain_words():
    lines, warnings = diagnose(_synthetic(), LINK)
    text = "\n".join(lines)
    assert "d2h: pageable memory: 6.5x slower than pinned (8.4 vs 54.6 GB/s" in text
    assert "allocation in every copy (the seed way): 37.1x slower" in text
    assert "paged blocks of 16 tokens (2,048 pieces of 128.0 KiB): one copy per piece " \
           "reaches 55% of one contiguous copy; best staged 96.4%" in text
    assert "batching them wins it back" in text
    assert "both directions at once" in text and "1.82x one way" in text
    assert "= 87% of the PCIe Gen5 x16 peak (63.0 GB/s per direction)" in text
    assert "possible causes" not in text and warnings == []
    t = targets(_synthetic())
    assert t["engine_vs_contiguous"]["d2h"] == pytest.approx(54.6 / 55)
    assert t["paged_vs_contiguous"]["16"]["h2d"] == pytest.approx(53 / 55)
    assert t["both_vs_one_way"] == pytest.approx(100 / 55)


def test_diagnosis_slow_link_and_fallback():
    cases = _synthetic(contiguous=40.0)
    cases.append(_case("engine", "pinned", "d2h", "streams", 30.0, pinned=False))
    link = dict(LINK, gen_current=4, process_on_gpu_node=False)
    lines, warnings = diagnose(cases, link)
    text = "\n".join(lines)
    assert "below 85%, possible causes" in text
    assert "the link ran at Gen4 x16 during the copy, below its Gen5 x16 maximum" in text
    assert "outside the GPU's NUMA node 0" in text
    assert any("asked for pinned memory but ran on pageable memory" in w for w in warnings)


def test_engine_layout_is_allocated_by_the_engine_cache(monkeypatch):
    from infermeter.copy import methods
    from infermeter.engine import kv_cache

    made = []
    real = kv_cache.LayerKVCache

    class Counting(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(kv_cache, "LayerKVCache", Counting)
    spec = PRESETS["debug"]
    plan = plan_layout(spec, 2, 40, "fp32", "engine", None)
    layout = methods.DeviceLayout(plan, torch.device("cpu"), torch.float32)
    assert len(made) == spec.n_layers
    assert layout.tensors[0] is made[0].k and layout.tensors[1] is made[0].v
    assert [tuple(t.shape) for t in layout.tensors] == list(plan.buffers)
