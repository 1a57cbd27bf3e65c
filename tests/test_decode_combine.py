"""The split-KV decode attention's one-launch combine (COMBINE "last", kernels/decode_attention.py):
the last split program of each (sequence, KV head) to finish combines the row, instead of a
second kernel. Its output must be the two-kernel path's to the bit.

Under Triton's interpreter (tests/decode_combine_worker.py): "last" against "separate" over GQA
shapes, head sizes, split counts, a ring layer, Gemma 2's cap, gpt-oss's sinks, float32 and
bfloat16, the counter back at 0 after every call, and compiled steps. Here, without a GPU: which
op the step takes, where the counter is made, the sm_90 build of the kernel (PDL's rule, the
acq_rel count, the exact division), and that its combine compiles to the same reductions (same
layouts, same order) as _combine_kernel, which bit-equality on a GPU rests on. On a GPU (`gpu`):
bit-equality over repeated calls and CUDA-graph replays.
"""

from __future__ import annotations

import importlib.util
import re
import threading
from pathlib import Path

import pytest
import torch

from infermeter.engine.kernels import decode_attention as kernels
from infermeter.engine.kernels import kept_counts as kept
from tests.sm90_build import recorded_launches, sm90_binary
from tests.triton_interpreter import run_under_interpreter

WORKER = Path(__file__).with_name("decode_combine_worker.py")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="needs triton")


@needs_triton
def test_last_combine_under_the_triton_interpreter():
    run_under_interpreter(WORKER)


def test_the_combine_is_separate_unless_set(monkeypatch):
    assert kernels.COMBINE == "separate"  # the default until a GPU measures "last"
    monkeypatch.setattr(kernels, "COMBINE", kernels.COMBINE)  # set_combine's change undone
    kernels.set_combine("last")
    assert kernels.COMBINE == "last"
    with pytest.raises(ValueError, match="unknown decode-attention combine 'first'"):
        kernels.set_combine("first")
    assert kernels.COMBINE == "last"


@needs_triton
@pytest.mark.parametrize("combine", ["separate", "last"])
def test_the_step_launches_one_kernel_with_the_last_combine(monkeypatch, combine):
    """decode_attention_kernel, as the compiled step calls it: two launches (split, combine)
    with "separate", one (_split_kv_last_kernel, the counter among its arguments) with
    "last"."""
    monkeypatch.setattr(kernels, "COMBINE", combine)
    q, cache = torch.zeros(2, 4, 2, 64), torch.zeros(2, 4, 256, 64)
    pos = torch.arange(256)
    launches = recorded_launches(monkeypatch, lambda: kernels.decode_attention_kernel(
        q, cache, cache, pos, pos[:1], 0, False, 3))
    names = [kernel.fn.__name__ for kernel, _, _ in launches]
    if combine == "separate":
        assert names == ["_split_kv_kernel", "_combine_kernel"]
        return
    assert names == ["_split_kv_last_kernel"]
    (_, args, kwargs), = launches
    assert args[10] is kernels.combine_counter(q.device, 8)  # B * H_kv rows
    assert kwargs["S_PAD"] == 4 and kwargs["HAS_SINKS"] is False


def test_the_counter_is_kept_and_never_made_during_a_capture(monkeypatch):
    """One counter per (device, rows), zeros, the same tensor on every call (a captured graph
    keeps its address); none is made while a CUDA graph is being captured."""
    cpu = torch.device("cpu")
    counter = kernels.combine_counter(cpu, 5)
    assert counter.dtype == torch.int32 and counter.shape == (5,) and not counter.any()
    assert kernels.combine_counter(cpu, 5) is counter
    assert kernels.combine_counter(cpu, 6) is not counter
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="before a CUDA graph is captured"):
        kernels.combine_counter(torch.device("cuda"), 5)
    assert kernels.combine_counter(cpu, 5) is counter  # made already: no capture question
    assert (torch.device("cuda"), 5) not in kept._KEPT


def test_a_gpu_counter_is_made_by_a_thread_of_its_own(monkeypatch):
    """On a GPU the counter comes from _zeros_in_no_pool, whose zeros are made (and waited
    for) on another thread than the caller's: a CUDA-graph pool routes only the allocations of
    the thread that asked for it (the gpu test below checks the pool itself)."""
    made = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(kept, "_zeros_in_no_pool",
                        lambda rows, device: made.append((rows, device)) or torch.zeros(rows))
    monkeypatch.setattr(kept, "_KEPT", {})
    cuda = torch.device("cuda", 0)
    counter = kernels.combine_counter(cuda, 7)
    assert made == [(7, cuda)] and kernels.combine_counter(cuda, 7) is counter and len(made) == 1
    monkeypatch.undo()

    threads, synced = [], []
    real_zeros = torch.zeros

    def zeros(*args, **kwargs):
        threads.append(threading.get_ident())
        return real_zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", zeros)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: synced.append(device))
    cpu = torch.device("cpu")
    zeros_made = kept._zeros_in_no_pool(3, cpu)
    assert zeros_made.dtype == torch.int32 and zeros_made.tolist() == [0, 0, 0]
    assert threads and threading.get_ident() not in threads and synced == [cpu]


def pdl_builds(monkeypatch, combine: str, dtype: torch.dtype, groups: int, head_dim: int,
               splits: int, softcap: float = 0.0, sinks: bool = False) -> list:
    """The sm_90 builds of the kernels one call launches with PDL, as on a GPU."""
    from tests.test_pdl import pdl_launches

    q = torch.zeros(2, 2, groups, head_dim, dtype=dtype)
    cache = torch.zeros(2, 2, 512, head_dim, dtype=dtype)
    pos = torch.arange(512)
    sink = torch.zeros(2 * groups, dtype=dtype) if sinks else None
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "compiled_for_gpu", lambda x: True)
        launches = pdl_launches(patch, lambda: kernels._split_kv_decode(
            q, cache, cache, pos, pos[:1], 0, False, splits, softcap, pdl=True, sinks=sink,
            combine=combine))
    return [(launch, sm90_binary(*launch)) for launch in launches]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_last_kernel_builds_for_an_h100(monkeypatch, dtype):
    """The one-launch kernel with PDL, compiled for sm_90: it waits before it reads anything
    and releases the next kernel after; its count is an acq_rel atomic add at GPU scope after
    a barrier (every thread's partial stored first), the last program reads the partials
    through L2 (.cg) and divides exactly (div.rn, as _combine_kernel), then sets the count
    back to 0."""
    from tests.test_fused_step import assert_exact_divisions
    from tests.test_pdl import first

    ((kernel, _, kwargs), binary), = pdl_builds(monkeypatch, "last", dtype, 4, 128, 3,
                                                softcap=50.0, sinks=True)
    assert kernel.fn.__name__ == "_split_kv_last_kernel"
    assert kwargs["PDL"] is True and kwargs["launch_pdl"] is True and binary.metadata.launch_pdl
    lines = binary.asm["ptx"].splitlines()
    wait = first(lines, "griddepcontrol.wait")
    assert wait < first(lines, "griddepcontrol.launch_dependents") < len(lines)
    assert not [line for line in lines[:wait] if "ld.global" in line]
    count = first(lines, "atom.global.gpu.acq_rel.add.u32")
    assert count < len(lines)
    stores = [i for i, line in enumerate(lines[:count]) if "st.global" in line]
    assert stores and first(lines, "bar.sync", max(stores)) < count  # the partials, then a barrier
    cg = [i for i, line in enumerate(lines) if "ld.global.cg" in line]
    assert cg and min(cg) > count  # the partials, read after the count
    assert count < first(lines, "atom.global.gpu.relaxed.exch.b32", max(cg)) < len(lines)
    assert_exact_divisions(lines, True, "split-KV with the last combine")


def reductions(ttgir: str) -> list[str]:
    """The types of a TTGIR module's tt.reduce ops, in order, with each layout alias written
    out (#blocked1 -> its definition): two kernels whose lists match reduce alike, thread by
    thread, so in the same order of additions."""
    aliases = dict(re.findall(r"^(#\w+) = (#ttg\.\w+<.*>)$", ttgir, re.M))
    found = re.findall(r"^\s*\}\) : (\(tensor<.*?\) -> [^ ]+(?: [^l][^ ]*)*)", ttgir, re.M)
    return [re.sub(r"#\w+", lambda m: aliases.get(m.group(0), m.group(0)), f) for f in found]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64, 1, 0.0, False), (4, 128, 3, 50.0, False),
                                   (8, 64, 17, 0.0, True)])
def test_the_last_kernel_reduces_as_the_two_kernels_do(monkeypatch, dtype, shape):
    """Built for sm_90, the one-launch kernel's reductions are the split kernel's then the
    combine kernel's, with the same types and layouts: the partials and the combine's sums
    (max over splits, the weighted l and acc sums) are computed alike, which is what makes
    "last" the same bits as "separate" (the gpu test checks the bits themselves)."""
    groups, head_dim, splits, softcap, sinks = shape
    two = pdl_builds(monkeypatch, "separate", dtype, groups, head_dim, splits, softcap, sinks)
    (_, one), = pdl_builds(monkeypatch, "last", dtype, groups, head_dim, splits, softcap, sinks)
    want = [r for _, binary in two for r in reductions(binary.asm["ttgir"])]
    assert len(want) == 5  # the split's max and sum, the combine's max and two sums
    assert reductions(one.asm["ttgir"]) == want


@pytest.mark.gpu
def test_on_cuda_a_counter_made_inside_a_pools_routing_stays_out_of_the_pool():
    """As in inductor's graph-tree warm-up: the step's first call allocates into a private pool
    (per thread); the counter made then is not in that pool, as a tensor the caller made is."""
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool):
        inside = torch.zeros(5, device="cuda", dtype=torch.int32)
        counter = kernels.combine_counter(torch.device("cuda", torch.cuda.current_device()), 4099)
    assert not counter.any() and counter.shape == (4099,)

    def in_pool(tensor):
        return any(seg["address"] <= tensor.data_ptr() < seg["address"] + seg["total_size"]
                   for seg in pool.snapshot(include_traces=False))

    assert in_pool(inside) and not in_pool(counter)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_on_cuda_the_last_combine_is_the_separate_ones_to_the_bit(dtype):
    """On a GPU: "last" equals "separate" bit for bit, with and without PDL, over repeated
    calls (the counter back at 0 after each) and over a CUDA graph's replays with new inputs
    copied in, for GQA shapes, heads of 64 and 128, 1, 3 and 17 splits, a ring layer, a cap
    and sinks."""
    from tests.test_pdl import launch_ways

    gen = torch.Generator(device="cuda").manual_seed(0)
    uses_pdl = launch_ways(torch.device("cuda"))
    cases = [(1, 64, 1, False, 0, 0.0, False), (4, 128, 3, False, 0, 0.0, False),
             (8, 64, 17, False, 0, 0.0, False), (4, 64, 3, True, 100, 0.0, False),
             (4, 128, 17, False, 0, 50.0, False), (8, 128, 3, False, 0, 0.0, True)]
    slots = 512
    query_pos = torch.tensor([300], device="cuda")

    def fresh(groups, dim, ring, sinks):
        q = torch.randn(2, 4, groups, dim, device="cuda", generator=gen).to(dtype)
        k, v = (torch.randn(2, 4, slots, dim, device="cuda", generator=gen).to(dtype)
                for _ in range(2))
        key_pos = torch.randperm(slots, device="cuda", generator=gen) if ring \
            else torch.arange(slots, device="cuda")
        sink = torch.randn(4 * groups, device="cuda", generator=gen).to(dtype) if sinks \
            else None
        return q, k, v, key_pos, sink

    for groups, dim, splits, ring, window, cap, sinks in cases:
        case = (groups, dim, splits, ring, window, cap, sinks, dtype)

        def run(tensors, combine, use_pdl=False, args=(window, ring, splits, cap)):
            q, k, v, key_pos, sink = tensors
            return kernels._split_kv_decode(q, k, v, key_pos, query_pos, *args, use_pdl, sink,
                                            combine=combine)

        counter = kernels.combine_counter(torch.zeros(0, device="cuda").device, 8)  # q.device
        for use_pdl in uses_pdl:
            for _ in range(3):
                tensors = fresh(groups, dim, ring, sinks)
                want = run(tensors, "separate")
                for _ in range(3):
                    assert torch.equal(run(tensors, "last", use_pdl), want), (case, use_pdl)
                    assert not counter.any(), (case, use_pdl, counter.tolist())
            # a CUDA graph of the op, warmed first (the counter is made outside the capture)
            static = fresh(groups, dim, ring, sinks)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                run(static, "last", use_pdl)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = run(static, "last", use_pdl)
            for _ in range(4):
                for buffer, new in zip(static, fresh(groups, dim, ring, sinks), strict=True):
                    if buffer is not None:
                        buffer.copy_(new)
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(out, run(static, "separate")), (case, use_pdl, "graph")
                assert not counter.any(), (case, use_pdl, "graph", counter.tolist())
