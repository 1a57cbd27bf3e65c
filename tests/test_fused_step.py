"""The fused batch-1 step (engine/kernels/fused_step.py, --step-kernels fused).

Under Triton's CPU interpreter in a subprocess (tests/fused_step_worker.py): each kernel against
the unfused chain with eager's roundings (several K and N with ragged tails; float32, float16,
bfloat16; the wqkv kernel with and without per-head q/k norms), and the debug model's and
Qwen3-like ones' greedy steps fused against split. Here: the PDL launches' PTX
keeps pdl.py's rule, eager steps never take the fused path, and the choice reaches every layer
and the Result. No GPU: which is faster is benchmarks/step_kernels_ab.py's to say.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from infermeter.engine.fusion import fuse_projections
from infermeter.engine.model import (
    FUSED_PARTS,
    STEP_KERNELS,
    build_model,
    fused_step_layers,
    fused_step_parts,
    set_step_kernels,
)
from infermeter.engine.moe import MOE_KERNEL
from infermeter.specs.presets import PRESETS
from tests.test_peer_all_reduce import needs_triton
from tests.triton_interpreter import run_under_interpreter

WORKER = Path(__file__).with_name("fused_step_worker.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_fused_kernels_under_the_triton_interpreter():
    run_under_interpreter(WORKER)


APPROXIMATE_DIVISIONS = ("div.full.f32", "div.approx")


def assert_exact_divisions(lines: list[str], divides: bool, what: str) -> None:
    """No approximate float32 division in the PTX (Triton's `/` is div.full.f32, or div.approx
    by a constant): the means multiply by a reciprocal rounded once and SiLU divides as torch's
    CUDA kernels do, through div.rn (fused_step.py says why); `divides`: some div.rn is there."""
    approximate = [line.strip() for line in lines if any(d in line for d in APPROXIMATE_DIVISIONS)]
    assert not approximate, (what, approximate)
    assert any("div.rn.f32" in line for line in lines) == divides, what


@needs_triton
def test_pdl_launches_read_only_weights_before_the_wait(monkeypatch):
    """Each fused op launched with PDL, compiled for sm_90: the wait comes before the release,
    and before the wait only weights are loaded (evict-first: the first tile; the norm's
    weights, not evict-first: every program reads them); x and the residual after it. No
    approximate division anywhere (the norm's mean, SiLU).
    GeGLU's gelu (Gemma's norm), as a CUDA x launches it: its five products a value besides
    kappa * x^3 (one FMA with x's add, as in torch's build) are PTX mul.rn, never contracted,
    and its tanh is libdevice's (tanhf's ex2.approx.ftz, not tl.exp's ex2.approx.f32)."""
    from infermeter.engine.kernels import pdl
    from infermeter.engine.kernels.fused_step import _fused_gemv
    from tests.test_pdl import first, pdl_launches, pdl_ptx

    # pdl.py's order, which pdl_ptx checks (the early release: its own test below)
    monkeypatch.setattr(pdl, "EARLY_RELEASE", "off")
    dtype = torch.bfloat16
    x, norm_w = torch.zeros(1, 2560, dtype=dtype), torch.ones(2560, dtype=dtype)
    weight, residual = torch.zeros(40, 2560, dtype=dtype), torch.zeros(1, 40, dtype=dtype)
    calls = {"norm + product": (norm_w, None, False, False),
             "norm + w13 + swiglu": (norm_w, None, True, False),
             "gemma norm + w13 + geglu": (norm_w, None, True, True),
             "w13 + geglu": (None, None, True, True),
             "product + add": (None, residual, False, False)}
    for name, (norm, res, swiglu, gelu) in calls.items():
        launches = pdl_launches(monkeypatch, lambda n=norm, r=res, s=swiglu, g=gelu: _fused_gemv(
            x, weight, n, r, 1e-5, g, s, pdl=True, gelu=g))
        assert len(launches) == 1
        kernel, args, kwargs = launches[0]
        assert kwargs["LIBDEVICE"] is False  # x on the CPU: as a CUDA x launches it, below
        lines, wait = pdl_ptx((kernel, args, {**kwargs, "LIBDEVICE": True}), name)
        early = [line for line in lines[:wait] if "ld.global" in line]
        assert early and any("evict_first" in line for line in early), name
        # the norm's weights besides the weight tile, nothing else
        assert all("evict_first" in line for line in early) == (norm is None), name
        assert first(lines, "ld.global", wait) < len(lines), name  # x, after the wait
        assert_exact_divisions(lines, norm is not None or (swiglu and not gelu), name)
        assert kwargs["GELU"] == gelu, name
        products = sum("mul.rn.f32" in line for line in lines)
        assert (products > 0 and products % 5 == 0) == gelu, (name, products)
        if gelu:
            assert any("ex2.approx.ftz.f32" in line for line in lines), name
            assert not any("ex2.approx.f32" in line for line in lines), name


def _instructions(lines: list[str], leave_out: str) -> list[str]:
    """A kernel's PTX without its source-line marks (.loc), comments (inline asm's begin and
    end), blank lines, its debug sections (which name those lines) and any line with
    `leave_out`: what it executes, to compare two builds."""
    from tests.test_pdl import first

    body = lines[:first(lines, ".section")]  # the debug sections come last
    return [line for line in body if line.strip() and not line.strip().startswith((".loc", "//"))
            and leave_out not in line]


def _builds_each_way(monkeypatch, call, setting: str = "EARLY_RELEASE"
                     ) -> dict[str, list[list[str]]]:
    """pdl.<setting> way (EARLY_RELEASE's or ATTENTION_RELEASE's) -> the sm_90 PTX lines of
    each PDL launch call() makes under it."""
    from infermeter.engine.kernels import pdl
    from tests.test_pdl import pdl_launches, sm90_lines

    built = {}
    for way in getattr(pdl, f"{setting}_WAYS"):
        monkeypatch.setattr(pdl, setting, way)
        with pdl.launching(True):
            built[way] = [sm90_lines(*launch)[1] for launch in pdl_launches(monkeypatch, call)]
    return built


def _not_params(lines: list[str]) -> list[str]:
    """PTX lines other than a kernel parameter's read (ld.param), whose place the compiler
    may change around a release without changing anything the kernel computes."""
    return [line for line in lines if "ld.param" not in line]


def _release_calls(monkeypatch) -> dict[str, object]:
    """name -> a call making one fused-step op's PDL launches on CPU tensors (the attention's:
    split then combine, or the unsplit kernel alone)."""
    from infermeter.engine.kernels import decode_attention
    from infermeter.engine.kernels.decode_attention import decode_attention_kernel
    from infermeter.engine.kernels.fused_step import _fused_gemv, _norm_qkv_rope

    dtype, tiles = torch.float16, (2, 1024, 4)
    x, norm_w = torch.zeros(1, 576, dtype=dtype), torch.ones(576, dtype=dtype)
    weight, residual = torch.zeros(64, 576, dtype=dtype), torch.zeros(1, 64, dtype=dtype)
    cache, key_pos = torch.zeros(1, 2, 16, 16, dtype=dtype), torch.zeros(16, dtype=torch.int64)
    q, kv = torch.zeros(1, 2, 2, 64, dtype=dtype), torch.zeros(1, 2, 256, 64, dtype=dtype)

    def attention(fused, unsplit="off"):
        def call():
            monkeypatch.setattr(decode_attention, "UNSPLIT", unsplit)
            return decode_attention_kernel(q, kv, kv.clone(), torch.arange(256),
                                           torch.tensor([100]), 0, False, 4, fused_step=fused)
        return call

    return {"product + add": lambda: _fused_gemv(
                x, weight, None, residual, 1e-5, False, False, pdl=True, tiles=tiles),
            "norm + w13 + swiglu": lambda: _fused_gemv(
                x, weight, norm_w, None, 1e-5, False, True, pdl=True, tiles=tiles),
            "norm + product": lambda: _fused_gemv(
                x, weight, norm_w, None, 1e-5, False, False, pdl=True, tiles=tiles),
            "norm + wqkv + rope": lambda: _norm_qkv_rope(
                x, norm_w, weight, None, torch.ones(1, 8), torch.zeros(1, 8), torch.tensor([3]),
                cache, cache.clone(), key_pos, 32, 1e-5, False, False, pdl=True, tiles=tiles),
            "fused step's attention": attention(True),
            "fused step's unsplit attention": attention(True, "on"),
            "split step's attention": attention(False)}


def _releases_moved(monkeypatch, setting: str, early_way: str, moves: dict) -> None:
    """For each name -> which of its launches move (_release_calls'), built under each way of
    pdl.<setting>: "late" way's build keeps pdl.py's order (wait, then release); a launch that
    does not move builds the same under early_way; one that moves releases before its wait,
    after some load and with nothing loaded between the release and the wait, and is
    otherwise the same instructions in the same order, but for where a kernel parameter is
    read (the same loads and maths: no value changes). Returns nothing; asserts."""
    from infermeter.engine.kernels import pdl
    from tests.test_pdl import first

    calls = _release_calls(monkeypatch)
    release, wait_line = "griddepcontrol.launch_dependents", "griddepcontrol.wait"
    late_way = next(way for way in getattr(pdl, f"{setting}_WAYS")
                    if way not in (early_way, "auto"))
    for name, moving in moves.items():
        built = _builds_each_way(monkeypatch, calls[name], setting)
        if "auto" in built:  # outside the generator's step, "auto" releases late
            assert built["auto"] == built[late_way], name
        assert len(built[early_way]) == len(built[late_way]) == len(moving), name
        for moved, early, late in zip(moving, built[early_way], built[late_way], strict=True):
            wait = first(late, wait_line)
            assert wait < first(late, release) < len(late), name  # pdl.py's order
            if not moved:
                assert early == late, name
                continue
            wait, freed = first(early, wait_line), first(early, release)
            assert freed < wait < len(early), name
            assert not any("ld.global" in line for line in early[freed:wait]), name
            ran, default = _instructions(early, release), _instructions(late, release)
            assert sorted(ran) == sorted(default), name
            assert _not_params(ran) == _not_params(default), name
            first_loads = [line for line in early[:freed] if "ld.global" in line]
            if setting == "EARLY_RELEASE":  # a product's weight tile (and a norm's weights)
                assert all("evict_first" in line or name.startswith("norm")
                           for line in first_loads), name
                assert bool(first_loads) != name.endswith("attention"), name  # the combine: none
            else:  # norm + wqkv's weights; the split kernel's cache block and position
                assert first_loads, name


@needs_triton
def test_an_early_release_moves_only_the_products_and_the_combine_s_release(monkeypatch):
    """pdl.EARLY_RELEASE "on" (the default): the PDL launches of product + add (wo, w2), norm +
    w13 + SwiGLU and, in the fused step, the attention's combine release the next kernel
    before their wait (after the products' weight loads; the combine loads nothing first),
    their builds otherwise "off"'s (_releases_moved). norm + product (wqkv where the q/k norms
    run apart), norm + wqkv + RoPE and the split kernel keep pdl.py's order, as does the split
    step's combine; "off" is pdl.py's order everywhere; a way there is not is refused."""
    from infermeter.engine.kernels import pdl
    from tests.test_pdl import pdl_launches

    monkeypatch.setattr(pdl, "ATTENTION_RELEASE", "after")
    _releases_moved(monkeypatch, "EARLY_RELEASE", "on", {
        "product + add": (True,), "norm + w13 + swiglu": (True,), "norm + product": (False,),
        "norm + wqkv + rope": (False,),
        "fused step's attention": (False, True),  # split, combine
        "split step's attention": (False, False)})
    monkeypatch.setattr(pdl, "EARLY_RELEASE", "soon")
    with pytest.raises(ValueError, match="unknown EARLY_RELEASE 'soon'"):
        pdl_launches(monkeypatch, _release_calls(monkeypatch)["product + add"])


@needs_triton
def test_an_attention_release_moves_only_norm_wqkv_s_and_the_split_kernel_s_release(
        monkeypatch):
    """pdl.ATTENTION_RELEASE "before" (by name; "auto", the default, is "after" outside a
    generator's step): the PDL launches of norm + wqkv + RoPE and, in the fused step, the
    attention's split kernel (and the unsplit one) release the next kernel before their wait,
    after what they load first (weight tiles and the norm's weights; the cache block and the
    position), their builds otherwise "after"'s (_releases_moved); "wqkv" and "split" move
    only that kernel's release. The products, the combine and the split step's attention
    build the same every way (here with EARLY_RELEASE "off", so that every "after" build is
    pdl.py's order; the split kernel's build does not read it); a way there is not is
    refused."""
    from infermeter.engine.kernels import pdl
    from tests.test_pdl import pdl_launches

    monkeypatch.setattr(pdl, "EARLY_RELEASE", "off")
    for early_way, wqkv, split in (("before", True, True), ("wqkv", True, False),
                                   ("split", False, True)):  # "split", "wqkv": one kernel's
        _releases_moved(monkeypatch, "ATTENTION_RELEASE", early_way, {
            "norm + wqkv + rope": (wqkv,),
            "fused step's attention": (split, False),  # split, combine
            "fused step's unsplit attention": (split,),
            "split step's attention": (False, False), "product + add": (False,),
            "norm + w13 + swiglu": (False,), "norm + product": (False,)})
    monkeypatch.setattr(pdl, "ATTENTION_RELEASE", "soon")
    with pytest.raises(ValueError, match="unknown ATTENTION_RELEASE 'soon'"):
        pdl_launches(monkeypatch, _release_calls(monkeypatch)["norm + wqkv + rope"])


@needs_triton
def test_the_rope_kernel_reads_weights_before_the_wait_and_rounds_ropes_products(monkeypatch):
    """norm + wqkv + RoPE + cache write launched with PDL, compiled for sm_90, without and with
    the per-head q/k norms (QK_NORM, a head a program): only weights before the wait, the
    product's and the input norm's (x, the position and the cache after it); and as a CUDA x
    launches it (UNCONTRACTED), RoPE's four
    float32 products (and the head norm's squares) are PTX mul.rn, which is never folded into an
    FMA with the add after it (eager rounds each product). Neither mean (the input's, the
    heads') divides approximately."""
    from infermeter.engine.kernels.fused_step import _norm_qkv_rope
    from tests.test_pdl import first, pdl_launches, pdl_ptx

    dtype = torch.bfloat16
    x, norm_w = torch.zeros(1, 2560, dtype=dtype), torch.ones(2560, dtype=dtype)
    cache, key_pos = torch.zeros(1, 2, 16, 16, dtype=dtype), torch.zeros(16, dtype=torch.int64)
    for qk_norm in (None, torch.ones(16, dtype=dtype)):
        launches = pdl_launches(monkeypatch, lambda w=qk_norm: _norm_qkv_rope(
            x, norm_w, torch.zeros(64, 2560, dtype=dtype), None, torch.ones(1, 8),
            torch.zeros(1, 8), torch.tensor([3]), cache, cache.clone(), key_pos, 32, 1e-5, False,
            True, w, w, 1e-6, False, pdl=True))
        assert len(launches) == 1
        kernel, args, kwargs = launches[0]
        assert kwargs["QK_NORM"] == (qk_norm is not None)
        what = f"norm + wqkv + rope, q/k norms {qk_norm is not None}"
        lines, wait = pdl_ptx((kernel, args, {**kwargs, "UNCONTRACTED": True}), what)
        early = [line for line in lines[:wait] if "ld.global" in line]
        # the weight tiles (evict-first) and the input norm's weights
        assert any("evict_first" in line for line in early), what
        assert not all("evict_first" in line for line in early), what
        assert first(lines, "ld.global", wait) < len(lines), what
        # RoPE's four a pair (and the q/k norm's two squares, rounded as torch's pow(2))
        products = sum("mul.rn.f32" in line for line in lines)
        assert products and products % (4 if qk_norm is None else 6) == 0, (what, products)
        assert_exact_divisions(lines, True, what)


@needs_triton
def test_after_the_wait_every_load_goes_out_before_a_reduction_waits(monkeypatch):
    """With one column tile (135M's 576 columns, tiles (2, 1024, 4)), each fused kernel issues
    its loads after the PDL wait before its first barrier (a reduction's, above which the
    compiler moves no load): one round trip after the wait, not one a use. Between the wait and
    that barrier, loads other than the weight loop's (evict-first): wo + add the residual and
    x (two), norm + w13 x and x again for the sum of squares (one each), norm + wqkv + RoPE
    cos, sin, the position and x twice; before, x alone in each (the residual, cos, sin and
    the position after the reduction, the norm's weights after its sum)."""
    from infermeter.engine.kernels import pdl
    from infermeter.engine.kernels.fused_step import _fused_gemv, _norm_qkv_rope
    from tests.test_pdl import first, pdl_launches, pdl_ptx

    monkeypatch.setattr(pdl, "EARLY_RELEASE", "off")  # pdl.py's order, which pdl_ptx checks
    dtype, tiles = torch.bfloat16, (2, 1024, 4)
    x, norm_w = torch.zeros(1, 576, dtype=dtype), torch.ones(576, dtype=dtype)
    weight, residual = torch.zeros(64, 576, dtype=dtype), torch.zeros(1, 64, dtype=dtype)
    cache, key_pos = torch.zeros(1, 2, 16, 16, dtype=dtype), torch.zeros(16, dtype=torch.int64)
    calls = {"product + add": (3, lambda: _fused_gemv(
                 x, weight, None, residual, 1e-5, False, False, pdl=True, tiles=tiles)),
             "norm + w13 + swiglu": (2, lambda: _fused_gemv(
                 x, weight, norm_w, None, 1e-5, False, True, pdl=True, tiles=tiles)),
             "norm + wqkv + rope": (5, lambda: _norm_qkv_rope(
                 x, norm_w, weight, None, torch.ones(1, 8), torch.zeros(1, 8), torch.tensor([3]),
                 cache, cache.clone(), key_pos, 32, 1e-5, False, False, pdl=True, tiles=tiles))}
    for name, (count, call) in calls.items():
        lines, wait = pdl_ptx(pdl_launches(monkeypatch, call)[0], name)
        barrier = first(lines, "bar.sync", wait)
        early = [line for line in lines[wait:barrier]
                 if "ld.global" in line and "evict_first" not in line]
        assert len(early) >= count, (name, early)


@needs_triton
def test_the_heads_kernel_waits_first_and_rounds_as_the_rope_kernel(monkeypatch):
    """The q/k norms' own kernel (kernels/qk_norm_rope.py) launched with PDL, for sm_90:
    it loads nothing before the wait (all it reads but two small norm weights is the product
    the kernel before wrote), and as a CUDA tensor launches it RoPE's products and the norm's
    squares are mul.rn, as in norm_qkv_rope's QK_NORM epilogue, which it shares."""
    from infermeter.engine.kernels.qk_norm_rope import _qk_norm_rope
    from tests.test_pdl import pdl_launches, pdl_ptx

    dtype = torch.bfloat16
    cache, key_pos = torch.zeros(1, 2, 16, 16, dtype=dtype), torch.zeros(16, dtype=torch.int64)
    launches = pdl_launches(monkeypatch, lambda: _qk_norm_rope(
        torch.zeros(1, 128, dtype=dtype), torch.ones(1, 8), torch.zeros(1, 8),
        torch.tensor([3]), cache, cache.clone(), key_pos, torch.ones(16, dtype=dtype),
        torch.ones(16, dtype=dtype), 64, True, 1e-6, False, pdl=True))
    assert len(launches) == 1
    kernel, args, kwargs = launches[0]
    lines, wait = pdl_ptx((kernel, args, {**kwargs, "UNCONTRACTED": True}), "q/k heads")
    assert not [line for line in lines[:wait] if "ld.global" in line], "a load before the wait"
    products = sum("mul.rn.f32" in line for line in lines)
    assert products and products % 6 == 0, products
    assert_exact_divisions(lines, False, "q/k heads")

@torch.inference_mode()
def test_eager_steps_and_prefill_never_take_the_fused_path(monkeypatch):
    """Outside a compiled step (eager) a model asked for "fused" runs today's code, even where
    Triton could run: the same logits as "split", and no fused op is called."""
    from infermeter.engine.kernels import fused_step

    monkeypatch.setattr(fused_step, "triton_runs_on", lambda x: True)

    def refuse(*args):
        raise AssertionError("a fused op ran outside a compiled step")

    # the model imports the fused ops from their module where it takes them
    for name in ("norm_matvec", "norm_matvec_swiglu", "matvec_add", "norm_qkv_rope_cache"):
        monkeypatch.setattr(fused_step, name, refuse)
    tokens = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    logits = {}
    for kind in STEP_KERNELS:
        model = build_model(PRESETS["debug"], seed=1)
        fuse_projections(model)
        set_step_kernels(model, kind)
        model.setup_cache(1, 8)
        outs = [model(tokens[:, :4], torch.arange(4))]
        outs += [model(tokens[:, i:i + 1], torch.tensor([i])) for i in (4, 5)]
        logits[kind] = torch.cat(outs, dim=1)
    assert torch.equal(logits["fused"], logits["split"])
    with pytest.raises(ValueError, match="unknown step kernels"):
        set_step_kernels(model, "megakernel")


def test_step_kernels_choice_reaches_every_layer_and_the_result_says_what_ran(monkeypatch):
    """--step-kernels: the CLI's choices are "auto" (the default: step_choice.py's rule) and the
    engine's; the runner sets every layer; the Result records "fused" only for a compiled
    batch-1 case where Triton runs, "split" otherwise, nothing in eager mode."""
    from infermeter.cli import build_parser
    from infermeter.commands.generate import STEP_KERNELS as CLI_KINDS
    from infermeter.engine.checkpoint.load import load_weights
    from infermeter.generate import modes as modes_module
    from infermeter.generate.cases import plan_cases, prompt_sets
    from infermeter.generate.modes import EngineRunner
    from infermeter.generate.request import EngineChoices, GenerateRequest

    assert CLI_KINDS == ("auto", *STEP_KERNELS)
    assert EngineChoices().step_kernels == "auto"
    assert build_parser().parse_args(["generate", "--model", "debug"]).step_kernels == "auto"
    model = load_weights("random:debug", "cpu", "float32")
    sets = prompt_sets((1,), (4,), (), PRESETS["debug"].vocab_size, 0, ())
    compiled, eager = (plan_cases(PRESETS["debug"], sets, (mode,), 4, None, None)
                       for mode in ("compiled", "eager"))
    request = GenerateRequest("random:debug", engine=EngineChoices(step_kernels="fused"))
    runner = EngineRunner(model, compiled[0], request)
    assert {layer.step_kernels for layer in model.layers} == {"fused"}
    monkeypatch.setattr(modes_module, "triton_runs_on", lambda x: True)
    runner.batch_sizes = [1]
    assert runner.describe()["step_kernels"] == "fused"
    model.layers[0].attention.wo.register_forward_hook(lambda *args: None)  # as tp's all-reduce
    assert runner.describe()["step_kernels"] == "partly fused"
    runner.batch_sizes = [2]
    assert runner.describe()["step_kernels"] == "split"
    monkeypatch.setattr(modes_module, "triton_runs_on", lambda x: False)
    runner.batch_sizes = [1]
    assert runner.describe()["step_kernels"] == "split"  # no Triton here
    assert EngineRunner(model, eager[0], request).describe()["step_kernels"] is None
    EngineRunner(model, compiled[0], GenerateRequest("random:debug"))  # auto, off a GPU
    assert {layer.step_kernels for layer in model.layers} == {"split"}


@pytest.mark.parametrize("name,parts", [
    ("llama-3.2-1b", FUSED_PARTS),
    ("qwen3-0.6b", FUSED_PARTS),
    # post-norms between each product and its add: norm + wqkv and norm + w13 + GeGLU
    ("gemma-2-9b", ("attention_in", "ffn_in")), ("gemma-3-1b", ("attention_in", "ffn_in")),
    # the experts stay split; the attention's two fuse
    ("qwen3-30b-a3b", ("attention_in", "attention_out")),
    ("mixtral-8x7b", ("attention_in", "attention_out")),
    # wo's bias: only norm + wqkv (+ RoPE, cache); the sinks are the attention's, after it
    ("gpt-oss-20b", ("attention_in",))])
def test_each_layer_takes_the_fused_parts_its_architecture_allows(name, parts):
    spec = PRESETS[name]
    small = spec.with_updates(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=16,
                              ffn_dim=96, vocab_size=128,
                              sliding_window_layers=tuple(i for i in spec.sliding_window_layers
                                                          if i < 2),
                              **({"n_experts": 4, "moe_ffn_dim": 32,
                                  "n_active_experts": 2} if spec.is_moe else {}))
    model = build_model(small, on_meta=True)
    fuse_projections(model)
    assert {layer.fused_parts() for layer in model.layers} == {parts}
    set_step_kernels(model, "fused")
    assert fused_step_parts(model) == len(parts) * small.n_layers
    assert fused_step_layers(model) == (small.n_layers if parts == FUSED_PARTS else 0)
    # a hook on any product (tensor parallelism's all-reduce on wo) leaves the layer split
    model.layers[0].attention.wo.register_forward_hook(lambda *args: None)
    assert model.layers[0].fused_parts() == ()
    set_step_kernels(model, "split")
    assert fused_step_parts(model) == 0


def test_the_ab_script_runs_both_kinds_and_summarises_them(tmp_path, capsys):
    """benchmarks/step_kernels_ab.py's CPU check: its cases are each model's batch-1 compiled
    case with one kind of kernels, under each way of replaying the step asked for; run here
    eagerly on the debug model, split and fused, trees then recorded, append a Result each,
    labelled with the kernels (and "/recorded") asked for, and the summary has a row for each,
    fused / split and recorded / trees from the per-run TPOTs."""
    from infermeter.measure.env import capture_env
    from infermeter.measure.result import read_results
    from tests.benchmark_scripts import load_benchmark

    script = load_benchmark("step_kernels_ab")
    assert tuple(script.KINDS) == STEP_KERNELS
    for model, dtype in script.MODELS.items():
        request = script.ab_request(model, "fused")
        assert (request.source, request.dtype, request.modes, request.batch_sizes) == \
            (f"random:{model}", dtype, ("compiled",), (1,))
        assert request.engine.step_kernels == "fused" and request.timing.roofline
        assert request.engine.step_graphs == "trees"
        # an MoE model's cases run the Triton experts, a dense one's the default
        assert request.engine.moe_kernel == script.MOE_KERNELS.get(model, MOE_KERNEL), model
    assert script.MOE_KERNELS == {"qwen3-30b-a3b": "triton"}
    assert script.ab_request("debug", "split", "recorded").engine.step_graphs == "recorded"
    path = tmp_path / "ab.jsonl"
    script.run_model("debug", 1, path, capture_env(), trace=str(tmp_path / "traces"),
                     graphs=("trees", "recorded"), device="cpu", modes=("eager",),
                     prompt_lens=(4,), max_new_tokens=5, max_seq_len=16, repeats=2,
                     roofline=False)
    labels = ["split", "fused", "split/recorded", "fused/recorded"]
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == sorted(
        f"debug-{name.replace('/', '-')}-0" for name in labels)
    results = read_results(path)
    assert [r.config["ab"] for r in results] == [{"kernels": k, "round": 0} for k in labels]
    assert all(len(script.run_tpots(r)) == 2 for r in results)
    text = script.summary(results)
    rows = [line.split() for line in text.splitlines() if line.startswith("debug ")]
    assert [row[2] for row in rows] == labels, text  # the kernels column
    assert "debug: fused / split TPOT" in text and "kernels/step" in text, text
    assert "debug: split/recorded / split TPOT" in text, text
    assert "debug: fused/recorded / fused TPOT" in text, text
    # both kernels in the recorded step: the kernels' own A/B, no replay difference in it
    assert "debug: fused/recorded / split/recorded TPOT" in text, text
    results[1].metrics["breakdown"] = {"step_gaps": {"median_of_steps": {"kernels": 123,
                                                                         "gaps_ms": 0.25}}}
    fused_row = next(line for line in script.summary(results).splitlines()
                     if line.startswith("debug ") and " fused " in line)
    assert "123" in fused_row.split() and "0.2500" in fused_row.split(), fused_row
    # --kernels split: only that kind, under each way
    alone = tmp_path / "split.jsonl"
    script.run_model("debug", 1, alone, capture_env(), graphs=("trees", "recorded"),
                     kinds=("split",), device="cpu", modes=("eager",), prompt_lens=(4,),
                     max_new_tokens=3, max_seq_len=16, repeats=1, roofline=False)
    assert [r.config["ab"]["kernels"] for r in read_results(alone)] == ["split",
                                                                         "split/recorded"]
    assert script.arguments().parse_args(["--kernels", "split"]).kernels == ["split"]


def test_each_ab_case_gives_its_weights_back_before_the_next_fit_check(tmp_path, monkeypatch):
    """A model's cases run one after another in its process, and a fit check counts torch's
    cached blocks as used: each case's model must be gone, and its memory collected, before the
    next case is checked (qwen3-30b-a3b's split case left its 57 GB cached, and fused and
    layer were refused with 21 GiB free)."""
    from infermeter.measure.env import capture_env
    from tests.benchmark_scripts import load_benchmark
    from tests.test_sweep_merge import record_memory_events

    script = load_benchmark("step_kernels_ab")
    events = record_memory_events(monkeypatch)
    script.run_model("debug", 1, tmp_path / "ab.jsonl", capture_env(), kinds=("split", "fused"),
                     device="cpu", modes=("eager",), prompt_lens=(4,), max_new_tokens=3,
                     max_seq_len=16, repeats=1, warmup=0, roofline=False)
    fits = [i for i, (what, _) in enumerate(events) if what == "fit"]
    assert [events[i] for i in fits] == [("fit", []), ("fit", [True])]
    # the first case's model died, then its memory was collected, before the second's check
    assert events[fits[1] - 1] == ("collect", [True])
    assert events[-1] == ("collect", [True, True])  # and the second's before run_model returns


def test_the_report_takes_a_fused_result_for_a_comparison_and_says_so():
    """A compiled Result whose step ran fused is an A/B run while split is the default: a column
    is represented by the split one, and the setting names the fused step."""
    from infermeter.engine.model import STEP_KERNEL
    from infermeter.report.select import (
        DEFAULT_STEP_KERNELS,
        Column,
        ColumnKey,
        off_default_kernels,
        pick_generate,
    )
    from infermeter.report.tables import _generate_setting
    from tests.report_records import seed_record

    assert DEFAULT_STEP_KERNELS == STEP_KERNEL
    split, fused = seed_record(1, step_kernels="split"), seed_record(2, step_kernels="fused")
    older = seed_record(3)
    assert off_default_kernels(fused) and not off_default_kernels(split)
    assert not off_default_kernels(older)  # from before the setting: split
    assert pick_generate(Column(ColumnKey("gpu", "m", 1), generates=[fused, split])) is split
    assert "fused step" in _generate_setting(fused)
    assert "step" not in _generate_setting(split)
    # left to "auto", which chose it (config.step_choice): the default setting, fused or not
    chosen = seed_record(4, step_kernels="fused", step_choice="auto: fused, recorded (0.27 GB)")
    assert not off_default_kernels(chosen)
    # asked for by name: a comparison, even split (the default may have fused this model)
    asked = seed_record(5, step_kernels="split", step_choice="asked: split, trees")
    assert off_default_kernels(asked)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@torch.inference_mode()
def test_on_cuda_the_norm_and_silu_are_eagers_to_the_bit(dtype):
    """On a GPU: torch's CUDA mean is the sum times the float32 1 / n (what the kernels
    compute), and with products exact in any order (weight rows that pick one column, x of
    quarter-integers: the sum of squares is exact too) the fused norm + product and norm +
    w13 + SwiGLU equal eager's RMSNorm and F.silu chain to the bit (fused_step.py: div.rn, the
    same rsqrt.approx and libdevice expf as torch's kernels)."""
    import torch.nn.functional as F

    from infermeter.engine.kernels.fused_step import gemv_swiglu, norm_gemv
    from infermeter.engine.norms import RMSNorm

    gen = torch.Generator(device="cuda").manual_seed(0)
    for n in (72, 1100, 3072):
        x = torch.randn(64, n, device="cuda", generator=gen)
        factor = torch.tensor(1.0 / n, device="cuda")
        assert torch.equal(x.mean(-1), x.sum(-1) * factor), n
    n_cols, n_rows = 1100, 24
    for trial in range(20):
        x = (torch.randint(-12, 13, (1, n_cols), device="cuda", generator=gen) / 4).to(dtype)
        norm = RMSNorm(n_cols, 1e-5).to("cuda", dtype)
        norm.weight.data.copy_(1 + 0.3 * torch.randn(n_cols, device="cuda", generator=gen))
        pick = torch.randint(0, n_cols, (2 * n_rows, 1), device="cuda", generator=gen)
        one = torch.zeros(2 * n_rows, n_cols, device="cuda").scatter_(1, pick, 1.0)
        normed = norm(x).float()
        got = norm_gemv(x, norm.weight, one[:n_rows].to(dtype), 1e-5, False)
        assert torch.equal(got.float(), normed @ one[:n_rows].T), (dtype, trial)
        gate, up = (normed @ one.T).to(dtype).chunk(2, dim=-1)
        want = F.silu(gate) * up  # eager: silu rounded to the dtype, the product rounded
        got = gemv_swiglu(x, norm.weight, one.to(dtype), 1e-5, False)
        assert torch.equal(got, want), (dtype, trial)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@torch.inference_mode()
def test_on_cuda_the_geglu_is_eagers_to_the_bit(dtype):
    """On a GPU: w13 + GeGLU with weight rows that each pick one column of x (gate and up are
    x's values, exact) equals F.gelu(gate, approximate="tanh") * up to the bit, over gates of
    several scales and from -12 to 12 (exact_math.exact_gelu_tanh: torch's CUDA kernel's order
    and libdevice tanhf); and after Gemma's norm, as the Gemma step runs it."""
    import torch.nn.functional as F

    from infermeter.engine.kernels.fused_step import gemv_swiglu
    from infermeter.engine.norms import GemmaRMSNorm

    gen = torch.Generator(device="cuda").manual_seed(0)
    n_cols = 4096
    pick = torch.cat([torch.arange(n_cols, device="cuda"),
                      torch.randint(0, n_cols, (n_cols,), device="cuda", generator=gen)])
    w13 = torch.zeros(2 * n_cols, n_cols, device="cuda").scatter_(1, pick[:, None], 1.0)
    w13 = w13.to(dtype)
    for x in [torch.randn(1, n_cols, device="cuda", generator=gen) * s for s in (0.3, 1, 3, 8)] \
            + [torch.linspace(-12, 12, n_cols, device="cuda")[None]]:
        x = x.to(dtype)
        gate, up = x[:, pick[:n_cols]], x[:, pick[n_cols:]]
        want = F.gelu(gate, approximate="tanh") * up
        assert torch.equal(gemv_swiglu(x, None, w13, 1e-6, True, True), want), dtype
    norm = GemmaRMSNorm(n_cols, 1e-6).to("cuda", dtype)
    norm.weight.data.copy_(0.3 * torch.randn(n_cols, device="cuda", generator=gen))
    x = (torch.randint(-12, 13, (1, n_cols), device="cuda", generator=gen) / 4).to(dtype)
    gate, up = norm(x)[:, pick].chunk(2, dim=-1)  # quarter-integers: the sum of squares exact
    got = gemv_swiglu(x, norm.weight, w13, 1e-6, True, True)
    assert torch.equal(got, F.gelu(gate, approximate="tanh") * up), dtype


@pytest.mark.parametrize("way", ["off", "on"])
def test_the_result_records_the_fused_head_and_the_report_sets_the_other_way_aside(monkeypatch,
                                                                                  way):
    """config.fused_head: whether the fused step ran its final norm and output head as one
    kernel (model.FUSED_HEAD), None where no layer ran fused; a head with hooks (tensor
    parallelism's gather) never fuses; the report takes a Result of the way that is not the
    default as a comparison, and one from before the field as the default's; a way there is
    not is refused."""
    from infermeter.engine import model as model_module
    from infermeter.report.select import DEFAULT_FUSED_HEAD, off_default_kernels
    from infermeter.specs.presets import PRESETS
    from tests.report_records import seed_record
    from tests.test_fused_rope_record import batch_one_runner, recorded_under

    assert DEFAULT_FUSED_HEAD is (model_module.FUSED_HEAD == "on")  # the engine's default
    monkeypatch.setattr(model_module, "FUSED_HEAD", way)
    assert recorded_under(monkeypatch, "fused_head", (("fused", "triton"), ("split", "triton"))) \
        == {("fused", "triton"): way == "on", ("split", "triton"): None}
    runner = batch_one_runner(monkeypatch, PRESETS["debug"])
    handle = runner.generator.model.output.register_forward_hook(lambda *args: None)
    assert runner.describe()["fused_head"] is False
    handle.remove()
    assert off_default_kernels(seed_record(1, fused_head=way == "on")) == (way == "on")
    assert not off_default_kernels(seed_record(2))  # before the field: the default
    monkeypatch.setattr(model_module, "FUSED_HEAD", "maybe")
    with pytest.raises(ValueError, match="unknown FUSED_HEAD 'maybe'"):
        runner.generator.model.head_fuses()


def _described_by_step(monkeypatch, key: str) -> dict:
    """(step kernels asked, "fused" or "split"; launched with PDL) -> the debug model's batch-1
    runner's config[key]."""
    from infermeter.specs.presets import PRESETS
    from tests.test_fused_rope_record import batch_one_runner

    described = {}
    for kinds in ("fused", "split"):
        for launched in (True, False):
            runner = batch_one_runner(monkeypatch, PRESETS["debug"], kinds)
            monkeypatch.setattr(runner.generator, "pdl", launched)
            described[kinds, launched] = runner.describe()[key]
    return described


@pytest.mark.parametrize("way", ["off", "on"])
def test_the_result_records_the_release_and_the_report_sets_a_late_one_aside(monkeypatch, way):
    """config.early_release: whether the fused step's wo, w13 and w2 kernels and its combine
    released the next kernel before their PDL wait (pdl.EARLY_RELEASE, "on" by default); None
    where no layer ran fused or the step ran without PDL; the report takes a Result released
    after the wait as a comparison, and one from before the field as the default's."""
    from infermeter.engine.kernels import pdl
    from infermeter.report.select import DEFAULT_EARLY_RELEASE, off_default_kernels
    from tests.report_records import seed_record

    assert DEFAULT_EARLY_RELEASE is (pdl.EARLY_RELEASE == "on")  # the engine's default
    monkeypatch.setattr(pdl, "EARLY_RELEASE", way)
    assert _described_by_step(monkeypatch, "early_release") == {
        ("fused", True): way == "on", ("fused", False): None, ("split", True): None,
        ("split", False): None}
    assert off_default_kernels(seed_record(1, early_release=way == "on")) == (way == "off")
    assert not off_default_kernels(seed_record(2))  # before the field: the default


@pytest.mark.parametrize("way", ["auto", "after", "before", "split"])
def test_the_result_records_the_attention_s_release_and_the_report_sets_a_named_one_aside(
        monkeypatch, way):
    """config.attention_release: where the fused step's norm + wqkv and split kernels released
    the next kernel, "after" or "before" their PDL wait (pdl.ATTENTION_RELEASE; "auto", the
    default, by the step's weight bytes: the debug model's few kilobytes, "after"), and
    config.attention_release_asked the way asked; both None where no layer ran fused or the
    step ran without PDL. The report takes a way asked by name as a comparison, and, from
    before the asked field, "before" as one ("after" was the default then)."""
    from infermeter.engine.kernels import pdl
    from infermeter.report.select import DEFAULT_ATTENTION_RELEASE, off_default_kernels
    from tests.report_records import seed_record

    assert DEFAULT_ATTENTION_RELEASE == pdl.ATTENTION_RELEASE  # the engine's default
    monkeypatch.setattr(pdl, "ATTENTION_RELEASE", way)
    ran = "after" if way == "auto" else way
    for key, value in (("attention_release", ran), ("attention_release_asked", way)):
        assert _described_by_step(monkeypatch, key) == {
            ("fused", True): value, ("fused", False): None, ("split", True): None,
            ("split", False): None}
    record = seed_record(1, attention_release=ran, attention_release_asked=way)
    assert off_default_kernels(record) == (way != "auto")
    assert off_default_kernels(seed_record(1, attention_release="before"))  # no asked field
    assert not off_default_kernels(seed_record(1, attention_release="after"))
    assert not off_default_kernels(seed_record(2))  # before the field: the default


@pytest.mark.parametrize("line", [0, 1e12])
def test_the_generator_s_step_runs_inside_its_size_s_attention_release(monkeypatch, line):
    """The compiled step is called inside pdl.releasing_attention with its model's answer
    (step_choice.attention_release_way of its weight bytes), so "auto" reaches the kernels the
    step launches: early from ATTENTION_FIRST_BYTES on (here moved below and above the debug
    model's bytes), late below; and set back after the call."""
    from infermeter.engine import generator as generator_module
    from infermeter.engine import step_choice
    from infermeter.engine.generator import Generator
    from infermeter.engine.kernels import pdl
    from tests.test_generate import SPEC, build_model

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: lambda *args, **kwargs:
                        seen.append(pdl.attention_release("split")))
    monkeypatch.setattr(step_choice, "ATTENTION_FIRST_BYTES", line)
    monkeypatch.setattr(generator_module, "allow_step_graphs", lambda: None)
    gen = Generator(build_model(SPEC, device="cpu", dtype=torch.float32), max_seq_len=32)
    gen._compile_step()()
    assert seen == [line == 0]
    assert pdl.attention_release("split") is False


def test_the_attention_releases_early_from_its_line_of_weight_bytes_as_asked(monkeypatch):
    """step_choice.attention_release_way: "auto" (the default) releases before the wait from
    ATTENTION_FIRST_BYTES (between Qwen2.5-0.5B's 0.99 GB, which lost, and Llama-3.2-1B's
    2.47 GB, which gained) up to the fused recorded step's line, SMALL_STEP_BYTES (past it, a
    Qwen3-MoE model's fused attention side was never timed with it); a way by name whatever
    the size; pdl.attention_release() answers
    "auto" as the generator's releasing_attention says around its step, "after" outside it;
    a way there is not is refused."""
    from infermeter.engine.kernels import pdl
    from infermeter.engine.step_choice import (
        ATTENTION_FIRST_BYTES,
        SMALL_STEP_BYTES,
        attention_release_way,
    )

    assert 0.99e9 < ATTENTION_FIRST_BYTES <= 2.47e9 < SMALL_STEP_BYTES
    assert pdl.ATTENTION_RELEASE == "auto"
    sizes = (0.27e9, 0.99e9, ATTENTION_FIRST_BYTES, 2.47e9, SMALL_STEP_BYTES,
             SMALL_STEP_BYTES + 1, 61e9)  # ... Qwen3-30B-A3B's bf16 weights
    assert [attention_release_way(int(b)) for b in sizes] == \
        ["after"] * 2 + ["before"] * 3 + ["after"] * 2
    assert not any(pdl.attention_release(kernel) for kernel in pdl.ATTENTION_KERNELS)
    for first in (True, False):
        with pdl.releasing_attention(first):
            assert all(pdl.attention_release(kernel) is first
                       for kernel in pdl.ATTENTION_KERNELS)
    assert not any(pdl.attention_release(kernel) for kernel in pdl.ATTENTION_KERNELS)
    for way in ("after", "before", "split", "wqkv"):
        monkeypatch.setattr(pdl, "ATTENTION_RELEASE", way)
        assert attention_release_way(int(2.47e9)) == attention_release_way(0) == way
        with pdl.releasing_attention(way == "after"):  # a way by name wins over the size
            assert [pdl.attention_release(kernel) for kernel in ("split", "wqkv")] == [
                way in ("before", "split"), way in ("before", "wqkv")], way
    with pytest.raises(ValueError, match="unknown attention kernel 'wo'"):
        pdl.attention_release("wo")
    monkeypatch.setattr(pdl, "ATTENTION_RELEASE", "early")
    with pytest.raises(ValueError, match="unknown ATTENTION_RELEASE 'early'"):
        attention_release_way(0)


def _fused_recorded_step_gives_eager_tokens(dtype: torch.dtype, pdl: bool = False):
    """On a GPU: a peaked model's (no near ties) fused step in the recorded graph, with PDL
    where asked, gives eager's greedy tokens; the model, for a caller's further checks."""
    from infermeter.engine.generator import Generator
    from infermeter.engine.model import set_step_kernels
    from tests.test_generate import (
        PROMPTS,
        SPEC,
        assert_compiled_gives_eager_tokens,
        peaked_cuda_model,
    )

    model = peaked_cuda_model(SPEC, dtype)
    gen = Generator(model, max_seq_len=64, step_graphs="recorded", pdl=pdl)
    set_step_kernels(model, "fused")
    assert_compiled_gives_eager_tokens(gen, PROMPTS[:1])
    return model


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_on_cuda_the_fused_head_gives_eager_s_tokens(monkeypatch, dtype):
    """On a GPU: the fused step in the recorded graph with its final norm and output head as
    one kernel (FUSED_HEAD "on") gives eager's greedy tokens (a peaked model: no near ties)."""
    from infermeter.engine import model as model_module

    monkeypatch.setattr(model_module, "FUSED_HEAD", "on")
    assert _fused_recorded_step_gives_eager_tokens(dtype).head_fuses()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_on_cuda_an_early_release_gives_eager_s_tokens(monkeypatch, dtype):
    """On a GPU with PDL: the fused step in the recorded graph with wo's, w13's and w2's kernels
    and the combine releasing the next kernel before their wait (EARLY_RELEASE "on") gives
    eager's greedy tokens
    (a peaked model: no near ties); a kernel that read its input before the one writing it had
    ended would part from them."""
    from infermeter.engine.kernels import pdl

    monkeypatch.setattr(pdl, "EARLY_RELEASE", "on")
    _fused_recorded_step_gives_eager_tokens(dtype, pdl=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_on_cuda_an_early_attention_release_gives_eager_s_tokens(monkeypatch, dtype):
    """On a GPU with PDL: the fused step in the recorded graph with every kernel of a layer
    releasing the next one before its wait (EARLY_RELEASE "on", ATTENTION_RELEASE "before")
    gives eager's greedy tokens (a peaked model: no near ties); a split kernel that kept a
    stale copy of the step's own slot, or any kernel that read its input before the one
    writing it had ended, would part from them."""
    from infermeter.engine.kernels import pdl

    monkeypatch.setattr(pdl, "EARLY_RELEASE", "on")
    monkeypatch.setattr(pdl, "ATTENTION_RELEASE", "before")
    _fused_recorded_step_gives_eager_tokens(dtype, pdl=True)

def test_the_early_release_part_times_both_orders_then_checks_eager_s_tokens():
    """open_targets.sh step-early-release: the recorded fused step at the three small models,
    released after the wait and before it, one round, in a file of its own; then the gpu test
    above, by its name (a renamed test would leave the part running nothing)."""
    from tests.benchmark_scripts import part_arguments, part_body

    step = part_arguments("step-early-release", "step_kernels_ab")
    assert (step.early_release, step.kernels, step.graphs, step.rounds, step.name) == (
        ["off", "on"], ["fused"], ["recorded"], 1, "step-early-release")
    assert step.models == ["smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b"]
    test = "test_on_cuda_an_early_release_gives_eager_s_tokens"
    assert f"fused_gpu_test {test} " in part_body("step-early-release")  # a shell function
    assert callable(globals()[test])


def test_the_attention_release_part_times_both_then_checks_eager_s_tokens():
    """open_targets.sh step-attention-release: the recorded fused step at the three small
    models with norm + wqkv and the split kernel releasing after their wait and before it, one
    round, in a file of its own; then the gpu test above, by its name."""
    from tests.benchmark_scripts import part_arguments, part_body

    step = part_arguments("step-attention-release", "step_kernels_ab")
    assert (step.attention_release, step.kernels, step.graphs, step.rounds, step.name) == (
        ["after", "before"], ["fused"], ["recorded"], 1, "step-attention-release")
    assert step.models == ["smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b"]
    test = "test_on_cuda_an_early_attention_release_gives_eager_s_tokens"
    assert f"fused_gpu_test {test} " in part_body("step-attention-release")
    assert callable(globals()[test])


def test_the_attention_parts_part_times_each_kernel_s_release_alone():
    """open_targets.sh step-attention-parts: the recorded fused step at the three small
    models with both attention kernels releasing after their wait, then the split kernel's
    alone before it, then norm + wqkv's alone, one round, in a file of its own."""
    from tests.benchmark_scripts import part_arguments

    step = part_arguments("step-attention-parts", "step_kernels_ab")
    assert (step.attention_release, step.kernels, step.graphs, step.rounds, step.name) == (
        ["after", "split", "wqkv"], ["fused"], ["recorded"], 1, "step-attention-parts")
    assert step.models == ["smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b"]


def test_the_large_fused_part_times_both_kernels_in_both_replays_at_7b():
    """open_targets.sh step-large-fused: Llama-2-7B, past the 3 GB line where `auto` runs the
    split step in the trees, with split and fused kernels each in our recorded step and then in
    the trees (so the pair that decides, fused recorded and split in the trees, runs second
    and third, before a cut at the command's limit), one round, in a file of its own, every
    other setting at its default."""
    from tests.benchmark_scripts import load_benchmark, part_arguments

    step = part_arguments("step-large-fused", "step_kernels_ab")
    assert (step.kernels, step.graphs, step.rounds, step.name, step.models, step.batch) == (
        ["split", "fused"], ["recorded", "trees"], 1, "step-large-fused", ["llama-2-7b"], 1)
    defaults = vars(load_benchmark("step_kernels_ab").arguments().parse_args([]))
    named = {"kernels", "graphs", "rounds", "name", "models", "results"}
    assert {k: v for k, v in vars(step).items() if k not in named} == {
        k: v for k, v in defaults.items() if k not in named}
