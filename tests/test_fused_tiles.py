"""The fused step kernels' tiles (engine/kernels/fused_step.py: FUSED_TILES, fused_tiles_for, the
launch helpers' `tiles` override) and benchmarks/fused_tiles.py, which times them.

Here: the table's lookup and today's tiles without an entry, which tiles each launch gets
(launches recorded, not run), refused overrides, the benchmark's shapes (the model's own weights),
grid, suggested table and open_targets part. Under Triton's interpreter
(tests/fused_tiles_worker.py): other tiles reach the kernels and change no bit where every sum is
exact."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

pytest.importorskip("triton")  # the kernels' launchers and the script's timing

from infermeter.engine.kernels import fused_step  # noqa: E402
from infermeter.engine.kernels.fused_step import (  # noqa: E402
    _fused_gemv,
    _norm_qkv_rope,
    fused_tiles_for,
)
from infermeter.engine.kernels.gemv import tiles_for  # noqa: E402
from infermeter.measure.env import device_slug  # noqa: E402
from tests.benchmark_scripts import BENCHMARKS, load_benchmark, part_arguments  # noqa: E402
from tests.tile_launches import tile_launches  # noqa: E402
from tests.triton_interpreter import run_under_interpreter  # noqa: E402

H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
TILE_KEYS = ("BLOCK_N", "BLOCK_K", "num_warps")  # a timed row's tiles in the Result file
GEMV_KERNELS = ("norm_gemv", "gemv_swiglu", "gemv_add")


def test_an_empty_table_gives_today_s_tiles(monkeypatch):
    """Without an entry each kernel runs the tiles it ran before the table: the GEMV's, SwiGLU's
    rows halved into gate and up, wqkv's at least one pair, with q/k norms one head a program
    on a tile of the GEMV's element count."""
    monkeypatch.setattr(fused_step, "FUSED_TILES", {})  # a GPU nobody measured
    for cols in (576, 896, 1024, 1536, 2048, 4096, 4864, 5120, 8192, 14336):
        for gpu in ("", H100, H200):
            n, k, w = tiles_for(cols, gpu)
            assert fused_tiles_for("norm_gemv", cols, gpu) == (n, k, w)
            assert fused_tiles_for("gemv_add", cols, gpu) == (n, k, w)
            assert fused_tiles_for("gemv_swiglu", cols, gpu) == (max(1, n // 2), k, w)
            assert fused_tiles_for("norm_qkv_rope", cols, gpu, 64) == (max(2, n), k, w)
            for head_dim in (64, 128, 256):
                assert fused_tiles_for("norm_qkv_rope", cols, gpu, head_dim, True) == \
                    (head_dim, max(16, n * k // head_dim), w)
    # pinned: Llama-3.2-1B's four on the CPU and an H200, Llama-2-7B's, Qwen3-8B's wqkv
    assert [fused_tiles_for(kernel, cols, gpu, 64) for gpu in ("", H200)
            for kernel, cols in (("norm_qkv_rope", 2048), ("gemv_add", 2048),
                                 ("gemv_swiglu", 2048), ("gemv_add", 8192))] == \
        [(4, 2048, 8), (4, 2048, 8), (2, 2048, 8), (2, 4096, 16),
         (4, 2048, 8), (4, 2048, 8), (2, 2048, 8), (2, 4096, 4)]
    assert fused_tiles_for("gemv_swiglu", 4096, H100) == (1, 4096, 16)
    assert fused_tiles_for("gemv_add", 11008, H100) == (1, 4096, 16)
    assert fused_tiles_for("norm_qkv_rope", 11008, H100, 128) == (2, 4096, 16)
    assert fused_tiles_for("norm_qkv_rope", 4096, H100, 128, True) == (128, 64, 16)


def test_the_measured_table_holds_valid_tiles_for_its_widths_only():
    """The H100's entry (benchmarks/fused_tiles.py's bests): each tile three powers of two, used
    at its kernel and width; another width, kernel or GPU keeps the GEMV's tiles."""
    for gpu, kernels in fused_step.FUSED_TILES.items():
        for kernel, widths in kernels.items():
            for cols, tile in widths.items():
                assert fused_tiles_for(kernel, cols, gpu, 64) == tile, (gpu, kernel, cols)
    assert fused_tiles_for("gemv_swiglu", 2048, H100) == (1, 2048, 4)
    assert fused_tiles_for("gemv_add", 8192, H100) == tiles_for(8192, H100)  # 1B's w2: none
    assert fused_tiles_for("norm_gemv", 2048, H100) == tiles_for(2048, H100)
    assert fused_tiles_for("gemv_swiglu", 2048, H200) == (2, 2048, 4)
    assert fused_tiles_for("gemv_add", 8192, H200) == (1, 1024, 4)  # the H200's has 1B's w2
    assert fused_tiles_for("norm_gemv", 2048, H200) == tiles_for(2048, H200)
    assert fused_tiles_for("gemv_add", 896, H200) == tiles_for(896, H200)  # its best: the GEMV's


@pytest.mark.parametrize("gpu", sorted(fused_step.FUSED_TILES))
def test_each_gpu_s_entry_is_the_one_its_committed_grids_suggest(gpu):
    """A GPU's FUSED_TILES entry is, tile for tile, the suggestion of the fused_tiles.py Results
    its comment names (results/fused-tiles-<grid>-<device>.json: the quick grid, then any grid
    that timed some widths again, each over the ones before it), so the table holds what was
    measured and nothing edited by hand."""
    slug = device_slug({"device_name": gpu})  # a Result file's device part
    named = re.findall(rf"results/(fused-tiles-[a-z]+-{re.escape(slug)}\.json)", _table_comment())
    assert named and named[0] == f"fused-tiles-quick-{slug}.json", named
    paths = [str(BENCHMARKS.parent / "results" / name) for name in named]
    suggested = load_benchmark("step_kernels_ab").file_entry(paths, gpu)
    assert suggested and suggested == fused_step.FUSED_TILES[gpu]


def _table_comment() -> str:
    """The comment lines above FUSED_TILES in fused_step.py."""
    lines = inspect.getsource(fused_step).splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("FUSED_TILES: "))
    start = max(i for i in range(end) if not lines[i].startswith("#")) + 1
    return "\n".join(lines[start:end])


def test_a_table_entry_serves_its_gpu_kernel_and_width_only(monkeypatch):
    monkeypatch.setattr(fused_step, "FUSED_TILES", {})  # only the entries below
    monkeypatch.setitem(fused_step.FUSED_TILES, H200, {"gemv_add": {2048: (8, 256, 4)},
                                                       "norm_qkv_rope": {2048: (4, 512, 4)}})
    assert fused_tiles_for("gemv_add", 2048, H200) == (8, 256, 4)
    assert fused_tiles_for("gemv_add", 8192, H200) == tiles_for(8192, H200)  # another width
    assert fused_tiles_for("norm_gemv", 2048, H200) == tiles_for(2048, H200)  # another kernel
    assert fused_tiles_for("gemv_add", 2048, H100) == tiles_for(2048, H100)  # another GPU
    assert fused_tiles_for("gemv_add", 2048, "") == tiles_for(2048, "")
    assert fused_tiles_for("norm_qkv_rope", 2048, H200, 64) == (4, 512, 4)
    # with q/k norms no entry applies (it timed the pairs' kernel): the GEMV's tile, one head
    n, k, w = tiles_for(2048, H200)
    assert fused_tiles_for("norm_qkv_rope", 2048, H200, 128, True) == (128, n * k // 128, w)
    monkeypatch.setitem(fused_step.FUSED_TILES, H100, {"gemv_swiglu": {2048: (3, 256, 4)}})
    with pytest.raises(ValueError, match="three powers of two"):  # a bad entry is refused
        fused_tiles_for("gemv_swiglu", 2048, H100)


@pytest.mark.parametrize("way", fused_step.TILES_FROM_WAYS)
def test_the_tiles_come_from_the_table_the_gemv_or_a_file_s_entry(monkeypatch, way):
    """TILES_FROM (an A/B's setting): "table" takes FUSED_TILES' entry, "gemv" none (the GEMV's
    tiles adapted, as on a GPU nobody measured), "file" FILE_ENTRY (a fused_tiles.py run's
    suggestion) and not the table's; a way there is not is refused."""
    monkeypatch.setattr(fused_step, "FUSED_TILES", {H200: {"gemv_add": {2048: (8, 256, 4)}}})
    monkeypatch.setattr(fused_step, "FILE_ENTRY", {"gemv_swiglu": {2048: (4, 512, 8)}})
    monkeypatch.setattr(fused_step, "TILES_FROM", way)
    n, k, w = tiles_for(2048, H200)
    wanted = {"table": [(8, 256, 4), (max(1, n // 2), k, w)],
              "gemv": [(n, k, w), (max(1, n // 2), k, w)],
              "file": [(n, k, w), (4, 512, 8)]}[way]
    assert [fused_tiles_for("gemv_add", 2048, H200),
            fused_tiles_for("gemv_swiglu", 2048, H200)] == wanted
    assert fused_step.tile_entry(H200) == {"table": fused_step.FUSED_TILES[H200], "gemv": {},
                                           "file": fused_step.FILE_ENTRY}[way]
    monkeypatch.setattr(fused_step, "TILES_FROM", "guess")
    with pytest.raises(ValueError, match="unknown TILES_FROM 'guess'"):
        fused_tiles_for("gemv_add", 2048, H200)


@pytest.mark.parametrize("way", fused_step.TILES_FROM_WAYS)
def test_the_result_records_the_tiles_and_the_report_sets_other_sources_aside(monkeypatch,
                                                                               way):
    """config.fused_tiles_from and config.fused_tiles: where a fused step's kernels took their
    tiles from and the entry they took on this GPU (JSON's string widths, list tiles; {} for
    the GEMV's), both None where no layer ran fused; the report takes a Result of tiles from
    anywhere but the table as a comparison, never a column's figure, and one from before the
    fields as the table's."""
    from infermeter.report.select import off_default_kernels
    from tests.report_records import seed_record
    from tests.test_fused_rope_record import recorded_under

    # the debug model runs on the CPU, whose device name is ""
    monkeypatch.setattr(fused_step, "FUSED_TILES", {"": {"gemv_add": {64: (2, 64, 4)}}})
    monkeypatch.setattr(fused_step, "FILE_ENTRY", {"gemv_swiglu": {64: (1, 64, 2)}})
    monkeypatch.setattr(fused_step, "TILES_FROM", way)
    entry = {"table": {"gemv_add": {"64": [2, 64, 4]}}, "gemv": {},
             "file": {"gemv_swiglu": {"64": [1, 64, 2]}}}[way]
    cases = (("fused", "triton"), ("split", "triton"))
    assert recorded_under(monkeypatch, "fused_tiles_from", cases) == {
        ("fused", "triton"): way, ("split", "triton"): None}
    assert recorded_under(monkeypatch, "fused_tiles", cases) == {
        ("fused", "triton"): entry, ("split", "triton"): None}
    assert off_default_kernels(seed_record(1, fused_tiles_from=way)) == (way != "table")
    assert not off_default_kernels(seed_record(2))  # before the fields: the table's


def _step_calls(tiles=None, qk_norm=False):
    """A Llama-3.2-1B-like layer's four fused launches on the CPU (x [1, 2048], wqkv [3072, 2048]
    of 32 + 2 x 8 heads of 64, wo [2048, 2048], w13 [16384, 2048], w2 [2048, 8192])."""
    dtype, dim, ffn, head_dim, n_q = torch.bfloat16, 2048, 8192, 64, 2048
    x, norm_w = torch.zeros(1, dim, dtype=dtype), torch.ones(dim, dtype=dtype)
    wqkv = torch.empty(n_q + 2 * 512, dim, dtype=dtype)
    cache = torch.zeros(1, 8, 16, head_dim, dtype=dtype)
    head_w = torch.ones(head_dim, dtype=dtype) if qk_norm else None
    rope = torch.zeros(1, head_dim // 2)

    def tiles_of(kernel):
        return tiles.get(kernel) if isinstance(tiles, dict) else tiles

    def call():
        _norm_qkv_rope(x, norm_w, wqkv, None, rope, rope, torch.tensor([0]), cache, cache,
                       torch.arange(16), n_q, 1e-5, False, False, head_w, head_w, pdl=False,
                       tiles=tiles_of("norm_qkv_rope"))
        _fused_gemv(x, torch.empty(dim, n_q, dtype=dtype), None, x, 0.0, False, False,
                    pdl=False, tiles=tiles_of("gemv_add"))
        _fused_gemv(x, torch.empty(2 * ffn, dim, dtype=dtype), norm_w, None, 1e-5, False, True,
                    pdl=True, tiles=tiles_of("gemv_swiglu"))
        _fused_gemv(torch.zeros(1, ffn, dtype=dtype), torch.empty(dim, ffn, dtype=dtype), None,
                    x, 0.0, False, False, pdl=False, tiles=tiles_of("gemv_add"))
        _fused_gemv(x, wqkv, norm_w, None, 1e-5, False, False, pdl=False,
                    tiles=tiles_of("norm_gemv"))
    return call


def test_the_table_and_the_override_reach_each_launch(monkeypatch):
    """The CPU's tiles ("" in the table): today's without an entry, the entry's with one, and an
    explicit override over both; the grid covers the kernel's output rows."""
    names = ["_norm_qkv_rope_kernel"] + ["_fused_gemv_kernel"] * 4
    grids = [lambda n: 3072 // n, lambda n: 2048 // n, lambda n: 8192 // n, lambda n: 2048 // n,
             lambda n: 3072 // n]

    def launched(tiles_each):
        return [(name, (grid(t[0]),), *t)
                for name, grid, t in zip(names, grids, tiles_each, strict=True)]

    def step_launches(tiles=None, qk_norm=False):
        return tile_launches(monkeypatch, fused_step, _step_calls(tiles, qk_norm))

    assert step_launches() == launched(
        [(4, 2048, 8), (4, 2048, 8), (2, 2048, 8), (2, 4096, 16), (4, 2048, 8)])
    assert step_launches((8, 256, 2)) == launched([(8, 256, 2)] * 5)
    monkeypatch.setitem(fused_step.FUSED_TILES, "", {
        "norm_qkv_rope": {2048: (16, 128, 4)}, "gemv_add": {8192: (1, 1024, 2)},
        "gemv_swiglu": {2048: (8, 512, 4)}, "norm_gemv": {2048: (2, 1024, 4)}})
    assert step_launches() == launched(
        [(16, 128, 4), (4, 2048, 8), (8, 512, 4), (1, 1024, 2), (2, 1024, 4)])
    assert step_launches({"gemv_swiglu": (4, 256, 8)})[2] == \
        ("_fused_gemv_kernel", (8192 // 4,), 4, 256, 8)
    monkeypatch.setitem(fused_step.FUSED_TILES, H200, {"gemv_add": {2048: (16, 64, 2)}})
    assert step_launches()[1] == ("_fused_gemv_kernel", (512,), 4, 2048, 8)
    # q/k norms: one head of 64 a program, 48 programs, on the GEMV's tile (4 x 2048 weights),
    # not the pairs' entry
    assert step_launches(qk_norm=True)[0] == \
        ("_norm_qkv_rope_kernel", (48,), 64, 128, 8)


@pytest.mark.parametrize("kernel, tiles, qk_norm, message", [
    ("gemv_add", (3, 256, 4), False, "three powers of two"),
    ("gemv_swiglu", (2, 256), False, "three powers of two"),
    ("norm_gemv", (2, 256, 0), False, "three powers of two"),
    ("gemv_add", (2, 256.5, 4), False, "three powers of two"),
    ("norm_qkv_rope", (1, 1024, 4), False, "whole pairs"),
    ("norm_qkv_rope", (32, 64, 4), True, "BLOCK_N = head_dim 64"),
])
def test_bad_overrides_are_refused_before_a_launch(monkeypatch, kernel, tiles, qk_norm, message):
    calls = {"norm_qkv_rope": {"norm_qkv_rope": tiles}, "gemv_add": {"gemv_add": tiles},
             "gemv_swiglu": {"gemv_swiglu": tiles}, "norm_gemv": {"norm_gemv": tiles}}[kernel]
    launches = []
    monkeypatch.setattr(fused_step, "launch", lambda *a, **k: launches.append(a))
    call = _step_calls({**calls}, qk_norm)
    with pytest.raises(ValueError, match=message):
        call()
    order = ["norm_qkv_rope", "gemv_add", "gemv_swiglu", "gemv_add", "norm_gemv"]
    assert len(launches) == order.index(kernel)  # the bad one launched nothing


def test_the_lookup_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="unknown fused kernel"):
        fused_tiles_for("gemv", 2048)
    with pytest.raises(ValueError, match="q/k norms are norm_qkv_rope's"):
        fused_tiles_for("norm_gemv", 2048, "", 64, True)
    with pytest.raises(ValueError, match="q/k norms are norm_qkv_rope's"):
        fused_tiles_for("norm_qkv_rope", 2048, "", None, True)


def test_other_tiles_change_no_bit_under_the_triton_interpreter():
    run_under_interpreter(BENCHMARKS.parent / "tests" / "fused_tiles_worker.py")


@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen2.5-0.5b", "smollm2-135m", "qwen3-0.6b"])
def test_the_benchmark_s_shapes_are_the_model_s_weights(name):
    """Each shape is the fused model's layer weight (built on meta, projections fused), and the
    wqkv kernel ropes and writes the cache where the model's Attention would."""
    from infermeter.engine.fusion import fuse_projections
    from infermeter.engine.model import build_model

    script = load_benchmark("fused_tiles")
    dtype = script.DTYPES[script.MODELS[name]]
    model = build_model(script.PRESETS[name], dtype=dtype, on_meta=True)
    fuse_projections(model)
    layer = model.layers[0]
    attention, ffn = layer.attention, layer.feed_forward
    weights = {"wqkv": attention.wqkv.weight, "wo": attention.wo.weight,
               "w13": ffn.w13.weight, "w2": ffn.w2.weight}
    shapes = script.fused_shapes(name)
    assert [s.part for s in shapes] == ["wqkv", "wo", "w13", "w2"]
    assert [s.kernel for s in shapes[1:]] == ["gemv_add", "gemv_swiglu", "gemv_add"]
    for shape in shapes:
        assert (shape.n_rows, shape.n_cols) == tuple(weights[shape.part].shape), shape.label
    qkv = shapes[0]
    ropes = attention.ropes_in_wqkv(dtype, dtype)
    assert qkv.kernel == ("norm_qkv_rope" if ropes else "norm_gemv")
    assert (qkv.n_q, qkv.head_dim) == (attention.qkv_split[0], attention.head_dim)
    assert qkv.bias == (attention.wqkv.bias is not None)
    assert qkv.qk_norm == (attention.q_norm is not None)


def test_the_benchmark_s_models_grids_and_rotation():
    script, tile_grid = load_benchmark("fused_tiles"), load_benchmark("tile_grid")
    assert script.DEFAULT_MODELS == ("llama-3.2-1b", "qwen2.5-0.5b", "smollm2-135m")
    assert script.MODELS["smollm2-135m"] == "fp16" and script.MODELS["llama-3.2-1b"] == "bf16"
    llama = script.fused_shapes("llama-3.2-1b")
    assert [(s.kernel, s.n_rows, s.n_cols) for s in llama] == [
        ("norm_qkv_rope", 3072, 2048), ("gemv_add", 2048, 2048),
        ("gemv_swiglu", 16384, 2048), ("gemv_add", 2048, 8192)]
    for model in script.MODELS:
        for shape in script.fused_shapes(model):
            default = shape.default_tiles("")
            for name, grid in script.GRIDS.items():
                tiles = script.tilings(shape, grid, default)
                assert default in tiles and len(set(tiles)) == len(tiles) > 5, (name, shape)
                for n, k, warps in tiles:
                    if (n, k, warps) == default:
                        continue
                    held = 2 * n * k if shape.kernel == "gemv_swiglu" else n * k
                    assert held <= tile_grid.MAX_TILE and k < 2 * shape.n_cols, (name, shape)
                    assert shape.kernel != "norm_qkv_rope" or n >= 2
                    assert not shape.qk_norm or n == shape.head_dim
                    fused_step._checked_tiles(shape.kernel, (n, k, warps), shape.head_dim,
                                              shape.qk_norm)
            calls = script.calls_per_replay(shape, 2)
            assert calls >= 2 and calls * shape.weight_bytes(2) >= 256 * 2**20
    # SmolLM2's wo: 576 columns, so no tile wider than 1024
    wo = script.fused_shapes("smollm2-135m")[1]
    assert max(k for _, k, _ in script.tilings(wo, script.GRIDS["full"], (4, 1024, 8))) == 1024
    assert script.fused_shapes("qwen2.5-0.5b")[0].bias
    args = script.arguments().parse_args([])
    assert (args.models, args.grid) == (list(script.DEFAULT_MODELS), "quick")
    with pytest.raises(SystemExit):
        script.arguments().parse_args(["--models", "llama-3.2"])


def _timed(kernel, cols, rows, default=(4, 1024, 8), qk_norm=False):
    return {"label": f"m {kernel}", "kernel": kernel, "n_rows": 1024, "n_cols": cols,
            "qk_norm": qk_norm, "default_tiles": list(default),
            "split_gemv": {"tiles": [4, 1024, 8], "ms": 0.002, "gbps": 2000.0},
            "tiles": [{**dict(zip(TILE_KEYS, t, strict=True)), "ms": ms,
                       "gbps": 4.0 / ms} for t, ms in rows]}


def test_the_suggested_table_takes_bests_that_beat_today_s_tiles():
    script = load_benchmark("fused_tiles")
    a, b, base = (2, 512, 4), (8, 256, 4), (4, 1024, 8)
    runs = [_timed("gemv_swiglu", 2048, [(base, 2.0), (a, 1.0)]),
            _timed("gemv_add", 896, [(base, 1.0), (a, 1.5)]),  # today's fastest
            # two gemv_add shapes of 2048 columns: the least summed time, b (1.7 against 1.8)
            _timed("gemv_add", 2048, [(base, 1.0), (a, 0.6), (b, 0.9)]),
            _timed("gemv_add", 2048, [(base, 1.0), (a, 1.2), (b, 0.8)]),
            _timed("norm_qkv_rope", 1024, [((128, 32, 8), 2.0), ((128, 64, 4), 1.0)],
                   (128, 32, 8), qk_norm=True)]  # one head a program: not an entry
    assert script.suggested_table(runs, H200) == {
        H200: {"gemv_swiglu": {2048: a}, "gemv_add": {2048: b}}}
    assert script.suggested_table(runs[1:2], H200) == {}
    failed = _timed("gemv_add", 896, [(base, 1.0)])
    failed["tiles"].append({**dict(zip(TILE_KEYS, a, strict=True)), "error": "x"})
    assert script.suggested_table([failed], H200) == {}
    line = script.summary_line(runs[0], 4000.0)
    assert line.startswith("m gemv_swiglu") and "split GEMV [4, 1024, 8]" in line
    assert "default [4, 1024, 8] 2000.00 us" in line and "best [2, 512, 4]" in line


def test_the_open_targets_part_runs_the_quick_grid_on_the_three_models():
    text = (BENCHMARKS / "open_targets.sh").read_text()
    args = part_arguments("fused-tiles", "fused_tiles")
    assert args.models == ["llama-3.2-1b", "qwen2.5-0.5b", "smollm2-135m"]
    assert args.grid == "quick"
    # listed in the header, with its time on an H100 since it ran (1e5c1b1)
    listed = text.split("#   part fused-tiles ", 1)[1].split("#   part ", 1)[0]
    assert "s on an H100 on 2026-12-06" in listed


def test_the_step_tiles_part_times_the_step_with_the_entry_its_bests_suggest():
    """open_targets.sh step-tiles: the quick grid on the three models, then the recorded fused
    step with the table's tiles and with the entry of the file that grid wrote."""
    timed = part_arguments("step-tiles", "fused_tiles")
    assert (timed.models, timed.grid) == (["llama-3.2-1b", "qwen2.5-0.5b", "smollm2-135m"],
                                          "quick")
    step = part_arguments("step-tiles", "step_kernels_ab")
    assert (step.fused_tiles, step.kernels, step.graphs) == (["table", "file"], ["fused"],
                                                             ["recorded"])
    assert step.tiles_file == ['"results/fused-tiles-quick-$slug.json"']  # the grid's file
    assert step.models == timed.models


def test_the_step_tiles_table_part_times_the_committed_entry_against_the_gemv_s_tiles():
    step = part_arguments("step-tiles-table", "step_kernels_ab")
    assert (step.fused_tiles, step.kernels, step.graphs, step.rounds) == (
        ["table", "gemv"], ["fused"], ["recorded"], 1)
    assert step.models == ["llama-3.2-1b", "qwen2.5-0.5b", "smollm2-135m"]
    assert step.name == "step-tiles-table"  # its own file: not step-kernels-<device>'s


def test_the_step_tiles_full_part_times_the_table_against_the_full_grid_s_bests():
    """open_targets.sh step-tiles-full: the full grid at 1B (one command's worth), then
    the recorded fused step with the table's tiles and with the entry of the file it wrote,
    each with the attention split and unsplit, one round."""
    timed = part_arguments("step-tiles-full", "fused_tiles")
    assert (timed.models, timed.grid) == (["llama-3.2-1b"], "full")
    step = part_arguments("step-tiles-full", "step_kernels_ab")
    assert (step.fused_tiles, step.unsplit, step.kernels, step.graphs, step.name,
            step.rounds) == (["table", "file"], ["off", "on"], ["fused"], ["recorded"],
                             "step-tiles-full", 1)
    assert step.tiles_file == ['"results/fused-tiles-full-$slug.json"']  # the grid's own file
    assert step.models == timed.models


def test_the_step_head_part_times_the_head_apart_and_fused():
    step = part_arguments("step-head", "step_kernels_ab")
    assert (step.fused_head, step.kernels, step.graphs) == (["off", "on"], ["fused"],
                                                            ["recorded"])
    assert step.models == ["smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b"]


@pytest.mark.gpu
def test_the_benchmark_times_a_tiling_on_cuda():
    """On a GPU: SmolLM2's wo + add and wqkv kernels at their default tiles and one other, with
    the split GEMV beside them; the other tiles' output near the default's."""
    from infermeter.engine.kernels.gemv import gpu_name

    script = load_benchmark("fused_tiles")
    grid = {"BLOCK_N": (2,), "BLOCK_K": (512,), "num_warps": (4,)}
    gpu = gpu_name(torch.device("cuda"))
    shapes = script.fused_shapes("smollm2-135m")
    for shape in (shapes[0], shapes[1]):
        timed = script.time_shape(shape, grid, gpu, torch.float16)
        assert [tuple(r[k] for k in TILE_KEYS) for r in timed["tiles"]] == \
            [(2, 512, 4), shape.default_tiles(gpu)]
        for row in timed["tiles"]:
            assert "error" not in row and row["ms"] > 0 and row["rel_error"] < 1e-2, row
        assert timed["split_gemv"]["ms"] > 0
