"""Which tiles make the MoE expert kernels (engine/kernels/expert_gemv.py) stream their experts'
rows fastest? (issue 25: Qwen3-30B-A3B's batch-1 decode is bound by them)

    python benchmarks/expert_tiles.py [--models qwen3-30b-a3b mixtral-8x7b gpt-oss-20b]
                                      [--batches 1 4] [--grid quick]

For each model's expert shapes in bf16 (its E, k, dim and ffn; gpt-oss's biases and clamped
SwiGLU) and each batch, experts_swiglu (the chosen experts' w1 / w3 rows) and experts_down (w2's;
at batch 1 both one-token ways, expert_gemv.DOWN_WAYS: "sum" in the kernel, "terms" then torch's
sum) are timed at every (BLOCK_N, BLOCK_K, num_warps) of a grid, in expert_tiles_for's terms
(tiles_for's: BLOCK_N weight rows, BLOCK_K columns at one token; the launchers halve BLOCK_N into
gate and up rows and divide BLOCK_K among the tokens), next to the device-to-device copy
bandwidth of the same run. The calls are replayed from a CUDA graph (gemv_tiles.py's --timing
graph: the engine's step runs them so), each graph cycling through several layers' stacked
weights and random routing ids (k distinct experts a token, tokens sharing some at batch 4), so
that a layer's rows come back only after far more than L2 (50 MB on an H100) has streamed by;
do_bench's median. GB/s counts the distinct chosen experts' weight bytes a call reads.
Writes results/expert-tiles-[<grid>-]<device>.json (and $OUT/ when set) after each model, and
prints each case's tiles_for tiles and its best, with the GB/s each reaches, and the
EXPERT_TILES entry the batch-1 bests would make.
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

from infermeter.engine.kernels import expert_gemv
from infermeter.specs.presets import PRESETS

MODELS = ("qwen3-30b-a3b", "mixtral-8x7b", "gpt-oss-20b")
BATCHES = (1, 4)
# (BLOCK_N, BLOCK_K, num_warps) candidates; tilings() keeps those that fit a shape. quick (the
# open_targets part, all three models in one 10-minute command) and full (one model a command).
GRIDS = {"quick": {"BLOCK_N": (1, 2, 4, 8), "BLOCK_K": (512, 1024, 2048, 4096),
                   "num_warps": (4, 8)},
         "full": {"BLOCK_N": (1, 2, 4, 8, 16), "BLOCK_K": (256, 512, 1024, 2048, 4096),
                  "num_warps": (2, 4, 8, 16)}}
LAYER_BUDGET = 8 * 2**30  # stacked weights made a model at most


class Shape(NamedTuple):
    """One MoE layer's experts as the kernels see them (bf16). (NamedTuples: a dataclass
    needs its module in sys.modules, which the tests' loading of a script skips.)"""
    n_experts: int
    top_k: int
    dim: int
    ffn: int
    bias: bool
    limit: float | None
    alpha: float

    @classmethod
    def of(cls, model: str) -> Shape:
        spec = PRESETS[model]
        return cls(spec.n_experts, spec.n_active_experts, spec.dim, spec.moe_ffn_dim,
                   bool(spec.moe_bias), spec.swiglu_limit, spec.swiglu_alpha or 1.0)

    def layer_bytes(self, itemsize: int = 2) -> int:
        """w1, w3 and w2 of all E experts (and their biases)."""
        weights = 3 * self.n_experts * self.ffn * self.dim
        biases = self.n_experts * (2 * self.ffn + self.dim) if self.bias else 0
        return (weights + biases) * itemsize

    def expert_bytes(self, kernel: str, itemsize: int = 2) -> int:
        """What one chosen expert's rows cost `kernel`: w1 and w3 (swiglu) or w2 (down)."""
        if kernel == "swiglu":
            return (2 * self.ffn * self.dim + (2 * self.ffn if self.bias else 0)) * itemsize
        return (self.dim * self.ffn + (self.dim if self.bias else 0)) * itemsize


class Case(NamedTuple):
    """A kernel timed at one batch; way: the down's one-token way ("terms" at several
    tokens, the only one there; "" for swiglu)."""
    model: str
    batch: int
    kernel: str
    way: str = ""

    def n_cols(self, shape: Shape) -> int:
        return shape.dim if self.kernel == "swiglu" else shape.ffn

    @property
    def label(self) -> str:
        return f"{self.model} N{self.batch} {self.kernel}" + (f" {self.way}" if self.way else "")


def cases(models: tuple[str, ...] = MODELS, batches: tuple[int, ...] = BATCHES) -> list[Case]:
    """Each model's kernels at each batch: swiglu, then down (both ways at batch 1)."""
    out = []
    for model, batch in itertools.product(models, batches):
        out.append(Case(model, batch, "swiglu"))
        ways = expert_gemv.DOWN_WAYS if batch == 1 else ("terms",)
        out += [Case(model, batch, "down", way) for way in ways]
    return out


def tilings(n_cols: int, grid: dict, default: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """The grid's (BLOCK_N, BLOCK_K, num_warps) that fit weights of n_cols columns (tile_grid.fits,
    a program holding a BLOCK_N x BLOCK_K tile); then tiles_for's own, if the grid lacks it
    (each case's baseline)."""
    return with_default([(n, k, w) for n, k, w in itertools.product(*grid.values())
                         if fits(n_cols, grid, k, w, n * k)], default)


def calls_per_replay(shape: Shape, case: Case) -> int:
    """Calls a graph replay makes: enough that the rows read pass ROTATE_BYTES."""
    chosen = min(case.batch * shape.top_k, shape.n_experts)
    return max(2, math.ceil(ROTATE_BYTES / (chosen * shape.expert_bytes(case.kernel))))


def layer_count(shape: Shape, calls: int) -> int:
    """Distinct stacked layers a model gets: one a call up to LAYER_BUDGET's worth."""
    return max(1, min(calls, LAYER_BUDGET // shape.layer_bytes()))


def routing_ids(gen: torch.Generator, shape: Shape, batch: int) -> torch.Tensor:
    """[batch, k] expert ids, k distinct a token (as the router's top k), drawn independently."""
    return torch.stack([torch.randperm(shape.n_experts, generator=gen)[:shape.top_k]
                        for _ in range(batch)])


def make_layers(shape: Shape, count: int, dtype: torch.dtype) -> list[dict]:
    """count layers of random stacked weights on the GPU: w1 / w3 [E, ffn, dim], w2 [E, dim,
    ffn], and biases b1 / b3 [E, ffn], b2 [E, dim] where the model has them (else None)."""
    layers = []
    for _ in range(count):
        e, f, d = shape.n_experts, shape.ffn, shape.dim
        layer = {"w1": torch.randn(e, f, d, device="cuda", dtype=dtype) / d**0.5,
                 "w3": torch.randn(e, f, d, device="cuda", dtype=dtype) / d**0.5,
                 "w2": torch.randn(e, d, f, device="cuda", dtype=dtype) / f**0.5}
        for name, rows in (("b1", f), ("b3", f), ("b2", d)):
            layer[name] = torch.randn(e, rows, device="cuda", dtype=dtype) if shape.bias else None
        layers.append(layer)
    return layers


def case_calls(case: Case, shape: Shape, layers: list[dict], calls: int,
               gen: torch.Generator, dtype: torch.dtype):
    """(call(i, tiles) -> output of the i-th call, mean distinct experts a call): call i reads
    layer i % len(layers) with its own random ids and inputs."""
    ids = [routing_ids(gen, shape, case.batch).cuda() for _ in range(calls)]
    distinct = sum(i.unique().numel() for i in ids) / calls
    if case.kernel == "swiglu":
        xs = [torch.randn(case.batch, shape.dim, generator=gen).to("cuda", dtype)
              for _ in range(calls)]

        def call(i, tiles):
            layer = layers[i % len(layers)]
            return expert_gemv._experts_swiglu(xs[i], ids[i], layer["w1"], layer["w3"], False,
                                               layer["b1"], layer["b3"], shape.limit,
                                               shape.alpha, tiles=tiles)
        return call, distinct
    acts = [torch.randn(case.batch, shape.top_k, shape.ffn, generator=gen).to("cuda", dtype)
            for _ in range(calls)]
    weights = [torch.softmax(torch.randn(case.batch, shape.top_k, generator=gen), -1)
               .to("cuda", dtype) for _ in range(calls)]

    def call(i, tiles):
        layer = layers[i % len(layers)]
        return expert_gemv._experts_down(acts[i], ids[i], weights[i], layer["w2"], False,
                                         layer["b2"], tiles=tiles, one_token=case.way)
    return call, distinct


def time_case(case: Case, shape: Shape, layers: list[dict], grid: dict, gpu: str,
              dtype: torch.dtype) -> dict:
    """Every tiling of the grid for `case`: ms a call, GB/s, and its relative error against
    tiles_for's tiles (other tiles sum in other float32 orders)."""
    calls = calls_per_replay(shape, case)
    call, distinct = case_calls(case, shape, layers, calls, torch.Generator().manual_seed(0),
                                dtype)
    nbytes = distinct * shape.expert_bytes(case.kernel)
    default = expert_gemv.expert_tiles_for(case.kernel, case.n_cols(shape), gpu)
    rows = time_tilings(call, calls, tilings(case.n_cols(shape), grid, default), default, nbytes)
    return {**case._asdict(), "n_cols": case.n_cols(shape), "calls_per_replay": calls,
            "layers": len(layers), "distinct_experts": distinct, "bytes": nbytes,
            "default_tiles": list(default), "tiles": rows}


def suggested_table(timed_cases: list[dict], gpu: str) -> dict:
    """The EXPERT_TILES entry the batch-1 bests make: per kernel and column count, the best
    tiles where they beat tiles_for's. The down's from the way that runs today
    (expert_gemv.ONE_TOKEN_DOWN) only: an entry applies to whichever way runs, so a best of the
    other way is a reason to switch ways first, not tiles for this one. An entry also applies
    at every batch (divided among the tokens), though only batch 1 chose it."""
    entry: dict[str, dict[int, tuple]] = {}
    for timed in timed_cases:
        if timed["batch"] != 1 or timed.get("way", "") not in ("", expert_gemv.ONE_TOKEN_DOWN):
            continue
        top, base = best(timed), default_row(timed)
        if top is None or (base is not None and base["ms"] <= top["ms"]):
            continue
        entry.setdefault(timed["kernel"], {})[timed["n_cols"]] = tiles_of(top)
    return {gpu: entry} if entry else {}


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--grid", choices=tuple(GRIDS), default="quick",
                        help="quick: up to 30 tilings a case; full: up to 60 (one model a run)")
    return parser


def main() -> int:
    from gemv_tiles import copy_gbps  # benchmarks/ beside this script

    from infermeter.engine.kernels.gemv import gpu_name
    from infermeter.measure.env import capture_env, device_slug

    args = arguments().parse_args()
    if any(b < 1 for b in args.batches):
        raise SystemExit("error: --batches are positive")
    grid, dtype = GRIDS[args.grid], torch.bfloat16
    env = capture_env()
    gpu = gpu_name(torch.device("cuda"))
    hbm = copy_gbps()
    print(f"device-to-device copy: {hbm:.0f} GB/s", flush=True)
    timed_cases: list[dict] = []
    for model in args.models:
        shape = Shape.of(model)
        mine = cases((model,), tuple(args.batches))
        layers = make_layers(shape, layer_count(shape, max(calls_per_replay(shape, c)
                                                           for c in mine)), dtype)
        for case in mine:
            timed = time_case(case, shape, layers, grid, gpu, dtype)
            timed_cases.append(timed)
            top, base = best(timed), default_row(timed)
            line = f"{case.label:36s} {timed['n_cols']:6d} cols"
            if base is not None:
                line += f"; tiles_for {timed['default_tiles']} {base['ms'] * 1e3:7.2f} us " \
                        f"{base['gbps']:5.0f} GB/s"
            if top is not None:
                line += f"; best {list(tiles_of(top))} {top['ms'] * 1e3:7.2f} us " \
                        f"{top['gbps']:5.0f} GB/s ({100 * top['gbps'] / hbm:.0f}% of the copy)"
            print(line, flush=True)
        del layers
        torch.cuda.empty_cache()
        metrics = {"copy_gbps": hbm, "cases": timed_cases,
                   "suggested_expert_tiles": table_json(suggested_table(timed_cases, gpu))}
        config = {"benchmark": "expert_tiles", "dtype": "bf16", "grid": grid,
                  "batches": args.batches, "timing": "graph", "models": args.models}
        infix = "" if args.grid == "quick" else f"{args.grid}-"
        write_result(f"expert-tiles-{infix}{device_slug(env)}.json", args.models, config, env,
                     metrics)
    print(f"EXPERT_TILES entry from the batch-1 bests: {suggested_table(timed_cases, gpu)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
