"""What the scripts that time a Triton kernel over a grid of (BLOCK_N, BLOCK_K, num_warps) tiles
share (expert_tiles.py, fused_tiles.py; each imports this file from beside it): which tilings
fit a weight, the timing of each against the default tiles' output, the fastest and the default
rows of a timed case, and the Result they write to results/ and $OUT."""

from __future__ import annotations

import os
from pathlib import Path

from infermeter.measure.result import Result, write_json
from infermeter.specs.presets import PRESETS

TILE_KEYS = ("BLOCK_N", "BLOCK_K", "num_warps")  # a tiling's keys, in the grids' order
MAX_TILE = 16384  # weights a program holds in float32 partial products (twice the GEMV's most)
MIN_PER_THREAD = 4  # weights a thread at least (8 bytes of 16-bit)
ROTATE_BYTES = 256 * 2**20  # weight bytes a graph replay reads at least (well past L2)


def fits(n_cols: int, grid: dict, block_k: int, warps: int, held: int) -> bool:
    """A tiling fits weights of n_cols columns: BLOCK_K no wider than n_cols rounded up to a
    power of two (past that, masked lanes only; the grid's narrowest always fits), a program
    holding `held` weights, at most MAX_TILE with MIN_PER_THREAD a thread."""
    widest = max(min(grid["BLOCK_K"]), 1 << (n_cols - 1).bit_length())
    return block_k <= widest and warps * 32 * MIN_PER_THREAD <= held <= MAX_TILE


def with_default(tilings: list[tuple[int, int, int]],
                 default: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """The tilings, then `default` if the grid lacks it: each case's baseline is always timed."""
    return tilings if default in tilings else [*tilings, default]


def time_tilings(call, calls: int, tilings: list[tuple[int, int, int]],
                 default: tuple[int, int, int], nbytes: float) -> list[dict]:
    """A row for each tiling: its TILE_KEYS, ms a call, GB/s (nbytes a call) and the relative
    error against the default tiles' output (other tiles sum in other float32 orders), or the
    error that stopped it. call(i, tiles) -> the i-th of `calls` calls' output, replayed from a
    CUDA graph."""
    from gemv_tiles import time_per_call  # benchmarks/ beside this file

    reference = call(0, default).float()
    rows = []
    for tiles in tilings:
        row = dict(zip(TILE_KEYS, tiles, strict=True))
        try:
            error = float((call(0, tiles).float() - reference).norm() / reference.norm())
            ms = time_per_call(lambda t=tiles: [call(i, t) for i in range(calls)], calls, True)
        except Exception as failure:  # noqa: BLE001 - e.g. out of registers: skip it
            rows.append({**row, "error": f"{type(failure).__name__}: {failure}"[:200]})
            continue
        rows.append({**row, "ms": ms, "gbps": nbytes / ms / 1e6, "rel_error": error})
    return rows


def tiles_of(row: dict) -> tuple[int, int, int]:
    return tuple(row[key] for key in TILE_KEYS)


def best(timed: dict) -> dict | None:
    """The fastest tiling of a timed case (None: none ran)."""
    ran = [r for r in timed["tiles"] if "ms" in r]
    return min(ran, key=lambda r: r["ms"]) if ran else None


def default_row(timed: dict) -> dict | None:
    """The default tiles' row of a timed case (None: they did not run)."""
    want = tuple(timed["default_tiles"])
    return next((r for r in timed["tiles"] if "ms" in r and tiles_of(r) == want), None)


def table_json(table: dict) -> dict:
    """A suggested table (gpu -> kernel -> columns -> tiles) as JSON holds it: columns as
    strings, tiles as lists."""
    return {gpu: {kernel: {str(cols): list(tiles) for cols, tiles in widths.items()}
                  for kernel, widths in entry.items()} for gpu, entry in table.items()}


def table_from_json(table: dict) -> dict:
    """table_json's inverse: columns as ints, tiles as tuples."""
    return {gpu: {kernel: {int(cols): tuple(tiles) for cols, tiles in widths.items()}
                  for kernel, widths in entry.items()} for gpu, entry in table.items()}


def write_result(file_name: str, models: list[str], config: dict, env, metrics: dict) -> None:
    """A generate Result of `models` (their presets) to results/<file_name>, and to $OUT/ when
    set."""
    result = Result("generate", {"name": "+".join(models),
                                 "models": {m: PRESETS[m].to_dict() for m in models}},
                    config, env, metrics)
    for folder in filter(None, [Path("results"), os.environ.get("OUT")]):
        write_json(Path(folder) / file_name, result)
