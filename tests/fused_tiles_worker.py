"""Checks of the fused kernels' `tiles` override (engine/kernels/fused_step.py, fused_tiles_for's
terms), run by tests/test_fused_tiles.py in a subprocess with TRITON_INTERPRET=1. Exits non-zero
with the failing check's message; prints "ok".

Inputs make every sum exact in any order: x and the norm weights of quarter-integers (the sums
of squares exact whatever BLOCK_K splits them into), weight rows that pick one of x's columns
times 1/2, 1 or 2 (a product's one nonzero term). So each kernel's outputs at other tiles must
equal those at today's tiles to the bit; the launches are recorded, so tiles that never reached
the kernel fail too."""

from __future__ import annotations

import torch

from infermeter.engine.kernels import fused_step
from infermeter.engine.kernels.fused_step import _fused_gemv, _norm_qkv_rope
from infermeter.engine.kv_cache import LayerKVCache
from tests.triton_interpreter import run_checks

REAL_LAUNCH = fused_step.launch
# (BLOCK_N, BLOCK_K, num_warps): one row a program, ragged rows and column tiles, one tile
# wider than K
GEMV_OVERRIDES = ((1, 32, 4), (8, 64, 2), (16, 512, 1))
QKV_OVERRIDES = ((2, 32, 4), (16, 64, 2), (4, 512, 1))
HEAD_DIM = 8
QK_OVERRIDES = ((HEAD_DIM, 16, 4), (HEAD_DIM, 128, 2))


def recorded(calls: list) -> None:
    """fused_step.launch, recording each launch's grid and tile constexprs."""
    def launch(kernel, grid, pdl, *args, **kwargs):
        calls.append((grid, kwargs["BLOCK_N"], kwargs["BLOCK_K"], kwargs["num_warps"]))
        return REAL_LAUNCH(kernel, grid, pdl, *args, **kwargs)

    fused_step.launch = launch


def quarters(gen, *size: int, low: int = -12, high: int = 13) -> torch.Tensor:
    return torch.randint(low, high, size, generator=gen) / 4


def picks(gen, n_rows: int, n_cols: int) -> torch.Tensor:
    """[n_rows, n_cols]: each row one of the columns, times 1/2, 1 or 2."""
    pick = torch.randint(0, n_cols, (n_rows, 1), generator=gen)
    scale = 2.0 ** torch.randint(-1, 2, (n_rows, 1), generator=gen)
    return torch.zeros(n_rows, n_cols).scatter_(1, pick, scale)


def same_at_every_tiling(run, overrides, n_out: int, what: str) -> None:
    """run(tiles) -> tensors: equal at each override to today's (tiles None), each override
    launched as given, over ceil(n_out / BLOCK_N) programs."""
    today = run(None)
    for tiles in overrides:
        calls: list = []
        recorded(calls)
        try:
            got = run(tiles)
        finally:
            fused_step.launch = REAL_LAUNCH
        want = [((-(-n_out // tiles[0]),), *tiles)]
        assert calls == want, f"{what} {tiles}: launched {calls}, want {want}"
        for a, b in zip(got, today, strict=True):
            assert torch.equal(a, b), f"{what} {tiles}: not today's output"


def gemv_runs(x, w, norm_w, residual) -> dict:
    """kernel -> run(tiles): its outputs on these operands (x [1, K], w [N, K])."""
    return {"norm_gemv": lambda t: [_fused_gemv(x, w, norm_w, None, 1e-5, False, False,
                                                pdl=False, tiles=t)],
            "gemv_swiglu": lambda t: [_fused_gemv(x, w, norm_w, None, 1e-5, False, True,
                                                  pdl=False, tiles=t)],
            "gemv_add": lambda t: [_fused_gemv(x, w, None, residual, 0.0, False, False,
                                               pdl=False, tiles=t)]}


def check_fused_gemv() -> None:
    gen = torch.Generator().manual_seed(41)
    for dtype, (n_rows, n_cols) in ((torch.bfloat16, (40, 72)), (torch.float16, (12, 300))):
        x = quarters(gen, 1, n_cols).to(dtype)
        norm_w = quarters(gen, n_cols, low=1, high=9).to(dtype)
        w = picks(gen, n_rows, n_cols).to(dtype)
        residual = quarters(gen, 1, n_rows).to(dtype)
        for kernel, run in gemv_runs(x, w, norm_w, residual).items():
            n_out = n_rows // 2 if kernel == "gemv_swiglu" else n_rows
            same_at_every_tiling(run, GEMV_OVERRIDES, n_out, f"{kernel} {dtype} {n_rows}x{n_cols}")


def qkv_run(x, norm_w, w, bias, q_w, k_w, n_q: int, n_kv: int):
    """run(tiles): q and a fresh cache's k, v and key_pos after norm_qkv_rope at position 3."""
    angles = 3 * 10000.0 ** (-torch.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    cos, sin = torch.cos(angles)[None], torch.sin(angles)[None]  # [1, D / 2]

    def run(tiles):
        cache = LayerKVCache(1, 6, n_kv, HEAD_DIM, None, x.dtype, "cpu")
        q = _norm_qkv_rope(x, norm_w, w, bias, cos, sin, torch.tensor([3]), cache.k, cache.v,
                           cache.key_pos, n_q, 1e-5, False, False, q_w, k_w, 1e-6, False,
                           pdl=False, tiles=tiles)
        return [q, cache.k, cache.v, cache.key_pos]
    return run


def check_norm_qkv_rope() -> None:
    """GQA over one ragged column tile, MHA with Qwen2's bias over several, and q/k norms (one
    head a program): q and the cache's k, v and key_pos as at today's tiles."""
    gen = torch.Generator().manual_seed(42)
    dtype = torch.bfloat16
    # heads, kv heads, columns, bias, q/k norms
    for n_heads, n_kv, n_cols, has_bias, qk_norm in ((4, 2, 72, False, False),
                                                     (2, 2, 300, True, False),
                                                     (4, 2, 72, False, True)):
        n_q = n_heads * HEAD_DIM
        n_rows = n_q + 2 * n_kv * HEAD_DIM
        x = quarters(gen, 1, n_cols).to(dtype)
        norm_w = quarters(gen, n_cols, low=1, high=9).to(dtype)
        w = picks(gen, n_rows, n_cols).to(dtype)
        bias = quarters(gen, n_rows).to(dtype) if has_bias else None
        q_w, k_w = (quarters(gen, HEAD_DIM, low=2, high=7).to(dtype) if qk_norm else None
                    for _ in range(2))
        same_at_every_tiling(qkv_run(x, norm_w, w, bias, q_w, k_w, n_q, n_kv),
                             QK_OVERRIDES if qk_norm else QKV_OVERRIDES, n_rows,
                             f"norm_qkv_rope {n_heads}/{n_kv} heads {n_cols} q/k norms {qk_norm}")


if __name__ == "__main__":
    run_checks(check_fused_gemv, check_norm_qkv_rope)
