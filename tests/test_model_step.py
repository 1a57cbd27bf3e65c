"""The one-launch model step (engine/kernels/model_step.py, --step-kernels model).

Under Triton's CPU interpreter in a subprocess (tests/model_step_worker.py): the model launch
against the layer launches, to the bit (Llama, Qwen2's bias, Qwen3's q/k norms), over a prompt
and greedy steps, each wait finding exactly its count, the counts back at 0. Here: the kernel
as Triton builds it for an H100 keeps stage_sync.py's memory order and spills nothing, and
which models take the launch. On a GPU (marked gpu): the worker, in a subprocess whose timeout
turns a wait that never ends into a failure. Which is faster is
benchmarks/step_kernels_ab.py's to say.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from infermeter.engine.fusion import fuse_projections
from infermeter.engine.model import build_model, set_step_kernels
from infermeter.specs.presets import PRESETS
from tests.sm90_build import sm90_registers
from tests.test_layer_step import (
    H100,
    keeps_the_memory_order,
    ops,
    recorded,
    recorded_launch,
    sm90_build,
)
from tests.test_peer_all_reduce import needs_triton
from tests.triton_interpreter import run_under_interpreter, run_worker

WORKER = Path(__file__).with_name("model_step_worker.py")


@needs_triton
def test_model_step_under_the_triton_interpreter():
    run_under_interpreter(WORKER, "cpu")


def recorded_model_launch(monkeypatch, name: str, dtype: torch.dtype, layers: int = 2) -> tuple:
    """The model launch of `layers` layers of preset `name`'s shapes, recorded, not run."""
    from infermeter.engine.kernels import layer_step as layer_module
    from infermeter.engine.kernels import model_step as model_module

    spec = PRESETS[name]
    dim, head_dim, kv = spec.dim, spec.head_dim, spec.n_kv_heads
    n_q = spec.n_heads * head_dim
    monkeypatch.setattr(layer_module, "INTERPRETER_PROGRAMS", None)  # as on a GPU: no chunks
    monkeypatch.setattr(layer_module, "gpu_name", lambda device: H100)  # an H100's tiles

    def each(*shape):
        return [torch.zeros(*shape, dtype=dtype) for _ in range(layers)]

    norms = (each(head_dim), each(head_dim)) if spec.qk_norm else ([], [])
    return recorded(monkeypatch, model_module, "_model_kernel", lambda: model_module._model_step(
        torch.zeros(1, dim, dtype=dtype), each(dim), each(n_q + 2 * kv * head_dim, dim),
        each(n_q + 2 * kv * head_dim) if spec.qkv_bias else [],
        torch.zeros(1, head_dim // 2), torch.zeros(1, head_dim // 2),
        torch.zeros(1, dtype=torch.long), each(1, kv, 512, head_dim), each(1, kv, 512, head_dim),
        torch.arange(512), *norms, each(dim, n_q), each(dim), each(2 * spec.ffn_dim, dim),
        each(dim, spec.ffn_dim), n_q, 1e-5, 1e-5, 1e-6 if spec.qk_norm else 0.0, 4))


@needs_triton
@pytest.mark.parametrize("name,dtype", [
    ("smollm2-135m", torch.float16), ("qwen2.5-0.5b", torch.bfloat16),
    ("llama-3.2-1b", torch.bfloat16)])
def test_the_launch_builds_for_an_h100_and_keeps_its_memory_order(monkeypatch, tmp_path, name,
                                                                  dtype):
    """Built for sm_90 as launched: the layer launch's atomics (test_layer_step's test of it)
    and one wait more, the qkv stage's for the layer before (acquire polls: one before its
    loop, one in it); the final reset loops over the layers (one exchange in the IR for the
    stage counts, one for an attention row); the PTX keeps the memory order; no spills."""
    ir, lines = sm90_build(*recorded_model_launch(monkeypatch, name, dtype))
    assert sm90_registers("\n".join(lines), tmp_path)[1] == 0, name
    # the weights and caches through the address table load 16 bytes at a time, as the layer
    # launch's do (a loaded pointer's alignment unsaid, every such load was 2 bytes)
    wide = sum("ld.global" in line and ".v4." in line for line in lines)
    layer_lines = sm90_build(*recorded_launch(monkeypatch, name, dtype))[1]
    assert wide >= sum("ld.global" in line and ".v4." in line for line in layer_lines), name
    assert ops(ir, "add", "relaxed") == 1, name
    assert ops(ir, "add", "acquire") == 10, name
    assert ops(ir, "add", "acq_rel") == 6, name
    assert ops(ir, "exch", "relaxed") == 2, name
    keeps_the_memory_order(lines, name)


def model(spec, kind: str = "model"):
    built = build_model(spec, dtype=torch.float32)
    fuse_projections(built)
    set_step_kernels(built, kind)
    built.setup_cache(1, 64)
    return built


def test_which_models_take_one_launch(monkeypatch):
    """Compiling (patched on), a one-token step of a dense model whose layers all take the
    layer launch and are alike takes it; not: another kind asked for, two tokens, a ring
    cache (Mistral's window), a layer unlike the others, an MoE model."""
    from infermeter.engine import model as model_module
    from infermeter.engine import self_attention as attention_module

    monkeypatch.setattr(model_module, "compiling", lambda: True)
    monkeypatch.setattr(attention_module, "compiling", lambda: True)
    # Triton taken to run here (the rule's other conditions are the model's)
    monkeypatch.setattr(attention_module, "decode_kernel_usable", lambda q: True)
    monkeypatch.setattr(model_module, "fused_step_kernels_usable", lambda x, params: True)
    debug = PRESETS["debug"]
    one, two = torch.zeros(1, 1, debug.dim), torch.zeros(1, 2, debug.dim)
    assert model(debug).takes_model_kernel(one)
    assert not model(debug).takes_model_kernel(two)
    assert not model(debug, "layer").takes_model_kernel(one)
    ring = debug.with_updates(arch="mistral", sliding_window=32,
                              sliding_window_layers=tuple(range(debug.n_layers)))
    assert not model(ring).takes_model_kernel(one)
    unlike = model(debug)
    unlike.layers[1].ffn_norm.eps = 1e-3
    assert not unlike.takes_model_kernel(one)
    moe = debug.with_updates(arch="qwen3_moe", head_dim=32, qk_norm=True, n_experts=4,
                             n_active_experts=2, moe_ffn_dim=48, norm_topk_prob=True)
    assert not model(moe).takes_model_kernel(one)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_cuda_the_launch_gives_the_layer_launches_results_and_ends():
    """The worker's comparisons on a GPU, in a subprocess: a wait for a count never reached
    would hang the launch, so a timeout is a failure, not a stuck suite."""
    run_worker(WORKER, ("cuda",), {}, 120)
