"""engine/parallel/peer_all_reduce.py: the one-kernel all-reduce (--tp-all-reduce triton).

The kernel's protocol (remote stores, release/acquire flags, owner-reset) runs for real in two
spawned processes under Triton's CPU interpreter, whose atomics act on shared memory: the ranks'
"symmetric" buffers are shared CPU tensors. The sm_90 build is checked with Triton's compiler
(no GPU needed), including that the flags really are system-scope release/acquire atomics.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from infermeter.cli import main as cli_main
from infermeter.engine.parallel.all_reduce import use_peer_all_reduce
from infermeter.engine.parallel.group import TensorParallel
from infermeter.engine.parallel.peer_all_reduce import (
    BLOCK,
    MAX_PROGRAMS,
    SLOT_BYTES,
    PeerAllReduce,
    PeerBufferUnavailable,
    buffer_bytes,
    flag_area_bytes,
)
from infermeter.errors import InfermeterError
from infermeter.generate.job import _all_reduce_options
from infermeter.generate.request import build_request
from infermeter.specs.presets import PRESETS
from tests.tp_workers import (
    PEER_CASES,
    generate_when_peer_buffers_fail,
    peer_buffer_agreement,
    peer_models_match_tp1,
    peer_sums,
    run_ranks,
)

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="needs triton")


def shared_buffers(n_sites: int, world: int) -> list[torch.Tensor]:
    return [torch.zeros(buffer_bytes(n_sites, world), dtype=torch.uint8).share_memory_()
            for _ in range(world)]


def test_buffer_layout_leaves_room_for_every_program() -> None:
    # Data starts after the flags, 256-byte aligned; a slot takes SLOT_BYTES of any dtype, and
    # the most programs a slot needs (2-byte elements) each have a flag.
    assert flag_area_bytes(80) % 256 == 0 and flag_area_bytes(80) >= 80 * MAX_PROGRAMS * 4
    assert buffer_bytes(80, 2) == flag_area_bytes(80) + 80 * 2 * SLOT_BYTES
    assert MAX_PROGRAMS * BLOCK * 2 == SLOT_BYTES
    peer = PeerAllReduce(0, [torch.zeros(buffer_bytes(2, 2), dtype=torch.uint8)] * 2, 2)
    assert peer.takes(torch.zeros(SLOT_BYTES // 2, dtype=torch.bfloat16))
    assert not peer.takes(torch.zeros(SLOT_BYTES // 2 + 1, dtype=torch.bfloat16))
    assert not peer.takes(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="site 2 outside"):
        peer(torch.zeros(4), 2)
    with pytest.raises(ValueError, match="needs"):
        PeerAllReduce(0, [torch.zeros(16, dtype=torch.uint8)] * 2, 2)


@needs_triton
def test_two_ranks_sum_through_each_others_buffers(monkeypatch) -> None:
    """Five all-reduces over three sites (one reused), 5 to 3000 elements (1-3 programs,
    ragged), fp32/bf16/fp16: each equals the float32 sum in rank order, on both ranks; then the
    fused all-reduce + residual add + RMSNorm (1-5 rows) against torch; every flag is back at
    0."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the spawned ranks inherit it
    results = run_ranks(peer_sums, 2, shared_buffers(3, 2), timeout=120)
    for result in results:
        assert result == {"equal": [True] * (len(PEER_CASES) + 3), "flags_set": 0}


@needs_triton
def test_tp2_model_with_the_peer_kernel_matches_tp1(monkeypatch) -> None:
    """The debug model (with the residual add and the norm fused into the kernel, and without),
    a tied-embedding Qwen2 one (fused; its logits all-reduce stays NCCL's) and a tiny gpt-oss
    (fused: rank 0's partial sums carry wo's and the experts' down biases) at tp 2 with
    every wo/w2 all-reduce through a kernel: logits equal tp 1's within 1e-5 (float32), greedy
    tokens equal, and a fullgraph-compiled decode step too. The cases run in turn on one
    pair of spawned ranks, each with its own buffers."""
    from tests.test_parallel import SPECS

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    debug = PRESETS["debug"]
    tied = debug.with_updates(arch="qwen2", qkv_bias=True, tie_embeddings=True)
    cases = {"gqa-fused": (debug, True), "gqa": (debug, False), "tied-fused": (tied, True),
             "gpt-oss-fused": (SPECS["gpt-oss"], True)}
    results = run_ranks(peer_models_match_tp1, 2,
                        [(spec, shared_buffers(2 * spec.n_layers, 2), fuse_norm)
                         for spec, fuse_norm in cases.values()], timeout=400)
    for per_case in results:
        assert len(per_case) == len(cases)
        for name, result in zip(cases, per_case):
            assert result["diff"] < 1e-5, name
            assert result["tokens_equal"] and result["compiled_equal"], name
            # the prefill and 4 decode steps, wo and w2 of every layer
            assert result["calls"] == 5 * 2 * result["n_layers"], name


def test_triton_all_reduce_is_refused_where_it_cannot_run(capsys) -> None:
    """CPU ranks (no symmetric memory) and tp 1 get one clear line before any weights load;
    an unsharded model cannot take it."""
    cpu_ranks = TensorParallel(0, 2, 0, torch.device("cpu"))
    request = build_request(source="random:debug", tp_all_reduce="triton")
    with pytest.raises(InfermeterError, match="needs CUDA GPUs"):
        _all_reduce_options(request, cpu_ranks)
    with pytest.raises(InfermeterError, match="needs --tp 2 or more"):
        _all_reduce_options(request, None)
    cuda_ranks = TensorParallel(0, 2, 0, torch.device("cuda", 0))
    fused_prefill = build_request(source="random:debug", tp_all_reduce="triton",
                                    compile_prefill=True)
    with pytest.raises(InfermeterError, match="use --tp-all-reduce triton-unfused with it"):
        _all_reduce_options(fused_prefill, cuda_ranks)
    from infermeter.engine.checkpoint.load import load_model

    with pytest.raises(InfermeterError, match="needs a tensor-parallel model"):
        use_peer_all_reduce(load_model("random:debug"), cpu_ranks)
    code = cli_main(["generate", "--model", "debug", "--device", "cpu", "--max-new-tokens", "2",
                     "--tp-all-reduce", "triton"])
    assert code == 2 and capsys.readouterr().err.strip().splitlines() == [
        "infermeter: error: --tp-all-reduce triton needs --tp 2 or more"]


def sm90_ptx(monkeypatch, launch) -> list[tuple[str, str]]:
    """(kernel name, PTX) of every Triton launch `launch()` makes, each built for an H100
    (sm_90) with Triton's compiler as the launch asked: nothing runs, no GPU needed."""
    from tests.sm90_build import recorded_launches, sm90_binary

    built = []
    for kernel, args, kwargs in recorded_launches(monkeypatch, launch):
        binary = sm90_binary(kernel, args, kwargs)
        assert binary.asm["cubin"]
        built.append((kernel.fn.__name__, binary.asm["ptx"]))
    return built


RELEASE_ADD_SYS = r"(red|atom)\.global\.(sys\.release|release\.sys)\.add"  # a signal
ACQUIRE_CAS_SYS = r"atom\.global\.(acquire\.sys|sys\.acquire)\.cas"  # a wait


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_compiles_for_an_h100_with_system_scope_flags(monkeypatch, dtype) -> None:
    """sm_90 machine code from the launch the op makes (nothing runs); its PTX signals with a
    release and waits with an acquire, both at system scope (the peer is another GPU)."""
    peer = PeerAllReduce(1, [torch.zeros(buffer_bytes(2, 2), dtype=torch.uint8)] * 2, 2)
    x = torch.zeros(1, 1, 5120, dtype=dtype)
    weight = torch.ones(5120, dtype=dtype)
    built = sm90_ptx(monkeypatch, lambda: (peer(x, 1), peer.add_norm(x, x, weight, 1e-5, 0)))
    assert [name for name, _ in built] == ["_peer_all_reduce_kernel", "_peer_add_norm_kernel"]
    for _, ptx in built:
        assert re.search(RELEASE_ADD_SYS, ptx) and re.search(ACQUIRE_CAS_SYS, ptx)
        assert "bar.sync" in ptx  # the program's stores before its signal
    # the norm's mean as torch's CUDA mean (sum x 1/n, an exact reciprocal), no fast division
    norm_ptx = built[1][1]
    assert "div.rn.f32" in norm_ptx
    assert "div.full.f32" not in norm_ptx and "div.approx" not in norm_ptx


def test_the_prenormed_forward_is_the_same_model() -> None:
    """model.add_norm set to the plain add-then-norm: the layers run forward_prenormed (each
    residual add with the norm after it, across layer boundaries) and the logits are the plain
    forward's, bit for bit; a compiled prefill's per-layer block_fn is refused."""
    from infermeter.engine.checkpoint.load import load_model
    from infermeter.engine.model import add_then_norm

    model = load_model("random:debug", max_batch_size=2, max_seq_len=16, seed=3)
    tokens = torch.randint(0, model.spec.vocab_size, (2, 7),
                           generator=torch.Generator().manual_seed(0))
    plain = model(tokens, torch.arange(7))
    model.reset_cache()
    model.add_norm = add_then_norm
    assert torch.equal(model(tokens, torch.arange(7)), plain)
    with pytest.raises(InfermeterError, match="compiled prefill"):
        model(tokens, torch.arange(7), block_fn=lambda *args: args[1])


def test_auto_takes_the_triton_kernels_only_where_every_rank_can(monkeypatch) -> None:
    """--tp-all-reduce auto: triton (fused) where peer_all_reduce_usable says so, triton-unfused
    with --compile-prefill, NCCL otherwise and at tp 1; an explicit kind is kept. CPU ranks are
    never usable (no collective needed to say so without a group)."""
    from infermeter.engine.parallel import all_reduce
    from infermeter.generate.job import resolve_all_reduce

    cpu_ranks = TensorParallel(0, 2, 0, torch.device("cpu"))
    assert all_reduce.peer_all_reduce_usable(cpu_ranks) is False
    gpus = TensorParallel(0, 2, 0, torch.device("cuda", 0))
    auto = build_request(source="random:debug")
    assert auto.engine.tp_all_reduce == "auto"
    monkeypatch.setattr(all_reduce, "peer_all_reduce_usable", lambda parallel: True)
    assert resolve_all_reduce(auto, gpus) == "triton"
    prefill = build_request(source="random:debug", compile_prefill=True)
    assert resolve_all_reduce(prefill, gpus) == "triton-unfused"
    # a model that norms after attention and the FFN (Gemma) cannot fuse the add and norm
    from infermeter.specs.presets import PRESETS

    assert resolve_all_reduce(auto, gpus, PRESETS["gemma-3-1b"]) == "triton-unfused"
    assert resolve_all_reduce(auto, gpus, PRESETS["llama-2-7b"]) == "triton"
    assert resolve_all_reduce(build_request(source="random:debug", tp_all_reduce="nccl"),
                              gpus) == "nccl"
    assert resolve_all_reduce(auto, None) == "nccl"
    monkeypatch.setattr(all_reduce, "peer_all_reduce_usable", lambda parallel: False)
    assert resolve_all_reduce(auto, gpus) == "nccl"


# ---- symmetric memory that cannot be had (for_group's agreement; generate's fallback) --------
ERROR_LINE = "RuntimeError: CUDA driver error: operation not supported"


def test_every_rank_raises_the_same_error_when_one_cannot_get_its_buffer() -> None:
    """for_group on two gloo ranks with stand-ins for symmetric memory (tp_workers): success
    on both returns each rank's peer; a failed allocation or rendezvous on one rank (or an
    allocation on both) makes both ranks raise PeerBufferUnavailable at once, with the same
    one-line message naming the failing rank(s), the step and the first line of the first
    one's error, and no buffer kept. Four calls in a row on one group: a rank that went on
    alone would leave the next call's collectives unmatched (a hang, or the timeout)."""
    cases = [{}, {1: "empty"}, {0: "rendezvous"}, {0: "empty", 1: "empty"}, {}]
    ranks = run_ranks(peer_buffer_agreement, 2, cases, timeout=60)
    allocating = f"allocating {buffer_bytes(2, 2) / 2**20:.1f} MiB"  # n_sites 2, 2 ranks
    for rank, results in enumerate(ranks):
        for ok in (results[0], results[-1]):
            assert ok["rank"] == rank and ok["buffers"] == 2
        for result in results[1:-1]:
            assert result["error"] == "PeerBufferUnavailable" and not result["buffer_kept"]
        assert [r["message"] for r in results[1:-1]] == [
            f"symmetric memory unavailable on rank 1 ({allocating}): {ERROR_LINE} (empty)",
            "symmetric memory unavailable on rank 0 (mapping the peers' buffers): "
            f"{ERROR_LINE} (rendezvous)",
            f"symmetric memory unavailable on ranks 0, 1 ({allocating}): {ERROR_LINE} (empty)"]
        assert all(r["seconds"] < 10 for r in results)


def test_auto_falls_back_to_nccl_where_the_peer_buffers_fail(capsys) -> None:
    """generate --tp 2 on gloo ranks where auto picks triton and rank 1's rendezvous fails:
    with auto the run goes on with NCCL (the tokens of one process), its Result saying "nccl"
    and why; with an explicit triton it ends with exit 2 and one error line per rank (the
    same message on both: the launcher prints it once), no traceback."""
    import json

    ranks = run_ranks(generate_when_peer_buffers_fail, 2, ["auto", "triton"], timeout=120)
    why = ("symmetric memory unavailable on rank 1 (mapping the peers' buffers): "
           f"{ERROR_LINE} (rendezvous)")
    for rank, (auto, _) in enumerate(ranks):
        assert auto["code"] == 0 and "Traceback" not in auto["stderr"], auto["stderr"]
        assert bool(auto["stdout"]) == (rank == 0)  # only rank 0 prints
    result = json.loads(ranks[0][0]["stdout"])
    assert result["config"]["tp"] == 2 and result["config"]["tp_all_reduce"] == "nccl"
    assert f"--tp-all-reduce auto fell back to NCCL: {why}" in result["warnings"]
    assert cli_main(["generate", "--model", "debug", "--device", "cpu", "--max-new-tokens",
                     "4", "--repeats", "1", "--warmup", "0", "--no-roofline", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert result["output_token_ids"] == alone["output_token_ids"]
    for rank, (_, explicit) in enumerate(ranks):
        assert explicit["code"] == 2 and explicit["stdout"] == ""
        assert explicit["stderr"].splitlines() == [f"infermeter: error: rank {rank}: {why}"]


@needs_triton
@pytest.mark.parametrize("kind", [{}, {"fuse_norm": False}])
def test_a_failed_peer_buffer_leaves_the_model_as_it_was(monkeypatch, kind) -> None:
    """use_peer_all_reduce whose for_group raises PeerBufferUnavailable (as on every rank when
    one cannot get its buffer): the sharded model keeps its NCCL all-reduces, nothing of the
    peer kernels set (what lets auto go on with NCCL)."""
    from infermeter.engine.checkpoint.load import load_model
    from infermeter.engine.parallel.sharding import row_parallel_sites

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # use_peer_all_reduce's Triton check passes

    def unavailable(cls, *args, **kwargs):
        raise PeerBufferUnavailable("symmetric memory unavailable on rank 1 (...): ...")

    monkeypatch.setattr(PeerAllReduce, "for_group", classmethod(unavailable))
    model = load_model("random:debug", parallel=TensorParallel(0, 2, 0, torch.device("cpu")))
    gpus = TensorParallel(0, 2, 0, torch.device("cuda", 0))  # only its type is looked at
    with pytest.raises(PeerBufferUnavailable):
        use_peer_all_reduce(model, gpus, **kind)
    collectives = model.tp_collectives
    assert collectives.peer is None and collectives.peer_index == -1
    assert not collectives.fused and model.add_norm is None
    for _, _, norm in row_parallel_sites(model):
        assert not hasattr(norm, "all_reduce_site")
