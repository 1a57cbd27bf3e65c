"""Checks of the routing kernel (engine/kernels/router_topk.py), run by tests/test_router_topk.py
in a subprocess with TRITON_INTERPRET=1 (the variable must be set before Triton is imported).
Exits non-zero with the failing check's message; prints "ok".

Two references: `cuda_route`, torch's CUDA route in float32 with its kernels' orders (the warp
softmax's lane sums and butterfly, the CUDA sum's shfl_down tree over the k) and numpy's exp
(the interpreter's tl.exp): the kernel must equal it to the bit; and MoEFeedForward.route with
the torch choice on the CPU, whose exp and sum orders are the CPU's: the same ids, and weights
within one ulp of the dtype. Under the interpreter a bfloat16 store rounds toward zero
(fused_step_worker's rounder), so bfloat16 references round that way.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from infermeter.engine import moe as moe_module
from infermeter.engine.kernels import expert_gemv
from infermeter.engine.kernels.router_topk import router_topk
from infermeter.engine.moe import MoEFeedForward
from tests.expert_gemv_worker import moe_model, tiny_gpt_oss, tiny_qwen3_moe, trace_moe_block
from tests.fused_step_worker import ULP, rounder

# (what, E, k, renormalize, softmax after top-k): Qwen3-MoE, Mixtral, gpt-oss, and E and k not
# powers of two (a padded block; the CUDA sum's lanes holding two of the k)
CASES = (("qwen3", 128, 8, True, False), ("mixtral", 8, 2, True, False),
         ("gpt-oss", 32, 4, False, True), ("ragged", 60, 6, True, False),
         ("no renormalisation", 16, 4, False, False))
TILES_FOR = expert_gemv.tiles_for


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def warp_softmax(x: torch.Tensor) -> torch.Tensor:
    """softmax of float32 x [N, E] over E as torch's CUDA warp softmax orders it (W lanes of a
    warp, lane l summing elements l, l + W, ... in turn, then the xor butterfly), numpy's exp."""
    n, n_experts = x.shape
    block = next_pow2(n_experts)
    lanes = min(block, 32)
    e = torch.from_numpy(np.exp((x - x.max(-1, keepdim=True).values).numpy()))
    padded = torch.zeros(n, block).index_copy_(1, torch.arange(n_experts), e)
    acc = torch.zeros(n, lanes)
    for it in range(block // lanes):
        acc = acc + padded[:, it * lanes:(it + 1) * lanes]
    offset = lanes // 2
    while offset:
        acc = acc + acc[:, torch.arange(lanes) ^ offset]
        offset //= 2
    return e / acc[:, :1]


def cuda_sum(v: torch.Tensor) -> torch.Tensor:
    """v [N, k]'s sum over k as torch's CUDA sum orders it: last_power_of_2(k) lanes, lane t
    holding v[t] + v[t + lanes], then shfl_down's tree (lane t adds lane t + o, o = 1, 2, ...)."""
    k = v.shape[1]
    width = 1 << (k.bit_length() - 1)
    acc = v[:, :width].clone()
    acc[:, :k - width] += v[:, width:]
    offset = 1
    while offset < width:
        shifted = torch.zeros_like(acc)
        shifted[:, :width - offset] = acc[:, offset:]
        acc = acc + shifted
        offset *= 2
    return acc[:, :1]


def cuda_route(logits: torch.Tensor, top_k: int, renormalize: bool, after: bool):
    """(weights float32 [N, k] before the cast, ids [N, k]): torch's CUDA route's numbers; ties
    lowest index first (a stable descending sort)."""
    scores = logits.float() if after else warp_softmax(logits.float())
    top, ids = torch.sort(scores, dim=-1, descending=True, stable=True)
    top, ids = top[:, :top_k], ids[:, :top_k]
    if after:
        return warp_softmax(top), ids
    return (top / cuda_sum(top) if renormalize else top), ids


def distinct_logits(gen: torch.Generator, n: int, n_experts: int, dtype: torch.dtype):
    """[N, E] router logits in dtype, no two of a row equal (a bfloat16 draw would tie often,
    and which of equal values torch's CPU topk keeps is not defined)."""
    grid = torch.linspace(-6, 6, 4000).to(dtype).unique()  # distinct values of the dtype
    rows = [grid[torch.randperm(grid.numel(), generator=gen)[:n_experts]] for _ in range(n)]
    return torch.stack(rows)


def identity_router(n_experts: int, top_k: int, renormalize: bool, after: bool,
                    dtype: torch.dtype) -> MoEFeedForward:
    """An MoE block whose router passes its input through (gate = identity, zero bias), so
    route(logits) routes exactly those logits."""
    moe = MoEFeedForward(n_experts, 4, n_experts, top_k, renormalize, bias=after).to(dtype)
    moe.gate.weight.data = torch.eye(n_experts, dtype=dtype)
    if after:
        moe.gate.bias.data.zero_()
    return moe


def check_route() -> None:
    """Each case at 1 and 5 tokens, float32 and bfloat16: the op to the bit against cuda_route
    (ids equal, weights equal); MoEFeedForward.route with the Triton choice against its torch
    route on the CPU: ids equal, weights within one ulp of the dtype."""
    gen = torch.Generator().manual_seed(41)
    for (what, n_experts, top_k, renorm, after), n, dtype in itertools.product(
            CASES, (1, 5), (torch.float32, torch.bfloat16)):
        label = f"{what} E{n_experts} k{top_k} N{n} {dtype}"
        logits = distinct_logits(gen, n, n_experts, dtype)
        weights, ids = router_topk(logits, top_k, renorm, after)
        assert weights.dtype == dtype and ids.dtype == torch.int64, label
        assert weights.shape == ids.shape == (n, top_k), label
        want, want_ids = cuda_route(logits, top_k, renorm, after)
        assert torch.equal(ids, want_ids), f"{label}: ids {ids.tolist()} {want_ids.tolist()}"
        want = rounder(dtype)(want)
        assert torch.equal(weights.float(), want), \
            f"{label}: weights differ by {(weights.float() - want).abs().max().item()}"
        moe = identity_router(n_experts, top_k, renorm, after, dtype)
        torch_weights, torch_ids = moe.route(logits)
        moe.moe_kernel = "triton"
        assert moe.runs_kernels(logits), label
        got, got_ids = moe.route(logits)
        assert torch.equal(got_ids, torch_ids), f"{label}: ids against torch's route"
        assert torch.equal(got, weights), f"{label}: route is not the op"
        err = (got.float() - torch_weights.float()).abs().max().item()
        assert err <= ULP[dtype], f"{label}: weights {err} from torch's route"


def check_ties() -> None:
    """Equal scores are taken lowest index first, best first: a uniform row (every expert
    equal), and a row whose k-th and (k+1)-th logits tie, in both modes."""
    for (what, n_experts, top_k, renorm, after), dtype in itertools.product(
            CASES, (torch.float32, torch.bfloat16)):
        uniform = torch.zeros(1, n_experts)
        tied = torch.arange(n_experts, dtype=torch.float32).flip(0)[None] / n_experts
        tied[0, -1] = tied[0, top_k - 1]  # the k-th best ties with the last index
        tied[0, 0] = tied[0, 1]  # and the two best tie
        logits = torch.cat([uniform, tied]).to(dtype)
        weights, ids = router_topk(logits, top_k, renorm, after)
        want, want_ids = cuda_route(logits, top_k, renorm, after)
        label = f"{what} {dtype}"
        assert torch.equal(ids, want_ids), f"{label}: ids {ids.tolist()} {want_ids.tolist()}"
        assert ids[0].tolist() == list(range(top_k)), label
        assert torch.equal(weights.float(), rounder(dtype)(want)), label


def check_nan() -> None:
    """A NaN logit: every id still names an expert, distinct within the token, and the weights
    are NaN (torch's route gives NaN weights too); a token without NaN beside it is unharmed."""
    for what, n_experts, top_k, renorm, after in CASES:
        logits = torch.randn(2, n_experts, generator=torch.Generator().manual_seed(3))
        logits[0, n_experts // 2] = float("nan")
        weights, ids = router_topk(logits, top_k, renorm, after)
        assert ((ids >= 0) & (ids < n_experts)).all(), f"{what}: ids {ids.tolist()}"
        assert len(set(ids[0].tolist())) == top_k, f"{what}: ids {ids.tolist()}"
        if not after:  # gpt-oss's top k of the logits may leave the NaN out
            assert weights[0].isnan().all(), f"{what}: weights {weights.tolist()}"
        want, want_ids = cuda_route(logits[1:], top_k, renorm, after)
        assert torch.equal(ids[1:], want_ids) and torch.equal(weights[1:], want), what


def check_model_greedy() -> None:
    """Tiny random Qwen3-MoE (a dense layer between MoE ones), Mixtral and gpt-oss models
    (float32): prefill then greedy steps, the Triton choice (and Qwen3-MoE's "auto") against
    torch: the same tokens, and every MoE layer of every forward routed through the kernel
    wherever the kind takes Triton's experts (all for "triton"; one row or past E / k rows for
    "auto")."""
    from infermeter.specs.presets import PRESETS

    expert_gemv.tiles_for = lambda n_cols, gpu="": (128, 64, 4)  # few programs
    calls = []
    real = moe_module.kernel_route
    moe_module.kernel_route = lambda *args: calls.append(args[0].shape[0]) or real(*args)
    specs = {"qwen3_moe": tiny_qwen3_moe(),
             "mixtral": PRESETS["debug"].with_updates(arch="mixtral", n_experts=4,
                                                      n_active_experts=2, moe_ffn_dim=176),
             "gpt_oss": tiny_gpt_oss()}
    steps, prompt, batch = 3, 5, 1
    for arch, spec in specs.items():
        moe_layers = sum(spec.is_moe_layer(i) for i in range(spec.n_layers))
        tokens = {}
        # "auto" on Qwen3-MoE only (its 5-token prompt past E / k: routed in the kernel)
        for kind in moe_module.MOE_KERNELS if arch == "qwen3_moe" else ("torch", "triton"):
            calls.clear()
            model = moe_model(spec, kind)
            model.setup_cache(batch, 16)
            ids = torch.randint(0, spec.vocab_size, (batch, prompt),
                                generator=torch.Generator().manual_seed(8))
            with torch.inference_mode():
                out = model(ids, torch.arange(prompt))
                for i in range(prompt, prompt + steps):
                    ids = torch.cat([ids, out[:, -1:].argmax(-1)], dim=1)
                    out = model(ids[:, -1:], torch.tensor([i]))
            tokens[kind] = ids
            # each forward of n rows routes in the kernel where its kind takes Triton's experts
            # there ("auto": one row, or past E / k rows)
            want = [n for n in [prompt] * moe_layers + [batch] * moe_layers * steps
                    if moe_module.uses_triton(kind, n, spec.n_active_experts, spec.n_experts)]
            assert calls == want, f"{arch} {kind}: routed {calls}"
        assert torch.equal(tokens["triton"], tokens["torch"]), f"{arch}: tokens"
        if "auto" in tokens:
            assert torch.equal(tokens["auto"], tokens["torch"]), f"{arch}: auto's tokens"
    moe_module.kernel_route = real
    expert_gemv.tiles_for = TILES_FOR


def check_compiled_trace() -> None:
    """torch.compile (fullgraph) traces a batch-1 MoE block with the Triton choice into the
    routing op (its PDL twin: an opaque custom op with a fake kernel, as the interpreter cannot
    run under dynamo's fake tensors) with no softmax or topk left, and the traced block's output
    is the uncompiled one's."""
    # the router's product as eager computes it (the GEMV's sum order moves a logit's last bit)
    graph, traced, plain = trace_moe_block(router_matvec="inductor")
    targets = [str(node.target) for node in graph.graph.nodes]
    assert "infermeter.router_topk_pdl.default" in targets, targets
    assert not any("topk" in t and "router" not in t or "softmax" in t for t in targets), targets
    assert torch.equal(traced, plain), "traced and uncompiled blocks differ"
    torch._dynamo.reset()


if __name__ == "__main__":
    import sys
    import time

    for check in (check_route, check_ties, check_nan, check_compiled_trace, check_model_greedy):
        start = time.perf_counter()
        check()
        print(f"{check.__name__} {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print("ok")
