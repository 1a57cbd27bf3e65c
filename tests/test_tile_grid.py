"""benchmarks/tile_grid.py, what expert_tiles.py and fused_tiles.py share: which tilings fit a
weight, the timing loop's rows (timing faked: no GPU here), the fastest and default rows, and
the Result file they write to results/ and $OUT."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.benchmark_scripts import load_benchmark

pytest.importorskip("triton")  # the scripts import the kernels' launchers


def test_the_tile_keys_are_both_scripts_grid_keys_in_order():
    """Rows are keyed, and tiles read back, by TILE_KEYS: the grids' keys, in their order."""
    tile_grid = load_benchmark("tile_grid")
    for name in ("expert_tiles", "fused_tiles"):
        for grid in load_benchmark(name).GRIDS.values():
            assert tuple(grid) == tile_grid.TILE_KEYS, name


def test_a_tiling_fits_no_wider_than_the_columns_and_within_a_program_s_share():
    tile_grid = load_benchmark("tile_grid")
    grid = {"BLOCK_N": (1, 2), "BLOCK_K": (256, 512, 1024, 2048), "num_warps": (4,)}
    # 768 columns: BLOCK_K up to 1024 (768 rounded up), not 2048
    assert tile_grid.fits(768, grid, 1024, 4, 1024)
    assert not tile_grid.fits(768, grid, 2048, 4, 2048)
    assert tile_grid.fits(513, grid, 1024, 4, 1024) and not tile_grid.fits(512, grid, 1024, 4,
                                                                             1024)
    assert tile_grid.fits(10, grid, 256, 4, 512)  # the grid's narrowest always fits
    # at least MIN_PER_THREAD a thread (4 warps: 512 weights), at most MAX_TILE a program
    assert not tile_grid.fits(4096, grid, 256, 4, 511)
    assert tile_grid.fits(4096, grid, 256, 4, 512)
    assert tile_grid.fits(2**15, grid, 2048, 4, tile_grid.MAX_TILE)
    assert not tile_grid.fits(2**15, grid, 2048, 4, tile_grid.MAX_TILE + 1)
    assert tile_grid.with_default([(1, 256, 4)], (2, 512, 8)) == [(1, 256, 4), (2, 512, 8)]
    assert tile_grid.with_default([(1, 256, 4), (2, 512, 8)], (1, 256, 4)) == \
        [(1, 256, 4), (2, 512, 8)]


def test_each_tiling_gets_its_time_bandwidth_and_error_or_what_stopped_it(monkeypatch):
    """call(i, tiles): the default tiles give the reference; (2, 512, 4) is off by 1 % and
    takes 0.002 ms a call; (8, 512, 4) raises, and its row says why instead."""
    tile_grid = load_benchmark("tile_grid")
    reference = torch.tensor([[3.0, 4.0]])
    default, off, bad = (4, 1024, 8), (2, 512, 4), (8, 512, 4)
    made = []

    def call(i, tiles):
        made.append((i, tiles))
        if tiles == bad:
            raise RuntimeError("out of resources: " + "x" * 300)
        return reference * (1.01 if tiles == off else 1.0)

    def time_per_call(fn, count, graph):
        assert graph and count == 3
        fn()  # the calls a replay makes: each of the `count`
        return 0.002

    monkeypatch.setitem(sys.modules, "gemv_tiles", SimpleNamespace(time_per_call=time_per_call))
    rows = tile_grid.time_tilings(call, 3, [off, bad, default], default, nbytes=4e6)
    assert rows[0] == {"BLOCK_N": 2, "BLOCK_K": 512, "num_warps": 4, "ms": 0.002,
                       "gbps": pytest.approx(2000.0), "rel_error": pytest.approx(0.01)}
    assert rows[1]["BLOCK_N"] == 8 and "ms" not in rows[1]
    assert rows[1]["error"].startswith("RuntimeError: out of resources: x")
    assert len(rows[1]["error"]) == 200
    assert rows[2]["rel_error"] == 0.0
    assert made[:5] == [(0, default), (0, off), (0, off), (1, off), (2, off)]
    timed = {"default_tiles": list(default), "tiles": [rows[1], {**rows[0], "ms": 0.001},
                                                       rows[2]]}
    assert tile_grid.tiles_of(tile_grid.best(timed)) == off
    assert tile_grid.default_row(timed) is rows[2]
    assert tile_grid.best({"tiles": [rows[1]]}) is None
    assert tile_grid.default_row({"default_tiles": list(bad), "tiles": rows}) is None  # failed


def test_the_result_goes_to_results_and_out_alike(tmp_path, monkeypatch):
    tile_grid = load_benchmark("tile_grid")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    (tmp_path / "results").mkdir()
    (tmp_path / "out").mkdir()
    table = {"NVIDIA H200": {"gemv_add": {2048: (8, 256, 4)}}}
    metrics = {"copy_gbps": 4000.0, "suggested": tile_grid.table_json(table)}
    tile_grid.write_result("tiles-h200.json", ["smollm2-135m", "llama-3.2-1b"],
                           {"benchmark": "t"}, {"gpu": "x"}, metrics)
    written = (tmp_path / "results" / "tiles-h200.json").read_text()
    assert (tmp_path / "out" / "tiles-h200.json").read_text() == written
    data = json.loads(written)
    assert data["kind"] == "generate" and data["config"] == {"benchmark": "t"}
    assert data["model"]["name"] == "smollm2-135m+llama-3.2-1b"
    assert list(data["model"]["models"]) == ["smollm2-135m", "llama-3.2-1b"]
    assert data["metrics"]["suggested"] == {"NVIDIA H200": {"gemv_add": {"2048": [8, 256, 4]}}}
