"""Checks of the combine folded into wo (engine/kernels/combine_wo.py), run by
tests/test_combine_wo.py in a subprocess with TRITON_INTERPRET=1. Exits non-zero with the failing
check's message; prints "ok".

The partials are made here, not by the split kernel, so every dtype runs (the interpreter's
tl.dot mishandles bfloat16): acc, m and l as a split kernel leaves them, with empty splits
(m = -inf, l = 0, acc = 0). The reference combines them in float64, rounds the attention to the
dtype as the combine kernel stores it, then wo's product rounded and the residual added as
gemv_add adds it (the bfloat16 roundings toward zero where this interpreter rounds so:
fused_step_worker.rounder)."""

from __future__ import annotations

import torch

from infermeter.engine import model as model_module
from infermeter.engine import self_attention as attention_module
from infermeter.engine.kernels import combine_wo
from infermeter.engine.kernels.combine_wo import _combine_gemv_add, combine_gemv_add
from infermeter.engine.kernels.decode_attention import _combine_kernel
from infermeter.engine.kernels.fused_step import gemv_add
from infermeter.engine.kernels.pdl import launch
from tests.fused_step_worker import ULP, close, rounder
from tests.greedy import greedy_decode
from tests.triton_interpreter import run_checks


def partials(gen: torch.Generator, kv_heads: int, splits: int, groups: int, head_dim: int,
             used: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A split kernel's acc [H_kv, splits, G, D], m, l [H_kv, splits, G] float32, its first
    `used` splits seen (m finite, l >= 1: each holds its own max's weight 1), the rest empty."""
    acc = torch.randn(kv_heads, splits, groups, head_dim, generator=gen)
    m = 3 * torch.randn(kv_heads, splits, groups, generator=gen)
    l_sum = 1 + 5 * torch.rand(kv_heads, splits, groups, generator=gen)
    acc[:, used:], m[:, used:], l_sum[:, used:] = 0.0, float("-inf"), 0.0
    return acc, m, l_sum


def reference_attention(acc, m, l_sum, sinks) -> torch.Tensor:
    """The combine in float64: [1, H_kv * G * D]."""
    top = m.double().amax(1, keepdim=True)  # [H_kv, 1, G]
    if sinks is not None:
        top = torch.maximum(top, sinks.double().view(1, 1, -1).reshape(top.shape))
    weight = (m.double() - top).exp()
    total = (l_sum.double() * weight).sum(1)  # [H_kv, G]
    if sinks is not None:
        total = total + (sinks.double().view(total.shape) - top.squeeze(1)).exp()
    out = (acc.double() * weight[..., None]).sum(1) / total[..., None]
    return out.reshape(1, -1)


def combined(acc, m, l_sum, sinks, dtype) -> torch.Tensor:
    """The combine kernel's output [1, K] (the two-kernel path's first half)."""
    rows, splits, groups, head_dim = acc.shape
    out = torch.empty(rows * groups * head_dim, dtype=dtype)
    launch(_combine_kernel, (rows * groups,), False, acc, m, l_sum, out,
           m if sinks is None else sinks, groups, splits, rows,
           S_PAD=1 << (splits - 1).bit_length(), D=head_dim, HAS_SINKS=sinks is not None)
    return out.view(1, -1)


def check_against_the_reference_and_the_two_kernels() -> None:
    """GQA and MHA shapes; 1, 3 and 5 splits (S_PAD above the count), some empty; with and
    without gpt-oss's sinks; float32, float16, bfloat16; tiles with ragged rows, and the
    default tiles (fold_tiles); heads not a power of two: the folded kernel equals the
    reference within the product's rounding, and the combine kernel + gemv_add within the
    same (the attention's float32 sums may run in another order)."""
    gen = torch.Generator().manual_seed(21)
    cases = ((3, 5, 3, 16, 3, 37), (2, 1, 4, 32, 1, 24), (4, 3, 1, 16, 2, 19))
    for n, (kv_heads, splits, groups, head_dim, used, n_out) in enumerate(cases):
        for dtype in ULP:
            rnd = rounder(dtype)
            acc, m, l_sum = partials(gen, kv_heads, splits, groups, head_dim, used)
            n_cols = kv_heads * groups * head_dim
            sinks = 2 * torch.randn(kv_heads * groups, generator=gen) if n == 0 else None
            weight = torch.randn(n_out, n_cols, generator=gen).to(dtype)
            residual = torch.randn(1, n_out, generator=gen).to(dtype)
            attention = rnd(reference_attention(acc, m, l_sum, sinks).float())
            want = rnd(residual.float() + rnd(attention.float() @ weight.float().T))
            scale = (attention.float().abs() @ weight.float().abs().T).max().item()
            two = gemv_add(combined(acc, m, l_sum, sinks, dtype), weight, residual)
            for tiles in ((4, 4), None):
                got = _combine_gemv_add(acc, m, l_sum, sinks, weight, residual, False, tiles)
                what = f"case {n} {dtype} tiles {tiles}"
                assert got.dtype == dtype and got.shape == (1, n_out), what
                # one ulp of the attention's rounding may flip against float64's, in any term
                flip = 2 * ULP[dtype] * scale
                close(got, want, scale, flip, f"{what} against the reference")
                close(got, two.float(), scale, flip, f"{what} against the two kernels")
            # the op: the default tiles' launch (the loop's last)
            assert torch.equal(combine_gemv_add(acc, m, l_sum, sinks, weight, residual), got), \
                f"case {n} {dtype}: the op"


def check_tiles() -> None:
    """fold_tiles: rows enough for at most about one program an SM (135M's wo on 132 SMs: 576
    rows, 8 a program; 1B's 2048, 16), one at least; mismatched partials refused."""
    assert combine_wo.fold_tiles(576, 132) == (8, combine_wo.WARPS)
    assert combine_wo.fold_tiles(2048, 132) == (16, combine_wo.WARPS)
    assert combine_wo.fold_tiles(10, 132) == (1, combine_wo.WARPS)
    acc, m, l_sum = partials(torch.Generator().manual_seed(0), 2, 2, 2, 16, 2)
    try:
        combine_gemv_add(acc, m, l_sum, None, torch.zeros(8, 60), torch.zeros(1, 8))
    except ValueError as err:
        assert "64 columns for wo of 60" in str(err), err
    else:
        raise AssertionError("partials of 64 columns taken for wo of 60")


def check_model_step() -> None:
    """The debug model's batch-1 fused step with the split-KV kernel (while 'compiling', every
    kernel run by the interpreter), the combine folded into wo: eager's greedy tokens, logits
    within float32 sum-order error of eager's; no layer runs the combine kernel's op and each
    runs the folded one once (the fused step unfolded is checked against eager in
    fused_step_worker.py). Llama with a ring layer, float32;
    with prefetch on, the fold is refused."""
    from infermeter.engine.fusion import fuse_projections
    from infermeter.engine.kernels import decode_attention
    from infermeter.engine.kernels import prefetch as prefetch_module
    from infermeter.engine.model import build_model, set_step_kernels
    from infermeter.engine.opaque_ops import compiling
    from infermeter.specs.presets import PRESETS

    calls: list[str] = []

    def counted(module, name):
        real = getattr(module, name)
        setattr(module, name, lambda *args, **kwargs: calls.append(name) or real(*args, **kwargs))

    counted(decode_attention, "decode_attention_kernel")
    counted(combine_wo, "combine_matvec_add")
    spec = PRESETS["debug"].with_updates(sliding_window=3, sliding_window_layers=(1,))
    steps, prompt = 2, 4
    tokens, logits = {}, {}
    for way in ("eager", "on"):  # off: the fused step itself, against eager in its own tests
        on = way != "eager"
        attention_module.compiling = model_module.compiling = compiling if not on \
            else (lambda: True)
        combine_wo.FOLD = "on" if way == "on" else "off"
        model = build_model(spec, seed=3, dtype=torch.float32)
        fuse_projections(model)
        set_step_kernels(model, "fused" if on else "split")
        for layer in model.layers:
            layer.attention.decode_attention = "triton"
        model.setup_cache(1, 16)
        ids = torch.randint(0, spec.vocab_size, (1, prompt),
                            generator=torch.Generator().manual_seed(2))
        tokens[way], logits[way] = greedy_decode(model, ids, steps, calls.clear)
        want = {"eager": [],
                "on": ["combine_matvec_add"]}[way] * spec.n_layers * steps
        assert calls == want, f"{way}: ran {calls}"
    assert torch.equal(tokens["on"], tokens["eager"]), "folded tokens differ from eager"
    err = (logits["on"] - logits["eager"]).abs().max().item()
    assert err < 1e-4, f"folded logits differ from eager's by {err}"
    prefetch_module.DISTANCE = 2
    try:
        combine_wo.folds()
    except ValueError as err:
        assert "prefetch distance 0" in str(err), err
    else:
        raise AssertionError("the fold taken with prefetch on")
    prefetch_module.DISTANCE = 0
    combine_wo.FOLD = "off"


if __name__ == "__main__":
    run_checks(check_tiles, check_against_the_reference_and_the_two_kernels, check_model_step)
