"""The fused step's kernels prefetching a later product's weight into L2
(engine/kernels/prefetch.py): each program's share of the bytes (under Triton's interpreter,
tests/prefetch_worker.py), the instruction in each kernel's sm_90 build and nowhere without a
weight to prefetch, the chain each kernel of a step is handed (Transformer.prefetch_plan), the
Result's record of it, and on a GPU the eager tokens with it on. The A/B script's cases:
tests/test_benchmark_shell.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from infermeter.engine.fusion import fuse_projections
from infermeter.engine.kernels import fused_step, pdl, prefetch
from infermeter.engine.model import build_model, set_step_kernels
from infermeter.specs.presets import PRESETS
from tests.test_peer_all_reduce import needs_triton
from tests.triton_interpreter import run_under_interpreter

WORKER = Path(__file__).with_name("prefetch_worker.py")
DEBUG = PRESETS["debug"]
PREFETCH_LINE = "cp.async.bulk.prefetch.L2.global"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_the_programs_shares_cover_the_bytes_once_under_the_interpreter():
    run_under_interpreter(WORKER)


def test_a_kernel_prefetches_a_products_first_bytes_up_to_the_cap():
    small = torch.zeros(960, 576, dtype=torch.float16)  # 135M's wqkv: 1,105,920 bytes
    assert prefetch.ahead_bytes(small) == 960 * 576 * 2
    assert prefetch.ahead_bytes(torch.zeros(16384, 2048, dtype=torch.bfloat16)) == prefetch.CAP
    assert prefetch.ahead_bytes(torch.zeros(3, 5, dtype=torch.float16)) == 16  # 30 bytes, whole 16s
    assert not prefetch.prefetchable(small)  # off a GPU: nothing to prefetch into
    assert prefetch.aligned(small) and prefetch.aligned(small[8:])  # 8 rows of 1,152 bytes
    assert not prefetch.aligned(small.view(-1)[1:])  # 2 bytes in
    assert not prefetch.aligned(small[:, :64])  # not contiguous


def test_alignment_is_read_without_an_address():
    """The triton_op's body runs on fake tensors while the step is traced (a GPU run found it):
    no data pointer there, the storage offset is."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        weight = torch.empty(960, 576, dtype=torch.float16)
        assert prefetch.aligned(weight[4:]) and not prefetch.aligned(weight.view(-1)[3:])
    with pytest.raises(ValueError, match="prefetch distance"):
        prefetch.set_distance(3)


def _launch_as_on_a_gpu(monkeypatch, call):
    """call()'s PDL launch as a CUDA x makes it (recorded, not run): the weight it is handed
    counts as prefetchable."""
    from tests.test_pdl import pdl_launches

    monkeypatch.setattr(fused_step, "compiled_for_gpu", lambda x: True)
    monkeypatch.setattr(fused_step, "prefetchable", lambda weight: True)
    launches = pdl_launches(monkeypatch, call)
    assert len(launches) == 1
    return launches[0]


@needs_triton
def test_each_fused_kernel_prefetches_from_one_thread_before_its_wait(monkeypatch):
    """Built for sm_90: with a weight to prefetch, one bulk prefetch into L2, predicated (thread
    0 of a program with bytes left), before the PDL wait (weights need no wait), and the kernel
    is handed that weight and its bytes; without one, no prefetch is built in."""
    from tests.test_pdl import pdl_ptx

    # pdl.py's order, which pdl_ptx checks (the early release's: tests/test_fused_step.py)
    monkeypatch.setattr(pdl, "EARLY_RELEASE", "off")
    dtype = torch.float16
    x, norm_w = torch.zeros(1, 576, dtype=dtype), torch.ones(576, dtype=dtype)
    w13, w2 = torch.zeros(3072, 576, dtype=dtype), torch.zeros(576, 1536, dtype=dtype)
    wqkv, cos = torch.zeros(960, 576, dtype=dtype), torch.zeros(1, 32)
    cache = torch.zeros(1, 3, 16, 64, dtype=dtype)
    calls = {
        "norm + w13 + swiglu": lambda ahead: fused_step._fused_gemv(
            x, w13, norm_w, None, 1e-5, False, True, pdl=True, ahead=ahead),
        "w2 + add": lambda ahead: fused_step._fused_gemv(
            torch.zeros(1, 1536, dtype=dtype), w2, None, x, 0.0, False, False, pdl=True,
            ahead=ahead),
        "norm + wqkv + rope": lambda ahead: fused_step._norm_qkv_rope(
            x, norm_w, wqkv, None, cos, cos, torch.tensor([3]), cache, cache.clone(),
            torch.arange(16), 576, 1e-5, False, False, pdl=True, ahead=ahead),
    }
    for name, call in calls.items():
        for ahead in (w2, None):
            kernel, args, kwargs = _launch_as_on_a_gpu(monkeypatch, lambda c=call, a=ahead: c(a))
            assert kwargs["AHEAD_ON"] is (ahead is not None), name
            if ahead is not None:
                names = [p.name for p in kernel.params]
                assert args[names.index("AHEAD")] is ahead, name
                assert args[names.index("ahead_total")] == prefetch.ahead_bytes(ahead) \
                    == 576 * 1536 * 2, name
            lines, wait = pdl_ptx((kernel, args, kwargs), name)
            at = [i for i, line in enumerate(lines) if PREFETCH_LINE in line]
            if ahead is None:
                assert at == [], name
                continue
            assert len(at) == 1 and at[0] < wait, (name, at, wait)
            assert lines[at[0]].strip().startswith("@"), name  # one thread's, where bytes are left


def _fused_debug(spec=DEBUG, kinds="fused"):
    model = build_model(spec, seed=1)
    fuse_projections(model)
    set_step_kernels(model, kinds)
    return model


def _products(model) -> list[torch.Tensor]:
    return [w for layer in model.layers for w in layer.products()] + [model.output.weight]


@pytest.mark.parametrize("distance", [1, 2])
def test_each_kernel_is_handed_the_product_distance_kernels_on(monkeypatch, distance):
    """The chain wqkv, wo, w13, w2 of every layer, then the output head: kernel i of the step
    prefetches product i + distance, none past the head; the model records the distance."""
    from infermeter.engine import model as model_module

    monkeypatch.setattr(model_module, "compiling", lambda: True)
    monkeypatch.setattr(prefetch, "DISTANCE", distance)
    model = _fused_debug()
    plan = model.prefetch_plan(torch.zeros(1, 1, DEBUG.dim))
    chain = _products(model)
    handed = [weight for layer in plan for weight in layer]
    assert len(plan) == DEBUG.n_layers and all(len(layer) == 4 for layer in plan)
    assert len(handed) == len(chain) - 1
    for i, weight in enumerate(handed):
        if i + distance < len(chain):
            assert weight is chain[i + distance], i
        else:
            assert weight is None, i
    assert model.prefetch_distance == distance
    set_step_kernels(model, "split")  # a kind that prefetches nothing forgets the record
    assert model.prefetch_distance == 0


def test_no_plan_where_the_step_is_not_the_whole_fused_step(monkeypatch):
    """Distance 0, split kernels, a model whose layers do not all take the four kernels
    (Gemma 3), a batch over one, an eager step: no plan, and nothing recorded."""
    from infermeter.engine import model as model_module

    monkeypatch.setattr(model_module, "compiling", lambda: True)
    one = torch.zeros(1, 1, DEBUG.dim)
    monkeypatch.setattr(prefetch, "DISTANCE", 0)
    assert _fused_debug().prefetch_plan(one) is None
    monkeypatch.setattr(prefetch, "DISTANCE", 2)
    assert _fused_debug(kinds="split").prefetch_plan(one) is None
    gemma = DEBUG.with_updates(arch="gemma3_text", qk_norm=True)  # post-norms: two parts a layer
    model = _fused_debug(gemma)
    assert model.prefetch_plan(torch.zeros(1, 1, gemma.dim)) is None
    model = _fused_debug()
    assert model.prefetch_plan(torch.zeros(2, 1, DEBUG.dim)) is None
    monkeypatch.setattr(model_module, "compiling", lambda: False)
    assert model.prefetch_plan(one) is None
    assert model.prefetch_distance == 0


def test_the_step_hands_each_fused_kernel_its_planned_weight(monkeypatch):
    """A fused step of the debug model, its four kernels replaced by recorders (their outputs
    zeros of the right shape): wqkv's kernel, wo's, w13's and w2's are handed, in step order,
    the plan's weights (distance 2)."""
    from infermeter.engine import model as model_module
    from infermeter.engine import self_attention

    handed: list[torch.Tensor | None] = []

    def qkv(x, norm_weight, weight, bias, *rest):
        handed.append(rest[-1])
        return torch.zeros(1, rest[6], dtype=x.dtype)  # rest[6]: n_q

    def swiglu(x, norm_weight, weight, eps, gemma, gelu=False, ahead=None):
        handed.append(ahead)
        return torch.zeros(1, weight.shape[0] // 2, dtype=x.dtype)

    def add(x, weight, residual, ahead=None):
        handed.append(ahead)
        return residual.clone()

    monkeypatch.setattr(fused_step, "norm_qkv_rope_cache", qkv)
    monkeypatch.setattr(fused_step, "norm_matvec_swiglu", swiglu)
    monkeypatch.setattr(fused_step, "matvec_add", add)
    monkeypatch.setattr(model_module, "compiling", lambda: True)
    monkeypatch.setattr(self_attention, "compiling", lambda: True)
    monkeypatch.setattr(model_module, "fused_step_kernels_usable", lambda x, params: True)
    monkeypatch.setattr(prefetch, "DISTANCE", 2)
    model = _fused_debug()
    for layer in model.layers:
        layer.attention.decode_attention = "math"
        monkeypatch.setattr(layer.attention, "fuses_rope_and_cache", lambda x: True)
    model.setup_cache(1, 8)
    with torch.inference_mode():
        model(torch.tensor([[3]]), torch.tensor([0]))
    chain = _products(model)
    assert len(handed) == len(chain) - 1
    assert all(weight is chain[i + 2] for i, weight in enumerate(handed[:-1]))
    assert handed[-1] is None  # the last layer's w2: nothing two kernels past the head


def _recorded_prefetch(monkeypatch, traced: int, kinds: str = "fused") -> int | None:
    """config.prefetch of a compiled batch-1 case whose traced step prefetched `traced` ahead."""
    from tests.test_fused_rope_record import batch_one_runner

    runner = batch_one_runner(monkeypatch, DEBUG, kinds)
    runner.generator.model.prefetch_distance = traced
    return runner.describe()["prefetch"]


def test_the_result_records_the_distance_where_the_step_was_fused(monkeypatch):
    assert _recorded_prefetch(monkeypatch, 2) == 2
    assert _recorded_prefetch(monkeypatch, 0) == 0
    assert _recorded_prefetch(monkeypatch, 0, kinds="split") is None


@pytest.mark.gpu
def test_on_cuda_the_prefetching_fused_step_gives_the_eager_tokens(monkeypatch):
    """The fused step in our recorded CUDA graph with every kernel prefetching two products
    ahead: eager's greedy tokens (a prefetch moves no value), and the plan ran."""
    from infermeter.engine.generator import Generator
    from tests.test_generate import (
        PROMPTS,
        SPEC,
        assert_compiled_gives_eager_tokens,
        peaked_cuda_model,
    )

    monkeypatch.setattr(prefetch, "DISTANCE", 2)
    model = peaked_cuda_model(SPEC, torch.float16)
    gen = Generator(model, max_seq_len=64, step_graphs="recorded")
    set_step_kernels(model, "fused")
    assert_compiled_gives_eager_tokens(gen, PROMPTS[:1])
    assert model.prefetch_distance == 2
