"""The expert kernels' tiles (engine/kernels/expert_gemv.py: EXPERT_TILES, the launchers' `tiles`
override, the one-token down ways) and benchmarks/expert_tiles.py, which times them.

Here: the table's lookup, which tiles and grid each launch gets (launches recorded, not run),
the benchmark's cases and grid, and its open_targets part. Under Triton's interpreter
(tests/expert_tiles_worker.py): other tiles reach the kernels and change no bit where every
product is exact, and one token's two down ways hold the same terms, parting only where torch's
sum over k leaves routing order (k > 4)."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton")  # the kernels' launchers and the script's timing

from infermeter.engine.kernels import expert_gemv  # noqa: E402
from infermeter.engine.kernels.expert_gemv import (  # noqa: E402
    _experts_down,
    _experts_swiglu,
    expert_tiles_for,
)
from infermeter.engine.kernels.gemv import tiles_for  # noqa: E402
from tests.benchmark_scripts import BENCHMARKS, load_benchmark, part_arguments  # noqa: E402
from tests.tile_launches import tile_launches  # noqa: E402
from tests.triton_interpreter import run_under_interpreter  # noqa: E402

H100 = "NVIDIA H100 80GB HBM3"


def test_an_empty_table_gives_tiles_for_and_an_entry_only_its_own_shape(monkeypatch):
    monkeypatch.setattr(expert_gemv, "EXPERT_TILES", {})  # a GPU nobody measured
    for kernel in expert_gemv.EXPERT_KERNELS:
        for cols in (768, 2048, 2880, 4096, 14336):
            for gpu in ("", H100, "NVIDIA H200"):
                assert expert_tiles_for(kernel, cols, gpu) == tiles_for(cols, gpu)
    monkeypatch.setitem(expert_gemv.EXPERT_TILES, H100, {"down": {768: (16, 256, 4)}})
    assert expert_tiles_for("down", 768, H100) == (16, 256, 4)
    assert expert_tiles_for("down", 2048, H100) == tiles_for(2048, H100)  # another width
    assert expert_tiles_for("swiglu", 768, H100) == tiles_for(768, H100)  # another kernel
    assert expert_tiles_for("down", 768, "NVIDIA H200") == tiles_for(768, "NVIDIA H200")
    monkeypatch.undo()  # the measured table: an H100 at Qwen3's widths, nothing else
    assert expert_tiles_for("swiglu", 2048, H100) == (2, 2048, 4)
    assert expert_tiles_for("down", 768, H100) == (2, 1024, 4)
    assert expert_tiles_for("down", 768, "NVIDIA H200") == tiles_for(768, "NVIDIA H200")
    assert expert_tiles_for("swiglu", 4096, H100) == tiles_for(4096, H100)
    with pytest.raises(ValueError, match="unknown expert kernel"):
        expert_tiles_for("gate", 768, H100)


def test_a_token_count_entry_serves_that_count_only():
    """EXPERT_TOKEN_TILES: the H100's batch-4 bests at Qwen3-30B-A3B's widths serve 4 tokens;
    1, 2, 3 and 5 take the width's entry (or tiles_for's); another width or GPU, its own."""
    assert expert_tiles_for("swiglu", 2048, H100, 4) == (8, 1024, 4)
    assert expert_tiles_for("down", 768, H100, 4) == (8, 512, 4)
    for tokens in (1, 2, 3, 5):
        assert expert_tiles_for("swiglu", 2048, H100, tokens) == (2, 2048, 4)
        assert expert_tiles_for("down", 768, H100, tokens) == (2, 1024, 4)
    assert expert_tiles_for("down", 2048, H100, 4) == tiles_for(2048, H100)
    assert expert_tiles_for("down", 768, "NVIDIA H200", 4) == tiles_for(768, "NVIDIA H200")


def test_the_table_and_the_override_reach_each_launch(monkeypatch):
    """Qwen3-30B-A3B's shapes (dim 2048, ffn 768, 8 of 128 experts): with the table empty each
    launch carries tiles_for's tiles (gate/up: half the rows; several tokens: BLOCK_K shared
    among them); an EXPERT_TILES entry for this device ("" on the CPU), an EXPERT_TOKEN_TILES
    entry at its token count and an explicit override replace them; the terms way runs one
    token on the several-token kernel, a program a slot."""
    dtype, e, k, dim, ffn = torch.bfloat16, 128, 8, 2048, 768
    w13, w2 = torch.empty(e, ffn, dim, dtype=dtype), torch.empty(e, dim, ffn, dtype=dtype)

    def run(n, tiles=None, way=None):
        x, ids = torch.zeros(n, dim, dtype=dtype), torch.zeros(n, k, dtype=torch.int64)
        act, weights = torch.zeros(n, k, ffn, dtype=dtype), torch.zeros(n, k, dtype=dtype)
        return tile_launches(monkeypatch, expert_gemv, lambda: (
            _experts_swiglu(x, ids, w13, w13, False, tiles=tiles),
            _experts_down(act, ids, weights, w2, False, tiles=tiles, one_token=way)))

    assert run(1) == [("_experts_swiglu_kernel", (768 // 2, 8), 2, 2048, 8),
                      ("_experts_down_kernel", (2048 // 4, 1), 4, 1024, 8)]
    assert run(4) == [("_experts_swiglu_kernel", (768 // 2, 32), 2, 512, 8),
                      ("_experts_down_terms_kernel", (2048 // 4, 32), 4, 256, 8)]
    assert run(1, way="terms")[1] == ("_experts_down_terms_kernel", (2048 // 4, 8), 4, 1024, 8)
    assert run(1, (8, 512, 4)) == [("_experts_swiglu_kernel", (768 // 4, 8), 4, 512, 4),
                                   ("_experts_down_kernel", (2048 // 8, 1), 8, 512, 4)]
    assert run(4, (16, 256, 2))[1] == ("_experts_down_terms_kernel", (2048 // 16, 32), 16, 64, 2)
    monkeypatch.setitem(expert_gemv.EXPERT_TILES, "", {"swiglu": {dim: (16, 1024, 4)},
                                                      "down": {ffn: (1, 256, 2)}})
    assert run(1) == [("_experts_swiglu_kernel", (768 // 8, 8), 8, 1024, 4),
                      ("_experts_down_kernel", (2048, 1), 1, 256, 2)]
    assert run(1, (4, 2048, 8))[0] == ("_experts_swiglu_kernel", (768 // 2, 8), 2, 2048, 8)
    monkeypatch.setitem(expert_gemv.EXPERT_TOKEN_TILES, "", {"swiglu": {(dim, 4): (8, 1024, 4)},
                                                            "down": {(ffn, 4): (8, 512, 4)}})
    # four tokens take their count's entry (BLOCK_K shared among them), one token the width's
    assert run(4) == [("_experts_swiglu_kernel", (768 // 4, 32), 4, 256, 4),
                      ("_experts_down_terms_kernel", (2048 // 8, 32), 8, 128, 4)]
    assert run(1)[0] == ("_experts_swiglu_kernel", (768 // 8, 8), 8, 1024, 4)
    monkeypatch.setattr(expert_gemv, "ONE_TOKEN_DOWN", "terms")  # the module's choice
    assert run(1)[1] == ("_experts_down_terms_kernel", (2048, 8), 1, 256, 2)
    with pytest.raises(ValueError, match="three powers of two"):
        run(1, (3, 512, 4))
    with pytest.raises(ValueError, match="unknown one-token down way"):
        run(1, way="atomic")


def test_tiles_and_ways_under_the_triton_interpreter():
    run_under_interpreter(BENCHMARKS.parent / "tests" / "expert_tiles_worker.py")


def test_the_benchmark_times_each_model_s_kernels_at_batch_1_and_4():
    """Its cases: swiglu and down at batch 1 and 4 for the three MoE models, both one-token
    down ways at batch 1 only; each shape the preset's; every grid tiling fits the shape and
    tiles_for's own tiles are always among them; a graph replay reads enough rows to outrun L2,
    and no model's layers pass the memory budget."""
    script, tile_grid = load_benchmark("expert_tiles"), load_benchmark("tile_grid")
    assert script.MODELS == ("qwen3-30b-a3b", "mixtral-8x7b", "gpt-oss-20b")
    labels = [case.label for case in script.cases(script.MODELS[:1])]
    assert labels == ["qwen3-30b-a3b N1 swiglu", "qwen3-30b-a3b N1 down sum",
                      "qwen3-30b-a3b N1 down terms", "qwen3-30b-a3b N4 swiglu",
                      "qwen3-30b-a3b N4 down terms"]
    assert len(script.cases()) == 15
    qwen3 = script.Shape.of("qwen3-30b-a3b")
    assert (qwen3.n_experts, qwen3.top_k, qwen3.dim, qwen3.ffn, qwen3.bias) == \
        (128, 8, 2048, 768, False)
    oss = script.Shape.of("gpt-oss-20b")
    assert (oss.top_k, oss.dim, oss.ffn, oss.bias, oss.limit, oss.alpha) == \
        (4, 2880, 2880, True, 7.0, 1.702)
    # the trace's 48 MiB of gate/up rows and 24 MiB of down rows a Qwen3 layer at batch 1
    assert 8 * qwen3.expert_bytes("swiglu") == 48 * 2**20
    assert 8 * qwen3.expert_bytes("down") == 24 * 2**20
    for case in script.cases():
        shape = script.Shape.of(case.model)
        cols = case.n_cols(shape)
        assert cols == (shape.dim if case.kernel == "swiglu" else shape.ffn)
        for name, grid in script.GRIDS.items():
            tiles = script.tilings(cols, grid, tiles_for(cols))
            assert tiles_for(cols) in tiles and len(set(tiles)) == len(tiles) > 10, name
            assert all(n * k <= tile_grid.MAX_TILE and k <= max(1024, 2 * cols)
                       for n, k, _ in tiles), name
        calls = script.calls_per_replay(shape, case)
        chosen = min(case.batch * shape.top_k, shape.n_experts)
        assert calls >= 2 and calls * chosen * shape.expert_bytes(case.kernel) >= 256 * 2**20
        layers = script.layer_count(shape, calls)
        assert 1 <= layers <= calls and layers * shape.layer_bytes() <= script.LAYER_BUDGET
    # Qwen3's down at batch 1: 768 columns, so no tile wider than 1024 columns
    assert max(k for _, k, _ in script.tilings(768, script.GRIDS["full"], (4, 1024, 8))) == 1024
    args = script.arguments().parse_args([])
    assert (args.models, args.batches, args.grid) == (list(script.MODELS), [1, 4], "quick")
    with pytest.raises(SystemExit):
        script.arguments().parse_args(["--models", "qwen3-30b"])


def test_the_suggested_table_takes_batch_1_bests_that_beat_tiles_for():
    script = load_benchmark("expert_tiles")
    grid = script.GRIDS["quick"]

    def timed(kernel, way, batch, cols, rows):
        return {"kernel": kernel, "way": way, "batch": batch, "n_cols": cols,
                "default_tiles": [4, 1024, 8],
                "tiles": [dict(zip(grid, t, strict=True), ms=ms) for t, ms in rows]}

    runs = [timed("swiglu", "", 1, 2048, [((4, 1024, 8), 2.0), ((2, 2048, 4), 1.0)]),
            timed("down", "sum", 1, 768, [((4, 1024, 8), 1.0), ((8, 512, 4), 1.5)]),
            timed("down", "terms", 1, 768, [((4, 1024, 8), 0.9), ((1, 1024, 4), 0.8)]),
            timed("swiglu", "", 4, 2048, [((4, 1024, 8), 2.0), ((8, 512, 8), 0.5)])]
    # the down's best is the terms way's: not an entry for the sum way, which runs today
    assert script.suggested_table(runs, H100) == {H100: {"swiglu": {2048: (2, 2048, 4)}}}
    assert script.suggested_table(runs[1:2], H100) == {}  # tiles_for's was fastest
    faster_sum = timed("down", "sum", 1, 768, [((4, 1024, 8), 1.0), ((8, 512, 4), 0.7)])
    assert script.suggested_table([faster_sum, runs[2]], H100) == {
        H100: {"down": {768: (8, 512, 4)}}}


def test_the_open_targets_part_runs_the_benchmark_on_the_three_models():
    text = (BENCHMARKS / "open_targets.sh").read_text()
    args = part_arguments("expert-tiles", "expert_tiles")
    assert args.models == ["qwen3-30b-a3b", "mixtral-8x7b", "gpt-oss-20b"]  # issue 25's first
    assert (args.batches, args.grid) == ([1, 4], "quick")
    assert re.search(r"^#   part expert-tiles ", text, re.M)
