"""Checks of the expert kernels' tiles and one-token down ways (engine/kernels/expert_gemv.py),
run by tests/test_expert_tiles.py in a subprocess with TRITON_INTERPRET=1. Exits non-zero with
the failing check's message; prints "ok".

Tiles: weights with one +-0.75 a row (expert_gemv_worker.picks) make every product exact in any
order, so outputs with other tiles must equal those with tiles_for's to the bit; the launches are
recorded, so tiles that never reached the kernel fail too. Ways: one token's "terms" way against
its "sum" way on random weights, where only the k terms' float32 sum order could part them."""

from __future__ import annotations

import itertools

import torch

from infermeter.engine.kernels import expert_gemv
from infermeter.engine.kernels.expert_gemv import _experts_down, _experts_swiglu
from tests.expert_gemv_worker import experts, picks, routing
from tests.fused_step_worker import rounder
from tests.triton_interpreter import run_checks

REAL_LAUNCH = expert_gemv.launch
# (BLOCK_N, BLOCK_K, num_warps) in expert_tiles_for's terms: several column tiles, ragged ones,
# one row a program, and a BLOCK_K that 4 tokens divide below 16 (the launch keeps 16)
OVERRIDES = ((1, 16, 4), (8, 32, 2), (2, 64, 4), (4, 32, 1))


def recorded(calls: list) -> None:
    """expert_gemv.launch, recording each launch's kernel name, grid and tile constexprs."""
    def launch(kernel, grid, pdl, *args, **kwargs):
        calls.append((kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, grid,
                      kwargs["BLOCK_N"], kwargs["BLOCK_K"], kwargs["num_warps"]))
        return REAL_LAUNCH(kernel, grid, pdl, *args, **kwargs)

    expert_gemv.launch = launch


def launched(tiles: tuple[int, int, int], kernel: str, n_tokens: int, way: str) -> tuple:
    """The (BLOCK_N, BLOCK_K, num_warps) a launch of `kernel` must carry for `tiles`."""
    block_n, block_k, warps = tiles
    if kernel == "swiglu":
        block_n = max(1, block_n // 2)  # gate and up rows
    if n_tokens > 1 or way == "terms" or kernel == "swiglu":
        tokens = 1 << (n_tokens - 1).bit_length()
        block_k = max(16, block_k // tokens)
    return block_n, block_k, warps


def check_tiles_reach_the_kernels_and_change_no_bit() -> None:
    """bfloat16 only: the tiles reach the kernels by the same launch arithmetic and the same
    kernel code in any dtype (only the final casts name it), and with one +-0.75 a row every
    product is exact in float16 too; float16 took as long again under the interpreter.
    check_one_token_down_ways runs float32, float16 and bfloat16 through the down kernels,
    with tiles_for's tiles and an override."""
    gen = torch.Generator().manual_seed(31)
    n_experts, top_k, hidden, dim = 8, 2, 12, 40
    for dtype, n_tokens in itertools.product((torch.bfloat16,), (1, 4)):
        x = (torch.randn(n_tokens, dim, generator=gen) * 3).to(dtype)
        w1, w3 = (picks(gen, n_experts, hidden, dim).to(dtype) for _ in range(2))
        w2 = picks(gen, n_experts, dim, hidden).to(dtype)
        ids, weights = routing(gen, n_tokens, n_experts, top_k, dtype)
        act = _experts_swiglu(x, ids, w1, w3, False)  # tiles_for's tiles
        ways = ("sum", "terms") if n_tokens == 1 else ("terms",)
        down = {way: _experts_down(act, ids, weights, w2, False, one_token=way) for way in ways}
        for tiles in OVERRIDES:
            what = f"{dtype} N{n_tokens} tiles {tiles}"
            calls: list = []
            recorded(calls)
            got = _experts_swiglu(x, ids, w1, w3, False, tiles=tiles)
            assert torch.equal(got, act), f"swiglu {what}"
            for way in ways:
                out = _experts_down(act, ids, weights, w2, False, tiles=tiles, one_token=way)
                assert torch.equal(out, down[way]), f"down {way} {what}"
            expert_gemv.launch = REAL_LAUNCH
            kernels = ["swiglu"] + ["down"] * len(ways)
            want = [launched(tiles, kernel, n_tokens, way)
                    for kernel, way in zip(kernels, ("",) + ways, strict=True)]
            assert [c[2:] for c in calls] == want, f"{what}: launched {calls}, want {want}"


def check_one_token_down_ways() -> None:
    """One token: the terms way (a program a slot, then torch's sum over k) against the sum way
    (the k in turn in one program), random weights and activations, k of 2, 4 and 8. Both hold
    the same terms (each slot's term alone, the terms way of one slot): the sum way equals their
    float32 sum in routing order, rounded as the kernel rounds here (bfloat16: toward zero under
    the interpreter), and the terms way torch's sum of them, to the bit. Torch's sum over k (on
    the CPU for a dim that is no multiple of its vector width, as on a GPU) keeps four
    interleaved accumulators: up to k = 4 that is routing order, and the ways agree to the bit
    (float32, float16); at k = 8 it is (t0 + t4) + (t1 + t5) + (t2 + t6) + (t3 + t7)."""
    gen = torch.Generator().manual_seed(32)
    hidden, dim = 40, 24
    for (n_experts, top_k), dtype in itertools.product(((8, 2), (8, 4), (10, 8)),
                                                       (torch.float32, torch.float16,
                                                        torch.bfloat16)):
        what = f"{dtype} E{n_experts} k{top_k}"
        _, _, w2 = experts(gen, n_experts, hidden, dim, dtype, 2.0)
        act = (torch.randn(1, top_k, hidden, generator=gen) * 2).to(dtype)
        ids, weights = routing(gen, 1, n_experts, top_k, dtype)
        # other tiles once a routing shape (float16's: a 16-bit rounding), not in every dtype
        for tiles in (None, (2, 16, 4)) if dtype == torch.float16 else (None,):
            one = _experts_down(act, ids, weights, w2, False, tiles=tiles, one_token="sum")
            terms = _experts_down(act, ids, weights, w2, False, tiles=tiles, one_token="terms")
            each = torch.stack([_experts_down(act[:, j:j + 1], ids[:, j:j + 1],
                                              weights[:, j:j + 1], w2, False, tiles=tiles,
                                              one_token="terms")
                                for j in range(top_k)], 1)  # [1, k, dim]: the terms
            in_order = torch.zeros(1, dim)
            for j in range(top_k):  # routing order, float32
                in_order = in_order + each[:, j].float()
            assert torch.equal(one.float(), rounder(dtype)(in_order)), f"sum way {what} {tiles}"
            assert torch.equal(terms, each.sum(1)), f"terms way {what} {tiles}"
            if top_k <= 4 and dtype != torch.bfloat16:
                assert torch.equal(one, terms), f"ways {what} tiles {tiles}"


if __name__ == "__main__":
    run_checks(check_tiles_reach_the_kernels_and_change_no_bit, check_one_token_down_ways)
