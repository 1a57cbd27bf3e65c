"""benchmarks/gemv_tiles.py: the product shapes it times are the engine's, and the per-shape
tiling it reports for gemv_kernel.tiles_for is read from the grid it timed."""

import pytest

pytest.importorskip("triton")  # the script imports triton.testing (do_bench)

from infermeter.engine.fusion import fuse_projections  # noqa: E402
from infermeter.engine.kernels.gemv import NUM_STAGES, tiles_for  # noqa: E402
from infermeter.engine.linear import Linear  # noqa: E402
from infermeter.engine.model import build_model  # noqa: E402
from infermeter.specs.presets import PRESETS  # noqa: E402
from tests.benchmark_scripts import load_benchmark  # noqa: E402


def load_script():
    return load_benchmark("gemv_tiles")


@pytest.mark.parametrize("name", ["debug", "debug-gqa"])
def test_step_shapes_are_the_fused_models_linears(name):
    """Every Linear of a fused model, with its count, is one (N, K, calls) of step_shapes;
    at tp 2 each shape holds half the weights (column- or row-parallel)."""
    script = load_script()
    spec = PRESETS["debug"] if name == "debug" else \
        PRESETS["debug"].with_updates(n_kv_heads=PRESETS["debug"].n_heads // 2)
    model = build_model(spec, device="cpu")
    fuse_projections(model)
    counted: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, Linear) or module is model.output:
            shape = tuple(module.weight.shape)
            counted[shape] = counted.get(shape, 0) + 1
    shapes = script.step_shapes(spec, 1)
    want: dict[tuple[int, int], int] = {}
    for _, n, k, calls in shapes:
        want[(n, k)] = want.get((n, k), 0) + calls
    assert want == counted
    half = script.step_shapes(spec, 2)
    assert [n * k for _, n, k, _ in half] == [n * k // 2 for _, n, k, _ in shapes]


def test_engine_step_sums_the_tiles_tiles_for_picks_and_needs_every_shape():
    script = load_script()

    def row(k, tiles, ms):
        return {"BLOCK_N": tiles[0], "BLOCK_K": tiles[1], "num_warps": tiles[2],
                "num_stages": tiles[3], "ms": ms}

    def shape(k, calls, other_ms):
        mine = (*tiles_for(k), NUM_STAGES)
        other = (4, 512, 4, 3)
        return {"k": k, "calls_per_step": calls,
                "tiles": [row(k, other, other_ms), row(k, mine, 1.0 + k / 1e4)]}

    shapes = {"a": shape(4096, 32, 0.1), "b": shape(5120, 2, 0.2), "c": shape(11008, 1, 0.3)}
    assert script.engine_step_ms(shapes) == pytest.approx(
        32 * 1.4096 + 2 * 1.512 + 1 * 2.1008)  # the rule's rows, never the faster other ones
    shapes["b"]["tiles"].pop()  # the grid did not time the rule's tiles for one shape
    assert script.engine_step_ms(shapes) is None


def test_tiles_for_follows_the_measured_table():
    """7B's K = 4096: 2 x 4096 (16 warps); 11008 / 13824: 1 x 4096; 13B's 5120 and tp 2's w2
    (6912): 1 x 2048; under 4096 (tp 2's wo, 2560 / 2048): 4 x K's power of two."""
    assert tiles_for(4096) == (2, 4096, 16)
    assert tiles_for(8192) == (2, 4096, 16)
    assert tiles_for(11008) == tiles_for(13824) == (1, 4096, 16)
    assert tiles_for(5120) == tiles_for(6912) == (1, 2048, 8)
    assert tiles_for(2560) == (4, 4096, 8)
    assert tiles_for(2048) == tiles_for(1100) == (4, 2048, 8)
    assert tiles_for(64) == tiles_for(1000) == (4, 1024, 8)


def test_an_h200_takes_its_own_measured_tiles_and_other_gpus_the_table():
    """DEVICE_TILES: on an H200 K = 4096 and K over 8192 take 2 x 4096 with 4 warps, 13B's
    5120 and 6912 2 x 1024 with 4 (its own gemv_tiles runs); K under 4096 keeps the table's; an
    H100 or the CPU (the interpreter) the table's throughout. The step sum follows the GPU it
    is asked for."""
    h200 = "NVIDIA H200"
    assert tiles_for(4096, h200) == tiles_for(11008, h200) == (2, 4096, 4)
    assert tiles_for(5120, h200) == tiles_for(6912, h200) == (2, 1024, 4)
    assert tiles_for(2560, h200) == tiles_for(2560) == (4, 4096, 8)
    assert tiles_for(4096, "NVIDIA H100 80GB HBM3") == tiles_for(4096, "") == (2, 4096, 16)
    script = load_script()
    rows = [{"BLOCK_N": 2, "BLOCK_K": 4096, "num_warps": w, "num_stages": NUM_STAGES, "ms": ms}
            for w, ms in ((4, 1.0), (16, 2.0))]
    shapes = {"w": {"k": 4096, "calls_per_step": 3, "tiles": rows}}
    assert script.engine_step_ms(shapes, h200) == 3.0
    assert script.engine_step_ms(shapes) == 6.0


def test_gpu_name_is_empty_off_cuda():
    import torch

    from infermeter.engine.kernels.gemv import gpu_name

    assert gpu_name(torch.device("cpu")) == ""


def test_graph_timing_replays_what_it_captured(monkeypatch):
    """--timing graph: fn runs once outside the capture (compiles, warms up), once inside it,
    and do_bench then times only the graph's replays, divided by the calls fn makes."""
    script = load_script()
    calls, timed = [], []

    class FakeGraph:
        def replay(self):
            calls.append("replay")

    class Capture:
        def __init__(self, graph):
            calls.append("capture")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            calls.append("captured")

    monkeypatch.setattr(script.torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(script.torch.cuda, "graph", Capture)
    monkeypatch.setattr(script.torch.cuda, "synchronize", lambda: None)

    def do_bench(fn, **options):
        timed.append(options["return_mode"])
        fn()
        return 8.0

    monkeypatch.setattr(script.triton.testing, "do_bench", do_bench)
    ms = script.time_per_call(lambda: calls.append("fn"), 4, graph=True)
    assert ms == 2.0 and timed == ["median"]
    assert calls == ["fn", "capture", "fn", "captured", "replay"]
    calls.clear()
    assert script.time_per_call(lambda: calls.append("fn"), 2) == 4.0 and calls == ["fn"]
