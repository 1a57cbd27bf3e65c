"""Checks of the grouped-expert kernels (engine/kernels/expert_gemm.py), run by
tests/test_expert_gemm.py in a subprocess with TRITON_INTERPRET=1 (the variable must be set
before Triton is imported). Exits non-zero with the failing check's message; prints "ok".

References: MoEFeedForward.grouped (the eager torch path, the module's own numbers) and, in the
16-bit dtypes, expert_gemv_worker.reference (a float32 chain with the kernels' rounding points,
bfloat16 rounded toward zero as Triton's interpreter does)."""

from __future__ import annotations

from dataclasses import replace

import torch

from infermeter.engine import moe as moe_module
from infermeter.engine.kernels import expert_gemm, expert_gemv, pdl
from infermeter.engine.kernels.expert_gemm import grouped_experts
from infermeter.engine.moe import MoEFeedForward
from tests.expert_gemv_worker import (
    assert_rounding_points,
    experts,
    gpt_oss_down,
    module_with,
    moe_model,
    picks,
    reference,
    routing,
    tiny_gpt_oss,
    tiny_qwen3_moe,
)
from tests.fused_step_worker import ULP, close, rounder

# (E, k, renormalise, ffn, dim): Mixtral's routing (8 experts, 2 a token, renormalised) and
# Qwen3-MoE's (16 and 4 here, norm_topk_prob both ways); ffn and dim not multiples of the tiles.
# Renormalising changes only the router's weights, which torch applies after the kernels: the
# un-renormalised shape runs the router's routing alone (its ids' cases are the shape above's)
SHAPES = ((8, 2, True, 48, 40), (16, 4, True, 24, 36), (16, 4, False, 24, 36))
BLOCK_TILES, TILES_FOR = expert_gemm.block_tiles, expert_gemv.tiles_for
# few programs (the interpreter's cost is per program), yet several column tiles, ragged edges
def SMALL_TILES(n_pairs: int, n_experts: int) -> tuple[int, int, int, int, int]:  # noqa: N802
    return 16, 32, 16, 4, 1


def routings(gen, moe: MoEFeedForward, x: torch.Tensor):
    """(what, weights [N, k], ids [N, k]): the module's own router (a wide one: tokens spread);
    experts no token chose (every token's choices among the first k + 1 experts); one expert
    every token chose (expert 3 first, the rest the router's)."""
    n_tokens, top_k = x.shape[0], moe.top_k
    weights, ids = moe.route(x)
    yield "router", weights, ids
    few = torch.stack([torch.randperm(top_k + 1, generator=gen)[:top_k] for _ in range(n_tokens)])
    yield "unchosen experts", weights, few
    shared = ids.clone()
    for n in range(n_tokens):
        row = [3] + [e for e in ids[n].tolist() if e != 3]
        shared[n] = torch.tensor(row[:top_k])
    yield "one expert for all", weights, shared


def check_against_grouped() -> None:
    """The kernels' output against the eager grouped path and the rounding-point chain, each
    shape at N from E / k + 1 (the first N that groups) to a few dozen tokens. float32: within
    sum-order error (the products sum in another order than torch's CPU matmul, and grouped()'s
    index_add_ adds a token's k terms in expert order, not routing order; 8 float32 ulp of each
    output's largest term chain covers both, as in fused_step_worker.close). 16-bit: against
    the rounding-point chain as expert_gemv's kernels are (2 ulp, sum order, one rounding
    flip), and against grouped() within a few units of the output's largest value (grouped()
    rounds each of the k weighted terms into the dtype as it adds them; the chain sums them in
    float32)."""
    gen = torch.Generator().manual_seed(31)
    expert_gemm.block_tiles = SMALL_TILES
    narrow = iter(int(i) for i in "010101")  # bfloat16 and float16 in turn
    for n_experts, top_k, renorm, hidden, dim in SHAPES:
        for n_tokens in (n_experts // top_k + 1, 13):
            for dtype in (torch.float32, (torch.bfloat16, torch.float16)[next(narrow)]):
                w1, w3, w2 = experts(gen, n_experts, hidden, dim, dtype, 2.0)
                moe = module_with(w1, w3, w2, top_k)
                moe.renormalize = renorm
                torch.nn.init.normal_(moe.gate.weight, std=1.0, generator=gen)
                x = (torch.randn(n_tokens, dim, generator=gen) * 2).to(dtype)
                for what, weights, ids in routings(gen, moe, x):
                    if not renorm and what != "router":
                        continue
                    what = f"{dtype} E{n_experts} k{top_k} renorm {renorm} N{n_tokens} {what}"
                    got = grouped_experts(x, weights, ids, w1, w3, w2)
                    assert got.dtype == dtype and got.shape == x.shape, what
                    want = moe.grouped(x, weights, ids)
                    act, chain, gate, up = reference(x, ids, weights, w1, w3, w2)
                    # the largest |term| chain: every product's absolute terms, summed
                    terms = (act.abs()[..., None, :] * w2.float().abs()[ids]).sum(-1)
                    scale = (terms * weights.float().abs()[..., None]).sum(1).max().item()
                    if dtype == torch.float32:
                        torch.testing.assert_close(got, want, rtol=0, atol=8 * ULP[dtype] * scale,
                                                   msg=lambda m, w=what: f"{w}: {m}")
                        continue
                    top = want.float().abs().max().item()
                    torch.testing.assert_close(got.float(), want.float(), rtol=0,
                                               atol=(top_k + 2) * ULP[dtype] * top,
                                               msg=lambda m, w=what: f"{w} vs grouped: {m}")
                    # gate's and up's sum-order errors and rounding flips pass through silu, the
                    # product and the down projection (as expert_gemv_worker.check_kernels)
                    sums = (x.float().abs() @ w1.float().abs().flatten(0, 1).T).max().item()
                    flip = 2 * ULP[dtype] * (gate.abs().max().item() * up.abs().max().item()
                                             + act.abs().max().item())
                    reach = w2.float().abs().sum(-1).max().item() * top_k
                    close(got, chain, scale + sums * reach, flip * reach
                          + 2 * top_k * ULP[dtype] * top, f"{what} vs rounding points")
    expert_gemm.block_tiles = BLOCK_TILES


def check_rounding_points() -> None:
    """Every rounding point to the bit: each weight row picks one input column, so every
    product is exact in any order, and the kernels must equal the module's gathered torch path
    (the same rounding points; float32 and float16) or, in bfloat16, the chain with the
    interpreter's truncating roundings in the kernels and torch's after them, exactly;
    routing weights that are not powers of two make each weighted term's rounding count."""
    gen = torch.Generator().manual_seed(33)
    n_experts, top_k, hidden, dim, n_tokens = 8, 4, 20, 24, 9  # 36 pairs over 8 experts

    expert_gemm.block_tiles = SMALL_TILES
    for dtype in ULP:
        x = (torch.randn(n_tokens, dim, generator=gen) * 3).to(dtype)
        w1, w3, w2 = (picks(gen, n_experts, rows, cols).to(dtype)
                      for rows, cols in ((hidden, dim), (hidden, dim), (dim, hidden)))
        ids, weights = routing(gen, n_tokens, n_experts, top_k, dtype)
        moe = module_with(w1, w3, w2, top_k)
        if dtype == torch.bfloat16:  # the kernels' roundings truncate here, torch's do not
            act = reference(x, ids, weights, w1, w3, w2)[0]
            down = rounder(dtype)(torch.einsum("nkf,nkdf->nkd", act, w2.float()[ids]))
            want = (down.to(dtype) * weights[..., None]).sum(1)
        else:
            want = moe.gathered(x, weights, ids)
        got = grouped_experts(x, weights, ids, w1, w3, w2)
        assert_rounding_points(got, want, dtype, "grouped")
    expert_gemm.block_tiles = BLOCK_TILES


def gpt_oss_experts(gen, dtype: torch.dtype, n_experts: int, top_k: int, hidden: int,
                    dim: int) -> MoEFeedForward:
    """gpt-oss's experts (biases, the clamped SwiGLU at gpt-oss's limit and alpha) with exact
    products: each weight row picks one input column (+-0.75), biases of unit scale."""
    moe = MoEFeedForward(dim, hidden, n_experts, top_k, True, bias=True, swiglu_alpha=1.702,
                         swiglu_limit=7.0).to(dtype)
    for name, rows, cols in (("w1", hidden, dim), ("w3", hidden, dim), ("w2", dim, hidden)):
        getattr(moe, name).weight.data = picks(gen, n_experts, rows, cols).to(dtype)
        getattr(moe, name).bias.data = torch.randn(n_experts, rows, generator=gen).to(dtype)
    return moe


def check_gpt_oss_rounding_points() -> None:
    """gpt-oss's experts through the grouped kernels (9 tokens x 2 of 8 experts: 18 pairs), every
    rounding point to the bit, as check_rounding_points: exact products, so float16 must equal
    the module's torch grouped path (its index_add_ adds a token's two weighted terms, one
    rounding, as the float32 sum of two rounds once) and bfloat16 the truncating chain with
    torch's routing product and sum after it; plain and PDL launches. The inputs reach past the
    limit on both sides, so the clamps decide some elements."""
    gen = torch.Generator().manual_seed(34)
    n_experts, top_k, hidden, dim, n_tokens = 8, 2, 20, 24, 9
    expert_gemm.block_tiles = SMALL_TILES
    for dtype in (torch.float16, torch.bfloat16):
        moe = gpt_oss_experts(gen, dtype, n_experts, top_k, hidden, dim)
        x = (torch.randn(n_tokens, dim, generator=gen) * 8).to(dtype)
        ids, weights = routing(gen, n_tokens, n_experts, top_k, dtype)
        down, gate, up = gpt_oss_down(x, ids, moe)
        assert (gate > 7).any() and (up > 7).any() and (up < -7).any(), "clamps not reached"
        if dtype == torch.float16:
            want = moe.grouped(x, weights, ids)
        else:
            want = (down.to(dtype) * weights[..., None]).sum(1)
        moe.moe_kernel = "triton"
        assert moe.runs_kernels(x)
        got = grouped_experts(x, weights, ids, *moe.stacked(), 7.0, 1.702)
        assert_rounding_points(got, want, dtype, "gpt-oss grouped")
        with pdl.launching(True):  # the PDL twins' arithmetic (no wait here)
            assert torch.equal(grouped_experts(x, weights, ids, *moe.stacked(), 7.0, 1.702),
                               got), f"gpt-oss PDL {dtype}"
    expert_gemm.block_tiles = BLOCK_TILES


def check_compiled_trace() -> None:
    """torch.compile (fullgraph) traces a 9-token Mixtral-like block (9 x 2 pairs > 8 experts)
    with the Triton choice: the align step's torch ops and the two grouped ops (their PDL twins,
    opaque custom ops with fake kernels: the interpreter cannot run under dynamo's fake
    tensors), no torch loop over experts; and the traced block's output is the uncompiled
    one's."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    expert_gemm.block_tiles = SMALL_TILES
    gen = torch.Generator().manual_seed(32)
    moe = module_with(*experts(gen, 8, 48, 40, torch.float32), 2)
    torch.nn.init.normal_(moe.gate.weight, std=1.0, generator=gen)
    moe.moe_kernel = "triton"
    x = torch.randn(9, 1, 40, generator=gen)  # a decode step of 9 sequences
    with torch.inference_mode(), pdl.launching(True):
        traced = torch.compile(moe, fullgraph=True, dynamic=False, backend=keep)(x)
        plain = moe(x)
    targets = [str(node.target) for node in graphs[-1].graph.nodes]
    ours = [t.split(".")[1] for t in targets if t.startswith("infermeter.")]
    assert ours == ["router_topk_pdl", "grouped_swiglu_pdl", "grouped_down_pdl"], ours
    assert not any("einsum" in t for t in targets), targets  # not every_expert's products
    assert torch.equal(traced, plain), "traced and uncompiled blocks differ"
    torch._dynamo.reset()
    expert_gemm.block_tiles = BLOCK_TILES


def check_bucketed_prefill_greedy() -> None:
    """Tiny random MoE models (float32) with moe_kernel "triton": the Generator keeps the
    bucketed prefill, its compiled forward (fullgraph, dynamo's graph run eagerly) runs the
    grouped kernels on the padded rows, and the greedy tokens equal an eager, exact prefill's
    with the torch experts. A Qwen3-MoE (a dense layer between two MoE ones, 8 experts, 2 a
    token; batch 2: its decode steps gathered) and a gpt-oss (biases, clamps that bite, sinks,
    a sliding layer; 4 experts, 2 a token; batch 3: its decode steps grouped too, 6 pairs)."""

    check_bucketed_prefill(tiny_qwen3_moe(), 2)
    check_bucketed_prefill(tiny_gpt_oss(), 3)


def check_bucketed_prefill(spec, batch: int) -> None:
    """check_bucketed_prefill_greedy for one model at one batch size."""
    from infermeter.engine.generator import GenerationConfig, Generator, _block_step

    expert_gemm.block_tiles = SMALL_TILES
    expert_gemv.tiles_for = lambda n_cols, gpu="": (32, 64, 4)  # the gathered decode steps'
    models = {}
    for kind in moe_module.MOE_KERNELS:
        models[kind] = moe_model(spec, kind)
    n_new = 4
    moe_layers = sum(spec.is_moe_layer(i) for i in range(spec.n_layers))
    eager = GenerationConfig(max_new_tokens=n_new)
    bucketed = Generator(models["triton"], max_seq_len=64, bucketed_prefill=True)
    assert bucketed.bucketed_prefill, "the Triton experts keep the bucketed prefill"
    assert not Generator(models["torch"], max_seq_len=64, bucketed_prefill=True).bucketed_prefill
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    # the default layer graphs: each compiled layer holds the grouped kernels
    bucketed._compiled_layer = torch.compile(_block_step, backend=keep, fullgraph=True,
                                             dynamic=False)
    exact = Generator(models["torch"], max_seq_len=64)
    calls = []
    real = moe_module.grouped_experts
    moe_module.grouped_experts = lambda *args: calls.append(args[0].shape[0]) or real(*args)
    for length in (11,):
        tokens = torch.randint(0, spec.vocab_size, (batch, length),
                               generator=torch.Generator().manual_seed(length))
        out = {}
        for name, gen, config in (("bucketed", bucketed, replace(eager, compile=True)),
                                  ("exact", exact, eager)):
            gen.prepare(batch, length, n_new)
            calls.clear()
            with torch.inference_mode(), pdl.launching(True):
                state = gen.prefill(tokens, config)
                prefill_calls = list(calls)
                ids = [state.token] + [gen.decode_step(state, eager) for _ in range(n_new - 1)]
            out[name] = torch.stack(ids, dim=1).tolist()
            if name == "bucketed":  # each MoE layer on the padded rows: batch x the bucket
                (padded,) = bucketed.prefill_lengths(length, True)
                assert padded > length, (length, padded)
                assert prefill_calls == [batch * padded] * moe_layers, prefill_calls
                # decode steps past E / k pairs: the grouped kernels too, eagerly
                grouped_steps = n_new - 1 if batch * spec.n_active_experts > spec.n_experts \
                    else 0
                assert calls[len(prefill_calls):] == [batch] * moe_layers * grouped_steps, calls
            else:
                assert calls == [], calls  # the torch experts
        assert out["bucketed"] == out["exact"], f"{spec.arch} prompt {length}: {out}"
    ours = {str(n.target).split(".")[1] for g in graphs for n in g.graph.nodes
            if str(n.target).startswith("infermeter.")}
    assert {"grouped_swiglu_pdl", "grouped_down_pdl"} <= ours, ours
    moe_module.grouped_experts = real
    expert_gemm.block_tiles = BLOCK_TILES
    expert_gemv.tiles_for = TILES_FOR
    torch._dynamo.reset()


if __name__ == "__main__":
    import sys
    import time

    for check in (check_against_grouped, check_rounding_points, check_gpt_oss_rounding_points,
                  check_compiled_trace, check_bucketed_prefill_greedy):
        start = time.perf_counter()
        check()
        print(f"{check.__name__} {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print("ok")
