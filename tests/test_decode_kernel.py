"""The split-KV decode attention kernel (engine/decode_kernel.py).

The kernel itself runs under Triton's CPU interpreter in a subprocess (tests/decode_kernel_worker
.py: against the math attention for MHA/GQA/MQA, windows, ring layouts, 1-8 splits; a full layer
never reads past the position; swiglu_kernel.py's activation against eager's; the model's steps
with both kernels equal math's). Triton comes with the test
extras on Linux x86-64; elsewhere that test skips. On a GPU the compiled path is a `gpu` test.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infermeter.engine.decode_kernel import BLOCK_N, kernel_usable, split_count
from infermeter.engine.model import build_model
from infermeter.presets import PRESETS

WORKER = Path(__file__).with_name("decode_kernel_worker.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_kernel_under_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(WORKER.parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_split_count_fills_the_gpu_without_chunks_under_a_block():
    cpu = torch.device("cpu")  # assumes 132 SMs (an H100) off the GPU
    assert split_count(32, 512, cpu) == 512 // BLOCK_N  # 7B, batch 1: capped by the chunk size
    assert split_count(32, 8192, cpu) == 17  # ceil(4 * 132 / 32): ~4 programs per SM
    assert split_count(1024, 512, cpu) == 1  # batch 32: enough programs already
    assert split_count(8, 40, cpu) == 1  # a cache shorter than one block


def test_kernel_is_used_only_where_triton_runs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernel_usable(torch.empty(1, 1, 1, 128))  # a CPU tensor, no interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    has_triton = importlib.util.find_spec("triton") is not None
    assert kernel_usable(torch.empty(1, 1, 1, 128)) == has_triton
    assert not kernel_usable(torch.empty(1, 1, 1, 80))  # not a power of two
    assert not kernel_usable(torch.empty(1, 1, 1, 8))  # under tl.dot's 16


@torch.inference_mode()
def test_without_triton_the_triton_choices_fall_back(monkeypatch):
    """On a CPU without the interpreter, a model asking for the Triton attention and activation
    still compiles (fullgraph) to the math attention and the opaque eager activation, with the
    math path's logits."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tokens = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    logits, graphs = {}, []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for kind in ("math", "triton"):
        model = build_model(PRESETS["debug"], seed=1)
        model.setup_cache(1, 8)
        for layer in model.layers:
            layer.attention.decode_attention = kind
            layer.feed_forward.activation_kernel = "triton" if kind == "triton" else "aten"
        step = torch.compile(model, fullgraph=True, dynamic=False, backend=keep)
        outs = [model(tokens[:, :4], torch.arange(4))]
        outs += [step(tokens[:, i:i + 1], torch.tensor([i])) for i in range(4, 8)]
        logits[kind] = torch.cat(outs, dim=1)
        torch._dynamo.reset()
    targets = [str(node.target) for node in graphs[-1].graph.nodes]
    assert targets.count("infermeter.silu_mul.default") == PRESETS["debug"].n_layers
    assert not any("triton" in target or "split_kv" in target for target in targets)
    torch.testing.assert_close(logits["triton"], logits["math"], atol=1e-6, rtol=0)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_kernels_compile_for_an_h100_without_one(dtype):
    """Triton compiles both kernels to sm_90 machine code here, with no GPU (ptxas ships with
    Triton): the GPU path's type and shape rules (loop bounds, tl.dot sizes) hold, for the
    full and ring layouts, 64- and 128-wide heads, in float16 and bfloat16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from infermeter.engine.decode_kernel import _split_kv_kernel
    from infermeter.engine.swiglu_kernel import BLOCK, _silu_mul_kernel

    hopper = GPUTarget("cuda", 90, 32)

    def compiled(fn, pointers: dict, scalars: dict, constants: dict):
        signature = {**pointers, **scalars, **dict.fromkeys(constants, "constexpr")}
        where = {(list(signature).index(name),): value for name, value in constants.items()}
        return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=where),
                              target=hopper)

    pointers = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "KEY_POS": "*i64",
                "POS": "*i64", "ACC": "*fp32", "M": "*fp32", "L": "*fp32"}
    scalars = dict.fromkeys(("stride_qb", "stride_qh", "stride_qg", "stride_kb", "stride_kh",
                             "stride_ks", "stride_vb", "stride_vh", "stride_vs", "n_kv_heads",
                             "groups", "slots", "chunk", "n_splits"), "i32")
    scalars.update(scale="fp32", window="i32")
    for head_dim, ring in ((128, False), (64, True)):
        kernel = compiled(_split_kv_kernel, pointers, scalars,
                          {"G_PAD": 16, "D": head_dim, "BLOCK": BLOCK_N, "IS_RING": ring,
                           "HAS_WINDOW": ring, "PRECISION": "tf32"})
        assert kernel.asm["cubin"]
    swiglu = compiled(_silu_mul_kernel, {"GATE": f"*{dtype}", "UP": f"*{dtype}",
                                         "OUT": f"*{dtype}"},
                      dict.fromkeys(("n_cols", "stride_gate", "stride_up"), "i32"),
                      {"BLOCK": BLOCK})
    assert swiglu.asm["cubin"]
