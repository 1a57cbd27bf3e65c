"""The one-launch layer step (engine/kernels/layer_step.py, --step-kernels layer).

Under Triton's CPU interpreter in a subprocess (tests/layer_step_worker.py): the launch against
the fused step's own kernels one after another, to the bit (MHA and GQA, Qwen2's bias, Qwen3's
q/k norms, a ring layer, one split and several, float32 and float16), every wait finding exactly
its stage's count, the counts back at 0, and the debug model's greedy steps against the fused
step's. Here: the kernel as Triton builds it for an H100 (no GPU needed: ptxas ships with
Triton) keeps stage_sync.py's memory order, and which layers take the launch. On a GPU (marked
gpu): the same worker against the fused kernels, in a subprocess whose timeout turns a wait that
never ends into a failure. Which is faster is benchmarks/step_kernels_ab.py's to say.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infermeter.engine.fusion import fuse_projections
from infermeter.engine.model import build_model, layer_step_layers, set_step_kernels
from infermeter.specs.presets import PRESETS
from tests.test_peer_all_reduce import needs_triton
from tests.triton_interpreter import run_under_interpreter

WORKER = Path(__file__).with_name("layer_step_worker.py")


@needs_triton
def test_layer_step_under_the_triton_interpreter():
    run_under_interpreter(WORKER)


def recorded_launch(monkeypatch, name: str, dtype: torch.dtype) -> tuple:
    """(kernel, args, kwargs) of the layer step's launch for preset `name`'s shapes (one layer,
    a 512-slot cache, 4 splits), recorded instead of run."""
    from infermeter.engine.kernels import layer_step as layer_module

    spec = PRESETS[name]
    kernel, launches = layer_module._layer_kernel, []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((kernel, args, kwargs))

    monkeypatch.setattr(layer_module, "_layer_kernel", Recorder())
    dim, head_dim, kv = spec.dim, spec.head_dim, spec.n_kv_heads
    n_q = spec.n_heads * head_dim

    def zeros(*shape):
        return torch.zeros(*shape, dtype=dtype)

    norms = (zeros(head_dim), zeros(head_dim)) if spec.qk_norm else (None, None)
    layer_module._layer_step(
        zeros(1, dim), zeros(dim), zeros(n_q + 2 * kv * head_dim, dim),
        zeros(n_q + 2 * kv * head_dim) if spec.qkv_bias else None,
        torch.zeros(1, head_dim // 2), torch.zeros(1, head_dim // 2),
        torch.zeros(1, dtype=torch.long), zeros(1, kv, 512, head_dim),
        zeros(1, kv, 512, head_dim), torch.arange(512), *norms, zeros(dim, n_q), zeros(dim),
        zeros(2 * spec.ffn_dim, dim), zeros(dim, spec.ffn_dim), n_q, 1e-5, 1e-5,
        1e-6 if spec.qk_norm else 0.0, False, 0, 4)
    return launches[0]


@needs_triton
@pytest.mark.parametrize("name,dtype", [
    ("smollm2-135m", torch.float16), ("qwen2.5-0.5b", torch.bfloat16),
    ("qwen3-0.6b", torch.bfloat16), ("llama-3.2-1b", torch.bfloat16)])
def test_the_launch_builds_for_an_h100_and_keeps_its_memory_order(monkeypatch, name, dtype):
    """Built for sm_90 as launched: the program's ticket is one thread's relaxed add; each of
    the four waits polls with one thread's acquire loads (at least one before its loop and one
    in it; no volatile loads of every thread), each value passed on through shared memory
    between two barriers; each of the six counts (qkv, an attention row,
    the rows combined, wo, w13, w2) is one thread's acq_rel add after a barrier with no store
    between them (every thread's stores first); the row's count and the ticket and five stage
    counts go back to 0 with exchanges; no float64 anywhere."""
    from tests.test_pdl import sm90_lines

    _, lines = sm90_lines(*recorded_launch(monkeypatch, name, dtype))

    def atomics(pattern: str) -> list[int]:
        found = [i for i, line in enumerate(lines) if pattern in line]
        assert all(lines[i].strip().startswith("@") for i in found), (name, pattern)  # one thread
        return found

    assert len(atomics("atom.global.gpu.relaxed.add")) == 1, name
    acquires = atomics("ld.global.gpu.acquire.b32")
    assert len(acquires) >= 8, name
    for poll in acquires:  # thread 0's value reaches the others through shared memory
        before = max(i for i in range(poll) if "bar.sync" in lines[i])
        store = next(i for i in range(poll, len(lines)) if "st.shared" in lines[i])
        after = next(i for i in range(store, len(lines)) if "bar.sync" in lines[i])
        # a barrier before the poll (every thread has read the last value before thread 0
        # overwrites it) and between its store and any read
        assert not [i for i in (*range(before, poll), *range(store, after))
                    if "ld.shared" in lines[i]], (name, poll)
    assert not [line for line in lines if "ld.volatile" in line], name
    adds = atomics("atom.global.gpu.acq_rel.add")
    assert len(adds) == 6, (name, len(adds))
    for add in adds:
        barrier = max(i for i in range(add) if "bar.sync" in lines[i])
        stores = [lines[i].strip() for i in range(barrier, add) if "st.global" in lines[i]]
        assert not stores, (name, stores)
    assert len(atomics("atom.global.gpu.relaxed.exch")) == 7, name
    assert not [line for line in lines if ".f64" in line], name


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


def test_the_result_says_layer_where_the_traced_steps_ran_every_layer_in_one_launch(
        monkeypatch):
    """config.step_kernels is "layer" where every layer's traced batch-1 step took the launch
    (TransformerBlock.took_layer_kernel, set as the step is traced), "partly fused" where only
    some did, and set_step_kernels starts the record afresh."""
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
    set_step_kernels(model, "layer")
    assert layer_step_layers(model) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_cuda_the_launch_gives_the_fused_kernels_results_and_ends():
    """The worker's comparisons on a GPU, in a subprocess: a stage that waited for a count
    never reached would hang the launch, so a timeout is a failure, not a stuck suite."""
    root = WORKER.resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(root / "src"), str(root), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(WORKER), "cuda"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
