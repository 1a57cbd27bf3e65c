"""The Triton kernels: split-KV decode attention, SwiGLU activation, GEMV (engine/*_kernel.py).

The kernel itself runs under Triton's CPU interpreter in a subprocess (tests/decode_kernel_worker
.py: against the math attention for MHA/GQA/MQA, windows, ring layouts, 1-8 splits; a full layer
never reads past the position; swiglu_kernel.py's activation against eager's; the model's steps
with both kernels equal math's; gemv_kernel.py's GEMV against float32 products, and the model's
batch-1 steps with every Linear on it against F.linear's). Triton comes with the test
extras on Linux x86-64; elsewhere that test skips. On a GPU the compiled path is a `gpu` test.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from infermeter.engine.kernels.decode_attention import BLOCK_N, kernel_usable, split_count
from infermeter.engine.model import build_model
from infermeter.specs.presets import PRESETS
from tests.sm90_build import (
    LAUNCH_OPTIONS,
    inductor_signature,
    launch_recorder,
    recorded_launches,
    sm90_binary,
)
from tests.triton_interpreter import run_under_interpreter

WORKER = Path(__file__).with_name("decode_kernel_worker.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_kernel_under_the_triton_interpreter():
    run_under_interpreter(WORKER)


def test_split_count_fills_the_gpu_without_chunks_under_a_block():
    cpu = torch.device("cpu")  # assumes 132 SMs (an H100) off the GPU
    assert split_count(32, 512, cpu) == 512 // BLOCK_N  # 7B, batch 1: capped by the chunk size
    assert split_count(32, 8192, cpu) == 17  # ceil(4 * 132 / 32): ~4 programs per SM
    assert split_count(1024, 512, cpu) == 1  # batch 32: enough programs already
    assert split_count(8, 40, cpu) == 1  # a cache shorter than one block


def test_kernel_is_used_only_where_triton_runs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernel_usable(torch.empty(1, 1, 1, 128))  # a CPU tensor, no interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    has_triton = importlib.util.find_spec("triton") is not None
    assert kernel_usable(torch.empty(1, 1, 1, 128)) == has_triton
    assert not kernel_usable(torch.empty(1, 1, 1, 80))  # not a power of two
    assert not kernel_usable(torch.empty(1, 1, 1, 8))  # under tl.dot's 16


@torch.inference_mode()
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_auto_attention_calls_the_kernel_at_every_batch(monkeypatch, batch):
    """The default "auto" in a compiled one-token step (compiling() patched true, the kernel
    usable): the split-KV kernel at any batch size (measured on an H100: batches 1, 4 and 32
    gain since its combine is a Triton kernel)."""
    from infermeter.engine import model as model_module
    from infermeter.engine import self_attention as attention_module
    from infermeter.engine.attention import decode_attention

    calls = []

    def kernel(q, keys, values, *rest, fused_step=None):  # its contract, the math way
        calls.append((q.shape[0], fused_step))
        groups = q.shape[2]
        visible = torch.arange(keys.shape[2]) <= rest[1][0]
        return decode_attention(q, keys, values, visible.expand(groups, -1))

    monkeypatch.setattr(model_module, "compiling", lambda: True)
    monkeypatch.setattr(attention_module, "compiling", lambda: True)
    monkeypatch.setattr(attention_module, "decode_kernel_usable", lambda q: True)
    # the step imports the kernel from its module when it takes it (self_attention.py says why)
    monkeypatch.setattr("infermeter.engine.kernels.decode_attention.decode_attention_kernel",
                        kernel)
    model = build_model(PRESETS["debug"], seed=1)
    assert {layer.attention.decode_attention for layer in model.layers} == {"auto"}
    model.setup_cache(batch, 8)
    tokens = torch.randint(0, 256, (batch, 5), generator=torch.Generator().manual_seed(0))
    model(tokens[:, :4], torch.arange(4))  # prefill: SDPA, never the kernel
    assert calls == []
    model(tokens[:, 4:], torch.tensor([4]))
    # the split step's: under EARLY_BLOCK "auto" its one-block programs load after the wait
    assert calls == [(batch, False)] * PRESETS["debug"].n_layers


@torch.inference_mode()
def test_the_attention_tells_the_kernel_when_the_fused_step_surrounds_it(monkeypatch):
    """An attention handed the residual (the fused step's wo + add kernel after it) calls the
    split-KV kernel with fused_step, so EARLY_BLOCK "auto" loads a one-block program's block
    before the wait there; without it (the split step), not. The fused kernels are stand-ins
    computing the same thing in torch: the products' rounding is their own tests' matter."""
    from infermeter.engine import self_attention as attention_module
    from infermeter.engine.attention import decode_attention

    calls = []

    def kernel(q, keys, values, key_pos, query_pos, *rest, fused_step=None):
        calls.append(fused_step)
        visible = key_pos <= query_pos[0]
        return decode_attention(q, keys, values, visible.expand(q.shape[2], -1))

    def matvec_add(x, weight, residual, ahead=None):  # [1, K] @ [N, K].T + [1, N]
        return residual + x @ weight.T

    monkeypatch.setattr(attention_module, "compiling", lambda: True)
    monkeypatch.setattr(attention_module, "decode_kernel_usable", lambda q: True)
    monkeypatch.setattr("infermeter.engine.kernels.decode_attention.decode_attention_kernel",
                        kernel)
    monkeypatch.setattr("infermeter.engine.kernels.fused_step.matvec_add", matvec_add)
    model = build_model(PRESETS["debug"], seed=1)
    model.setup_cache(1, 8)
    attention = model.layers[0].attention
    x = torch.randn(1, 1, PRESETS["debug"].dim, generator=torch.Generator().manual_seed(0))
    cos, sin = (t[4:5] for t in (model.rope_cos, model.rope_sin))
    split = attention(x, cos, sin, torch.tensor([4]))
    fused = attention(x, cos, sin, torch.tensor([4]), residual=x)
    assert calls == [False, True]
    torch.testing.assert_close(fused, x + split)  # the same attention, the residual added


@torch.inference_mode()
def test_without_triton_the_triton_choices_fall_back(monkeypatch):
    """On a CPU without the interpreter, a model asking for the Triton attention and activation
    still compiles (fullgraph) to the math attention and the opaque eager activation, with the
    math path's logits."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tokens = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    logits, graphs = {}, []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for kind in ("math", "triton"):
        model = build_model(PRESETS["debug"], seed=1)
        model.setup_cache(1, 8)
        for layer in model.layers:
            layer.attention.decode_attention = kind
            layer.feed_forward.activation_kernel = "triton" if kind == "triton" else "aten"
        step = torch.compile(model, fullgraph=True, dynamic=False, backend=keep)
        outs = [model(tokens[:, :4], torch.arange(4))]
        outs += [step(tokens[:, i:i + 1], torch.tensor([i])) for i in range(4, 8)]
        logits[kind] = torch.cat(outs, dim=1)
        torch._dynamo.reset()
    targets = [str(node.target) for node in graphs[-1].graph.nodes]
    assert targets.count("infermeter.silu_mul.default") == PRESETS["debug"].n_layers
    assert not any("triton" in target or "split_kv" in target for target in targets)
    torch.testing.assert_close(logits["triton"], logits["math"], atol=1e-6, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_compile_for_an_h100_without_one(monkeypatch, dtype):
    """Triton compiles the kernels to sm_90 machine code here, with no GPU (ptxas ships with
    Triton), launched exactly as the ops launch them and typed as inductor types them: the GPU
    path's type and shape rules (loop bounds, tl.dot sizes, no float64) hold, for full and ring
    layouts, 64- and 128-wide heads, MHA/GQA and a soft cap (Gemma 2), in float16 and
    bfloat16."""
    from infermeter.engine.kernels.decode_attention import split_kv_decode
    from infermeter.engine.kernels.gemv import gemv
    from infermeter.engine.kernels.swiglu import silu_mul_triton

    def attention(head_dim: int, groups: int, ring: bool, softcap: float = 0.0):
        q = torch.zeros(2, 4, groups, head_dim, dtype=dtype)
        cache = torch.zeros(2, 4, 256, head_dim, dtype=dtype)
        pos = torch.arange(256)
        return lambda: split_kv_decode(q, cache, cache, pos, pos[:1], 64 if ring else 0,
                                       ring, 3, softcap)

    gate = torch.zeros(3, 1000, dtype=dtype)
    def matvec(n_cols: int):  # each of gemv_kernel.tiles_for's tilings
        row, weight = torch.zeros(1, n_cols, dtype=dtype), torch.zeros(37, n_cols, dtype=dtype)
        return lambda: gemv(row, weight)

    calls = [attention(128, 1, False), attention(64, 4, True), attention(128, 8, False),
             attention(256, 2, True, 50.0), lambda: silu_mul_triton(gate, gate), matvec(1100),
             matvec(2560), matvec(4096), matvec(5120), matvec(6912), matvec(11008)]
    launches = [launch for call in calls for launch in recorded_launches(monkeypatch, call)]
    assert len(launches) == len(calls) + 4  # the attention calls launch a combine kernel too
    for kernel, args, kwargs in launches:
        constants = {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
        signature = inductor_signature(kernel, args, constants)
        assert list(signature) == [p.name for p in kernel.params]  # every argument typed
        binary = sm90_binary(kernel, args, kwargs)
        assert binary.asm["cubin"]
        assert binary.metadata.num_warps == kwargs.get("num_warps", 4)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("sinks", [False, True])
def test_the_combine_loads_a_heads_maxima_and_sums_once(monkeypatch, sinks):
    """The combine kernel (one program a query head) loads its head's split maxima and sums as
    one column [S_PAD, 1], not once per output element: its sm_90 build at batch 8 of Llama-3.2-
    1B's attention (8 KV heads of 4 queries, 64 wide, 8 splits, PDL) has at most 4 global load
    instructions (5 with sinks), where the per-element form had 9 (13) and ran about 1.5 us
    longer a layer on an H100 (docs/engine.md, "Batch 8 and 32 at Llama-3.2-1B")."""
    import re

    from infermeter.engine.kernels import pdl
    from infermeter.engine.kernels.decode_attention import _split_kv_decode

    monkeypatch.setattr(pdl, "on_gpu", lambda tensor: True)  # the PDL launches, recorded
    q = torch.zeros(8, 8, 4, 64, dtype=torch.bfloat16)
    cache = torch.zeros(8, 8, 512, 64, dtype=torch.bfloat16)
    pos = torch.arange(512)
    sink = torch.zeros(32, dtype=torch.float32) if sinks else None
    launches = []
    monkeypatch.setattr(pdl, "direct", launch_recorder(launches))

    _split_kv_decode(q, cache, cache, pos, pos[100:101], 0, False, 8, 0.0, True, sinks=sink)
    (kernel, args, kwargs), = [launch for launch in launches
                               if launch[0].fn.__name__ == "_combine_kernel"]
    assert kwargs["PDL"] and kwargs["HAS_SINKS"] is sinks
    ptx = sm90_binary(kernel, args, kwargs).asm["ptx"]
    loads = re.findall(r"^\s*(?:@%p\d+\s+)?ld\.global", ptx, flags=re.MULTILINE)
    assert len(loads) <= (5 if sinks else 4), ptx


def test_linear_takes_the_gemv_kernel_only_for_one_row_in_a_compiled_step(monkeypatch):
    """engine/linear.py: the GEMV kernel for a one-row product while compiling, with
    matvec_kernel "triton" and a usable kernel; F.linear otherwise. The module's forward hooks
    (tensor parallelism's collectives) run around either."""
    from infermeter.engine import linear as linear_module
    from infermeter.engine.kernels import gemv as gemv_module  # Linear imports from it
    from infermeter.engine.linear import Linear, set_matvec_kernel

    calls = []

    def fake_gemv(x, weight):  # the kernel's contract, computed by torch
        calls.append(tuple(x.shape))
        return x @ weight.T

    real_usable = gemv_module.gemv_usable
    monkeypatch.setattr(gemv_module, "matvec", fake_gemv)
    layer = Linear(6, 4, bias=True)
    hooked = []
    layer.register_forward_hook(lambda module, inputs, out: hooked.append(out.shape))
    row, rows = torch.randn(1, 1, 6), torch.randn(1, 3, 6)
    assert layer.matvec_kernel == "triton"  # the default (linear.MATVEC_KERNEL)
    layer.matvec_kernel = "inductor"
    monkeypatch.setattr(linear_module, "compiling", lambda: True)
    monkeypatch.setattr(gemv_module, "gemv_usable", lambda x, w: True)
    want_row, want_rows = layer(row), layer(rows)  # "inductor": F.linear even where usable
    assert calls == []
    monkeypatch.setattr(gemv_module, "gemv_usable", real_usable)
    layer.matvec_kernel = "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert torch.equal(layer(row), want_row) and calls == []  # CPU, no interpreter: F.linear
    monkeypatch.setattr(linear_module, "triton_runs_on", lambda x: True)  # as on a GPU
    monkeypatch.setattr(gemv_module, "gemv_usable", lambda x, w: x.numel() == x.shape[-1])
    torch.testing.assert_close(layer(row), want_row)  # the kernel's path, bias added after
    assert calls == [(1, 6)]
    assert torch.equal(layer(rows), want_rows) and calls == [(1, 6)]  # 3 rows: F.linear
    monkeypatch.setattr(linear_module, "compiling", lambda: False)
    assert torch.equal(layer(row), want_row) and calls == [(1, 6)]  # eager: F.linear
    assert len(hooked) == 6  # every call ran the hook, kernel or not

    model = build_model(PRESETS["debug"], seed=1)
    set_matvec_kernel(model, "triton")
    assert {m.matvec_kernel for m in model.modules() if isinstance(m, Linear)} == {"triton"}
    from infermeter.engine.fusion import fuse_projections

    fuse_projections(model)  # the fused wqkv / w13 keep the choice
    assert model.layers[0].attention.wqkv.matvec_kernel == "triton"
    assert model.layers[0].feed_forward.w13.matvec_kernel == "triton"
    with pytest.raises(ValueError, match="unknown matrix-vector kernel 'cublas'"):
        set_matvec_kernel(model, "cublas")


def test_unsplit_takes_a_cache_one_program_holds(monkeypatch):
    """decode_attention.UNSPLIT "on" (an A/B's): the compiled step's attention passes n_splits 0
    (one program a row, no combine) where next_power_of_2(slots) x head size fits
    UNSPLIT_ELEMENTS, and the split count it was given elsewhere; "off" never; an unknown way
    is an error."""
    from infermeter.engine.kernels import decode_attention

    calls = []
    monkeypatch.setattr(decode_attention, "split_kv_decode",
                        lambda *args: calls.append(args[7]))
    def attend(slots: int, head_dim: int) -> int:
        q = torch.empty(1, 2, 7, head_dim)
        cache = torch.empty(1, 2, slots, head_dim)
        decode_attention.decode_attention_kernel(q, cache, cache, None, None, 0, False, 8)
        return calls.pop()

    assert decode_attention.UNSPLIT == "off"
    assert [attend(*shape) for shape in ((512, 64), (40, 64))] == [8, 8]
    monkeypatch.setattr(decode_attention, "UNSPLIT", "on")
    assert [attend(*shape) for shape in ((512, 64), (300, 64), (256, 128), (40, 64))] == [0] * 4
    assert [attend(*shape) for shape in ((513, 64), (512, 128))] == [8, 8]  # past one program
    monkeypatch.setattr(decode_attention, "UNSPLIT", "sometimes")
    with pytest.raises(ValueError, match="unknown UNSPLIT 'sometimes'"):
        attend(512, 64)


@pytest.mark.parametrize("way", ["off", "on"])
def test_the_result_records_unsplit_and_the_report_sets_it_aside(monkeypatch, way):
    """config.attention_unsplit: UNSPLIT wherever the compiled step ran the split-KV kernel
    (fused or split step) over a cache one program holds, false over one it does not, None
    where it ran another attention; the report takes an unsplit Result as a comparison, never
    a column's representative."""
    from infermeter.engine.kernels import decode_attention
    from infermeter.report.select import off_default_kernels
    from tests.report_records import seed_record
    from tests.test_fused_rope_record import recorded_under

    monkeypatch.setattr(decode_attention, "UNSPLIT", way)
    described = recorded_under(monkeypatch, "attention_unsplit", (
        ("fused", "triton"), ("split", "triton"), ("fused", "math")))
    assert described == {("fused", "triton"): way == "on", ("split", "triton"): way == "on",
                         ("fused", "math"): None}
    assert off_default_kernels(seed_record(1, attention_unsplit=way == "on")) == (way == "on")
    assert not off_default_kernels(seed_record(2))  # before the field: split
    # a cache no program holds: the kernel ran split whatever UNSPLIT says
    monkeypatch.setattr(decode_attention, "UNSPLIT_ELEMENTS", 1)
    assert recorded_under(monkeypatch, "attention_unsplit", (("fused", "triton"),)) == {
        ("fused", "triton"): False}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_on_cuda_the_unsplit_kernel_is_the_math_paths_attention(dtype):
    """The unsplit kernel (n_splits 0) on a GPU at SmolLM2-135M's, Qwen2.5-0.5B's and
    Llama-3.2-1B's heads over a 512-slot cache, plainly and with PDL where it runs: within one
    16-bit rounding of the float32 math attention, as the 8-split kernels are, at the
    prompt's end, mid-way and the cache's last slot."""
    from infermeter.engine.attention import decode_attention
    from infermeter.engine.kernels import pdl
    from infermeter.engine.kernels.decode_attention import _split_kv_decode

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    ways = (False, True) if pdl.supported(torch.device("cuda")) else (False,)
    for kv_heads, groups in ((3, 3), (2, 7), (8, 4)):
        q, k, v = (torch.randn(1, kv_heads, n, 64, device="cuda", generator=gen).to(dtype)
                   for n in (groups, 512, 512))
        key_pos = torch.arange(512, device="cuda")
        for pos in (80, 300, 511):
            at = torch.tensor([pos], device="cuda")
            visible = (key_pos <= pos)[None, :].expand(groups, -1)
            want = decode_attention(q.float(), k.float(), v.float(), visible)
            for with_pdl in ways:
                for splits in (0, 8):
                    got = _split_kv_decode(q, k, v, key_pos, at, 0, False, splits, 0.0,
                                           pdl=with_pdl).float()
                    err = (got - want).abs().max().item()
                    assert err <= 2 ** -7 * want.abs().max().item(), \
                        (kv_heads, groups, pos, with_pdl, splits, err)


def test_a_result_whose_wo_combined_the_splits_stays_a_comparison(monkeypatch):
    """The combine folded into wo's kernel was removed on 2026-12-07: a Result of the fused step
    no longer records config.combine_in_wo, and an older Result with it true is still a
    comparison, never a column's representative (false or absent: the default)."""
    from infermeter.report.select import off_default_kernels
    from tests.report_records import seed_record
    from tests.test_fused_rope_record import batch_one_runner

    assert "combine_in_wo" not in batch_one_runner(monkeypatch, PRESETS["debug"],
                                                   "fused").describe()
    assert off_default_kernels(seed_record(1, combine_in_wo=True))
    assert not off_default_kernels(seed_record(2, combine_in_wo=False))
    assert not off_default_kernels(seed_record(3))
