"""Checks of the one-launch layer step (engine/kernels/layer_step.py), run by
tests/test_layer_step.py in a subprocess: under Triton's CPU interpreter (TRITON_INTERPRET=1,
set before Triton is imported), or on a GPU with the argument "cuda" (a wait that never ends
there is a hang: the subprocess's timeout turns it into a failure). Exits non-zero with the
failing check's message; prints "ok".

The reference is the fused step's own kernels launched one after another (fused_step.py's
wqkv and GEMV kernels, decode_attention.py's split kernel and separate combine): the layer
step runs their code in one launch, so under the interpreter every output, q's cache writes
included, must be the same bits; on a GPU one num_warps for every stage may change a
reduction's order, so there the outputs must agree within a few units in the last place."""

from __future__ import annotations

import sys

import torch

from infermeter.engine.kernels import stage_sync
from infermeter.engine.kernels.decode_attention import _split_kv_decode
from infermeter.engine.kernels.fused_step import _fused_gemv, _norm_qkv_rope
from infermeter.engine.kernels.layer_step import STAGE_COUNTS, _layer_step

# name: (dim, heads, kv heads, head_dim, ffn, cache slots, splits, dtype, bias, q/k norms,
# ring window): MHA and GQA, Qwen2's bias, Qwen3's q/k norms, a ring layer, one split
CASES = {
    "gqa float32": (64, 4, 2, 16, 96, 192, 3, torch.float32, False, False, 0),
    "mha float16, one split": (48, 3, 3, 16, 80, 64, 1, torch.float16, False, False, 0),
    "bias float16": (64, 4, 2, 16, 96, 192, 2, torch.float16, True, False, 0),
    "q/k norms float32": (64, 2, 1, 32, 64, 128, 2, torch.float32, False, True, 0),
    "ring float32": (64, 4, 2, 16, 96, 64, 2, torch.float32, False, False, 48),
}


def rope(pos: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = pos.float()[:, None] * freqs  # [1, D / 2]
    return angles.cos(), angles.sin()


def fused_chain(x, weights, cos, sin, pos, k, v, key_pos, n_q, eps, ring, window, splits):
    """The fused step's five launches for the same layer -> (its output, x + wo(attention))."""
    attention_norm, wqkv, bias, q_norm, k_norm, wo, ffn_norm, w13, w2 = weights
    n_kv, head_dim = k.shape[1], k.shape[3]
    q = _norm_qkv_rope(x, attention_norm, wqkv, bias, cos, sin, pos, k, v, key_pos, n_q, eps,
                       False, ring, q_norm, k_norm, eps if q_norm is not None else 0.0,
                       pdl=False)
    attended = _split_kv_decode(q.view(1, n_kv, n_q // (n_kv * head_dim), head_dim), k, v,
                                key_pos, pos, window, ring, splits, 0.0, pdl=False)
    h = _fused_gemv(attended.reshape(1, -1), wo, None, x, 0.0, False, False, pdl=False)
    act = _fused_gemv(h, w13, ffn_norm, None, eps, False, True, pdl=False)
    return _fused_gemv(act, w2, None, h, 0.0, False, False, pdl=False), h


def same(got: torch.Tensor, want: torch.Tensor, exact: bool, what: str) -> None:
    """Equal bits (the interpreter), or within a few units in the last place of the largest
    value (a GPU, where one num_warps for every stage may reorder a sum)."""
    if exact:
        assert torch.equal(got, want), f"{what}: {(got.float() - want.float()).abs().max()}"
        return
    ulp = {torch.float32: 2.0 ** -20, torch.float16: 2.0 ** -8, torch.bfloat16: 2.0 ** -5}[
        want.dtype]
    scale = want.float().abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= 4 * ulp * scale, what


def check_against_the_fused_chain(device: str) -> None:
    exact = device == "cpu"
    for name, case in CASES.items():
        dim, heads, kv_heads, head_dim, ffn, slots, splits, dtype, bias, qk, window = case
        gen = torch.Generator().manual_seed(len(name))

        def rand(*shape, scale=0.2, gen=gen, dtype=dtype):
            return (scale * torch.randn(*shape, generator=gen)).to(device, dtype)

        n_q = heads * head_dim
        weights = (1 + rand(dim, scale=0.1), rand(n_q + 2 * kv_heads * head_dim, dim),
                   rand(n_q + 2 * kv_heads * head_dim) if bias else None,
                   1 + rand(head_dim, scale=0.1) if qk else None,
                   1 + rand(head_dim, scale=0.1) if qk else None,
                   rand(dim, n_q), 1 + rand(dim, scale=0.1), rand(2 * ffn, dim), rand(dim, ffn))
        ring = window > 0
        # the middle, the last slot (a ring: past its size), and once the first position
        # (every split but the first empty: their max is -inf)
        first = (0,) if name == "gqa float32" else ()
        for at, pos in enumerate((*first, slots // 2 + 5, slots + 7 if ring else slots - 1)):
            position = torch.tensor([pos], device=device)
            cos, sin = (t.to(device) for t in rope(position.cpu(), head_dim))
            x = rand(1, dim, scale=1.0)
            k, v = rand(1, kv_heads, slots, head_dim, scale=1.0), \
                rand(1, kv_heads, slots, head_dim, scale=1.0)
            # a full layer's slot j holds position j; a ring's slot j the latest position
            # before this one that is j modulo its size (-1: none yet)
            held = [pos - 1 - (pos - 1 - j) % slots for j in range(slots)]
            key_pos = torch.arange(slots, device=device) if not ring else \
                torch.tensor([p if p >= 0 else -1 for p in held], device=device)
            mine = (k.clone(), v.clone(), key_pos.clone())
            want, want_h = fused_chain(x, weights, cos, sin, position, k, v, key_pos, n_q,
                                       1e-5, ring, window, splits)
            got = _layer_step(x, weights[0], weights[1], weights[2], cos, sin, position,
                              *mine, weights[3], weights[4], weights[5], weights[6],
                              weights[7], weights[8], n_q, 1e-5, 1e-5,
                              1e-5 if qk else 0.0, ring, window, splits)
            what = f"{name} at position {pos}"
            assert torch.equal(mine[2], key_pos), f"{what}: key_pos"
            for got_, want_, part in ((got, want, "out"), (mine[0], k, "k"), (mine[1], v, "v")):
                same(got_, want_, exact, f"{what}: {part}")
            if at == 0:  # the attention side alone (an MoE layer's launch): x + wo(attention)
                alone = (k.clone(), v.clone(), key_pos.clone())
                h = _layer_step(x, weights[0], weights[1], weights[2], cos, sin, position,
                                *alone, weights[3], weights[4], weights[5], None, None, None,
                                n_q, 1e-5, 0.0, 1e-5 if qk else 0.0, ring, window, splits)
                same(h, want_h, exact, f"{what}: h")
                same(alone[0], k, exact, f"{what}: k, the attention side alone")
    for key, counts in stage_sync._KEPT.items():  # every launch left its counts at 0
        assert int(counts.abs().sum()) == 0, f"counts {key} not back to 0: {counts.tolist()}"
    assert any(n >= STAGE_COUNTS for _, n in stage_sync._KEPT), "no layer counts made"


# name: (dim, experts, k, ffn, renormalise (Qwen3's norm_topk_prob; Mixtral's), dtype)
MOE_CASES = {"qwen3-like float32": (64, 8, 4, 48, True, torch.float32),
             "k 2 float16": (48, 6, 2, 40, True, torch.float16),
             "no renormalisation float32": (64, 8, 2, 32, False, torch.float32)}


def check_moe_step_against_its_kernels(device: str) -> None:
    """The MoE block's launch (moe_step.py) against the engine's own kernels one after another
    on the normed h the launch stored: the fused norm + router GEMV, the routing kernel, the two
    expert kernels, then the residual add in the dtype; the same ids, and the same output to the
    bit under the interpreter (a few ulps on a GPU). The normed h is eager's RMSNorm within
    float32 sum-order error. Every launch leaves its counts at 0."""
    from infermeter.engine.kernels.expert_gemv import _experts_down, _experts_swiglu
    from infermeter.engine.kernels.moe_step import _moe_step
    from infermeter.engine.kernels.router_topk import _route

    exact = device == "cpu"
    # bfloat16, the MoE models' dtype, on a GPU only: the interpreter truncates its stores
    cases = {**MOE_CASES, **({"qwen3-like bfloat16": (64, 8, 4, 48, True, torch.bfloat16)}
                             if device == "cuda" else {})}
    for name, (dim, experts, top_k, ffn, renormalize, dtype) in cases.items():
        gen = torch.Generator().manual_seed(len(name))

        def rand(*shape, scale=0.2, gen=gen, dtype=dtype):
            return (scale * torch.randn(*shape, generator=gen)).to(device, dtype)

        norm, router = 1 + rand(dim, scale=0.1), rand(experts, dim, scale=0.5)
        w1, w3, w2 = rand(experts, ffn, dim), rand(experts, ffn, dim), rand(experts, dim, ffn)
        for trial in range(2):
            h = rand(1, dim, scale=1.0)
            out, ids, normed = _moe_step(h, norm, router, w1, w3, w2, 1e-5, top_k, renormalize)
            logits = _fused_gemv(h, router, norm, None, 1e-5, False, False, pdl=False)
            weights, want_ids = _route(logits, top_k, renormalize, False, False)
            act = _experts_swiglu(normed, want_ids, w1, w3, False)
            moe = _experts_down(act, want_ids, weights, w2, False)
            want = (h.float() + moe.float()).to(dtype)
            what = f"moe {name} #{trial}"
            assert torch.equal(ids, want_ids), f"{what}: ids {ids} against {want_ids}"
            same(out, want, exact, f"{what}: out")
            eager = (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5))
            eager = (eager.to(dtype).float() * norm.float()).to(dtype)
            ulp = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10,
                   torch.bfloat16: 2.0 ** -7}[dtype]
            assert (normed.float() - eager.float()).abs().max().item() <= \
                8 * ulp * eager.float().abs().max().item(), f"{what}: normed h"
    for key, counts in stage_sync._KEPT.items():
        assert int(counts.abs().sum()) == 0, f"counts {key} not back to 0: {counts.tolist()}"


def check_each_wait_counts_exactly_its_stage() -> None:
    """The interpreter runs a launch's programs in id order, so every wait is met on arrival:
    a program of a stage must find exactly the count it waits for (a smaller target would let
    it start early on a GPU, a larger one never start). Every program past the first stage
    waits: the attention's on the qkv programs, wo's on the combined rows (H_kv), w13's and
    w2's on every program of the stage before."""
    from infermeter.engine.kernels import fused_step
    from infermeter.engine.kernels import layer_step as layer_module
    from infermeter.engine.kernels.layer_step import launch_plan

    def scalar(value) -> int:  # an interpreter tensor's value, or a plain int
        handle = getattr(value, "handle", None)
        return int(handle.data.reshape(-1)[0]) if handle is not None else int(value)

    waits = []

    def exact(COUNT, target):  # noqa: N803 (the kernels' name for it)
        import triton.language as tl

        waits.append((scalar(tl.load(COUNT)), scalar(target)))

    from infermeter.engine.kernels import moe_step as moe_module
    from infermeter.engine.kernels.moe_step import moe_programs, moe_tiles

    real = layer_module.wait_count, fused_step.wait_count, moe_module.wait_count
    layer_module.wait_count = fused_step.wait_count = moe_module.wait_count = exact
    try:
        global CASES, MOE_CASES
        kept, CASES = CASES, {"gqa float32": CASES["gqa float32"]}
        kept_moe, MOE_CASES = MOE_CASES, {"qwen3-like float32": MOE_CASES["qwen3-like float32"]}
        check_against_the_fused_chain("cpu")
        layer_waits = len(waits)
        check_moe_step_against_its_kernels("cpu")
    finally:
        CASES, MOE_CASES = kept, kept_moe
        layer_module.wait_count, fused_step.wait_count, moe_module.wait_count = real
    dim, experts, top_k, ffn = MOE_CASES["qwen3-like float32"][:4]
    moe_ends = moe_programs(experts, top_k, dim, ffn, moe_tiles(dim, ffn, ""))
    assert len(waits) - layer_waits == 2 * (moe_ends[-1] - moe_ends[0]), (len(waits), moe_ends)
    dim, heads, kv_heads, head_dim, ffn, slots, splits = CASES["gqa float32"][:7]
    _, chunks, ends = launch_plan(heads * head_dim + 2 * kv_heads * head_dim, dim,
                                  heads * head_dim, ffn, head_dim, False, kv_heads, splits,
                                  torch.device("cpu"))
    assert max(chunks.values()) > 1, chunks  # the chunks' loops ran
    # the three positions check_against_the_fused_chain runs this case at, each a whole
    # layer's launch, and the first an attention side's too (its stages up to wo)
    positions = 3
    assert layer_waits == positions * (ends[4] - ends[0]) + ends[2] - ends[0], (layer_waits,
                                                                                ends)
    bad = [(seen, target) for seen, target in waits if seen != target]
    assert not bad, f"waits that found another count than their target: {bad[:5]}"


def check_model_steps() -> None:
    """The debug model (float32) with the Triton decode attention, compiled as if ("compiling"
    patched on, every kernel interpreted): step_kernels "layer" gives the fused step's logits to
    the bit over a prompt and 3 greedy steps; every layer took one launch a step; a Gemma 3 layer
    (post-norms, a query scale) never does, and runs its fused parts instead. A Qwen3-MoE-like
    model: each layer's attention side in one launch, and with the Triton experts its MoE
    layer's experts in a second (moe_step.py), whose router is a norm + GEMV of the fused
    step's rather than the split GEMV: the same greedy tokens, logits within float32 sum-order
    error, the routed ids noted as the block notes them."""
    from infermeter.engine import linear as linear_module
    from infermeter.engine import model as model_module
    from infermeter.engine import self_attention as attention_module
    from infermeter.engine.fusion import fuse_projections
    from infermeter.engine.kernels import fused_step, gemv
    from infermeter.engine.kernels import layer_step as layer_module
    from infermeter.engine.model import build_model, layer_step_layers, set_step_kernels
    from infermeter.specs.presets import PRESETS

    model_module.compiling = attention_module.compiling = linear_module.compiling = lambda: True
    # small tiles for every product: the interpreter's cost is per program
    gemv.tiles_for = fused_step.tiles_for = lambda n_cols, gpu="": (32, 64, 4)
    from infermeter.engine.kernels import moe_step as moe_module
    from infermeter.engine.moe import MoEFeedForward, set_moe_kernel

    launches, moe_launches = [], []
    real, real_moe = layer_module._layer_step, moe_module._moe_step
    layer_module._layer_step = lambda *args: launches.append(1) or real(*args)
    moe_module._moe_step = lambda *args: moe_launches.append(1) or real_moe(*args)
    debug = PRESETS["debug"]
    # (spec, layers in one launch): Qwen3-MoE's MoE layer its attention side (the experts,
    # torch's, after the launch), its dense layer whole
    specs = {"llama": (debug, debug.n_layers),
             "gemma3": (debug.with_updates(arch="gemma3_text", qk_norm=True, head_dim=32,
                                           tie_embeddings=True, norms_per_layer=4,
                                           query_pre_attn_scalar=24.0, norm_eps=1e-6), 0),
             "qwen3_moe": (debug.with_updates(
                 arch="qwen3_moe", n_layers=2, head_dim=32, qk_norm=True, n_experts=4,
                 n_active_experts=2, moe_ffn_dim=48, norm_topk_prob=True,
                 moe_dense_layers=(1,), norm_eps=1e-6), 2)}
    specs["qwen3_moe triton"] = specs["qwen3_moe"]  # the Triton experts: a second launch
    steps, prompt = 3, 4
    for arch, (spec, whole) in specs.items():
        logits, tokens = {}, {}
        for kind in ("fused", "layer"):
            model = build_model(spec, seed=3, dtype=torch.float32)
            fuse_projections(model)
            set_step_kernels(model, kind)
            set_moe_kernel(model, "triton" if arch.endswith("triton") else "torch")
            moe_launches.clear()
            model.setup_cache(1, 128)
            ids = torch.randint(0, spec.vocab_size, (1, prompt),
                                generator=torch.Generator().manual_seed(2))
            outs = []
            launches.clear()
            with torch.inference_mode():
                out = model(ids, torch.arange(prompt))
                for i in range(prompt, prompt + steps):
                    outs.append(out[:, -1:])
                    ids = torch.cat([ids, out[:, -1:].argmax(-1)], dim=1)
                    out = model(ids[:, -1:], torch.tensor([i]))
            logits[kind], tokens[kind] = torch.cat(outs, dim=1), ids
            if kind == "layer":
                assert len(launches) == whole * steps, (arch, len(launches))
                assert layer_step_layers(model) == whole, arch  # what the runner records
                moe = arch.endswith("triton")
                assert len(moe_launches) == steps * moe, (arch, len(moe_launches))
                blocks = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
                assert all(b.last_experts is not None and b.last_experts.shape == (1, 2)
                           for b in blocks), arch
                assert all(b.took_step_kernel == moe for b in blocks), arch  # the record
        if arch.endswith("triton"):
            assert torch.equal(tokens["layer"], tokens["fused"]), arch
            gap = (logits["layer"] - logits["fused"]).abs().max().item()
            assert gap <= 1e-5 * logits["fused"].abs().max().item(), (arch, gap)
        else:
            assert torch.equal(logits["layer"], logits["fused"]), arch


if __name__ == "__main__":
    # "cpu kernels", "cpu model" (two processes: the suite runs them side by side) or "cuda"
    device, part = (sys.argv[1:] + ["cpu", "kernels"])[:2] if len(sys.argv) > 1 \
        else ("cpu", "kernels")
    if device == "cuda" or part == "kernels":
        check_against_the_fused_chain(device)
        check_moe_step_against_its_kernels(device)
    if device == "cpu" and part == "kernels":
        check_each_wait_counts_exactly_its_stage()
    if device == "cpu" and part == "model":
        check_model_steps()
    print("ok")
