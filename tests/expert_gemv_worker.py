"""Checks of the gathered-expert kernels (engine/kernels/expert_gemv.py), run by
tests/test_expert_gemv.py in a subprocess with TRITON_INTERPRET=1 (the variable must be set
before Triton is imported). Exits non-zero with the failing check's message; prints "ok".

References are MoEFeedForward's torch gathered path and a float32 chain with its rounding points
(gate and up rounded, silu rounded, their product rounded; each expert's down product rounded,
times its routing weight rounded, the k summed in float32 in routing order, rounded). As in
fused_step_worker.py, Triton's interpreter rounds float32 -> bfloat16 toward zero, so bfloat16
references round that way (`rounder`), except the final sum of several tokens' terms, which
torch rounds."""

from __future__ import annotations

import itertools
from typing import Any

import torch
import triton
import triton.language as tl

from infermeter.engine import moe as moe_module
from infermeter.engine.kernels import expert_gemv
from infermeter.engine.kernels.expert_gemv import (
    _experts_down,
    _experts_swiglu,
    _sharing_tokens,
    experts_down,
    experts_swiglu,
)
from infermeter.engine.moe import MoEFeedForward
from tests.fused_step_worker import ULP, close, rounder
from tests.greedy import greedy_decode

# (E, k, N tokens, ffn, dim, tiles): tiles_for's own tiles, or (BLOCK_N, BLOCK_K, warps) small
# enough that tiny shapes take several column tiles and ragged row blocks (the interpreter's
# cost is per program); N*k = E; BLOCK_N 1 (a gate/up program's half of it rounds up to 1)
CASES = ((8, 2, 1, 24, 64, None), (8, 2, 4, 19, 40, (8, 16, 4)), (6, 3, 2, 9, 12, (1, 16, 4)),
         (4, 1, 3, 33, 40, (4, 64, 4)))
TILES_FOR = expert_gemv.tiles_for


def routing(gen, n_tokens: int, n_experts: int, top_k: int, dtype: torch.dtype):
    """ids [N, k]: distinct within a token, experts shared across tokens (the first token's
    first choice is every token's, in another position for odd tokens); weights [N, k]."""
    ids = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(n_tokens)])
    for n in range(1, n_tokens):
        row = ids[n].tolist()
        if ids[0, 0].item() not in row:
            row[n % top_k] = ids[0, 0].item()
        ids[n] = torch.tensor(row)
    weights = torch.softmax(torch.randn(n_tokens, top_k, generator=gen), -1).to(dtype)
    return ids, weights


def experts(gen, n_experts: int, hidden: int, dim: int, dtype: torch.dtype, scale: float = 1.0):
    """x-sized random stacks: w1, w3 [E, ffn, dim], w2 [E, dim, ffn], drawn so activations
    land where silu bends."""
    def draw(*shape):
        return (torch.randn(*shape, generator=gen) * scale / shape[-1] ** 0.5).to(dtype)

    return draw(n_experts, hidden, dim), draw(n_experts, hidden, dim), draw(n_experts, dim, hidden)


def reference(x, ids, weights, w1, w3, w2):
    """float32 (act [N, k, ffn], out [N, dim]) with the kernels' rounding points."""
    rnd = rounder(x.dtype)
    xf = x.float()
    gate = rnd(torch.einsum("nd,nkfd->nkf", xf, w1.float()[ids]))
    up = rnd(torch.einsum("nd,nkfd->nkf", xf, w3.float()[ids]))
    act = rnd(rnd(gate / (1 + torch.exp(-gate))) * up)
    down = rnd(torch.einsum("nkf,nkdf->nkd", act, w2.float()[ids]))
    terms = rnd(down * weights.float()[..., None])
    out = torch.zeros_like(terms[:, 0])
    for j in range(ids.shape[1]):  # routing order
        out = out + terms[:, j]
    # one token: summed in the down kernel; more: by torch, which rounds to nearest here too
    return act, rnd(out) if ids.shape[0] == 1 else out.to(x.dtype).float(), gate, up


def module_with(w1, w3, w2, top_k: int) -> MoEFeedForward:
    n_experts, hidden, dim = w1.shape
    moe = MoEFeedForward(dim, hidden, n_experts, top_k, True).to(w1.dtype)
    for param, value in zip((moe.w1.weight, moe.w3.weight, moe.w2.weight), (w1, w3, w2),
                            strict=True):
        param.data = value
    return moe


def check_kernels() -> None:
    """Each kernel against the float32 chain with its rounding points, in the 16-bit dtypes
    (float32 and the module's torch path are the checks below'); the PDL launch's arithmetic
    is the same."""
    gen = torch.Generator().manual_seed(21)
    # each case in one 16-bit dtype, the two dtypes in turn (float32: the checks below; both
    # dtypes' rounding points to the bit: check_rounding_points)
    for case, (n_experts, top_k, n_tokens, hidden, dim, tiles) in enumerate(CASES):
        for dtype in ((torch.float16, torch.bfloat16)[case % 2],):
            what = f"{dtype} E{n_experts} k{top_k} N{n_tokens} {hidden}x{dim} tiles {tiles}"
            expert_gemv.tiles_for = TILES_FOR if tiles is None else \
                lambda n_cols, gpu="", t=tiles: t
            x = (torch.randn(n_tokens, dim, generator=gen) * 2).to(dtype)
            ids, weights = routing(gen, n_tokens, n_experts, top_k, dtype)
            w1, w3, w2 = experts(gen, n_experts, hidden, dim, dtype, 2.0)
            want_act, want, gate, up = reference(x, ids, weights, w1, w3, w2)
            act = experts_swiglu(x, ids, w1, w3)
            assert act.dtype == dtype and act.shape == (n_tokens, top_k, hidden), what
            if dtype == torch.float16:  # the PDL launch's arithmetic (no wait here)
                assert torch.equal(act, _experts_swiglu(x, ids, w1, w3, pdl=True)), what
            # gate's and up's sum-order errors pass through silu (slope under 1.1) and the
            # product, and either may round one unit the other way
            sums = (x.float().abs() @ w1.float().abs().flatten(0, 1).T).max().item()
            gate_max, up_max = gate.abs().max().item(), up.abs().max().item()
            close(act, want_act, 2 * sums * max(up_max, gate_max),
                  2 * ULP[dtype] * (gate_max * up_max + want_act.abs().max().item()),
                  f"swiglu {what}")
            out = experts_down(want_act.to(dtype), ids, weights, w2)
            assert out.dtype == dtype and out.shape == (n_tokens, dim), what
            if dtype == torch.float16:
                assert torch.equal(out, _experts_down(want_act.to(dtype), ids, weights, w2,
                                                      pdl=True)), what
            sums = (want_act.abs().amax() * w2.float().abs().sum(-1)).max().item() * top_k
            close(out, want, sums, 2 * top_k * ULP[dtype] * want.abs().max().item(),
                  f"down {what}")
            # with the block's residual add in it (the fused step's MoE block): residual + the
            # sum as two dtype tensors add, the sum the kernel's own to the bit
            residual = torch.randn(n_tokens, dim, generator=gen).to(dtype)
            added = experts_down(want_act.to(dtype), ids, weights, w2, None, residual)
            assert torch.equal(added, residual + out), f"down + residual {what}"
    expert_gemv.tiles_for = TILES_FOR


def picks(gen: torch.Generator, n: int, rows: int, cols: int) -> torch.Tensor:
    """[n, rows, cols] weights with one +-0.75 a row: every product is exact in any order."""
    pick = torch.randint(0, cols, (n, rows, 1), generator=gen)
    signs = torch.randint(0, 2, (n, rows, 1), generator=gen) * 2.0 - 1
    return torch.zeros(n, rows, cols).scatter_(2, pick, signs * 0.75)


def tiny_qwen3_moe():
    """A 3-layer Qwen3-MoE (q/k norms, 8 experts of 48, 2 a token; layer 1 dense)."""
    from infermeter.specs.presets import PRESETS

    return PRESETS["debug"].with_updates(
        arch="qwen3_moe", n_layers=3, head_dim=32, qk_norm=True, n_experts=8,
        n_active_experts=2, moe_ffn_dim=48, norm_topk_prob=True, moe_dense_layers=(1,))


def tiny_gpt_oss():
    """A 2-layer gpt-oss (sinks, biases, a 6-token window on layer 0; 4 experts, 2 a token)."""
    from infermeter.specs.presets import PRESETS

    return PRESETS["gpt-oss-20b"].with_updates(
        n_layers=2, dim=32, n_heads=4, n_kv_heads=2, head_dim=8, vocab_size=96, n_experts=4,
        n_active_experts=2, moe_ffn_dim=32, sliding_window=6, sliding_window_layers=(0,),
        max_seq_len=64)


def moe_model(spec, kind: str):
    """A random model of `spec` whose MoE blocks run `kind`'s experts: a wide router (tokens
    spread over the experts) and, for gpt-oss, expert weights and biases large enough that the
    biases count and the clamps bite."""
    from infermeter.engine.model import build_model

    model = build_model(spec, seed=7)
    gen = torch.Generator().manual_seed(7)
    for layer in model.layers:
        if isinstance(layer.feed_forward, MoEFeedForward):
            torch.nn.init.normal_(layer.feed_forward.gate.weight, std=1.0, generator=gen)
        if getattr(layer.feed_forward, "swiglu_limit", None) is not None:
            for n in ("w1", "w3", "w2"):
                expert = getattr(layer.feed_forward, n)
                torch.nn.init.normal_(expert.weight, std=0.5, generator=gen)
                torch.nn.init.normal_(expert.bias, std=0.3, generator=gen)
    moe_module.set_moe_kernel(model, kind)
    return model


def check_rounding_points() -> None:
    """Every rounding point to the bit: each weight row picks one input column, so every
    product is exact in any order, and the kernels must equal the module's torch path exactly
    (float32 and float16; bfloat16 the truncating reference). Routing weights that are not
    powers of two make the rounding of each weighted term count."""
    gen = torch.Generator().manual_seed(22)
    n_experts, top_k, hidden, dim = 8, 4, 12, 24

    # 8 gate/up rows a program over ffn 12, 16 columns over dim 24, w2's 16 rows over dim 24:
    # two tiles each way, the last ragged (tiles_for's own tiles give a program a row pair:
    # dozens a launch, and the interpreter's cost is per program)
    expert_gemv.tiles_for = lambda n_cols, gpu="": (16, 16, 4)
    for dtype, n_tokens in itertools.product(ULP, (1, 2)):  # one token; two sharing experts
        x = (torch.randn(n_tokens, dim, generator=gen) * 3).to(dtype)
        w1, w3, w2 = (picks(gen, n_experts, rows, cols).to(dtype)
                      for rows, cols in ((hidden, dim), (hidden, dim), (dim, hidden)))
        ids, weights = routing(gen, n_tokens, n_experts, top_k, dtype)
        moe = module_with(w1, w3, w2, top_k)
        want = moe.gathered(x, weights, ids) if dtype != torch.bfloat16 else \
            reference(x, ids, weights, w1, w3, w2)[1].to(dtype)
        moe.moe_kernel = "triton"
        got = moe.gathered(x, weights, ids)
        assert_rounding_points(got, want, dtype, f"N{n_tokens}")
    expert_gemv.tiles_for = TILES_FOR


def assert_rounding_points(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype,
                           what: str) -> None:
    """Exact products: 16-bit outputs equal to the bit; float32 within 4 ulp of the largest,
    for silu's exp under the interpreter (Triton's is not torch's in the last bit) and the k
    terms' float32 sum (no rounding to a narrower dtype hides its order)."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=0,
                                   atol=4 * ULP[dtype] * want.abs().max().item())
    else:
        assert torch.equal(got, want), f"rounding points {dtype} {what}: " \
            f"{(got.float() - want.float()).abs().max().item()}"


def gpt_oss_down(x: torch.Tensor, ids: torch.Tensor, moe: MoEFeedForward):
    """float32 (down [N, k, dim], gate and up before their clamps [N, k, ffn]) of gpt-oss's
    experts with the kernels' rounding points (rounder's: bfloat16 truncating, as the
    interpreter's kernels): each product rounded, plus its bias rounded; the clamps,
    gate * alpha, sigmoid (float32), gate * sigmoid, up + 1 and the activation each rounded."""
    rnd = rounder(x.dtype)
    w1, w3, w2 = (getattr(moe, n).weight.float()[ids] for n in ("w1", "w3", "w2"))
    b1, b3, b2 = (getattr(moe, n).bias.float()[ids] for n in ("w1", "w3", "w2"))
    limit, alpha = moe.swiglu_limit, moe.swiglu_alpha
    raw_gate = rnd(rnd(torch.einsum("nd,nkfd->nkf", x.float(), w1)) + b1)
    raw_up = rnd(rnd(torch.einsum("nd,nkfd->nkf", x.float(), w3)) + b3)
    gate, up = raw_gate.clamp(max=limit), raw_up.clamp(-limit, limit)
    sig = rnd(1 / (1 + torch.exp(-rnd(gate * alpha))))
    act = rnd(rnd(up + 1) * rnd(gate * sig))
    return rnd(rnd(torch.einsum("nkf,nkdf->nkd", act, w2)) + b2), raw_gate, raw_up


def gpt_oss_reference(x, ids, weights, moe: MoEFeedForward):
    """float32 (out [N, dim], gate and up before their clamps) of gpt-oss's experts with
    MoEFeedForward.gathered's rounding points: gpt_oss_down's, then each weighted term as
    reference()'s."""
    rnd = rounder(x.dtype)
    down, raw_gate, raw_up = gpt_oss_down(x, ids, moe)
    terms = rnd(down * weights.float()[..., None])
    out = torch.zeros_like(terms[:, 0])
    for j in range(ids.shape[1]):  # routing order
        out = out + terms[:, j]
    return rnd(out) if ids.shape[0] == 1 else out.to(x.dtype).float(), raw_gate, raw_up


def check_gpt_oss_rounding_points() -> None:
    """gpt-oss's experts (biases, the clamped SwiGLU at gpt-oss's limit and alpha) to the bit,
    as check_rounding_points: exact products (one input column a row), so every rounding point
    shows; float16 against the module's torch gathered path, bfloat16 against the truncating
    reference; one token and three sharing experts (the down kernel's sum and its terms). The
    inputs reach past the limit on both sides, so the clamps decide some elements."""
    gen = torch.Generator().manual_seed(23)
    n_experts, top_k, hidden, dim = 8, 2, 12, 24

    expert_gemv.tiles_for = lambda n_cols, gpu="": (16, 16, 4)  # two tiles each way, ragged
    for dtype, n_tokens in itertools.product((torch.float16, torch.bfloat16), (1, 3)):
        moe = MoEFeedForward(dim, hidden, n_experts, top_k, True, bias=True, swiglu_alpha=1.702,
                             swiglu_limit=7.0).to(dtype)
        for name, rows, cols in (("w1", hidden, dim), ("w3", hidden, dim), ("w2", dim, hidden)):
            getattr(moe, name).weight.data = picks(gen, n_experts, rows, cols).to(dtype)
            getattr(moe, name).bias.data = torch.randn(n_experts, rows, generator=gen).to(dtype)
        x = (torch.randn(n_tokens, dim, generator=gen) * 8).to(dtype)
        ids, weights = routing(gen, n_tokens, n_experts, top_k, dtype)
        want, gate, up = gpt_oss_reference(x, ids, weights, moe)
        assert (gate > 7).any() and (up > 7).any() and (up < -7).any(), "clamps not reached"
        if dtype == torch.float16:
            want = moe.gathered(x, weights, ids)
        moe.moe_kernel = "triton"
        got = moe.gathered(x, weights, ids)
        assert_rounding_points(got, want.to(dtype), dtype, f"gpt-oss N{n_tokens}")
        if dtype == torch.float16:  # the PDL launches' arithmetic (no wait here)
            act = _experts_swiglu(x, ids, moe.w1.weight, moe.w3.weight, True, moe.w1.bias,
                                  moe.w3.bias, 7.0, 1.702)
            assert torch.equal(_experts_down(act, ids, weights, moe.w2.weight, True,
                                             moe.w2.bias), got), f"gpt-oss PDL N{n_tokens}"
    expert_gemv.tiles_for = TILES_FOR


def check_each_expert_has_one_reader() -> None:
    """_sharing_tokens, which decides the programs that read an expert: for each slot, whether
    it is its expert's first slot, and the slot where each token chose that expert (-1: not
    chosen); so each distinct expert is read by one program per row block, for all its
    tokens."""
    @triton.jit
    def probe(IDS, OWNER, WHERE, n_tokens, top_k, TOKENS: tl.constexpr, TOPK: tl.constexpr):
        slot = tl.program_id(0)
        owner, where = _sharing_tokens(IDS, slot, tl.load(IDS + slot), n_tokens, top_k,
                                       TOKENS, TOPK)
        tl.store(OWNER + slot, owner.to(tl.int32))
        tl.store(WHERE + slot * TOKENS + tl.arange(0, TOKENS), where)

    ids = torch.tensor([[3, 1, 6], [1, 3, 0], [5, 2, 4]])  # 1 and 3 shared, in other places
    n_tokens, top_k = ids.shape
    owner = torch.empty(n_tokens * top_k, dtype=torch.int32)
    where = torch.empty(n_tokens * top_k, 4, dtype=torch.int64)
    probe[(n_tokens * top_k,)](ids, owner, where, n_tokens, top_k, TOKENS=4, TOPK=4)
    assert owner.tolist() == [1, 1, 1, 0, 0, 1, 1, 1, 1], owner.tolist()
    flat = ids.flatten().tolist()
    for slot, expert in enumerate(flat):
        want = [row.index(expert) + n * top_k if expert in row else -1
                for n, row in enumerate(ids.tolist())] + [-1]  # the 4th token: padding
        assert where[slot].tolist() == want, (slot, where[slot].tolist(), want)


def check_tensor_parallel_shards() -> None:
    """Each of two ranks' shards (w1 / w3 rows, w2 columns: a strided view) runs the kernels as
    the torch path does on it, and the two partial outputs sum to the whole block's."""
    from infermeter.engine.model import build_model
    from infermeter.engine.parallel.sharding import ShardPlan
    from infermeter.specs.presets import PRESETS

    spec = PRESETS["debug"].with_updates(arch="mixtral", n_experts=4, n_active_experts=2,
                                         moe_ffn_dim=176)
    expert_gemv.tiles_for = lambda n_cols, gpu="": (16, 32, 4)  # few programs, ragged tails
    whole = build_model(spec, seed=5).layers[0].feed_forward
    torch.nn.init.normal_(whole.gate.weight, std=1.0)
    x = torch.randn(2, spec.dim, generator=torch.Generator().manual_seed(6))
    weights, ids = whole.route(x)
    full = whole.gathered(x, weights, ids)
    parts = []
    for rank in range(2):
        plan = ShardPlan(spec, rank, 2)
        shard = [plan.narrow(f"layers.0.feed_forward.{n}.weight", getattr(whole, n).weight)
                 for n in ("w1", "w3", "w2")]
        assert not shard[2].is_contiguous()  # the kernel reads the column slice where it lies
        moe = module_with(*shard, spec.n_active_experts)
        torch_out = moe.gathered(x, weights, ids)
        moe.moe_kernel = "triton"
        parts.append(moe.gathered(x, weights, ids))
        assert (parts[-1] - torch_out).abs().max().item() < 1e-5, f"rank {rank}"
    assert (parts[0] + parts[1] - full).abs().max().item() < 1e-5, "shards' sum"
    expert_gemv.tiles_for = TILES_FOR


def check_model_greedy() -> None:
    """A tiny random Qwen3-MoE (float32; a dense layer between two MoE ones), Mixtral and
    gpt-oss (float32 at batch 1 and 2: 2 x 2 pairs = their 4 experts, still gathered; gpt-oss's
    biases and clamped SwiGLU, its prefill past E / k on the grouped kernels) through the
    model's forward: prefill, then greedy one-token steps, the Triton choice (and Mixtral's
    "auto") against torch: the same tokens, logits within sum-order error, and every MoE layer's
    decode step ran the kernels (with "auto" at batch 1 only: batch 2 gathers with torch's
    indexing)."""
    from infermeter.specs.presets import PRESETS

    # a few big tiles: the interpreter's cost is per program (ragged tails remain: gate/up's
    # 64 rows a program over ffn 176 and 48, w2's 128 over dim 64, its 64 columns over ffn 176)
    expert_gemv.tiles_for = lambda n_cols, gpu="": (128, 64, 4)
    calls = []
    real = moe_module.gathered_experts
    moe_module.gathered_experts = lambda *args: calls.append(args[0].shape[0]) or real(*args)
    specs = {"qwen3_moe": (tiny_qwen3_moe(), (1,)),
             "mixtral": (PRESETS["debug"].with_updates(arch="mixtral", n_experts=4,
                                                       n_active_experts=2, moe_ffn_dim=176),
                         (1, 2)),
             "gpt_oss": (tiny_gpt_oss(), (1, 2))}
    steps, prompt = 3, 5
    for arch, (spec, batches) in specs.items():
        moe_layers = sum(spec.is_moe_layer(i) for i in range(spec.n_layers))
        for batch in batches:
            logits, tokens = {}, {}
            # "auto" on Mixtral only, both of its ways (Triton's at batch 1, torch's at 2)
            kinds = moe_module.MOE_KERNELS if arch == "mixtral" else ("torch", "triton")
            for kind in kinds:
                model = moe_model(spec, kind)
                model.setup_cache(batch, 16)
                ids = torch.randint(0, spec.vocab_size, (batch, prompt),
                                    generator=torch.Generator().manual_seed(8))
                tokens[kind], logits[kind] = greedy_decode(model, ids, steps, calls.clear)
                # "auto": Triton's at one token, torch's gathered indexing at 2 to E / k
                takes = kind == "triton" or (kind == "auto" and batch == 1)
                want = [batch] * moe_layers * steps if takes else []
                assert calls == want, f"{arch} batch {batch} {kind}: kernels ran {calls}"
            for kind in tokens.keys() - {"torch"}:
                assert torch.equal(tokens[kind], tokens["torch"]), f"{arch} {batch}: {kind}"
                err = (logits[kind] - logits["torch"]).abs().max().item()
                assert err < 1e-4, f"{arch} batch {batch} {kind}: logits differ by {err}"
    moe_module.gathered_experts = real


def trace_moe_block(router_matvec: str | None = None) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """A tiny Mixtral MoE block with the Triton choice, at batch 1, traced by torch.compile
    (fullgraph, PDL on) and run uncompiled: (the last graph dynamo handed its backend, the
    traced block's output, the plain one's). router_matvec: the router's GEMV kernel, where a
    check wants eager's sum order."""
    from infermeter.engine.kernels import pdl
    from infermeter.engine.model import build_model
    from infermeter.specs.presets import PRESETS

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    spec = PRESETS["debug"].with_updates(arch="mixtral", n_experts=4, n_active_experts=2,
                                         moe_ffn_dim=176)
    moe = build_model(spec, seed=9).layers[0].feed_forward
    moe.moe_kernel = "triton"
    if router_matvec is not None:
        moe.gate.matvec_kernel = router_matvec
    x = torch.randn(1, 1, spec.dim, generator=torch.Generator().manual_seed(10))
    # the traced and the plain block run the kernels: a few big tiles (the interpreter's cost is
    # per program; the graph does not depend on the tiles)
    expert_gemv.tiles_for = lambda n_cols, gpu="": (128, 64, 4)
    with torch.inference_mode(), pdl.launching(True):
        traced = torch.compile(moe, fullgraph=True, dynamic=False, backend=keep)(x)
        plain = moe(x)
    expert_gemv.tiles_for = TILES_FOR
    return graphs[-1], traced, plain


def check_compiled_trace() -> None:
    """torch.compile (fullgraph) traces a batch-1 MoE block with the Triton choice into the two
    ops (their PDL twins, opaque custom ops with fake kernels: the interpreter cannot run under
    dynamo's fake tensors), no gather of the stacked weights left in the graph, and the traced
    block's output is the uncompiled one's within the router's float32 sum order."""
    graph, traced, plain = trace_moe_block()
    targets = [str(node.target) for node in graph.graph.nodes]
    ours = [t.split(".")[1] for t in targets if t.startswith("infermeter.")]
    # the router's product and its routing (router_topk.py), then the experts
    assert ours == ["gemv_pdl", "router_topk_pdl", "experts_swiglu_pdl", "experts_down_pdl"], \
        ours
    stacked = {node for node in graph.graph.nodes
               if any(f"{w}_parameters_weight" in node.name for w in ("w1", "w2", "w3"))}
    readers = {str(user.target).split(".")[-2] for node in stacked for user in node.users}
    assert len(stacked) == 3 and readers == {"experts_swiglu_pdl", "experts_down_pdl"}, readers
    # the router's GEMV (traced) and F.linear (eager) sum in other orders: a logit's last bit,
    # and the routing weights' with it, may differ
    torch.testing.assert_close(traced, plain, rtol=0, atol=4 * 2 ** -23 * plain.abs().max())
    torch._dynamo.reset()


if __name__ == "__main__":
    import sys
    import time

    for check in (check_kernels, check_rounding_points, check_gpt_oss_rounding_points,
                  check_each_expert_has_one_reader,
                  check_tensor_parallel_shards, check_compiled_trace, check_model_greedy):
        start = time.perf_counter()
        check()
        print(f"{check.__name__} {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print("ok")
