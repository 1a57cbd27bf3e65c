"""Checks of the split-KV decode kernel, run by tests/test_decode_kernel.py in a subprocess with
TRITON_INTERPRET=1 (Triton executes the kernel on the CPU; the variable must be set before
Triton is imported, hence the separate process). Exits non-zero with the failing check's
message; prints "ok" at the end."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from infermeter.engine import model as model_module
from infermeter.engine import self_attention as attention_module
from infermeter.engine.attention import decode_attention
from infermeter.engine.kernels import decode_attention as attention_kernels
from infermeter.engine.kernels import swiglu as swiglu_kernels
from infermeter.engine.kernels.decode_attention import BLOCK_N, kernel_usable, split_kv_decode
from infermeter.engine.kernels.swiglu import silu_mul_triton
from infermeter.engine.model import build_model
from infermeter.specs.presets import PRESETS


def reference(q, k, v, key_pos, pos, window, sinks=None):
    visible = (key_pos >= 0) & (key_pos <= pos)
    if window > 0:
        visible &= pos - key_pos < window
    return decode_attention(q, k, v, visible[None, :].expand(q.shape[2], -1),
                            sinks=None if sinks is None else sinks.view(q.shape[1], -1))


def check_against_math() -> None:
    """MHA, GQA and MQA shapes, first / middle / last position, 1 to 8 splits (some splits
    empty), with and without a window, full and ring slot layouts. GQA runs every (position,
    layout, splits) at batch 1; MHA and MQA (the same code, other head counts) at batch 2 (a
    second sequence's strides) every (position, layout) with one split count each, in turn, so
    each split count meets each layout and position at both batch sizes (the interpreter's cost
    is per program: B x H_kv x splits, and B x H_kv x G in the combine)."""
    gen = torch.Generator().manual_seed(0)
    slots = 2 * BLOCK_N + 5  # not a multiple of the block: a ragged last block
    for n_kv_heads, groups in ((2, 1), (2, 4), (1, 8)):
        batch = 1 if groups == 4 else 2
        q = torch.randn(batch, n_kv_heads, groups, 16, generator=gen)
        k, v = (torch.randn(batch, n_kv_heads, slots, 16, generator=gen) for _ in range(2))
        for p, pos in enumerate((0, 70, slots - 1)):
            for i, (is_ring, window) in enumerate(((False, 0), (False, 9), (True, 0), (True, 9))):
                if is_ring:  # slots hold scattered positions, some never written (-1)
                    key_pos = torch.randperm(slots, generator=gen) - 3
                    key_pos[key_pos == pos] = -1
                    key_pos[pos % slots] = pos  # the current token is always in the cache
                else:
                    key_pos = torch.arange(slots)
                want = reference(q, k, v, key_pos, pos, window)
                every = (1, 3, 8)
                for splits in every if groups == 4 else (every[(p + i) % 3],):
                    got = split_kv_decode(q, k, v, key_pos, torch.tensor([pos]), window,
                                          is_ring, splits)
                    err = (got - want).abs().max().item()
                    case = f"kv_heads {n_kv_heads} groups {groups} pos {pos} ring {is_ring} " \
                        f"window {window} splits {splits}"
                    assert got.shape == want.shape and err < 1e-5, f"{case}: max error {err}"


def check_unsplit() -> None:
    """n_splits 0, the unsplit kernel (one program a row over its whole cache, no combine):
    the math path's output for GQA and MQA, full and ring layouts, windows, first / middle /
    last positions, with and without gpt-oss's sinks; where the cache is one block (at most
    BLOCK_N slots) the two kernels' output at one split to the bit, plain, with sinks and with
    Gemma 2's cap (one split's combine weighs it by exp(0) = 1 and divides once, as the
    unsplit kernel does); a full layer never reads past the position."""
    gen = torch.Generator().manual_seed(6)
    # a block of 128 with 28 slots off (GQA), then one block (GQA and MQA)
    for slots, heads in ((BLOCK_N + 36, ((2, 4),)), (BLOCK_N - 14, ((2, 4), (1, 8)))):
        for n_kv_heads, groups in heads:
            q = torch.randn(2, n_kv_heads, groups, 16, generator=gen)
            k, v = (torch.randn(2, n_kv_heads, slots, 16, generator=gen) for _ in range(2))
            sinks = torch.randn(n_kv_heads * groups, generator=gen) * 2
            # each position meets one layout, each layout one position (the interpreter's
            # cost is a dot of the whole block a program)
            for pos, (is_ring, window) in zip((0, 37, slots - 1),
                                              ((True, 0), (False, 9), (False, 0)), strict=True):
                key_pos = torch.arange(slots)
                if is_ring:
                    key_pos = torch.randperm(slots, generator=gen) - 3
                    key_pos[key_pos == pos] = -1
                    key_pos[pos % slots] = pos
                at = torch.tensor([pos])
                case = f"unsplit: slots {slots} kv_heads {n_kv_heads} pos {pos} " \
                    f"ring {is_ring} window {window}"
                got = split_kv_decode(q, k, v, key_pos, at, window, is_ring, 0)
                err = (got - reference(q, k, v, key_pos, pos, window)).abs().max().item()
                assert err < 1e-5, f"{case}: max error {err}"
                sunk = split_kv_decode(q, k, v, key_pos, at, window, is_ring, 0, 0.0, sinks)
                want = reference(q, k, v, key_pos, pos, window, sinks)
                err = (sunk - want).abs().max().item()
                assert err < 1e-5 and (sunk - got).abs().max() > 1e-3, \
                    f"{case}, sinks: max error {err}"
                if slots <= BLOCK_N and pos == 37:  # the windowed layout's position
                    for softcap, sink in ((0.0, None), (0.0, sinks), (5.0, None)):
                        args = (q, k, v, key_pos, at, window, is_ring)
                        assert torch.equal(split_kv_decode(*args, 0, softcap, sink),
                                           split_kv_decode(*args, 1, softcap, sink)), \
                            f"{case}, cap {softcap}: not one split's output to the bit"
    k[:, :, 41:], v[:, :, 41:] = float("nan"), float("nan")
    got = split_kv_decode(q, k, v, torch.arange(slots), torch.tensor([40]), 0, False, 0)
    assert torch.isfinite(got).all(), "unsplit: a slot after the position was read"


def check_the_late_block_changes_no_bit() -> None:
    """EARLY_BLOCK off (a one-block split program loads its block after the wait, as the loop
    does): the same output to the bit, full and ring layouts, with a window."""
    from infermeter.engine.kernels.decode_attention import _split_kv_decode

    gen = torch.Generator().manual_seed(8)
    q = torch.randn(1, 2, 4, 16, generator=gen)
    k, v = (torch.randn(1, 2, 2 * BLOCK_N + 5, 16, generator=gen) for _ in range(2))
    ring_pos = torch.randperm(k.shape[2], generator=gen) - 3
    ring_pos[70 % k.shape[2]] = 70
    for key_pos, is_ring, window in ((torch.arange(k.shape[2]), False, 0),
                                     (ring_pos, True, 9)):
        args = (q, k, v, key_pos, torch.tensor([70]), window, is_ring, 3, 0.0)  # 45-slot chunks
        early = _split_kv_decode(*args, pdl=False)
        late = _split_kv_decode(*args, pdl=False, early_block=False)
        assert torch.equal(early, late), f"ring {is_ring}: the late block changed the output"


def check_half_precision() -> None:
    """float16 inputs (the GPU's case): fp16 out, within fp16 rounding of a float32 reference.
    (bfloat16 cannot be checked here: the interpreter's tl.dot mishandles it; the gpu test runs
    the kernel in bfloat16 too.)"""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, n, 32, generator=gen) for n in (4, 130, 130))
    key_pos = torch.arange(130)
    want = reference(q, k, v, key_pos, 90, 0)
    got = split_kv_decode(q.half(), k.half(), v.half(), key_pos, torch.tensor([90]), 0, False, 3)
    err = (got.float() - want).abs().max().item()
    assert got.dtype == torch.float16 and err < 2e-3, f"float16: max error {err}"


def check_full_layer_never_reads_past_the_position() -> None:
    """A full layer stops at the current position: NaN in every later slot changes nothing
    (with gpt-oss's sinks too, which must match the math path's)."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 4, 16, generator=gen)
    k, v = (torch.randn(1, 2, 100, 16, generator=gen) for _ in range(2))
    want = reference(q, k, v, torch.arange(100), 40, 0)
    k[:, :, 41:], v[:, :, 41:] = float("nan"), float("nan")
    for splits in (1, 4, 7):
        got = split_kv_decode(q, k, v, torch.arange(100), torch.tensor([40]), 0, False, splits)
        assert torch.isfinite(got).all(), f"splits {splits}: a slot after the position was read"
        assert (got - want).abs().max() < 1e-5, f"splits {splits}: wrong values"
    # gpt-oss's sinks [H_kv * G], one per query head, in the combine; 7 splits leave 4 empty
    sinks = torch.randn(8, generator=gen) * 2
    visible = (torch.arange(100) <= 40)[None, :].expand(4, -1)
    sunk = decode_attention(q, k.nan_to_num(), v.nan_to_num(), visible, sinks=sinks.view(2, 4))
    got = split_kv_decode(q, k, v, torch.arange(100), torch.tensor([40]), 0, False, 7, 0.0,
                          sinks)
    err = (got - sunk).abs().max().item()
    assert err < 1e-5 and (sunk - want).abs().max() > 1e-2, f"sinks: max error {err}"


def check_swiglu_kernel() -> None:
    """silu_mul_triton on the two halves of a fused w13 output (strided views, a width that is
    not a multiple of the block): equal to eager's silu(gate) * up, to rounding; at every
    block of swiglu.BLOCKS the same bits (a column's maths does not depend on its program)."""
    from infermeter.engine.kernels import swiglu
    from infermeter.engine.kernels.swiglu import silu_mul_triton

    h13 = torch.randn(3, 1, 2 * 2500, generator=torch.Generator().manual_seed(5)) * 4
    for dtype, ulp in ((torch.float32, 2.0 ** -23), (torch.float16, 2.0 ** -10)):
        gate, up = h13.to(dtype).chunk(2, dim=-1)
        got, want = silu_mul_triton(gate, up), F.silu(gate) * up
        assert got.dtype == dtype and got.shape == want.shape, f"swiglu {dtype}: wrong output"
        # within 2 units in the last place of each value (Triton's exp is not CUDA's expf)
        torch.testing.assert_close(got.float(), want.float(), rtol=2 * ulp, atol=2 * ulp,
                                   msg=lambda m, d=dtype: f"swiglu {d}: {m}")
        kept = swiglu.BLOCK
        try:
            for block in swiglu.BLOCKS:
                swiglu.set_block(block)
                assert torch.equal(silu_mul_triton(gate, up), got), f"swiglu block {block}"
        finally:
            swiglu.set_block(kept)


def check_gemv_kernel() -> None:
    """gemv against float32 products rounded once, in each tiling tiles_for picks: ragged shapes
    (rows not a multiple of BLOCK_N, columns not of BLOCK_K, three column steps of 4096 with
    the last one partial), a row-strided weight (a fused matrix's view), float32 and float16;
    and as the PDL launch runs it (pdl=True: the first FIRST_K columns in one wider tile
    loaded first; no PDL wait under the interpreter), e.g. 9000 columns as 8192 + a ragged
    808."""
    from infermeter.engine.kernels.gemv import _gemv, first_columns, gemv, tiles_for

    gen = torch.Generator().manual_seed(7)
    shapes = ((37, 1100), (9, 5000), (5, 9000), (3, 4096), (64, 512), (3, 5), (7, 2560))
    assert {tiles_for(k) for _, k in shapes} == {(4, 2048, 8), (1, 4096, 16), (2, 4096, 16),
                                                 (4, 1024, 8), (1, 2048, 8), (4, 4096, 8)}
    assert {first_columns(k, *tiles_for(k)[:2]) for _, k in shapes} == {1024, 2048, 4096, 8192}
    for n_rows, n_cols in shapes:
        x = torch.randn(1, n_cols, generator=gen)
        w = torch.randn(n_rows + 4, n_cols, generator=gen)[2:n_rows + 2]  # rows of a bigger one
        for dtype, ulp in ((torch.float32, 2.0 ** -23), (torch.float16, 2.0 ** -10)):
            xd, wd = x.to(dtype), w.to(dtype)
            want = (xd.float() @ wd.float().T).to(dtype)
            scale = (xd.float().abs() @ wd.float().abs().T).max().item()  # error bound's size
            for how, got in (("gemv", gemv(xd, wd)), ("pdl", _gemv(xd, wd, pdl=True))):
                assert got.dtype == dtype and got.shape == (1, n_rows), f"{how} {dtype}: shape"
                torch.testing.assert_close(got.float(), want.float(), rtol=2 * ulp,
                                           atol=8 * 2.0 ** -23 * scale + 2 * ulp,
                                           msg=lambda m, d=dtype, h=how: f"{h} {d}: {m}")


def check_model_gemv() -> None:
    """The model's batch-1 steps with every Linear on the GEMV kernel (while 'compiling') give
    F.linear's logits, through the plain op and through its PDL twin (pdl.launching: the
    custom op gemv_pdl; PDL itself is compiled in on a GPU only); the prefill's many-row
    products stay F.linear."""
    from infermeter.engine import linear as linear_module
    from infermeter.engine.kernels import gemv as gemv_module
    from infermeter.engine.kernels import pdl
    from infermeter.engine.kernels.gemv import gemv, gemv_pdl, matvec
    from infermeter.engine.linear import set_matvec_kernel

    linear_module.compiling = lambda: True
    calls = []
    real_ops = {"gemv": gemv, "gemv_pdl": gemv_pdl}

    def counted(x, weight):
        calls.append(tuple(weight.shape))
        return matvec(x, weight)

    gemv_module.matvec = counted  # Linear imports it from there where a step takes it
    # 128 x 64 tiles for every product: the interpreter's cost is per program (check_gemv_kernel
    # covers tiles_for's own tiles; w2's 176 columns still take three tiles, the last ragged)
    real_tiles = gemv_module.tiles_for
    gemv_module.tiles_for = lambda n_cols, gpu="": (128, 64, 4)
    spec = PRESETS["debug"]
    steps = 2  # one-row products are alike at every position: two steps show each is taken
    tokens = torch.randint(0, spec.vocab_size, (1, 4 + steps),
                           generator=torch.Generator().manual_seed(4))
    logits = {}
    ops_seen = []
    for name, op in real_ops.items():  # which of the two ops matvec calls
        setattr(gemv_module, name, lambda *a, _op=op, _n=name: ops_seen.append(_n) or _op(*a))
    for kind in ("inductor", "triton", "triton-pdl"):
        model = build_model(spec, seed=5)
        set_matvec_kernel(model, kind.removesuffix("-pdl"))
        model.setup_cache(1, 12)
        with torch.inference_mode(), pdl.launching(kind.endswith("-pdl")):
            outs = [model(tokens[:, :4], torch.arange(4))]
            outs += [model(tokens[:, i:i + 1], torch.tensor([i])) for i in range(4, 4 + steps)]
        logits[kind] = torch.cat(outs, dim=1)
    per_step = 7 * spec.n_layers + 1  # q, k, v, o, gate, down, up a layer, and the output head
    assert len(calls) == 2 * steps * per_step, \
        f"gemv ran {len(calls)} times, not {2 * steps * per_step}"
    assert ops_seen == ["gemv"] * steps * per_step + ["gemv_pdl"] * steps * per_step, ops_seen
    err = (logits["triton"] - logits["inductor"]).abs().max().item()
    assert err < 1e-5, f"gemv model logits differ by {err}"
    assert torch.equal(logits["triton-pdl"], logits["triton"])
    gemv_module.tiles_for = real_tiles


def check_model_decode() -> None:
    """The model's one-token steps with decode_attention="triton" (while 'compiling') give the
    math path's logits, split and unsplit (UNSPLIT on: every call's n_splits 0): a GQA model,
    and one with a wrapping sliding-window ring layer."""
    # the kernel is picked only while tracing (self_attention.py); the layers' own checks too
    model_module.compiling = attention_module.compiling = lambda: True
    calls = []

    kernel = attention_kernels.decode_attention_kernel  # honours UNSPLIT
    splits_seen = []  # the split count the op was given: 0 unsplit

    def counted(*args, fused_step=False):
        calls.append(args[0].shape)
        assert not fused_step  # the split step's layers (EARLY_BLOCK "auto": their block late)
        return kernel(*args, fused_step=fused_step)

    def op(*args):
        splits_seen.append(args[7])
        return split_kv_decode(*args)

    attention_kernels.split_kv_decode = op

    # the model imports the kernels from their modules where a compiled step takes them
    attention_kernels.decode_attention_kernel = counted
    activations = []

    def counted_act(gate, up):
        activations.append(gate.shape)
        return silu_mul_triton(gate, up)

    swiglu_kernels.silu_mul_kernel = counted_act
    debug = PRESETS["debug"]
    steps = 6  # positions 4-9: the 5-slot ring wraps (slot 0 holds 5, then all five rewritten)
    for spec in (debug, debug.with_updates(arch="mistral", sliding_window=5,
                                           sliding_window_layers=(1,))):
        tokens = torch.randint(0, spec.vocab_size, (2, 4 + steps), generator=torch.Generator()
                               .manual_seed(2))
        logits = {}
        for kind in ("math", "triton", "unsplit"):
            attention_kernels.UNSPLIT = "on" if kind == "unsplit" else "off"
            kind_asked = "triton" if kind == "unsplit" else kind
            model = build_model(spec, seed=3)
            model.setup_cache(2, 16)
            for layer in model.layers:
                layer.attention.decode_attention = kind_asked
                layer.feed_forward.activation_kernel = "aten" if kind == "math" else "triton"
            with torch.inference_mode():
                outs = [model(tokens[:, :4], torch.arange(4))]
                outs += [model(tokens[:, i:i + 1], torch.tensor([i])) for i in range(4, 4 + steps)]
            logits[kind] = torch.cat(outs, dim=1)
            if kind != "math":
                assert set(splits_seen) == ({0} if kind == "unsplit" else {1}), splits_seen
                splits_seen.clear()
        assert len(calls) == 2 * steps * spec.n_layers, f"the kernel ran {len(calls)} times"
        # the activation kernel also runs in the 4-token prefill while "compiling" is forced
        assert len(activations) == 2 * (steps + 1) * spec.n_layers, \
            f"swiglu ran {len(activations)} times"
        calls.clear()
        activations.clear()
        for kind in ("triton", "unsplit"):
            err = (logits[kind] - logits["math"]).abs().max().item()
            assert err < 1e-5, f"{spec.arch}, {kind}: model logits differ by {err}"
        assert kernel_usable(torch.empty(1, 1, 1, 16))
    attention_kernels.UNSPLIT = "off"
    attention_kernels.split_kv_decode = split_kv_decode


if __name__ == "__main__":
    check_against_math()
    check_unsplit()
    check_the_late_block_changes_no_bit()
    check_half_precision()
    check_swiglu_kernel()
    check_full_layer_never_reads_past_the_position()
    check_model_decode()
    check_gemv_kernel()
    check_model_gemv()
    print("ok")
