"""Checks of the fused step's kernels (engine/kernels/fused_step.py), run by
tests/test_fused_step.py in a subprocess with TRITON_INTERPRET=1 (the variable must be set
before Triton is imported). Exits non-zero with the failing check's message; prints "ok".

References are the unfused chain with eager's rounding points: RMSNorm (or GemmaRMSNorm) as the
model computes it, a float32 product rounded once, silu(gate) * up as F.silu and a dtype product
round (gelu(gate) * up as torch's CUDA tanh-GELU computes and rounds it), residual + the rounded
product. One caveat for bfloat16: Triton's interpreter rounds
float32 -> bfloat16 toward zero (a GPU rounds to nearest even), so the bfloat16 references
round the way this interpreter does (`rounder`); float16 and float32 round as torch does."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from infermeter.engine import linear as linear_module
from infermeter.engine import model as model_module
from infermeter.engine import self_attention as attention_module
from infermeter.engine.kernels.fused_step import (
    _fused_gemv,
    _norm_qkv_rope,
    gemv_add,
    gemv_swiglu,
    norm_gemv,
    norm_gemv_keeping,
    norm_qkv_rope,
)
from infermeter.engine.kernels.qk_norm_rope import _qk_norm_rope, qk_norm_rope
from infermeter.engine.kv_cache import LayerKVCache
from infermeter.engine.norms import GemmaRMSNorm, RMSNorm
from infermeter.engine.opaque_ops import compiling
from infermeter.specs.model import GEMMA_ARCHS
from tests.greedy import greedy_decode

EPS = 1e-5
# torch's CUDA tanh-GELU constants as float32: kBeta = M_SQRT2 * M_2_SQRTPI * 0.5, kKappa
GELU_BETA = torch.tensor(1.41421356237309504880 * 1.12837916709551257390 * 0.5)
GELU_KAPPA = torch.tensor(0.044715)
# How far the interpreter's tanh (2 sigmoid(2x) - 1: no libdevice here) may be from torch's:
# a few float32 ulp of 1 (sigmoid's exp and division, the subtraction's rounding)
TANH_ERROR = 2.0 ** -21
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
# (rows N, columns K): ragged rows against BLOCK_N, one ragged column tile (tiles_for's 1024 and
# 2048 columns), three column tiles of 2048 with the last one partial (5000)
SHAPES = ((37, 64), (6, 1100), (3, 5000))


def interpreter_truncates_bf16() -> bool:
    """Whether this Triton's interpreter rounds float32 -> bfloat16 toward zero."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast(X, OUT):
        tl.store(OUT, tl.load(X).to(tl.bfloat16))

    x = torch.tensor([1.0 + 2.0 ** -8 + 2.0 ** -10])  # nearest bfloat16: 1 + 2^-7
    out = torch.empty(1, dtype=torch.bfloat16)
    cast[(1,)](x, out)
    return out.item() == 1.0


TRUNCATES = interpreter_truncates_bf16()


def rounder(dtype: torch.dtype):
    """float32 -> dtype -> float32 as the kernel's roundings run here."""
    if dtype == torch.bfloat16 and TRUNCATES:
        return lambda t: (t.float().view(torch.int32) & ~0xFFFF).view(torch.float32)
    return lambda t: t.to(dtype).float()


def cuda_mean(t: torch.Tensor) -> torch.Tensor:
    """t's mean over its last dim as torch's CUDA mean computes it, the kernels' rounding: the
    float32 sum times the float32 reciprocal of n (ATen's MeanOps); torch's CPU mean divides by
    n instead, which parts from it by an ulp now and then (e.g. n = 1100 or 72)."""
    n = t.shape[-1]
    return t.sum(-1, keepdim=True) * torch.tensor(1.0 / n, dtype=torch.float32)


def reference_norm(x: torch.Tensor, weight: torch.Tensor, gemma: bool) -> torch.Tensor:
    """float32 [1, K]: RMSNorm's output with its roundings (module docstring of fused_step),
    the mean as CUDA's (cuda_mean)."""
    rnd = rounder(x.dtype)
    xf = x.float()
    normed = xf * torch.rsqrt(cuda_mean(xf.pow(2)) + EPS)
    if gemma:
        return rnd(normed * (1.0 + weight.float()))
    return rnd(rnd(normed) * weight.float())


def eager_norm(x: torch.Tensor, weight: torch.Tensor, gemma: bool) -> torch.Tensor:
    norm = (GemmaRMSNorm if gemma else RMSNorm)(x.shape[-1], EPS).to(x.dtype)
    norm.weight.data.copy_(weight)
    return norm(x)


def close(got: torch.Tensor, want: torch.Tensor, scale: float, flip: float, what: str) -> None:
    """Within 2 units in the last place of each value, plus float32 sum-order error (8 ulp of
    float32 over the sum of absolute terms, `scale`) and `flip` (a normed input rounded one
    unit the other way: the sum of squares runs in another order than torch's mean)."""
    ulp = ULP[got.dtype]
    torch.testing.assert_close(got.float(), want, rtol=2 * ulp,
                               atol=8 * 2.0 ** -23 * scale + 2 * ulp + flip,
                               msg=lambda m: f"{what}: {m}")


def operands(gen, n_rows: int, n_cols: int, dtype: torch.dtype):
    """x [1, K], a norm weight [K] near 1, a weight [N, K] that is rows of a bigger matrix (a
    fused projection's view), a residual [1, N]."""
    x = (torch.randn(1, n_cols, generator=gen) * 3).to(dtype)
    norm_w = (1 + 0.2 * torch.randn(n_cols, generator=gen)).to(dtype)
    w = torch.randn(n_rows + 3, n_cols, generator=gen).to(dtype)[1:n_rows + 1]
    residual = torch.randn(1, n_rows, generator=gen).to(dtype)
    return x, norm_w, w, residual


def check_norm_gemv() -> None:
    gen = torch.Generator().manual_seed(11)
    for dtype in ULP:
        rnd = rounder(dtype)
        for (n_rows, n_cols), gemma in zip(SHAPES, (False, True, False), strict=True):
            x, norm_w, w, _ = operands(gen, n_rows, n_cols, dtype)
            normed = reference_norm(x, norm_w, gemma)
            if dtype != torch.bfloat16:  # the reference is eager's norm, to the bit
                assert torch.equal(normed, eager_norm(x, norm_w, gemma).float()), "norm ref"
            terms = normed.abs() * w.float().abs()  # [N, K]
            want = rnd(normed @ w.float().T)
            for pdl in (False, True):  # the PDL launch's arithmetic (no wait here)
                got = norm_gemv(x, norm_w, w, EPS, gemma) if not pdl else \
                    _fused_gemv(x, w, norm_w, None, EPS, gemma, False, pdl=True)
                assert got.dtype == dtype and got.shape == (1, n_rows), f"norm_gemv {dtype}"
                close(got, want, terms.sum(1).max().item(), ULP[dtype] * terms.max().item(),
                      f"norm_gemv {dtype} {n_rows}x{n_cols} gemma {gemma} pdl {pdl}")
            # norm_gemv_keeping (an MoE block's norm + router): the same product, and the
            # normed row it read: the reference's within the units that the sum of squares'
            # order (another rsqrt by an ulp) can move a rounding
            got, kept = norm_gemv_keeping(x, norm_w, w, EPS, gemma)
            assert torch.equal(got, norm_gemv(x, norm_w, w, EPS, gemma)), f"keeping {dtype}"
            assert kept.dtype == dtype and kept.shape == x.shape, f"keeping {dtype}"
            torch.testing.assert_close(kept.float(), normed, rtol=2 * ULP[dtype], atol=0,
                                       msg=lambda m, d=dtype, n=n_cols: f"keeping {d} {n}: {m}")


def gelu_tanh(gate: torch.Tensor) -> torch.Tensor:
    """float32 F.gelu(gate, approximate="tanh") in the order of torch's CUDA kernel (float32
    opmath; each torch op here rounds once, as the kernel's products do), gate + kappa *
    gate^3 one FMA as there (the product exact in float64, the float64 sum rounded to float32:
    the FMA's result but at a rare double-rounding tie)."""
    x_cube = gate * gate * gate
    fma = (GELU_KAPPA.double() * x_cube.double() + gate.double()).float()
    return 0.5 * gate * (1 + torch.tanh(GELU_BETA * fma))


def gelu_bounds(gate: torch.Tensor, up: torch.Tensor, dtype: torch.dtype):
    """(low, high) float32 bounds of the kernel's rnd(rnd(gelu(gate)) * up) for gate, up dtype
    values in float32: eager's rounding points, about a float32 gelu that the interpreter's tanh
    may move by up to 0.5 |gate| TANH_ERROR (and its float32 rounding by an ulp). On a GPU the
    tanh is torch's (the gpu tests: to the bit)."""
    rnd = rounder(dtype)
    gelu = gelu_tanh(gate).double()
    ulp = torch.finfo(torch.float32).eps * gelu.abs()
    slack = 0.5 * gate.abs().double() * TANH_ERROR + ulp
    ends = [rnd(rnd((gelu + sign * slack).float()) * up) for sign in (-1, 1)]
    return torch.minimum(*ends), torch.maximum(*ends)


def check_gemv_glu() -> None:
    """norm + w13 + the gated activation against eager's rounding points: SwiGLU (Llama's RMSNorm)
    and GeGLU (Gemma's FFN input: GemmaRMSNorm's (1 + w), tanh-gelu instead of silu), with one
    tolerance (the activations' slopes are under 1.2: gate's and up's errors pass through them
    and the product, scaled by |up|, so twice the product bound)."""
    for gelu, seed in ((False, 12), (True, 17)):
        name = "gemv_geglu" if gelu else "gemv_swiglu"
        gen = torch.Generator().manual_seed(seed)
        for dtype in ULP:
            rnd = rounder(dtype)
            for (hidden, n_cols), normed_in in zip(SHAPES, (True, False, True), strict=True):
                x, norm_w, w13, _ = operands(gen, 2 * hidden, n_cols, dtype)
                w13 = w13 / 4  # gate values where the activation bends
                if gelu:
                    norm_w = (norm_w - 1).to(dtype)  # Gemma's weights are offsets from 1
                inputs = reference_norm(x, norm_w, gelu) if normed_in else x.float()
                gate, up = rnd(inputs @ w13.float().T).chunk(2, dim=-1)
                if gelu:
                    want = rnd(rnd(gelu_tanh(gate)) * up)
                    # eager on the CPU: its own tanh and order
                    eager_act, atol = (lambda g: F.gelu(g, approximate="tanh"),
                                       ULP[dtype] * up.abs().max().item())
                else:
                    want = rnd(rnd(gate / (1 + torch.exp(-gate))) * up)
                    # to the bit in float16; in float32 silu's own formula may move the last bit
                    eager_act, atol = F.silu, 0
                if dtype != torch.bfloat16:  # eager's activation
                    eager = (eager_act(gate.to(dtype)) * up.to(dtype)).float()
                    torch.testing.assert_close(want, eager, rtol=2 * ULP[dtype], atol=atol)
                got = gemv_swiglu(x, norm_w if normed_in else None, w13, EPS, gelu, gelu)
                assert got.dtype == dtype and got.shape == (1, hidden), f"{name} {dtype}"
                terms = inputs.abs() * w13.float().abs()
                scale = 2 * terms.sum(1).max().item() * up.abs().max().item()
                close(got, want, scale,
                      4 * ULP[dtype] * up.abs().max().item() * terms.max().item()
                      + 2 * ULP[dtype] * want.abs().max().item(),
                      f"{name} {dtype} {hidden}x{n_cols} norm {normed_in}")


def check_gemv_add() -> None:
    gen = torch.Generator().manual_seed(13)
    for dtype in ULP:
        rnd = rounder(dtype)
        for n_rows, n_cols in SHAPES:
            x, _, w, residual = operands(gen, n_rows, n_cols, dtype)
            want = rnd(residual.float() + rnd(x.float() @ w.float().T))
            got = gemv_add(x, w, residual)
            assert got.dtype == dtype and got.shape == (1, n_rows), f"gemv_add {dtype}"
            close(got, want, (x.float().abs() @ w.float().abs().T).max().item(), 0.0,
                  f"gemv_add {dtype} {n_rows}x{n_cols}")


def check_model_step() -> None:
    """The debug model's batch-1 steps with step_kernels "fused" (while 'compiling', every
    kernel run by the interpreter) against "split" (the GEMV and SwiGLU kernels; the math
    attention in both): the same greedy tokens, and logits within sum-order error; a decode
    step runs the fused ops 4 times a layer and the GEMV only for the output head; the 4-token
    prefill stays split; and eager's module forwards give the same tokens. Llama (GQA, a ring
    layer) in float32, Qwen2 (q/k/v biases) in float16, Qwen3 (per-head q/k norms over a
    head_dim of 32, in the first kernel too) in float32, and over a head_dim of 24 (no Triton
    block: norm + wqkv, then torch's q/k norms, RoPE and cache write) in float32; layers that
    take some of the four: Gemma 3 (norm + wqkv and norm + w13 + GeGLU fused, the products
    before its post-norms split) and Qwen3-MoE (an MoE layer's attention fused, its experts
    split; its dense layer whole), float32. Llama's and Gemma 3's again with the final norm and
    the head as one kernel (FUSED_HEAD "on"; Gemma's (1 + w) norm and soft cap): the decode
    step's head is norm_matvec, not the GEMV, with the same tokens."""
    from infermeter.engine.fusion import fuse_projections
    from infermeter.engine.kernels import fused_step
    from infermeter.engine.kernels import gemv as gemv_module
    from infermeter.engine.kernels import qk_norm_rope as qk_module
    from infermeter.engine.kernels.gemv import matvec
    from infermeter.engine.model import build_model, fused_step_layers, set_step_kernels
    from infermeter.engine.moe import set_moe_kernel
    from infermeter.specs.presets import PRESETS

    model_module.compiling = attention_module.compiling = linear_module.compiling = lambda: True
    # 128 x 64 tiles for every product, split and fused: the interpreter's cost is per program
    # (w2's 176 columns still take three tiles, the last one ragged)
    gemv_module.tiles_for = fused_step.tiles_for = lambda n_cols, gpu="": (128, 64, 4)
    calls: list[str] = []

    def counted(name, real):
        return lambda *args: calls.append(name) or real(*args)

    # the engine imports each kernel from its module where a compiled step takes it
    gemv_module.matvec = counted("gemv", matvec)
    for name in ("norm_matvec", "norm_matvec_swiglu", "matvec_add", "norm_qkv_rope_cache",
                 "norm_matvec_keeping"):
        setattr(fused_step, name, counted(name, getattr(fused_step, name)))
    qk_module.qk_norm_rope_cache = counted("qk_norm_rope_cache", qk_module.qk_norm_rope_cache)
    debug = PRESETS["debug"]
    # llama's layer 1 a ring of 3 slots (the 4-token prompt already wraps it)
    specs = {"llama": debug.with_updates(sliding_window=3, sliding_window_layers=(1,)),
             "qwen2": debug.with_updates(arch="qwen2", qkv_bias=True),
             "qwen3": debug.with_updates(arch="qwen3", qk_norm=True, head_dim=32,
                                         norm_eps=1e-6)}
    specs["qwen3 head_dim 24"] = specs["qwen3"].with_updates(head_dim=24)
    # the q/k norms in wqkv's kernel, one program a head (QK_NORM_KERNELS 1)
    specs["qwen3 in wqkv"] = specs["qwen3"]
    # layers that take some of the four: Gemma 3 its norm + wqkv and norm + w13 + GeGLU (its
    # post-norms keep wo and w2 split), an MoE layer its attention's two (the experts split;
    # layer 1 of this one is dense: all four)
    specs["gemma3"] = debug.with_updates(
        arch="gemma3_text", qk_norm=True, head_dim=32, tie_embeddings=True, sliding_window=3,
        sliding_window_layers=(0,), norms_per_layer=4, rope_local_theta=10000.0,
        query_pre_attn_scalar=24.0, final_logit_softcap=30.0, norm_eps=1e-6)
    specs["qwen3_moe"] = debug.with_updates(
        arch="qwen3_moe", n_layers=2, head_dim=32, qk_norm=True, n_experts=4,
        n_active_experts=2, moe_ffn_dim=48, norm_topk_prob=True, moe_dense_layers=(1,),
        norm_eps=1e-6)
    # the Triton experts: the MoE layer's block in the fused step's four kernels (norm +
    # router keeping the normed row, the routing, the experts, the down product + add)
    specs["qwen3_moe triton"] = specs["qwen3_moe"]
    # the final norm and the output head in one kernel (model.FUSED_HEAD "on"): RMSNorm, and
    # Gemma's (1 + w) norm with its soft-capped logits, where only some layer parts fuse
    heads = {"llama fused head": "llama", "gemma3 fused head": "gemma3"}
    specs.update({arch: specs[base] for arch, base in heads.items()})
    # q/k norms: norm + wqkv, then their own kernel (QK_NORM_KERNELS 2)
    apart = ["norm_matvec", "qk_norm_rope_cache"]
    per_layer = {"gemma3": [apart + ["gemv", "norm_matvec_swiglu", "gemv"]] * 2,
                 # the router's product runs the GEMV; the experts torch's gathered products
                 "qwen3_moe": [apart + ["matvec_add", "gemv"],
                               apart + ["matvec_add", "norm_matvec_swiglu", "matvec_add"]],
                 "qwen3_moe triton": [apart + ["matvec_add", "norm_matvec_keeping"],
                                      apart + ["matvec_add", "norm_matvec_swiglu",
                                               "matvec_add"]],
                 "qwen3": [apart + ["matvec_add", "norm_matvec_swiglu", "matvec_add"]] * 2}
    steps, prompt = 3, 4
    # the variants whose split step is another case's (the q/k norms' way and the experts'
    # kind change only the fused step; split with Triton's experts: expert_gemv_worker.py)
    same_split = {"qwen3 in wqkv": "qwen3", "qwen3_moe triton": "qwen3_moe", **heads}
    splits = {}
    dtypes = (torch.float32, torch.float16, torch.float32, torch.float32, torch.float32,
              torch.float32, torch.float32, torch.float32, torch.float32, torch.float32)
    for (arch, spec), dtype in zip(specs.items(), dtypes, strict=True):
        qk_module.QK_NORM_KERNELS = 1 if arch == "qwen3 in wqkv" else 2
        model_module.FUSED_HEAD = "on" if arch in heads else "off"
        logits, tokens = {}, {}
        base = same_split.get(arch)  # a variant's split step is its base case's: not run again
        if base is not None:
            logits["split"], tokens["split"] = splits[base]
        for kind in ("eager", "fused") if base is not None else ("eager", "split", "fused"):
            # eager: the module forwards with no kernel at all (compiling() False)
            model_module.compiling = attention_module.compiling = linear_module.compiling = \
                compiling if kind == "eager" else (lambda: True)
            model = build_model(spec, seed=3, dtype=dtype)
            norm_gen = torch.Generator().manual_seed(5)
            for name, param in model.named_parameters():  # q's and k's unequal, not ones
                if name.endswith(("q_norm.weight", "k_norm.weight")):
                    param.copy_(1 + 0.3 * torch.randn(param.shape, generator=norm_gen))
            fuse_projections(model)
            set_step_kernels(model, "split" if kind == "eager" else kind)
            if arch.startswith("qwen3_moe"):  # the interpreter runs Triton's experts too
                set_moe_kernel(model, "triton" if arch.endswith("triton") else "torch")
            for layer in model.layers:  # the attention is not what differs: the quick one
                layer.attention.decode_attention = "math"
            whole = 0 if kind != "fused" else 1 if arch.startswith("qwen3_moe") else \
                0 if arch.startswith("gemma3") else spec.n_layers
            assert fused_step_layers(model) == whole, f"{arch} {kind}"
            model.setup_cache(1, 16)
            ids = torch.randint(0, spec.vocab_size, (1, prompt),
                                generator=torch.Generator().manual_seed(2))
            tokens[kind], logits[kind] = greedy_decode(model, ids, steps, calls.clear)
            first = "norm_qkv_rope_cache" if spec.head_dim != 24 else "norm_matvec"
            fused = per_layer.get(heads.get(arch, arch),
                                  [[first, "matvec_add", "norm_matvec_swiglu",
                                    "matvec_add"]] * spec.n_layers)
            head = "norm_matvec" if arch in heads else "gemv"
            split = [["gemv"] * (3 if arch.startswith("qwen3_moe") and i == 0 else 4)
                     for i in range(spec.n_layers)]
            want = {"eager": [], "split": sum(split, []) + ["gemv"],
                    "fused": sum(fused, []) + [head]}[kind]  # + the output head
            assert calls == want * steps, f"{arch} {kind}: ran {calls[:12]}..."
            took = [layer.feed_forward.took_fused_step for layer in model.layers
                    if hasattr(layer.feed_forward, "took_fused_step")]
            assert took == ([kind == "fused" and arch == "qwen3_moe triton"]
                            if arch.startswith("qwen3_moe") else []), f"{arch} {kind}: {took}"
        splits[arch] = logits["split"], tokens["split"]
        model_module.compiling = attention_module.compiling = linear_module.compiling = lambda: True
        assert torch.equal(tokens["fused"], tokens["split"]), f"{arch}: tokens differ"
        assert torch.equal(tokens["fused"], tokens["eager"]), f"{arch}: tokens differ from eager"
        err = (logits["fused"] - logits["split"]).abs().max().item()
        bound = 1e-4 if dtype == torch.float32 else 2e-2
        assert err < bound, f"{arch} {dtype}: logits differ by {err}"
    qk_module.QK_NORM_KERNELS = 2
    model_module.FUSED_HEAD = "off"


def check_rounding_points() -> None:
    """Each rounding point to the bit: weight rows that pick one or two of x's columns make the
    products exact in float32 in any order, and x of quarter-integers makes the sum of squares
    exact too, so the kernels must equal the references exactly (float32's silu within 2 ulp:
    Triton's exp is not torch's)."""
    gen = torch.Generator().manual_seed(14)
    n_cols, n_rows = 1100, 24
    pick = torch.randint(0, n_cols, (2, 2 * n_rows), generator=gen)
    one = torch.zeros(2 * n_rows, n_cols).scatter_(1, pick[:1].T, 1.0)  # one column a row
    two = one.scatter(1, pick[1:].T, 1.0)  # two columns a row (one where they coincide)
    for dtype in ULP:
        rnd = rounder(dtype)
        x = (torch.randint(-12, 13, (1, n_cols), generator=gen) / 4).to(dtype)
        norm_w = (1 + 0.3 * torch.randn(n_cols, generator=gen)).to(dtype)
        residual = torch.randn(1, n_rows, generator=gen).to(dtype)
        for gemma in (False, True):
            want = reference_norm(x, norm_w, gemma) @ one[:n_rows].T  # the normed x, picked
            got = norm_gemv(x, norm_w, one[:n_rows].to(dtype), EPS, gemma).float()
            assert torch.equal(got, want), f"norm rounding {dtype} gemma {gemma}"
        gate, up = (reference_norm(x, norm_w, False) @ one.T).chunk(2, dim=-1)
        want = rnd(rnd(gate / (1 + torch.exp(-gate))) * up)
        got = gemv_swiglu(x, norm_w, one.to(dtype), EPS, False).float()
        torch.testing.assert_close(got, want, rtol=2 * ULP[dtype] if dtype == torch.float32
                                   else 0, atol=0, msg=lambda m, d=dtype: f"swiglu {d}: {m}")
        for pdl in (False, True):  # GeGLU (Gemma's norm), and the PDL launch's arithmetic
            gate, up = (reference_norm(x, norm_w, True) @ one.T).chunk(2, dim=-1)
            low, high = gelu_bounds(gate, up, dtype)
            got = gemv_swiglu(x, norm_w, one.to(dtype), EPS, True, True) if not pdl else \
                _fused_gemv(x, one.to(dtype), norm_w, None, EPS, True, True, pdl=True,
                            gelu=True)
            got = got.float()
            assert bool(((low <= got) & (got <= high)).all()), \
                f"geglu rounding {dtype} pdl {pdl}: {got} not in [{low}, {high}]"
        x = torch.randn(1, n_cols, generator=gen).to(dtype)  # sums of two need a rounding
        want = rnd(residual.float() + rnd(x.float() @ two[:n_rows].T))
        got = gemv_add(x, two[:n_rows].to(dtype), residual).float()
        assert torch.equal(got, want), f"add rounding {dtype}"


def rope_reference(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype):
    """float32 [heads, D]: rope.apply_rope's float32 arithmetic on t [heads, D] (dtype values
    in float32), rounded as the kernel rounds here."""
    pairs = t.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return rounder(dtype)(torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1)
                          .flatten(-2))


def check_norm_qkv_rope() -> None:
    """norm + wqkv + RoPE + cache write against the unfused chain, to the bit: weight rows
    that pick one of x's columns and x of quarter-integers make the product exact in any order
    (as check_rounding_points), so each rounding point shows. GQA (ragged rows: 16 programs),
    MHA with Qwen2's bias over three column tiles (4100: the GEMV's 2 rows a program), and a
    ring layer (slot = position % 4, key_pos written) with Gemma's norm; positions 0, the last
    slot, middle ones and past the ring's window; every other slot of the cache as it was (and
    all of it after a position past a full cache's end)."""
    from infermeter.engine.rope import apply_rope

    gen = torch.Generator().manual_seed(15)
    head_dim, max_len = 8, 6
    # heads, kv heads, columns, bias, window, Gemma's norm, positions
    cases = ((4, 2, 72, False, None, False, (0, max_len - 1)),
             (2, 2, 4100, True, None, False, (2,)),
             (4, 1, 72, False, 4, True, (3, 9)))
    angles = 10000.0 ** (-torch.arange(0, head_dim, 2) / head_dim)  # [D / 2]
    for dtype in ULP:
        rnd = rounder(dtype)
        for n_heads, n_kv, n_cols, has_bias, window, gemma, positions in cases:
            n_q, n_kv_rows = n_heads * head_dim, n_kv * head_dim
            n_rows = n_q + 2 * n_kv_rows
            x = (torch.randint(-12, 13, (1, n_cols), generator=gen) / 4).to(dtype)
            norm_w = (1 + 0.3 * torch.randn(n_cols, generator=gen)).to(dtype)
            pick = torch.randint(0, n_cols, (n_rows, 1), generator=gen)
            w = torch.zeros(n_rows, n_cols).scatter_(1, pick, 1.0)
            bias = torch.randn(n_rows, generator=gen).to(dtype) if has_bias else None
            qkv = reference_norm(x, norm_w, gemma) @ w.T  # [1, n_rows], exact
            if bias is not None:  # added to the rounded product, rounded
                qkv = rnd(qkv + bias.float())
            q, k, v = (t.view(-1, head_dim) for t in qkv.split([n_q, n_kv_rows, n_kv_rows], -1))
            caches = [LayerKVCache(1, 12 if window else max_len, n_kv, head_dim, window, dtype,
                                   "cpu") for _ in range(2)]
            start = torch.randn(caches[0].k.shape, generator=gen)
            for cache in caches:  # the same earlier contents in both
                cache.k.copy_(start)
                cache.v.copy_(-start)
            for pos in positions:
                cos, sin = torch.cos(pos * angles)[None], torch.sin(pos * angles)[None]
                input_pos = torch.tensor([pos])
                want_q = rope_reference(q, cos, sin, dtype)  # [heads, D]
                want_k = rope_reference(k, cos, sin, dtype)
                if dtype != torch.bfloat16:  # the reference is eager's RoPE, to the bit
                    eager = apply_rope(q.to(dtype)[None, None], cos, sin)
                    assert torch.equal(want_q, eager.float().view_as(want_q)), "rope ref"
                ref, got = caches
                # the eager write of [1, H_kv, 1, D]
                ref.update(want_k.to(dtype)[None, :, None], v.to(dtype)[None, :, None], input_pos)
                out = norm_qkv_rope(x, norm_w, w.to(dtype), bias, cos, sin, input_pos, got.k,
                                    got.v, got.key_pos, n_q, EPS, gemma, got.is_ring)
                what = f"norm_qkv_rope {dtype} {n_heads}/{n_kv} heads {n_cols} ring " \
                       f"{got.is_ring} position {pos}"
                assert_q_and_cache(out, want_q, got, ref, dtype, n_q, what)
            if window is None and dtype == torch.float32:  # past the last slot: no write
                norm_qkv_rope(x, norm_w, w.to(dtype), bias, cos, sin, torch.tensor([max_len]),
                              got.k, got.v, got.key_pos, n_q, EPS, gemma, got.is_ring)
                assert torch.equal(got.k, ref.k) and torch.equal(got.v, ref.v), "past the cache"


def reference_head_norm(t: torch.Tensor, weight: torch.Tensor, gemma: bool, dtype: torch.dtype,
                        eps: float) -> torch.Tensor:
    """float32 [heads, D]: the q/k norm (RMSNorm, or GemmaRMSNorm, over each head's D values
    of t, dtype values in float32) with eager's roundings, rounded as the kernel rounds here."""
    rnd = rounder(dtype)
    normed = t * torch.rsqrt(cuda_mean(t.pow(2)) + eps)
    if gemma:
        return rnd(normed * (1.0 + weight.float()))
    return rnd(rnd(normed) * weight.float())


def check_norm_qkv_rope_qk_norm() -> None:
    """norm + wqkv + the per-head q/k norms + RoPE + cache write (QK_NORM: Qwen3's, Gemma 3's
    (1 + w) with Gemma's input norm) against the unfused chain, to the bit: x of +-1 with eps 0
    makes the input norm exactly its weight's quarter-integers, weight rows that pick one of
    x's columns (times 1/2, 1 or 2, plus a quarter-integer bias) keep each head's values and
    their squares' sum exact in any order, so only the rounding points show, among them the
    head's rsqrt, its normed values' and their weighted values'. Columns in one ragged tile
    (72) and two (1100: BLOCK_K 1024 in a one-head program), GQA, MHA with a bias, and a ring
    layer (slot = position % 4) with MQA; v's heads are written un-normed and un-roped.
    Where there is no bias, the two-kernel way too (QK_NORM_KERNELS 2): norm_gemv's product,
    then qk_norm_rope's program a head, into a cache of its own: the same q and cache."""
    from infermeter.engine.rope import apply_rope

    gen = torch.Generator().manual_seed(16)
    head_dim, max_len, qk_eps = 8, 6, 1e-6
    # heads, kv heads, columns, bias, window, Gemma's norms, positions
    cases = ((4, 2, 72, False, None, False, (0, max_len - 1)),
             (2, 2, 1100, True, None, False, (2,)),
             (2, 1, 72, False, 4, True, (3, 9)))
    angles = 10000.0 ** (-torch.arange(0, head_dim, 2) / head_dim)  # [D / 2]
    for dtype in ULP:
        for n_heads, n_kv, n_cols, has_bias, window, gemma, positions in cases:
            n_q, n_kv_rows = n_heads * head_dim, n_kv * head_dim
            n_rows = n_q + 2 * n_kv_rows
            x = (torch.randint(0, 2, (1, n_cols), generator=gen) * 2 - 1).to(dtype)
            norm_w = (torch.randint(-8, 9, (n_cols,), generator=gen) / 4).to(dtype)
            if gemma:  # (1 + w) of quarter-integers, never 0: the head's sum is not 0
                norm_w = (norm_w.abs() + 0.25 - 1).to(dtype)
            pick = torch.randint(0, n_cols, (n_rows, 1), generator=gen)
            scale = 2.0 ** torch.randint(-1, 2, (n_rows, 1), generator=gen)
            w = torch.zeros(n_rows, n_cols).scatter_(1, pick, scale)
            bias = (torch.randint(-4, 5, (n_rows,), generator=gen) / 4).to(dtype) \
                if has_bias else None
            qkv = reference_norm_eps0(x, norm_w, gemma) @ w.T  # [1, n_rows], exact
            if bias is not None:
                qkv = qkv + bias.float()  # exact: quarter-integers
            q, k, v = (t.view(-1, head_dim) for t in qkv.split([n_q, n_kv_rows, n_kv_rows], -1))
            q_w, k_w = ((0.3 * torch.randn(head_dim, generator=gen) + (0 if gemma else 1))
                        .to(dtype) for _ in range(2))
            q_normed = reference_head_norm(q, q_w, gemma, dtype, qk_eps)
            k_normed = reference_head_norm(k, k_w, gemma, dtype, qk_eps)
            if dtype != torch.bfloat16:  # the reference is eager's q/k norm, to the bit
                norm = (GemmaRMSNorm if gemma else RMSNorm)(head_dim, qk_eps).to(dtype)
                norm.weight.data.copy_(q_w)
                assert torch.equal(q_normed, norm(q.to(dtype)).float()), "q norm ref"
            caches = [LayerKVCache(1, 12 if window else max_len, n_kv, head_dim, window, dtype,
                                   "cpu") for _ in range(3)]
            start = torch.randn(caches[0].k.shape, generator=gen)
            for cache in caches:
                cache.k.copy_(start)
                cache.v.copy_(-start)
            for i, pos in enumerate(positions):
                cos, sin = torch.cos(pos * angles)[None], torch.sin(pos * angles)[None]
                input_pos = torch.tensor([pos])
                want_q = rope_reference(q_normed, cos, sin, dtype)  # [heads, D]
                want_k = rope_reference(k_normed, cos, sin, dtype)
                if dtype != torch.bfloat16:
                    eager = apply_rope(q_normed.to(dtype)[None, None], cos, sin)
                    assert torch.equal(want_q, eager.float().view_as(want_q)), "rope ref"
                ref, got, apart = caches
                ref.update(want_k.to(dtype)[None, :, None], v.to(dtype)[None, :, None], input_pos)
                args = (x, norm_w, w.to(dtype), bias, cos, sin, input_pos, got.k, got.v,
                        got.key_pos, n_q, 0.0, gemma, got.is_ring, q_w, k_w, qk_eps, gemma)
                # the op, and the PDL launch's arithmetic (no wait here)
                out = norm_qkv_rope(*args) if i == 0 else _norm_qkv_rope(*args, pdl=True)
                what = f"qk-norm rope {dtype} {n_heads}/{n_kv} heads {n_cols} ring " \
                       f"{got.is_ring} position {pos}"
                assert_q_and_cache(out, want_q, got, ref, dtype, n_q, what)
                if bias is not None:
                    continue
                qkv_rounded = norm_gemv(x, norm_w, w.to(dtype), 0.0, gemma)
                assert torch.equal(qkv_rounded.float(), qkv), f"{what}: norm_gemv's product"
                apart_args = (qkv_rounded, cos, sin, input_pos, apart.k, apart.v,
                              apart.key_pos, q_w, k_w, n_q, apart.is_ring, qk_eps, gemma)
                out = qk_norm_rope(*apart_args) if i == 0 else \
                    _qk_norm_rope(*apart_args, pdl=True)
                assert_q_and_cache(out, want_q, apart, ref, dtype, n_q, f"{what}, two kernels")



def assert_q_and_cache(out, want_q, got, ref, dtype, n_q: int, what: str) -> None:
    """The wqkv kernel's q [1, n_q] is want_q to the bit, and its cache (k, v, key_pos) is the
    eager write's."""
    assert out.dtype == dtype and out.shape == (1, n_q), what
    assert torch.equal(out.float().view_as(want_q), want_q), f"{what}: q"
    assert torch.equal(got.k, ref.k), f"{what}: k cache"
    assert torch.equal(got.v, ref.v), f"{what}: v cache"
    assert torch.equal(got.key_pos, ref.key_pos), f"{what}: key_pos"

def reference_norm_eps0(x: torch.Tensor, weight: torch.Tensor, gemma: bool) -> torch.Tensor:
    """float32 [1, K]: RMSNorm with eps 0 of x of +-1 (mean square 1: normed is x exactly),
    times its weight as eager's roundings give it (quarter-integers: exact)."""
    assert torch.equal(x.float().pow(2).mean(), torch.tensor(1.0))
    return x.float() * (1.0 + weight.float()) if gemma else x.float() * weight.float()


def check_compiled_trace() -> None:
    """torch.compile (fullgraph) traces the fused step whole: each layer is the four ops, the
    first with RoPE and the cache write (their PDL twins, opaque custom ops with fake kernels:
    the interpreter cannot run under dynamo's fake tensors), the only RMSNorm left in the graph
    is the final one, no RoPE or cache write is, and the traced step's logits are the
    uncompiled fused step's: the debug model, and a Qwen3-like one (its q/k norms in the first
    kernel too); a Gemma 3-like one takes its two input kernels (GeGLU's, gelu=True) and keeps
    the GEMV and each post-norm for wo and w2."""
    from infermeter.engine.model import build_model
    from infermeter.engine.moe import set_moe_kernel
    from infermeter.specs.presets import PRESETS

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    from infermeter.engine.kernels import fused_step
    from infermeter.engine.kernels import gemv as gemv_module

    # the traced and the plain step run every kernel: 128 x 64 tiles, a few programs each (the
    # interpreter's cost is per program; the graph does not depend on the tiles)
    real_tiles = gemv_module.tiles_for
    gemv_module.tiles_for = fused_step.tiles_for = lambda n_cols, gpu="": (128, 64, 4)
    debug = PRESETS["debug"]
    whole = ["norm_qkv_rope_pdl", "gemv_add_pdl", "gemv_swiglu_pdl", "gemv_add_pdl"]
    apart = ["norm_gemv_pdl", "qk_norm_rope_pdl"]  # q/k norms: their own kernel after wqkv
    gemma = debug.with_updates(arch="gemma3_text", qk_norm=True, head_dim=32,
                               tie_embeddings=True, norms_per_layer=4, norm_eps=1e-6)
    # (spec, a layer's ops, RMSNorms left in the graph: the final one and Gemma's post-norms)
    for spec, layer_ops, norms in (
            (debug, whole, 1),
            (debug.with_updates(arch="qwen3", qk_norm=True), apart + whole[1:], 1),
            (gemma, apart + ["gemv_pdl", "gemv_swiglu_pdl", "gemv_pdl"],
             1 + 2 * gemma.n_layers)):
        graphs.clear()
        trace_step(build_model(spec, seed=1), keep, graphs, [layer_ops] * spec.n_layers, norms)
    # Qwen3-MoE with the Triton experts: its MoE layer's block as four ops (norm + router
    # keeping the normed row, the routing, the experts, down + the residual add), no norm or
    # add left in the graph; its dense layer whole
    moe = debug.with_updates(arch="qwen3_moe", n_layers=2, head_dim=32, qk_norm=True,
                             n_experts=4, n_active_experts=2, moe_ffn_dim=48,
                             norm_topk_prob=True, moe_dense_layers=(1,), norm_eps=1e-6)
    model = build_model(moe, seed=1)
    set_moe_kernel(model, "triton")
    graphs.clear()
    trace_step(model, keep, graphs, [
        apart + ["gemv_add_pdl", "norm_gemv_keeping_pdl", "router_topk_pdl",
                 "experts_swiglu_pdl", "experts_down_pdl"], apart + whole[1:]], 1)
    gemv_module.tiles_for = fused_step.tiles_for = real_tiles


def trace_step(model, keep, graphs, layer_ops: list[list[str]], norms: int) -> None:
    """check_compiled_trace's checks on one model (built, no cache yet): each layer's ops in
    the graph are layer_ops' (a list a layer), and `norms` RMSNorms are left."""
    from infermeter.engine.fusion import fuse_projections
    from infermeter.engine.kernels import pdl
    from infermeter.engine.model import set_step_kernels

    spec = model.spec
    fuse_projections(model)
    set_step_kernels(model, "fused")
    for layer in model.layers:
        layer.attention.decode_attention = "math"
    model.setup_cache(1, 8)
    tokens = torch.randint(0, spec.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), pdl.launching(True):
        model(tokens[:, :4], torch.arange(4))
        step = torch.compile(model, fullgraph=True, dynamic=False, backend=keep)
        traced = step(tokens[:, 4:], torch.tensor([4]))
        model.reset_cache()  # the same step again, uncompiled, after the same prefill
        model(tokens[:, :4], torch.arange(4))
        model_module.compiling = attention_module.compiling = linear_module.compiling = lambda: True
        plain = model(tokens[:, 4:], torch.tensor([4]))
        model_module.compiling = attention_module.compiling = linear_module.compiling = compiling
    targets = [str(node.target) for node in graphs[-1].graph.nodes]
    ours = [t.split(".")[1] for t in targets if t.startswith("infermeter.")]
    # RoPE's rows gathered once for every layer (kernels/rope_rows.py), then the layers' ops
    assert ours == ["rope_rows_pdl"] + sum(layer_ops, []) + ["gemv_pdl"], (spec.arch, ours)
    gelu = [node.args[5:6] == (True,) for node in graphs[-1].graph.nodes
            if "gemv_swiglu_pdl" in str(node.target)]  # GeGLU's op: gelu=True
    swiglus = sum(ops.count("gemv_swiglu_pdl") for ops in layer_ops)
    assert gelu == [spec.arch in GEMMA_ARCHS] * swiglus, (spec.arch, gelu)
    assert sum("rsqrt" in t for t in targets) == norms, f"{spec.arch}: a layer's norm left in"
    # RoPE (apply_rope's stack of the rotated pairs) and the cache write run in the kernel
    assert not any("stack" in t or "index_copy" in t for t in targets), \
        f"{spec.arch}: RoPE or a cache write"
    assert torch.equal(traced, plain), f"{spec.arch}: traced and uncompiled fused steps differ"
    torch._dynamo.reset()


def check_rope_rows() -> None:
    """kernels/rope_rows.py: cos and sin rows at each position, the tables' own bits (both ops,
    one and several positions, the first and last rows); a position past the tables reads
    zeros, not memory past them; the fake's shapes and dtypes are the kernel's."""
    from infermeter.engine.kernels.rope_rows import rope_rows_pdl, rope_rows_triton

    gen = torch.Generator().manual_seed(7)
    cos_table, sin_table = torch.randn(12, 16, generator=gen), torch.randn(12, 16, generator=gen)
    for op in (rope_rows_triton, rope_rows_pdl):
        for positions in ([5], [0], [11], [3, 0, 11, 3]):
            at = torch.tensor(positions)
            cos, sin = op(cos_table, sin_table, at)
            assert torch.equal(cos, cos_table[at]) and torch.equal(sin, sin_table[at]), positions
        cos, sin = op(cos_table, sin_table, torch.tensor([12, 2], dtype=torch.int32))
        assert not cos[0].any() and not sin[0].any(), "a position past the tables read"
        assert torch.equal(cos[1], cos_table[2]) and torch.equal(sin[1], sin_table[2])
    torch.library.opcheck(rope_rows_pdl, (cos_table, sin_table, torch.tensor([4])))
    half = torch.randn(6, 12, generator=gen)  # a head of 24: not a power of two's half
    cos, _ = rope_rows_triton(half, half, torch.tensor([5]))
    assert torch.equal(cos, half[5:6])


def check_layers_it_cannot_fuse_stay_split() -> None:
    """Gemma (post-norms between wo's and w2's products and their adds: only the two input
    parts fuse) and a layer with a forward hook on wo (as tensor parallelism adds its
    all-reduce) do not run the whole fused step."""
    from infermeter.engine.fusion import fuse_projections
    from infermeter.engine.model import build_model, fused_step_layers, set_step_kernels
    from infermeter.specs.presets import PRESETS

    gemma = build_model(PRESETS["debug"].with_updates(arch="gemma3_text", qk_norm=True))
    fuse_projections(gemma)
    set_step_kernels(gemma, "fused")
    assert fused_step_layers(gemma) == 0, "gemma fused"
    assert {layer.fused_parts() for layer in gemma.layers} == {("attention_in", "ffn_in")}
    model = build_model(PRESETS["debug"])
    fuse_projections(model)
    set_step_kernels(model, "fused")
    model.layers[1].attention.wo.register_forward_hook(lambda *args: None)
    assert fused_step_layers(model) == PRESETS["debug"].n_layers - 1, "a hooked layer fused"


if __name__ == "__main__":
    check_norm_gemv()
    check_gemv_glu()
    check_gemv_add()
    check_rounding_points()
    check_norm_qkv_rope()
    check_norm_qkv_rope_qk_norm()
    check_rope_rows()
    check_layers_it_cannot_fuse_stay_split()
    check_compiled_trace()
    check_model_step()
    print("ok")
