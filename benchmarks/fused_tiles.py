"""Which tiles make the fused decode-step kernels (engine/kernels/fused_step.py) stream their
weights fastest? Their tiles are the GEMV's (tiles_for), chosen for a kernel that only multiplies.

    python benchmarks/fused_tiles.py [--models llama-3.2-1b qwen2.5-0.5b smollm2-135m]
                                     [--grid quick]

For each model (in its MODELS dtype) a layer's four fused kernels at batch 1, as its fused step
runs them (fused_shapes): norm + wqkv (+ RoPE and the K/V cache write where Attention takes
them), wo + add, norm + w13 + SwiGLU, w2 + add. Each is timed at every (BLOCK_N, BLOCK_K,
num_warps) of a grid in fused_tiles_for's terms (the launch's own: gate rows for SwiGLU, whole
pairs for wqkv), handed to the launch helpers as their `tiles` override, beside the split
step's GEMV of the same weight at its tiles_for tiles and the device-to-device copy bandwidth of
the same run. The calls are replayed from a CUDA graph (as the engine's step runs them), each
call reading its own copy of the weight, so that a weight comes back only after ROTATE_BYTES
(over L2's 50 MB on an H100 or H200) has streamed by; do_bench's median. GB/s counts the weight
bytes (and wqkv's bias) a call reads. Writes results/fused-tiles-<grid>-<device>.json (and
$OUT/ when set) after each model, and prints each shape's default tiles and its best, with the
GB/s of each, and the FUSED_TILES entry the bests would make.
"""

from __future__ import annotations

import argparse
import itertools
import math
from typing import NamedTuple

import torch
from tile_grid import (  # benchmarks/ beside this script
    ROTATE_BYTES,
    best,
    default_row,
    fits,
    table_json,
    tiles_of,
    time_tilings,
    with_default,
    write_result,
)

from infermeter.engine.kernels import fused_step
from infermeter.specs.presets import PRESETS

# Dense models whose layers take all four fused parts (Llama, Qwen2, Qwen3; not Gemma), each in
# the dtype step_kernels_ab.py runs it; the default list is the fused step's small models.
MODELS = {"llama-3.2-1b": "bf16", "qwen2.5-0.5b": "bf16", "smollm2-135m": "fp16",
          "qwen3-0.6b": "bf16"}
DEFAULT_MODELS = ("llama-3.2-1b", "qwen2.5-0.5b", "smollm2-135m")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Candidates; tilings() keeps those that fit a shape. quick: the open_targets part (three models
# in one 10-minute command); full: one or two models a command.
GRIDS = {"quick": {"BLOCK_N": (1, 2, 4, 8), "BLOCK_K": (256, 512, 1024, 2048),
                   "num_warps": (4, 8)},
         "full": {"BLOCK_N": (1, 2, 4, 8, 16), "BLOCK_K": (128, 256, 512, 1024, 2048, 4096),
                  "num_warps": (2, 4, 8, 16)}}
CACHE_LEN, POSITION = 128, 100  # the wqkv kernel's cache [1, H_kv, CACHE_LEN, D] and slot
EPS = 1e-5


class FusedShape(NamedTuple):
    """One fused kernel's weight in a layer (NamedTuples: a dataclass needs its module in
    sys.modules, which the tests' loading of a script skips). wqkv's: n_q rows of q, head_dim,
    its bias (Qwen2) and q/k norms (Qwen3)."""
    model: str
    part: str  # "wqkv", "wo", "w13", "w2"
    kernel: str  # one of fused_step.FUSED_KERNELS
    n_rows: int
    n_cols: int
    n_q: int = 0
    head_dim: int = 0
    bias: bool = False
    qk_norm: bool = False

    @property
    def label(self) -> str:
        return f"{self.model} {self.part}"

    def weight_bytes(self, itemsize: int) -> int:
        """What a call reads besides x: the weight [n_rows, n_cols] (and the bias)."""
        return (self.n_rows * self.n_cols + (self.n_rows if self.bias else 0)) * itemsize

    def default_tiles(self, gpu: str) -> tuple[int, int, int]:
        """The tiles the engine launches this kernel with on `gpu` today."""
        return fused_step.fused_tiles_for(self.kernel, self.n_cols, gpu, self.head_dim or None,
                                          self.qk_norm)


def fused_shapes(model: str) -> list[FusedShape]:
    """A layer's fused kernels at batch 1, in the step's order. norm + wqkv also ropes q and k
    and writes the cache (Attention.ropes_in_wqkv, the cache in the activations' dtype as here)
    unless q/k norms come with a head_dim that is no power of two; then it is norm_gemv."""
    spec = PRESETS[model]
    n_q, n_kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    ropes = not spec.qk_norm or spec.head_dim & (spec.head_dim - 1) == 0
    qkv = FusedShape(model, "wqkv", "norm_qkv_rope" if ropes else "norm_gemv", n_q + 2 * n_kv,
                     spec.dim, n_q, spec.head_dim, spec.qkv_bias and ropes, spec.qk_norm and ropes)
    return [qkv, FusedShape(model, "wo", "gemv_add", spec.dim, n_q),
            FusedShape(model, "w13", "gemv_swiglu", 2 * spec.ffn_dim, spec.dim),
            FusedShape(model, "w2", "gemv_add", spec.dim, spec.ffn_dim)]


def tilings(shape: FusedShape, grid: dict,
            default: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """The grid's tilings that fit `shape` (tile_grid.fits; SwiGLU's programs hold gate and up
    rows); wqkv's BLOCK_N whole pairs. With q/k norms BLOCK_N is head_dim and BLOCK_K each grid
    tile's size over it. Then `default` (the baseline) if the grid lacks it."""
    if shape.qk_norm:
        pairs = [(shape.head_dim, max(16, n * k // shape.head_dim))
                 for n, k in itertools.product(grid["BLOCK_N"], grid["BLOCK_K"])]
    else:
        pairs = list(itertools.product(grid["BLOCK_N"], grid["BLOCK_K"]))
    out = []
    for (n, k), warps in itertools.product(dict.fromkeys(pairs), grid["num_warps"]):
        held = 2 * n * k if shape.kernel == "gemv_swiglu" else n * k
        if fits(shape.n_cols, grid, k, warps, held) and (shape.kernel != "norm_qkv_rope" or n >= 2):
            out.append((n, k, warps))
    return with_default(out, default)


def calls_per_replay(shape: FusedShape, itemsize: int) -> int:
    """Calls (each on its own weight copy) a graph replay makes: enough to pass ROTATE_BYTES."""
    return max(2, math.ceil(ROTATE_BYTES / shape.weight_bytes(itemsize)))


def shape_calls(shape: FusedShape, calls: int, dtype: torch.dtype):
    """(fused(i, tiles), split(i)) -> the i-th call's output [1, N] (wqkv: q [1, n_q]): the
    fused kernel at `tiles`, and the split step's GEMV of the same weight copy."""
    from infermeter.engine.kernels.gemv import _gemv

    def randn(*size):
        return torch.randn(*size, device="cuda").to(dtype)

    weights = [randn(shape.n_rows, shape.n_cols) / shape.n_cols**0.5 for _ in range(calls)]
    x, norm_w, residual = randn(1, shape.n_cols), 1 + 0.1 * randn(shape.n_cols), \
        randn(1, shape.n_rows)
    if shape.kernel == "norm_qkv_rope":
        n_kv_heads = (shape.n_rows - shape.n_q) // 2 // shape.head_dim
        biases = [randn(shape.n_rows) if shape.bias else None for _ in range(calls)]
        k_cache, v_cache = (torch.zeros(1, n_kv_heads, CACHE_LEN, shape.head_dim, dtype=dtype,
                                        device="cuda") for _ in range(2))
        key_pos = torch.arange(CACHE_LEN, device="cuda")
        angles = POSITION * 10000.0 ** (-torch.arange(0, shape.head_dim, 2,
                                                      device="cuda") / shape.head_dim)
        cos, sin = torch.cos(angles)[None], torch.sin(angles)[None]  # [1, D / 2] float32
        pos = torch.tensor([POSITION], device="cuda")
        q_w, k_w = (1 + 0.1 * randn(shape.head_dim) if shape.qk_norm else None for _ in range(2))

        def fused(i, tiles):
            return fused_step._norm_qkv_rope(x, norm_w, weights[i], biases[i], cos, sin, pos,
                                             k_cache, v_cache, key_pos, shape.n_q, EPS, False,
                                             False, q_w, k_w, EPS, False, pdl=False, tiles=tiles)
    else:
        swiglu, add = shape.kernel == "gemv_swiglu", shape.kernel == "gemv_add"

        def fused(i, tiles):
            return fused_step._fused_gemv(x, weights[i], None if add else norm_w,
                                          residual if add else None, EPS, False, swiglu,
                                          pdl=False, tiles=tiles)

    def split(i):
        return _gemv(x, weights[i], pdl=False)
    return fused, split


def time_shape(shape: FusedShape, grid: dict, gpu: str, dtype: torch.dtype) -> dict:
    """Every tiling of the grid for `shape`: ms a call, GB/s and the relative error against the
    default tiles' output (other tiles sum in other float32 orders); and the split GEMV's."""
    from gemv_tiles import time_per_call  # benchmarks/ beside this script, for the split GEMV

    from infermeter.engine.kernels.gemv import tiles_for

    calls = calls_per_replay(shape, dtype.itemsize)
    fused, split = shape_calls(shape, calls, dtype)
    nbytes = shape.weight_bytes(dtype.itemsize)
    split_ms = time_per_call(lambda: [split(i) for i in range(calls)], calls, True)
    default = shape.default_tiles(gpu)
    rows = time_tilings(fused, calls, tilings(shape, grid, default), default, nbytes)
    return {**shape._asdict(), "label": shape.label, "bytes": nbytes, "calls_per_replay": calls,
            "default_tiles": list(default),
            "split_gemv": {"tiles": list(tiles_for(shape.n_cols, gpu)), "ms": split_ms,
                           "gbps": nbytes / split_ms / 1e6},
            "tiles": rows}


def suggested_table(timed_shapes: list[dict], gpu: str) -> dict:
    """The FUSED_TILES entry the bests make: per kernel and column count, the tiles of least
    summed time over the shapes that share them (the table keys on both only), where they beat
    the default tiles' sum. Shapes with q/k norms are left out: their tiles are one head a
    program, and they take no entry (fused_step.fused_tiles_for)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for timed in timed_shapes:
        if not timed.get("qk_norm"):
            groups.setdefault((timed["kernel"], timed["n_cols"]), []).append(timed)
    entry: dict[str, dict[int, tuple[int, int, int]]] = {}
    for (kernel, cols), group in groups.items():
        totals: dict[tuple[int, int, int], float] = {}
        for tiles in {tiles_of(r) for r in group[0]["tiles"]}:
            ms = [next((r["ms"] for r in t["tiles"] if "ms" in r and tiles_of(r) == tiles), None)
                  for t in group]
            if None not in ms:  # ran for every shape of the group
                totals[tiles] = sum(ms)
        if not totals:
            continue
        top = min(totals, key=totals.get)
        base = tuple(group[0]["default_tiles"])
        if base not in totals or totals[top] < totals[base]:
            entry.setdefault(kernel, {})[cols] = top
    return {gpu: entry} if entry else {}


def summary_line(timed: dict, hbm: float) -> str:
    """One shape: the split GEMV's, the default tiles' and the best tiles' us and GB/s."""
    line = f"{timed['label']:22s} {timed['kernel']:13s} {timed['n_rows']:6d} x " \
           f"{timed['n_cols']:5d}"
    split = timed["split_gemv"]
    line += f"; split GEMV {split['tiles']} {split['ms'] * 1e3:6.2f} us {split['gbps']:5.0f} GB/s"
    for name, row in (("default", default_row(timed)), ("best", best(timed))):
        if row is not None:
            line += f"; {name} {list(tiles_of(row))} {row['ms'] * 1e3:6.2f} us " \
                    f"{row['gbps']:5.0f} GB/s"
    top = best(timed)
    if top is not None and hbm > 0:
        line += f" ({100 * top['gbps'] / hbm:.0f}% of the copy)"
    return line


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(DEFAULT_MODELS))
    parser.add_argument("--grid", choices=tuple(GRIDS), default="quick",
                        help="quick: up to 32 tilings a shape; full: up to 120")
    return parser


def main() -> int:
    from gemv_tiles import copy_gbps  # benchmarks/ beside this script

    from infermeter.engine.kernels.gemv import gpu_name
    from infermeter.measure.env import capture_env, device_slug

    args = arguments().parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: fused_tiles.py times CUDA kernels: no CUDA device here")
    grid = GRIDS[args.grid]
    env = capture_env()
    gpu = gpu_name(torch.device("cuda"))
    hbm = copy_gbps()
    print(f"device-to-device copy: {hbm:.0f} GB/s", flush=True)
    timed_shapes: list[dict] = []
    for model in args.models:
        torch.manual_seed(0)
        for shape in fused_shapes(model):
            timed = time_shape(shape, grid, gpu, DTYPES[MODELS[model]])
            timed_shapes.append(timed)
            print(summary_line(timed, hbm), flush=True)
            torch.cuda.empty_cache()
        metrics = {"copy_gbps": hbm, "shapes": timed_shapes,
                   "suggested_fused_tiles": table_json(suggested_table(timed_shapes, gpu))}
        config = {"benchmark": "fused_tiles", "dtypes": {m: MODELS[m] for m in args.models},
                  "grid": grid, "batch_size": 1, "timing": "graph", "models": args.models}
        write_result(f"fused-tiles-{args.grid}-{device_slug(env)}.json", args.models, config,
                     env, metrics)
    print(f"FUSED_TILES entry from the bests: {suggested_table(timed_shapes, gpu)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
