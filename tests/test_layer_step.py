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
    """Built for sm_90 as launched: each of the four waits polls with volatile loads (L2) and
    then takes the count with an acquire load; each of the six counts (qkv, an attention row,
    the rows combined, wo, w13, w2) is an acq_rel add that follows a barrier with no store of
    its own between them (every thread's stores first); the counts go back to 0 with exchanges;
    no float64 anywhere."""
    from tests.test_pdl import sm90_lines

    _, lines = sm90_lines(*recorded_launch(monkeypatch, name, dtype))
    polls = [i for i, line in enumerate(lines) if "ld.volatile.global.b32" in line]
    acquires = [i for i, line in enumerate(lines) if "ld.global.gpu.acquire.b32" in line]
    adds = [i for i, line in enumerate(lines) if "atom.global.gpu.acq_rel.add" in line]
    assert len(acquires) == 4 and len(adds) == 6, (name, len(acquires), len(adds))
    assert all(any(p < a for p in polls) for a in acquires), name  # a poll before each acquire
    for add in adds:
        barrier = max(i for i in range(add) if "bar.sync" in lines[i])
        stores = [lines[i].strip() for i in range(barrier, add) if "st.global" in lines[i]]
        assert not stores, (name, stores)
    assert sum("atom.global.gpu.relaxed.exch" in line for line in lines) >= 2, name
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
    """A Llama-like layer does; none without a cache, with another decode attention than
    Triton's, with Gemma's post-norms, or in an MoE or gpt-oss model (those layers run their
    fused parts instead), nor where step_kernels is not "layer"."""
    debug = PRESETS["debug"]
    x = torch.zeros(1, 1, debug.dim)
    model = small_model(debug, monkeypatch)
    assert layer_step_layers(model, x) == debug.n_layers
    model.layers[0].attention.decode_attention = "math"
    assert layer_step_layers(model, x) == debug.n_layers - 1
    set_step_kernels(model, "fused")
    assert layer_step_layers(model, x) == 0
    model = build_model(debug, seed=0)
    fuse_projections(model)
    set_step_kernels(model, "layer")
    assert layer_step_layers(model, x) == 0  # no cache yet
    others = {"gemma": debug.with_updates(arch="gemma3_text", qk_norm=True, head_dim=32,
                                          norms_per_layer=4, query_pre_attn_scalar=24.0),
              "moe": debug.with_updates(arch="qwen3_moe", n_experts=4, n_active_experts=2,
                                        moe_ffn_dim=48),
              "gpt-oss": PRESETS["gpt-oss-20b"].with_updates(
                  n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=128,
                  n_experts=4, n_active_experts=2, moe_ffn_dim=32, ffn_dim=32,
                  sliding_window_layers=(0,))}
    for name, spec in others.items():
        model = small_model(spec, monkeypatch)
        assert layer_step_layers(model, torch.zeros(1, 1, spec.dim)) == 0, name


def test_the_result_says_layer_where_every_layer_took_one_launch(monkeypatch):
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
    model.setup_cache(1, 32)  # the runner's Generator sets up its own when it runs
    assert runner.describe()["step_kernels"] == "layer"
    assert runner.describe()["fused_rope"] is True
    model.layers[0].attention.decode_attention = "math"
    assert runner.describe()["step_kernels"] == "partly fused"


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
