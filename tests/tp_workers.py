"""Helpers for test_parallel.py: run a function on N gloo ranks, and what each rank checks.

`run_ranks(fn, world, *args)` starts `world` processes (torch.multiprocessing, spawn), sets the
environment torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, the agent's store
held by the test process), joins them through
group.init_distributed("cpu") and returns every rank's fn(parallel, *args). A rank that raises fails
the test with its traceback; ranks still running after `timeout` are killed and the test fails,
so a hang can never block CI. Worker functions live here (not in the test file) because spawned
processes import them by module name.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Only what every rank needs at start-up: each spawned rank imports this module, and the model,
# generator and sizes (about 1 s of imports a process) are imported by the workers that use them.
from infermeter.engine.parallel.group import TensorParallel, init_distributed, teardown

BATCH, CACHE, PROMPT, DECODE = 2, 24, 9, 4


def _entry(rank: int, fn: Any, world: int, port: int, out: str, args: tuple) -> None:
    # As torchrun does: the store is the launcher's (here the test's), every rank a client.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)  # 2 CPU cores shared by up to 4 ranks
    parallel = init_distributed("cpu")
    try:
        torch.save(fn(parallel, *args), Path(out) / f"rank-{rank}.pt")
    finally:
        assert teardown(timeout_s=30), "teardown did not finish"


def run_ranks(fn: Any, world: int, *args: Any, timeout: float = 80.0) -> list[Any]:
    """Every rank's fn(parallel, *args). One retry, only for a rank killed by SIGABRT from C++
    ("terminate called without an active exception"): seen once in about 16 runs of the
    two-rank test on a 2-core machine, inside gloo, never with a Python error. A rank that
    raises, a wrong result, or a second abort still fails the test."""
    try:
        return _run_ranks_once(fn, world, *args, timeout=timeout)
    except mp.ProcessExitedException as err:
        if err.signal_name != "SIGABRT":
            raise
        return _run_ranks_once(fn, world, *args, timeout=timeout)


def _run_ranks_once(fn: Any, world: int, *args: Any, timeout: float) -> list[Any]:
    # The test holds the rendezvous store on a port the OS picked: no port can be taken twice.
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory() as out:
        context = mp.start_processes(_entry, args=(fn, world, store.port, out, args),
                                     nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{world} ranks still running after {timeout} s")
        return [torch.load(Path(out) / f"rank-{r}.pt", weights_only=False) for r in range(world)]


# ---- what the ranks check ------------------------------------------------------------------------
def _forward_steps(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Prefill PROMPT tokens, then DECODE single-token steps: logits [B, PROMPT + DECODE, V]."""
    model.reset_cache()
    outs = [model(tokens[:, :PROMPT], torch.arange(PROMPT))]
    for pos in range(PROMPT, PROMPT + DECODE):
        outs.append(model(tokens[:, pos:pos + 1], torch.tensor([pos])))
    return torch.cat(outs, dim=1)


@torch.no_grad()
def compare_with_tp1(parallel: TensorParallel, sources: dict[str, Any],
                     compiled: tuple[str, ...] = (), seed: int = 1) -> dict[str, dict[str, Any]]:
    """Per source: max |logits tp - logits tp 1|, cache bytes vs kvsize, greedy tokens equal,
    and for the sources named in `compiled`, the decode step under torch.compile(fullgraph=True,
    backend="aot_eager": dynamo and AOT tracing without inductor's slow C++ build).

    The tp 1 reference runs on every rank, unsharded, from the same source and seed.
    """
    from infermeter.engine.checkpoint.load import load_model
    from infermeter.engine.generator import GenerationConfig, Generator
    from infermeter.specs import sizes

    out = {}
    for name, source in sources.items():
        full = load_model(source, max_batch_size=BATCH, max_seq_len=CACHE, seed=seed)
        shard = load_model(source, max_batch_size=BATCH, max_seq_len=CACHE, seed=seed,
                           parallel=parallel)
        spec = full.spec
        tokens = torch.randint(0, spec.vocab_size, (BATCH, PROMPT + DECODE),
                               generator=torch.Generator().manual_seed(0))
        diff = (_forward_steps(full, tokens) - _forward_steps(shard, tokens)).abs().max().item()
        config = GenerationConfig(max_new_tokens=12)
        prompts = tokens[:, :PROMPT].tolist()
        want = Generator(full, CACHE).generate(prompts, config).output_token_ids
        got = Generator(shard, CACHE).generate(prompts, config).output_token_ids
        # Generator fused both models' projections (fusion.py): fused tp 2 still equals tp 1.
        fused_diff = (_forward_steps(full, tokens) - _forward_steps(shard, tokens)).abs().max()
        shard.setup_cache(BATCH, CACHE)  # the generator resized it; size it as kvsize is asked
        out[name] = {"diff": diff, "fused_diff": fused_diff.item(), "tokens_equal": want == got,
                     "cache_bytes": shard.cache_bytes(),
                     "kvsize_bytes": sizes.kv_cache_bytes(spec, BATCH, CACHE, "float32",
                                                           parallel.world)}
        if name in compiled:
            out[name]["compiled_equal"] = _compiled_step_equal(full, shard, "aot_eager")
    return out


def _compiled_step_equal(full: Any, shard: Any, backend: str) -> bool:
    """The sharded decode step under torch.compile(fullgraph=True): collectives captured."""
    from infermeter.engine.generator import _decode_one

    step = torch.compile(_decode_one, backend=backend, fullgraph=True, dynamic=False)
    args = (torch.tensor([5, 7]), torch.tensor([0]), torch.zeros(2, dtype=torch.bool),
            torch.tensor([-1]), torch.tensor(0))
    options = {"greedy": True, "temperature": 1.0, "top_p": 1.0}
    tokens = []
    for model, fn in ((full, _decode_one), (shard, step)):
        model.setup_cache(2, 8)
        tokens.append(fn(model, *args, **options)[0])
    return torch.equal(tokens[0], tokens[1])


def abort_once(parallel: TensorParallel, marker: str) -> int:
    """Rank 1 aborts (SIGABRT, as a C++ terminate does) the first time only."""
    if parallel.rank == 1 and not Path(marker).exists():
        Path(marker).touch()
        os.abort()
    return parallel.rank


def abort_always(parallel: TensorParallel) -> int:
    if parallel.rank == 1:
        os.abort()
    return parallel.rank


# ---- the peer all-reduce kernel (engine/parallel/peer_all_reduce.py) under TRITON_INTERPRET=1
# float32 exactly but for rsqrt's last bits; float16 within its roundings; bfloat16 within three
# of the interpreter's truncations (2^-7 each: h, normed, times weight)
ADD_NORM_TOLERANCE = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 3 * 2**-7}


def add_norm_matches(h: torch.Tensor, normed: torch.Tensor, partials: list[torch.Tensor],
                     residual: torch.Tensor, weight: torch.Tensor, tol: float) -> bool:
    """Whether a fused all-reduce + add + norm kernel's (h, normed) are, within tol, residual +
    the float32 sum of every rank's partial (rounded to the dtype) and its RMSNorm (eps 1e-5)
    times weight, as torch computes them."""
    dtype = residual.dtype
    total = sum((p.float() for p in partials), torch.zeros(partials[0].shape)).to(dtype)
    want_h = residual + total
    hf = want_h.float()
    want = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * weight
    return (torch.allclose(h.float(), want_h.float(), rtol=tol, atol=tol)
            and torch.allclose(normed.float(), want.float(), rtol=tol, atol=tol))


PEER_CASES = [(0, 5, torch.float32), (1, 2500, torch.bfloat16), (2, 1024, torch.float16),
              (0, 3000, torch.float32), (1, 7, torch.bfloat16)]  # (site, numel, dtype)


def peer_inputs(site: int, numel: int, dtype: torch.dtype, world: int) -> list[torch.Tensor]:
    return [torch.randn(numel, generator=torch.Generator().manual_seed(100 * site + r + numel))
            .to(dtype) for r in range(world)]


def peer_sums(parallel: TensorParallel, buffers: list[torch.Tensor]) -> dict[str, Any]:
    """Every case's result against the float32 sum in rank order, and the flags left set."""
    from infermeter.engine.parallel.peer_all_reduce import PeerAllReduce, flag_area_bytes

    peer = PeerAllReduce(parallel.rank, buffers, n_sites=3)
    equal = []
    for site, numel, dtype in PEER_CASES:  # sites reused, slices of 1-3 programs, ragged ends
        xs = peer_inputs(site, numel, dtype, parallel.world)
        exact = sum((x.float() for x in xs), torch.zeros(numel))  # float32, in rank order
        # Rounded to the dtype as a GPU does (to nearest even), or, for bfloat16, by truncation
        # (how Triton's CPU interpreter converts float32 to bfloat16).
        truncated = (exact.view(torch.int32) & -65536).view(torch.float32)
        rounded = exact.to(dtype), truncated.to(dtype) if dtype == torch.bfloat16 else None
        got = peer(xs[parallel.rank], site)
        ok = got == rounded[0] if rounded[1] is None else (got == rounded[0]) | (got == rounded[1])
        equal.append(got.dtype == dtype and bool(ok.all()))
    for site, numel, dtype in PEER_CASES[:3]:  # the same sums, plus the add and the norm
        rows, dim = max(1, numel // 500), 500 if numel >= 500 else numel
        deltas = [x[:rows * dim].view(rows, dim) for x in peer_inputs(site, numel, dtype,
                                                                      parallel.world)]
        residual = torch.linspace(-2, 2, rows * dim).view(rows, dim).to(dtype)
        weight = torch.linspace(0.5, 1.5, dim).to(dtype)
        h, normed = peer.add_norm(deltas[parallel.rank], residual, weight, 1e-5, site)
        equal.append(add_norm_matches(h, normed, deltas, residual, weight,
                                      ADD_NORM_TOLERANCE[dtype]))
    flags = buffers[parallel.rank][:flag_area_bytes(3)].view(torch.int32)
    return {"equal": equal, "flags_set": flags.count_nonzero().item()}


class _CountingPeer:
    """A registered PeerAllReduce that counts the calls the model makes through it."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0

    def __call__(self, x: torch.Tensor, site: int) -> torch.Tensor:
        self.calls += 1
        return self.inner(x, site)

    def add_norm(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self.inner.add_norm(*args)


@torch.no_grad()
def peer_model_matches_tp1(parallel: TensorParallel, source: Any, buffers: list[torch.Tensor],
                           fuse_norm: bool) -> dict[str, Any]:
    """A tp model whose all-reduces are the peer kernels (fused with the add and norm after
    them, or not): logits and greedy tokens against tp 1, eagerly and in a fullgraph-compiled
    decode step (aot_eager), and how many all-reduces went through a kernel."""
    from infermeter.engine.checkpoint.load import load_model
    from infermeter.engine.generator import GenerationConfig, Generator
    from infermeter.engine.linear import set_matvec_kernel
    from infermeter.engine.moe import set_moe_kernel
    from infermeter.engine.parallel import peer_all_reduce
    from infermeter.engine.parallel.all_reduce import use_peer_all_reduce

    full = load_model(source, max_batch_size=BATCH, max_seq_len=CACHE, seed=1)
    shard = load_model(source, max_batch_size=BATCH, max_seq_len=CACHE, seed=1, parallel=parallel)
    use_peer_all_reduce(shard, parallel, buffers, fuse_norm=fuse_norm)
    index = shard.tp_collectives.peer_index
    counter = peer_all_reduce._INSTANCES[index] = _CountingPeer(peer_all_reduce._INSTANCES[index])
    tokens = torch.randint(0, full.spec.vocab_size, (BATCH, PROMPT + DECODE),
                           generator=torch.Generator().manual_seed(0))
    diff = (_forward_steps(full, tokens) - _forward_steps(shard, tokens)).abs().max().item()
    calls = counter.calls
    prompts = tokens[:, :PROMPT].tolist()
    config = GenerationConfig(max_new_tokens=6)
    want = Generator(full, CACHE).generate(prompts, config).output_token_ids
    got = Generator(shard, CACHE).generate(prompts, config).output_token_ids
    for model in (full, shard):  # our Triton kernels are not traceable when interpreted
        set_matvec_kernel(model, "inductor")
        set_moe_kernel(model, "torch")
        for layer in model.layers:
            layer.attention.decode_attention = "math"
            layer.feed_forward.activation_kernel = "inline"
    return {"diff": diff, "calls": calls, "tokens_equal": want == got,
            "compiled_equal": _compiled_step_equal(full, shard, "aot_eager"),
            "n_layers": full.spec.n_layers}


def peer_models_match_tp1(parallel: TensorParallel,
                          cases: list[tuple[Any, list[torch.Tensor], bool]]) -> list[dict]:
    """peer_model_matches_tp1 for each (source, buffers, fuse_norm) in turn, on one pair of
    ranks: each case its own buffers and model, the spawned ranks' start-up paid once."""
    return [peer_model_matches_tp1(parallel, *case) for case in cases]


# ---- symmetric memory that fails: PeerAllReduce.for_group's agreement, generate's fallback ----
class _FakeHandle:
    """What symm_mem.rendezvous returns, for CPU ranks: every peer's buffer a fresh zero tensor
    (nothing is exchanged; only the ranks' agreement is under test)."""

    def __init__(self, rank: int, buffer: torch.Tensor) -> None:
        self.rank, self.buffer = rank, buffer

    def get_buffer(self, rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype)


def fake_symmetric_memory(parallel: TensorParallel, fails: dict[int, str]) -> list[Any]:
    """Put CPU stand-ins for torch symmetric memory's calls in this (spawned, throwaway)
    process; the step fails[rank] ("empty" or "rendezvous") raises on that rank, as a driver
    without CUDA IPC does, with a multi-line message. Returns the list in which each buffer
    handed out leaves a weak reference (to see that a failed for_group drops it)."""
    import weakref

    import torch.distributed._symmetric_memory as symm_mem

    handed_out: list[Any] = []

    def fail_at(step: str) -> None:
        if fails.get(parallel.rank) == step:
            raise RuntimeError(f"CUDA driver error: operation not supported ({step})\n"
                               "more details on a second line")

    def empty(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        fail_at("empty")
        buffer = torch.empty(size, dtype=dtype, device=device)
        handed_out.append(weakref.ref(buffer))
        return buffer

    def rendezvous(buffer: torch.Tensor, group_name: str) -> _FakeHandle:
        fail_at("rendezvous")
        return _FakeHandle(parallel.rank, buffer)

    symm_mem.enable_symm_mem_for_group = lambda group_name: None
    symm_mem.empty, symm_mem.rendezvous = empty, rendezvous
    return handed_out


def peer_buffer_agreement(parallel: TensorParallel,
                          cases: list[dict[int, str]]) -> list[dict[str, Any]]:
    """PeerAllReduce.for_group once per case (rank -> the step that fails there) on the same
    group, in order: what came back (the peer's rank and buffer count, or the error's class
    and message), the seconds it took, and whether the error left this rank's buffer alive."""
    from infermeter.engine.parallel.peer_all_reduce import PeerAllReduce, PeerBufferUnavailable

    out = []
    for fails in cases:
        handed_out = fake_symmetric_memory(parallel, fails)
        start = time.monotonic()
        try:
            peer = PeerAllReduce.for_group(parallel.group, parallel.device, n_sites=2)
            got = {"rank": peer.rank, "buffers": len(peer.buffers)}
        except PeerBufferUnavailable as err:  # checked while its traceback is alive
            got = {"error": type(err).__name__, "message": str(err),
                   "buffer_kept": any(ref() is not None for ref in handed_out)}
        out.append({**got, "seconds": time.monotonic() - start})
    return out


def generate_when_peer_buffers_fail(parallel: TensorParallel, kinds: list[str]) -> list[dict]:
    """`infermeter generate --tp 2 --tp-all-reduce KIND` for each kind, on ranks that look like
    GPUs that reach each other (auto picks triton) and whose symmetric memory fails on rank 1 at
    the rendezvous: the exit code, stdout and stderr of each run."""
    import contextlib
    import io

    from infermeter.cli import main
    from infermeter.engine.parallel import all_reduce
    from infermeter.engine.parallel.peer_all_reduce import PeerAllReduce
    from infermeter.generate import job

    fake_symmetric_memory(parallel, {1: "rendezvous"})
    all_reduce.peer_all_reduce_usable = lambda parallel: True
    real_options = job._all_reduce_options  # refuses triton kinds on CPU ranks

    def options(request: Any, parallel: Any) -> dict:
        if request.engine.tp_all_reduce.startswith("triton"):
            return {}
        return real_options(request, parallel)

    job._all_reduce_options = options
    # use_peer_all_reduce refuses CPU ranks before it reaches for_group; what it does on a
    # failure (nothing to the model) is test_peer_all_reduce's single-process test
    all_reduce.use_peer_all_reduce = lambda model, parallel, **kwargs: PeerAllReduce.for_group(
        parallel.group, parallel.device, 2 * len(model.layers))
    runs = []
    for kind in kinds:
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["generate", "--model", "debug", "--device", "cpu", "--tp", "2",
                         "--tp-all-reduce", kind, "--max-new-tokens", "4", "--repeats", "1",
                         "--warmup", "0", "--no-roofline", "--json"])
        runs.append({"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()})
    return runs


# ---- `infermeter copy --tp 2`: the ranks in step, case by case ---------------------------------
def copy_in_step(parallel: TensorParallel, args: list[str], late_rank: int,
                 late_s: float) -> dict[str, Any]:
    """`infermeter copy ARGS` through cli.main on this rank, with every dist.barrier and the
    start of every timed case recorded in order (("barrier", entered, left) and ("case", label,
    started), monotonic seconds: one clock for every process of the host). Rank `late_rank`
    sleeps late_s before each barrier, so a rank that did not wait for it would start a case
    first. Returns those events, the exit code, stdout and stderr."""
    import contextlib
    import io

    from infermeter.cli import main
    from infermeter.copy.harness import CopyRunner

    events: list[tuple] = []
    real_barrier = dist.barrier

    def barrier(*args: Any, **kwargs: Any) -> Any:
        if parallel.rank == late_rank:
            time.sleep(late_s)
        entered = time.monotonic()
        out = real_barrier(*args, **kwargs)
        events.append(("barrier", entered, time.monotonic()))
        return out

    def recording(real: Any) -> Any:
        def run(self: Any, case: Any, buf: Any) -> Any:
            events.append(("case", case.label, time.monotonic()))
            return real(self, case, buf)
        return run

    dist.barrier = barrier
    CopyRunner._run_seed = recording(CopyRunner._run_seed)
    CopyRunner._run_movers = recording(CopyRunner._run_movers)
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["copy", *args])
    finally:
        dist.barrier = real_barrier  # teardown's own barrier
    return {"code": code, "events": events, "stdout": stdout.getvalue(),
            "stderr": stderr.getvalue()}
