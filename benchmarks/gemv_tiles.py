"""Which tiles make gemv_kernel.py's GEMV stream a model's weights fastest? (issue 5)

    python benchmarks/gemv_tiles.py [--model llama-2-7b] [--tp 1] [--dtype fp16] [--grid wide]
                                    [--timing graph]

For each one-row product of a decode step (one rank's at --tp; fused wqkv, wo, fused w13, w2,
output) the kernel is timed at every (BLOCK_N, BLOCK_K, num_warps, num_stages) of a small grid,
next to torch's F.linear (cuBLAS), F.linear compiled by inductor as the engine's step does, and
the device-to-device copy bandwidth of the same run. Each timing cycles through enough copies of
the weight (>= 256 MB) that L2 (50 MB on an H100) never holds it; triton.testing.do_bench's
median. The step-weighted total (each shape x its calls per step) says which single tiling is
best for the whole step. Writes results/gemv-tiles-[<model>-][tp<N>-]<grid>[-graph]-<device>.json
(and $OUT/ when set) and prints the best tiles per shape and overall.
--timing graph replays the calls from a CUDA graph (the engine's step does); the committed runs up
to commit aa590fd launched each call from Python, which times kernels under ~20 us
launch-bound: their tp 2 wo rows (~11 us in the step's traces) read 14-25 us there.
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

from infermeter.engine.kernels.gemv import NUM_STAGES, _gemv_kernel, gpu_name, tiles_for
from infermeter.measure.env import capture_env, device_slug
from infermeter.measure.result import Result, write_json
from infermeter.specs.presets import PRESETS


def step_shapes(spec, tp: int) -> tuple[tuple[str, int, int, int], ...]:
    """(name, N, K, calls per step) of one rank's one-row products, projections fused, at
    tensor-parallel degree tp (parallel.py: column-parallel wqkv / w13 split N, row-parallel
    wo / w2 split K, the untied output split by vocabulary)."""
    dim, kv, layers = spec.dim, spec.n_kv_heads * spec.head_dim, spec.n_layers
    q = spec.n_heads * spec.head_dim
    return (("wqkv", (q + 2 * kv) // tp, dim, layers), ("wo", dim, q // tp, layers),
            ("w13", 2 * spec.ffn_dim // tp, dim, layers), ("w2", dim, spec.ffn_dim // tp, layers),
            ("output", spec.vocab_size // tp, dim, 1))

GRID = {"BLOCK_N": (2, 4, 8, 16), "BLOCK_K": (256, 512, 1024), "num_warps": (4, 8),
        "num_stages": (1, 2, 3, 4)}
# The first H100 run (commit 7bf3699) put the best at the grid's edge (2, 1024, 4, 4): beyond it.
WIDE = {"BLOCK_N": (1, 2, 4, 8), "BLOCK_K": (1024, 2048, 4096), "num_warps": (4, 8, 16),
        "num_stages": (1, 2, 4)}
QUICK = {"BLOCK_N": (4, 8, 16), "BLOCK_K": (256, 512), "num_warps": (4, 8),
         "num_stages": (2, 3)}
ROTATE_BYTES = 256 * 2**20


def copies_of(n: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x [1, K] and enough distinct random W [N, K] to outrun L2 when cycled."""
    count = max(2, -(-ROTATE_BYTES // (n * k * dtype.itemsize)))
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    return x, [torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5 for _ in range(count)]


def time_per_call(fn, count: int, graph: bool = False) -> float:
    """Median milliseconds of one call, fn making `count` calls (one per weight copy). graph:
    fn's launches are captured once into a CUDA graph and the graph is replayed, as the
    engine's compiled step runs its kernels; launched from Python instead, a kernel under ~20 us
    (tp 2's wo) is timed launch-bound (Triton's launcher costs about that much per call)."""
    if graph:
        fn()  # compiles and warms up (cuBLAS workspaces, inductor) outside the capture
        torch.cuda.synchronize()
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            fn()
        fn = captured.replay
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median") / count


def run_kernel(x, w, out, tiles):
    n, k = w.shape
    grid = (triton.cdiv(n, tiles["BLOCK_N"]),)
    _gemv_kernel[grid](x, w, out, n, k, w.stride(0), BLOCK_N=tiles["BLOCK_N"],
                       BLOCK_K=tiles["BLOCK_K"], num_warps=tiles["num_warps"],
                       num_stages=tiles["num_stages"])


def time_shape(n: int, k: int, calls: int, dtype: torch.dtype, grid: dict,
               graph: bool = False) -> dict:
    """cuBLAS and every tiling of the grid on W [n, k]: ms, GB/s and error against F.linear."""
    x, weights = copies_of(n, k, dtype)
    out = torch.empty(1, n, device="cuda", dtype=dtype)
    nbytes = n * k * dtype.itemsize
    reference = F.linear(x, weights[0]).float()
    cublas = time_per_call(lambda: [F.linear(x, w) for w in weights], len(weights), graph)
    # what the engine's default compiled step does with it: inductor's reduction, tuned anew
    torch._dynamo.reset()
    compiled = torch.compile(F.linear, dynamic=False,
                             options={"coordinate_descent_tuning": True})
    compiled(x, weights[0])
    inductor = time_per_call(lambda: [compiled(x, w) for w in weights], len(weights),
                             graph)
    rows = []
    for values in itertools.product(*grid.values()):
        tiles = dict(zip(grid, values, strict=True))
        try:
            out.fill_(float("nan"))  # every element must be written
            run_kernel(x, weights[0], out, tiles)
            error = float((out.float() - reference).norm() / reference.norm())
            ms = time_per_call(lambda t=tiles: [run_kernel(x, w, out, t) for w in weights],
                               len(weights), graph)
        except Exception as failure:  # noqa: BLE001 - e.g. out of shared memory: skip it
            rows.append({**tiles, "error": f"{type(failure).__name__}: {failure}"[:200]})
            continue
        rows.append({**tiles, "ms": ms, "gbps": nbytes / ms / 1e6, "rel_error": error})
    return {"n": n, "k": k, "calls_per_step": calls, "bytes": nbytes, "cublas_ms": cublas,
            "cublas_gbps": nbytes / cublas / 1e6, "inductor_ms": inductor,
            "inductor_gbps": nbytes / inductor / 1e6, "tiles": rows}


def engine_step_ms(shapes: dict, gpu: str = "") -> float | None:
    """The step's products with the tiles gemv_kernel.tiles_for picks per shape on GPU `gpu`
    (a device name), where the grid timed them (None where it did not)."""
    total = 0.0
    for shape in shapes.values():
        want = (*tiles_for(shape["k"], gpu), NUM_STAGES)
        rows = [r for r in shape["tiles"] if "ms" in r and
                (r["BLOCK_N"], r["BLOCK_K"], r["num_warps"], r["num_stages"]) == want]
        if not rows:
            return None
        total += rows[0]["ms"] * shape["calls_per_step"]
    return total


def copy_gbps() -> float:
    """Device-to-device copy, bytes read + written per second (the roofline's HBM figure)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200,
                                 return_mode="median")
    return 2 * src.numel() / ms / 1e6


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-2-7b", choices=list(PRESETS))
    parser.add_argument("--tp", type=int, default=1, help="one rank's shards at this degree")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    parser.add_argument("--grid", choices=("full", "wide", "quick"), default="full",
                        help="full: 96 tilings; wide: 108 with fewer rows and longer columns; "
                             "quick: 24")
    parser.add_argument("--timing", choices=("launch", "graph"), default="launch",
                        help="launch: each call launched from Python (how the committed runs "
                             "timed); graph: the calls replayed from a CUDA graph, as in the "
                             "engine's step (honest for kernels under ~20 us)")
    args = parser.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    grid = {"full": GRID, "wide": WIDE, "quick": QUICK}[args.grid]
    env = capture_env()
    hbm = copy_gbps()
    print(f"device-to-device copy: {hbm:.0f} GB/s", flush=True)
    spec = PRESETS[args.model]
    shapes = {name: time_shape(n, k, calls, dtype, grid, args.timing == "graph")
              for name, n, k, calls in step_shapes(spec, args.tp)}
    totals: dict[tuple, float] = {}  # tiles -> the step's products' ms, for tiles timed on all
    for shape in shapes.values():
        for row in shape["tiles"]:
            if "ms" in row:
                key = tuple(row[g] for g in grid)
                totals[key] = totals.get(key, 0.0) + row["ms"] * shape["calls_per_step"]
    for name, shape in shapes.items():
        best = min((r for r in shape["tiles"] if "ms" in r), key=lambda r: r["ms"])
        print(f"{name:6s} {shape['n']:6d}x{shape['k']:<6d} cuBLAS {shape['cublas_gbps']:6.0f} "
              f"GB/s, inductor {shape['inductor_gbps']:6.0f} GB/s; best {best['gbps']:6.0f} "
              f"GB/s at {[best[g] for g in grid]} "
              f"(error {best['rel_error']:.1e})", flush=True)
    complete = {key: ms for key, ms in totals.items()
                if all(any("ms" in r and tuple(r[g] for g in grid) == key for r in s["tiles"])
                       for s in shapes.values())}
    ranked = sorted(complete.items(), key=lambda item: item[1])
    step_bytes = sum(s["bytes"] * s["calls_per_step"] for s in shapes.values())
    cublas_step = sum(s["cublas_ms"] * s["calls_per_step"] for s in shapes.values())
    inductor_step = sum(s["inductor_ms"] * s["calls_per_step"] for s in shapes.values())
    print(f"step's products: cuBLAS {cublas_step:.3f} ms, inductor {inductor_step:.3f} ms; "
          f"copy-bandwidth floor {step_bytes / hbm / 1e6:.3f} ms")
    engine = engine_step_ms(shapes, gpu_name(torch.device("cuda")))
    if engine is not None:
        print(f"  the kernel's own per-shape tiles (gemv_kernel.tiles_for): {engine:.3f} ms "
              f"({step_bytes / engine / 1e6:.0f} GB/s)")
    for key, ms in ranked[:8]:
        print(f"  {dict(zip(grid, key, strict=True))}: {ms:.3f} ms "
              f"({step_bytes / ms / 1e6:.0f} GB/s)")
    metrics = {"copy_gbps": hbm, "step_bytes": step_bytes, "cublas_step_ms": cublas_step,
               "tiles_for_step_ms": engine,
               "inductor_step_ms": inductor_step,
               "best_step": [{"tiles": dict(zip(grid, key, strict=True)), "step_ms": ms}
                             for key, ms in ranked[:20]], "shapes": shapes}
    config = {"benchmark": "gemv_tiles", "dtype": args.dtype, "grid": grid, "tp": args.tp,
              "timing": args.timing}
    result = Result("generate", spec.to_dict(), config, env, metrics)
    name = "" if (args.model, args.tp) == ("llama-2-7b", 1) else \
        f"{args.model}-" + (f"tp{args.tp}-" if args.tp > 1 else "")
    for folder in filter(None, [Path("results"), os.environ.get("OUT")]):
        timing = "-graph" if args.timing == "graph" else ""
        write_json(Path(folder) / f"gemv-tiles-{name}{args.grid}{timing}-{device_slug(env)}.json",
                   result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
