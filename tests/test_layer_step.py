"""The one-launch layer step (engine/kernels/layer_step.py, --step-kernels layer) and the MoE
block's (engine/kernels/moe_step.py).

Under Triton's CPU interpreter in subprocesses (tests/layer_step_worker.py): the layer's launch
against the fused step's own kernels one after another, to the bit (MHA and GQA, Qwen2's bias,
Qwen3's q/k norms, a ring layer, one split and several, float32 and float16; the attention side
alone), the MoE block's against the router, routing and expert kernels, every wait finding
exactly its stage's count, the counts back at 0, and greedy steps of the debug and a Qwen3-MoE-
like model against the fused step's. Here: the kernel as Triton builds it for an H100 (no GPU
needed: ptxas ships with Triton) keeps stage_sync.py's memory order, and which layers take the
launch. On a GPU (marked gpu): the same worker against the fused kernels, in a subprocess whose
timeout turns a wait that never ends into a failure. Which is faster is
benchmarks/step_kernels_ab.py's to say.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from infermeter.engine.fusion import fuse_projections
from infermeter.engine.model import build_model, layer_step_layers, set_step_kernels
from infermeter.specs.presets import PRESETS
from tests.sm90_build import sm90_registers
from tests.test_peer_all_reduce import needs_triton
from tests.triton_interpreter import run_under_interpreter, run_worker

WORKER = Path(__file__).with_name("layer_step_worker.py")
H100_SMS = 132  # an H100's SMs: the chunked launch (PROGRAMS_PER_SM 1) built below
H100 = "NVIDIA H100 80GB HBM3"  # the launches built here take its tiles (FUSED_TILES, EXPERT_TILES)


@needs_triton
@pytest.mark.parametrize("part", ["kernels", "model"])
def test_layer_step_under_the_triton_interpreter(part):
    """kernels: the launches against the kernels they are made of, and each wait's count;
    model: the models' greedy steps (two processes, so the suite runs them side by side)."""
    run_under_interpreter(WORKER, "cpu", part)


def sm90_build(kernel, args, kwargs) -> tuple[list[str], list[str]]:
    """One recorded launch built for sm_90 (sm90_build.sm90_binary): (its Triton GPU IR lines,
    where each atomic op of the source is still one op, and its PTX lines, where LLVM may have
    merged two alike atomics of different branches into one)."""
    from tests.sm90_build import sm90_binary

    binary = sm90_binary(kernel, args, kwargs)
    return binary.asm["ttgir"].splitlines(), binary.asm["ptx"].splitlines()


def ops(ir: list[str], op: str, order: str) -> int:
    """How many `tt.atomic_rmw <op>, <order>` the IR holds."""
    return sum(f"tt.atomic_rmw {op}, {order}, gpu" in line for line in ir)


def keeps_the_memory_order(lines: list[str], what: str) -> None:
    """The PTX's atomics are one thread's; every acq_rel add follows a barrier with no store of
    its own between them; every acquire poll's value reaches the other threads through shared
    memory between two barriers; no float64."""
    atomics = [i for i, line in enumerate(lines)
               if "atom.global" in line or "ld.global.gpu.acquire" in line]
    assert atomics and all(lines[i].strip().startswith("@") for i in atomics), what
    for add in (i for i in atomics if "acq_rel.add" in lines[i]):
        barrier = max(i for i in range(add) if "bar.sync" in lines[i])
        stores = [lines[i].strip() for i in range(barrier, add) if "st.global" in lines[i]]
        assert not stores, (what, stores)
    # an add of 0 from one thread: LLVM makes it that thread's acquire load, never an atomic
    assert any("ld.global.gpu.acquire" in lines[i] for i in atomics), what
    for poll in (i for i in atomics if "ld.global.gpu.acquire" in lines[i]):
        before = max(i for i in range(poll) if "bar.sync" in lines[i])
        store = next(i for i in range(poll, len(lines)) if "st.shared" in lines[i])
        after = next(i for i in range(store, len(lines)) if "bar.sync" in lines[i])
        assert not [i for i in (*range(before, poll), *range(store, after))
                    if "ld.shared" in lines[i]], (what, poll)
    assert not [line for line in lines if "ld.volatile" in line], what
    assert not [line for line in lines if ".f64" in line], what


def recorded(monkeypatch, module, kernel_name: str, call) -> tuple:
    """(kernel, args, kwargs) of the one launch call() makes of module's kernel_name, recorded
    instead of run."""
    kernel, launches = getattr(module, kernel_name), []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((kernel, args, kwargs))

    monkeypatch.setattr(module, kernel_name, Recorder())
    call()
    (launch,) = launches
    return launch


def recorded_launch(monkeypatch, name: str, dtype: torch.dtype,
                    programs: int | None = None) -> tuple:
    """(kernel, args, kwargs) of the layer step's launch for preset `name`'s shapes (one layer,
    a 512-slot cache, 4 splits), recorded instead of run."""
    from infermeter.engine.kernels import layer_step as layer_module

    spec = PRESETS[name]
    dim, head_dim, kv = spec.dim, spec.head_dim, spec.n_kv_heads
    n_q = spec.n_heads * head_dim
    # programs a stage: None, a program a row block as on a GPU; an int, that many (chunks)
    monkeypatch.setattr(layer_module, "INTERPRETER_PROGRAMS", programs)
    monkeypatch.setattr(layer_module, "gpu_name", lambda device: H100)  # an H100's tiles

    def zeros(*shape):
        return torch.zeros(*shape, dtype=dtype)

    norms = (zeros(head_dim), zeros(head_dim)) if spec.qk_norm else (None, None)
    return recorded(monkeypatch, layer_module, "_layer_kernel", lambda: layer_module._layer_step(
        zeros(1, dim), zeros(dim), zeros(n_q + 2 * kv * head_dim, dim),
        zeros(n_q + 2 * kv * head_dim) if spec.qkv_bias else None,
        torch.zeros(1, head_dim // 2), torch.zeros(1, head_dim // 2),
        torch.zeros(1, dtype=torch.long), zeros(1, kv, 512, head_dim),
        zeros(1, kv, 512, head_dim), torch.arange(512), *norms, zeros(dim, n_q), zeros(dim),
        zeros(2 * spec.ffn_dim, dim), zeros(dim, spec.ffn_dim), n_q, 1e-5, 1e-5,
        1e-6 if spec.qk_norm else 0.0, False, 0, 4))


@needs_triton
@pytest.mark.parametrize("name,dtype,per_sm,spilled", [
    ("smollm2-135m", torch.float16, 4, 0), ("qwen2.5-0.5b", torch.bfloat16, 4, 0),
    ("qwen3-0.6b", torch.bfloat16, 2, 16), ("llama-3.2-1b", torch.bfloat16, 3, 0)])
def test_the_launch_builds_for_an_h100_and_keeps_its_memory_order(monkeypatch, tmp_path, name,
                                                                  dtype, per_sm, spilled):
    """Built for sm_90 as launched: the program's ticket is a relaxed add; each of the four
    waits polls with acquire loads (one before its loop, one in it); each of the six counts
    (qkv, an attention row, the rows combined, wo, w13, w2) is an acq_rel add; the row's count
    and the ticket and five stage counts go back to 0 with exchanges; the PTX keeps the
    memory order (keeps_the_memory_order). per_sm: the programs an SM's 65,536 registers hold,
    though the one launch holds the registers of its hungriest stage; spilled: the bytes it
    spills to local memory, none but Qwen3-0.6B's 16 at 8 warps (docs/engine.md, "What one
    launch costs in registers")."""
    launch = recorded_launch(monkeypatch, name, dtype)
    ir, lines = sm90_build(*launch)
    registers, spills = sm90_registers("\n".join(lines), tmp_path)
    assert spills == spilled, (name, spills)
    assert 65536 // (registers * 32 * launch[2]["num_warps"]) == per_sm, (name, registers)
    assert ops(ir, "add", "relaxed") == 1, name
    assert ops(ir, "add", "acquire") == 8, name
    assert ops(ir, "add", "acq_rel") == 6, name
    assert ops(ir, "exch", "relaxed") == 2, name  # the row's, and the stage loop's
    keeps_the_memory_order(lines, name)


@needs_triton
def test_the_chunked_launch_builds_for_an_h100_with_the_same_order(monkeypatch, tmp_path):
    """At one program an SM (layer_step.PROGRAMS_PER_SM 1, an H100's 132), Llama-3.2-1B's
    GEMV stages walk chunks of row blocks: the same atomics as a program a block (the later
    blocks of a chunk do not wait again), the same memory order. At the H100's tiles the chunk
    loops cost 80 bytes of spill (none a program a block; docs/engine.md): a figure a reader
    of part step-chunks needs, checked so that a change to it is seen."""
    launch = recorded_launch(monkeypatch, "llama-3.2-1b", torch.bfloat16)
    monkeypatch.undo()  # the kernel back in place of the recorder, to record it again
    chunked = recorded_launch(monkeypatch, "llama-3.2-1b", torch.bfloat16, H100_SMS)
    assert chunked[2]["CH_W13"] > 1 and launch[2]["CH_W13"] == 1
    ir, lines = sm90_build(*chunked)
    assert sm90_registers("\n".join(lines), tmp_path)[1] == 80
    assert ops(ir, "add", "acquire") == 8 and ops(ir, "add", "acq_rel") == 6
    keeps_the_memory_order(lines, "chunked")


def test_programs_per_sm_cuts_a_gpu_plan_only(monkeypatch):
    """On a GPU (its name and SM count faked here) Llama-3.2-1B's plan is a program a row block
    with layer_step.PROGRAMS_PER_SM None, and N x 132 programs a GEMV stage at most with N; off
    a GPU PROGRAMS_PER_SM is not read (INTERPRETER_PROGRAMS is). The model launch plans through
    the same launch_plan."""
    from types import SimpleNamespace

    from infermeter.engine.kernels import layer_step as layer_module

    monkeypatch.setattr(layer_module, "gpu_name", lambda device: "")  # the CPU's tiles
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(multi_processor_count=H100_SMS))

    def chunks(device: str) -> dict[str, int]:  # 1B: wqkv 3072 rows, 8 KV heads, 4 splits
        return layer_module.launch_plan(3072, 2048, 2048, 8192, 64, False, 8, 4,
                                        torch.device(device))[1]

    assert chunks("cuda") == {"qkv": 1, "wo": 1, "w13": 1, "w2": 1}
    monkeypatch.setattr(layer_module, "PROGRAMS_PER_SM", 1)
    assert chunks("cuda") == {"qkv": 6, "wo": 4, "w13": 32, "w2": 8}  # 768, 512, 4096, 1024
    monkeypatch.setattr(layer_module, "PROGRAMS_PER_SM", 2)
    assert chunks("cuda") == {"qkv": 3, "wo": 2, "w13": 16, "w2": 4}
    monkeypatch.setattr(layer_module, "INTERPRETER_PROGRAMS", None)
    assert chunks("cpu") == {"qkv": 1, "wo": 1, "w13": 1, "w2": 1}


@needs_triton
def test_the_register_report_sees_a_planted_spill(tmp_path):
    """sm90_registers, which the no-spill checks above read, finds a spill where one is: a scan
    of 8,192 float32 values in one warp (256 a thread) spills; of 256 it does not."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def scan(x, y, N: tl.constexpr):
        offsets = tl.arange(0, N)
        values = tl.load(x + offsets)
        tl.store(y + offsets, tl.cumsum(values * values, 0) + values)

    def spills(n: int) -> int:
        binary = triton.compile(ASTSource(fn=scan, signature={"x": "*fp32", "y": "*fp32",
                                                              "N": "constexpr"},
                                          constexprs={(2,): n}),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
        return sm90_registers(binary.asm["ptx"], tmp_path)[1]

    assert spills(256) == 0 and spills(8192) > 0


@needs_triton
@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "mixtral-8x7b"])
def test_the_moe_launch_builds_for_an_h100_with_the_same_order(monkeypatch, tmp_path, name):
    """The MoE block's launch (moe_step.py) for the preset's shapes in bf16, built for sm_90:
    its ticket, three waits and four counts, the counts back to 0, the PTX's memory order
    (keeps_the_memory_order), and no spills."""
    from infermeter.engine.kernels import moe_step as moe_module

    spec = PRESETS[name]
    experts, ffn, dim = spec.n_experts, spec.moe_ffn_dim, spec.dim

    def zeros(*shape):
        return torch.zeros(*shape, dtype=torch.bfloat16)

    monkeypatch.setattr(moe_module, "gpu_name", lambda device: H100)  # an H100's tiles
    launch = recorded(monkeypatch, moe_module, "_moe_kernel", lambda: moe_module._moe_step(
        zeros(1, dim), zeros(dim), zeros(experts, dim), zeros(experts, ffn, dim),
        zeros(experts, ffn, dim), zeros(experts, dim, ffn), 1e-6, spec.n_active_experts, True))
    ir, lines = sm90_build(*launch)
    assert sm90_registers("\n".join(lines), tmp_path)[1] == 0, name
    assert ops(ir, "add", "relaxed") == 1, name
    assert ops(ir, "add", "acquire") == 6, name
    assert ops(ir, "add", "acq_rel") == 4, name
    assert ops(ir, "exch", "relaxed") == 1, name  # the loop over the ticket and counts
    keeps_the_memory_order(lines, name)


def small_model(spec, monkeypatch):
    """spec's model, projections fused, a batch-1 cache, with Triton taken to run here (the
    rule's other conditions are the model's)."""
    from infermeter.engine import model as model_module
    from infermeter.engine import self_attention as attention_module

    monkeypatch.setattr(attention_module, "decode_kernel_usable", lambda q: True)
    monkeypatch.setattr(model_module, "fused_step_kernels_usable", lambda x, params: True)
    model = build_model(spec, seed=0)
    fuse_projections(model)
    set_step_kernels(model, "layer")
    model.setup_cache(1, 32)
    return model


def test_which_layers_take_one_launch(monkeypatch):
    """A Llama-like layer does, whole; an MoE layer its attention side (Qwen3-MoE; its
    experts run after the launch); none without a cache or with another decode attention than
    Triton's, nor Gemma's (its norms and post-norms) or gpt-oss's (sinks) layers, which run
    their fused parts instead."""
    debug = PRESETS["debug"]
    x = torch.zeros(1, 1, debug.dim)

    def taking(model) -> list[bool]:
        return [layer.takes_layer_kernel(x) for layer in model.layers]

    model = small_model(debug, monkeypatch)
    assert taking(model) == [True] * debug.n_layers
    model.layers[0].attention.decode_attention = "math"
    assert taking(model) == [False] + [True] * (debug.n_layers - 1)
    model = build_model(debug, seed=0)
    fuse_projections(model)
    assert taking(model) == [False] * debug.n_layers  # no cache yet
    others = {"gemma": (debug.with_updates(arch="gemma3_text", qk_norm=True, head_dim=32,
                                           norms_per_layer=4, query_pre_attn_scalar=24.0),
                        [False, False]),
              "qwen3-moe": (debug.with_updates(arch="qwen3_moe", n_experts=4,
                                               n_active_experts=2, moe_ffn_dim=48),
                            [True, True]),
              "gpt-oss": (PRESETS["gpt-oss-20b"].with_updates(
                  n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=128,
                  n_experts=4, n_active_experts=2, moe_ffn_dim=32, ffn_dim=32,
                  sliding_window_layers=(0,)), [False, False])}
    for name, (spec, takes) in others.items():
        model = small_model(spec, monkeypatch)
        x = torch.zeros(1, 1, spec.dim)
        assert taking(model) == takes, name


def test_which_moe_blocks_take_one_launch(monkeypatch):
    """With the Triton experts a Qwen3-MoE block does; not with torch's experts, a hook on the
    block (tensor parallelism's all-reduce) or its router, a norm weight of another dtype,
    more experts than the routing kernel holds, or gpt-oss's block (router bias, clamped
    SwiGLU, top k then softmax). The Result's config.moe_step says whether the traced steps
    ran every block in one launch."""
    from infermeter.engine import moe as moe_module
    from infermeter.engine.kernels.router_topk import MAX_EXPERTS
    from infermeter.engine.moe import MoEFeedForward, set_moe_kernel
    from infermeter.engine.norms import RMSNorm

    monkeypatch.setattr(moe_module, "experts_kernel_usable", lambda x, *weights: True)
    debug = PRESETS["debug"]
    spec = debug.with_updates(arch="qwen3_moe", n_experts=4, n_active_experts=2, moe_ffn_dim=48)
    h = torch.zeros(1, 1, spec.dim)
    norm = RMSNorm(spec.dim, 1e-6)

    def block(of_spec) -> MoEFeedForward:
        model = build_model(of_spec, seed=0)
        set_moe_kernel(model, "triton")
        return next(m for m in model.modules() if isinstance(m, MoEFeedForward))

    moe = block(spec)
    assert moe.takes_step_kernel(h, norm)
    moe.moe_kernel = "torch"
    assert not moe.takes_step_kernel(h, norm)
    moe.moe_kernel = "triton"
    assert not moe.takes_step_kernel(h.expand(1, 2, -1), norm)  # two tokens
    handle = moe.register_forward_hook(lambda *args: None)
    assert not moe.takes_step_kernel(h, norm)
    handle.remove()
    handle = moe.gate.register_forward_pre_hook(lambda *args: None)
    assert not moe.takes_step_kernel(h, norm)
    handle.remove()
    assert not moe.takes_step_kernel(h, RMSNorm(spec.dim, 1e-6).to(torch.float64))
    moe.n_experts = MAX_EXPERTS + 1
    assert not moe.takes_step_kernel(h, norm)
    # the runner's record: whether the traced steps ran every MoE block in one launch
    from infermeter.generate.cases import plan_cases, prompt_sets
    from infermeter.generate.modes import EngineRunner
    from infermeter.generate.request import EngineChoices, GenerateRequest

    model = build_model(spec, seed=0)
    set_moe_kernel(model, "triton")
    sets = prompt_sets((1,), (4,), (), spec.vocab_size, 0, ())
    compiled, eager = (plan_cases(spec, sets, (mode,), 4, None, None)[0]
                       for mode in ("compiled", "eager"))
    request = GenerateRequest("random:debug", engine=EngineChoices(step_kernels="layer",
                                                                   moe_kernel="triton"))
    runner = EngineRunner(model, compiled, request)
    assert runner.describe()["moe_step"] is False
    monkeypatch.setattr(moe_module, "moe_step_kernel",
                        lambda h, *args: (h, torch.zeros(1, 2, dtype=torch.long)))
    for traced in (m for m in model.modules() if isinstance(m, MoEFeedForward)):
        traced.step_kernel(h, norm)  # as a traced batch-1 step runs it
    assert runner.describe()["moe_step"] is True
    assert EngineRunner(model, eager, request).describe()["moe_step"] is None
    set_step_kernels(model, "fused")  # another kind: the record starts afresh
    assert runner.describe()["moe_step"] is False
    oss = PRESETS["gpt-oss-20b"].with_updates(
        n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=128, n_experts=4,
        n_active_experts=2, moe_ffn_dim=32, ffn_dim=32, sliding_window_layers=(0,))
    assert not block(oss).takes_step_kernel(torch.zeros(1, 1, oss.dim), RMSNorm(oss.dim, 1e-5))


def test_the_result_says_layer_where_the_traced_steps_ran_every_layer_in_one_launch(
        monkeypatch):
    """config.step_kernels is "layer" where every layer's traced batch-1 step took the launch
    (TransformerBlock.took_layer_kernel, set as the step is traced), "partly fused" where only
    some did; set_step_kernels starts the record afresh when the kind changes, and keeps it
    for the same kind (a runner that shares compiled steps never traces them again)."""
    from infermeter.generate import modes as modes_module
    from infermeter.generate.cases import plan_cases, prompt_sets
    from infermeter.generate.modes import EngineRunner
    from infermeter.generate.request import EngineChoices, GenerateRequest

    debug = PRESETS["debug"]
    monkeypatch.setattr(modes_module, "triton_runs_on", lambda x: True)
    model = small_model(debug, monkeypatch)
    sets = prompt_sets((1,), (4,), (), debug.vocab_size, 0, ())
    case = plan_cases(debug, sets, ("compiled",), 4, None, None)[0]
    runner = EngineRunner(model, case, GenerateRequest(
        "random:debug", engine=EngineChoices(step_kernels="layer")))
    runner.batch_sizes = [1]
    assert runner.describe()["step_kernels"] == "fused"  # nothing traced yet
    # what TransformerBlock.forward does as it traces a batch-1 step in one launch
    monkeypatch.setattr(type(model.layers[0].attention), "layer_step",
                        lambda self, x, *args: x)
    for layer in model.layers:
        layer._layer_forward(torch.zeros(1, 1, debug.dim), None, None, None)
    assert layer_step_layers(model) == debug.n_layers
    assert runner.describe()["step_kernels"] == "layer"
    assert runner.describe()["fused_rope"] is True
    model.layers[0].took_layer_kernel = False
    assert runner.describe()["step_kernels"] == "partly fused"
    set_step_kernels(model, "layer")  # the same kind (a runner sharing compiled steps): kept
    assert layer_step_layers(model) == debug.n_layers - 1
    set_step_kernels(model, "fused")
    assert layer_step_layers(model) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_cuda_the_launch_gives_the_fused_kernels_results_and_ends():
    """The worker's comparisons on a GPU, in a subprocess: a stage that waited for a count
    never reached would hang the launch, so a timeout is a failure, not a stuck suite."""
    run_worker(WORKER, ("cuda",), {}, 300)
