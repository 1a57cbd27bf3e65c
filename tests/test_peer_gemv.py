"""parallel/peer_gemv.py: the GEMV that pushes its partial sums to the peers and the kernel that
waits for them, sums, adds and norms (--tp-all-reduce triton-push).

As in test_peer_all_reduce.py, the protocol runs for real in two spawned processes under
Triton's CPU interpreter, the ranks' "symmetric" buffers being shared CPU tensors; the sm_90
build is checked with Triton's compiler (no GPU needed).
"""

from __future__ import annotations

import re

import pytest
import torch

from infermeter.engine import linear as linear_module
from infermeter.engine.linear import Linear
from infermeter.engine.parallel.peer_all_reduce import PeerAllReduce, buffer_bytes
from infermeter.engine.parallel.peer_gemv import gemv_push, wait_add_norm
from infermeter.engine.parallel.sharding import TensorParallel, use_peer_all_reduce
from infermeter.errors import InfermeterError
from infermeter.generate.job import GenerateRequest, _all_reduce_options
from infermeter.spec.presets import PRESETS
from tests.test_peer_all_reduce import (
    ACQUIRE_CAS_SYS,
    RELEASE_ADD_SYS,
    needs_triton,
    shared_buffers,
    sm90_ptx,
)
from tests.tp_workers import (
    DECODE,
    PUSH_CASES,
    peer_push_model_matches_tp1,
    peer_push_sums,
    run_ranks,
)


@needs_triton
def test_two_ranks_push_and_sum(monkeypatch) -> None:
    """Four GEMVs over three sites (one reused) in each of the GEMV's tilings, fp32/fp16/bf16:
    each rank's partial equals F.linear's, the waiting kernel's h and norm equal torch's on the
    sum of both ranks' partials, and the two ranks hold the same bits; a plain fused add_norm on
    a site the pushes used still sums right, and every flag is back at 0."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    results = run_ranks(peer_push_sums, 2, shared_buffers(3, 2), timeout=180)
    for result in results:
        assert result["equal"] == [True] * (2 * len(PUSH_CASES) + 1)
        assert result["flags_set"] == 0
    for (h0, normed0), (h1, normed1) in zip(results[0]["outputs"], results[1]["outputs"]):
        assert torch.equal(h0, h1) and torch.equal(normed0, normed1)


@needs_triton
def test_tp2_model_that_pushes_matches_tp1(monkeypatch) -> None:
    """The debug model at tp 2, batch 1, decode steps compiled with fullgraph: every wo and w2
    pushes (2 a layer a step) and the logits equal tp 1's within 1e-5 (float32)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec = PRESETS["debug"]
    results = run_ranks(peer_push_model_matches_tp1, 2, spec,
                        shared_buffers(2 * spec.n_layers, 2), timeout=240)
    for result in results:
        assert result["diff"] < 1e-5
        assert result["pushes"] == DECODE * 2 * result["n_layers"]


def test_linear_pushes_only_the_products_that_take_the_gemv(monkeypatch) -> None:
    """row_product replaces the GEMV exactly where the GEMV would run (one row, compiled,
    matvec kernel triton, Triton there); the all-reduce after it asks the same question."""
    layer = Linear(8, 4, bias=False)
    monkeypatch.setattr(linear_module, "compiling", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(linear_module, "triton_runs_on", lambda t: True)
    assert not layer.pushes(1)  # nothing to push with
    calls = []
    layer.row_product = lambda x, w: calls.append(x.shape) or torch.zeros(1, 4)
    assert layer.pushes(1) and not layer.pushes(2)
    assert layer(torch.ones(1, 1, 8)).shape == (1, 1, 4) and calls == [(1, 8)]
    layer(torch.ones(2, 1, 8))  # two rows: F.linear
    assert calls == [(1, 8)]
    layer.matvec_kernel = "inductor"
    assert not layer.pushes(1)
    monkeypatch.setattr(linear_module, "compiling", lambda: False)
    layer.matvec_kernel = "triton"
    assert not layer.pushes(1)  # eager steps never push


def test_bad_calls_are_refused() -> None:
    peer = PeerAllReduce(0, [torch.zeros(buffer_bytes(2, 2), dtype=torch.uint8)] * 2, 2)
    with pytest.raises(ValueError, match="one row of 8"):
        gemv_push(peer, torch.zeros(1, 8, dtype=torch.float16), torch.zeros(4, 8), 0)
    with pytest.raises(ValueError, match="one row of 8"):
        gemv_push(peer, torch.zeros(2, 8), torch.zeros(4, 8), 0)
    with pytest.raises(ValueError, match="site 2 outside"):
        gemv_push(peer, torch.zeros(1, 8), torch.zeros(4, 8), 2)
    with pytest.raises(ValueError, match="takes one row"):
        wait_add_norm(peer, torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(4), 1e-5, 0)
    from infermeter.engine.checkpoint.load import load_model

    model = load_model("random:debug")
    model.tp_collectives = None
    cpu_ranks = TensorParallel(0, 2, 0, torch.device("cpu"))
    with pytest.raises(InfermeterError, match="needs a tensor-parallel model"):
        use_peer_all_reduce(model, cpu_ranks, push=True)
    cuda_ranks = TensorParallel(0, 2, 0, torch.device("cuda", 0))
    with pytest.raises(InfermeterError, match="triton-push fuses each all-reduce"):
        _all_reduce_options(GenerateRequest(source="random:debug", tp_all_reduce="triton-push",
                                            compile_prefill=True), cuda_ranks)


@needs_triton
def test_push_needs_the_fused_norm(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    results = run_ranks(_push_without_norm, 2, shared_buffers(2 * PRESETS["debug"].n_layers, 2))
    assert results == ["refused"] * 2


def _push_without_norm(tp: TensorParallel, buffers: list[torch.Tensor]) -> str:
    from infermeter.engine.checkpoint.load import load_model

    shard = load_model("random:debug", seed=1, tp=tp)
    try:
        use_peer_all_reduce(shard, tp, buffers, fuse_norm=False, push=True)
    except ValueError as refusal:
        return "refused" if "fused add and norm" in str(refusal) else str(refusal)
    return "taken"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_push_kernels_compile_for_an_h100_with_system_scope_flags(monkeypatch, dtype) -> None:
    """sm_90 machine code from the launches the functions make (nothing runs), with 13B's tp 2
    wo and w2 shapes: the GEMV has no atomics at all (a release per program stalled it), the
    kernel after it signals with a system-scope release and waits with a system-scope
    acquiring compare-and-swap."""
    peer = PeerAllReduce(1, [torch.zeros(buffer_bytes(2, 2), dtype=torch.uint8)] * 2, 2)
    row = torch.zeros(1, 1, 5120, dtype=dtype)
    built = sm90_ptx(monkeypatch, lambda: (
        gemv_push(peer, torch.zeros(1, 2560, dtype=dtype), torch.zeros(5120, 2560, dtype=dtype),
                  0),
        gemv_push(peer, torch.zeros(1, 6912, dtype=dtype), torch.zeros(5120, 6912, dtype=dtype),
                  1),
        wait_add_norm(peer, row, row, torch.ones(5120, dtype=dtype), 1e-5, 1)))
    assert [name for name, _ in built] == \
        ["_gemv_push_kernel"] * 2 + ["_peer_wait_add_norm_kernel"]
    for name, ptx in built:
        if name == "_gemv_push_kernel":
            assert not re.search(r"\b(red|atom)\.", ptx) and "fence" not in ptx
        else:
            assert re.search(RELEASE_ADD_SYS, ptx) and re.search(ACQUIRE_CAS_SYS, ptx)
