"""Checks of the one-launch model step (engine/kernels/model_step.py, --step-kernels model), run
by tests/test_model_step.py in a subprocess under Triton's CPU interpreter (TRITON_INTERPRET=1,
set before Triton is imported), or on a GPU with the argument "cuda" (a wait that never ends
there is a hang: the subprocess's timeout turns it into a failure). Prints "ok".

The reference is the one-launch layer step (layer_step.py), whose code each layer of the model
launch runs: under the interpreter the same bits, logits and caches; on a GPU within a few
units in the last place (the same tiles and warps, but a layer's first tiles load before the
wait for the layer before)."""

from __future__ import annotations

import sys

import torch

from infermeter.engine import linear as linear_module
from infermeter.engine import model as model_module
from infermeter.engine import self_attention as attention_module
from infermeter.engine.fusion import fuse_projections
from infermeter.engine.kernels import fused_step, gemv, stage_sync
from infermeter.engine.kernels import layer_step as layer_module
from infermeter.engine.kernels import model_step as model_step_module
from infermeter.engine.model import build_model, layer_step_layers, set_step_kernels
from infermeter.specs.presets import PRESETS

DEBUG = PRESETS["debug"]
# name: the spec (float32 on the CPU): Llama's, Qwen2's bias, Qwen3's q/k norms (tied head)
SPECS = {"llama": DEBUG,
         "qwen2 bias": DEBUG.with_updates(arch="qwen2", qkv_bias=True, n_layers=3),
         "qwen3 q/k norms": DEBUG.with_updates(arch="qwen3", qk_norm=True, head_dim=32,
                                               tie_embeddings=True, norm_eps=1e-6)}


def steps(spec, kind: str, device: str, dtype: torch.dtype, prompt: int = 4, count: int = 3):
    """The model's logits over a prompt and `count` greedy steps with step kernels `kind`, its
    tokens, its caches after, and the model."""
    model = build_model(spec, seed=3, dtype=dtype, device=device)
    fuse_projections(model)
    set_step_kernels(model, kind)
    model.setup_cache(1, 96)
    ids = torch.randint(0, spec.vocab_size, (1, prompt),
                        generator=torch.Generator().manual_seed(2)).to(device)
    outs = []
    with torch.inference_mode():
        out = model(ids, torch.arange(prompt, device=device))
        for i in range(prompt, prompt + count):
            outs.append(out[:, -1:])
            ids = torch.cat([ids, out[:, -1:].argmax(-1)], dim=1)
            out = model(ids[:, -1:], torch.tensor([i], device=device))
    caches = [(layer.attention.kv_cache.k.clone(), layer.attention.kv_cache.v.clone())
              for layer in model.layers]
    return torch.cat(outs, dim=1), ids, caches, model


def check_model_steps(device: str) -> None:
    """Each spec: "model" against "layer" over a prompt and 3 greedy steps, the same tokens
    and (interpreter) the same logits and caches to the bit; one model launch a step and no
    layer launch; the record of what ran; every count back at 0."""
    model_module.compiling = attention_module.compiling = linear_module.compiling = lambda: True
    if device == "cpu":  # small tiles for every product: the interpreter's cost is per program
        gemv.tiles_for = fused_step.tiles_for = lambda n_cols, gpu="": (32, 64, 4)
    launches = {"layer": 0, "model": 0}
    real_layer, real_model = layer_module._layer_step, model_step_module._model_step

    def counted(kind, real):
        def launch(*args):
            launches[kind] += 1
            return real(*args)
        return launch

    layer_module._layer_step = counted("layer", real_layer)
    model_step_module._model_step = counted("model", real_model)
    exact = device == "cpu"
    dtype = torch.float32 if exact else torch.bfloat16
    for name, spec in SPECS.items():
        got = {}
        for kind in ("layer", "model"):
            launches.update(layer=0, model=0)
            got[kind] = steps(spec, kind, device, dtype)
            model = got[kind][3]
            if kind == "model":
                assert launches == {"layer": 0, "model": 3}, (name, launches)
                assert model.took_model_kernel and layer_step_layers(model) == 0, name
            else:
                assert launches == {"layer": 3 * spec.n_layers, "model": 0}, (name, launches)
                assert not model.took_model_kernel, name
        (logits, tokens, caches, _), (want, want_tokens, want_caches, _) = \
            got["model"], got["layer"]
        assert torch.equal(tokens, want_tokens), name
        if exact:
            assert torch.equal(logits, want), (name, (logits - want).abs().max().item())
            for layer, (mine, theirs) in enumerate(zip(caches, want_caches, strict=True)):
                assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1]), \
                    (name, layer)
        else:
            gap = (logits.float() - want.float()).abs().max().item()
            assert gap <= 2.0 ** -5 * 4 * want.float().abs().max().item(), (name, gap)
    for key, counts in stage_sync._KEPT.items():  # every launch left its counts at 0
        assert int(counts.abs().sum()) == 0, f"counts {key} not back to 0: {counts.tolist()}"


def check_each_wait_counts_exactly(device: str) -> None:
    """The interpreter runs a launch's programs in id order, so every wait is met on arrival:
    each must find exactly the count it waits for (a smaller target would let a program start
    early on a GPU, a larger one never start). Past layer 0, a layer's qkv programs wait for
    the layer before's w2 programs, all of them."""
    waits = []

    def scalar(value) -> int:  # an interpreter tensor's value, or a plain int
        handle = getattr(value, "handle", None)
        return int(handle.data.reshape(-1)[0]) if handle is not None else int(value)

    def exact(COUNT, target):  # noqa: N803 (the kernels' name for it)
        import triton.language as tl

        waits.append((scalar(tl.load(COUNT)), scalar(target)))

    real = layer_module.wait_count, fused_step.wait_count
    layer_module.wait_count = fused_step.wait_count = exact
    try:
        model_module.compiling = attention_module.compiling = lambda: True
        linear_module.compiling = lambda: True
        gemv.tiles_for = fused_step.tiles_for = lambda n_cols, gpu="": (32, 64, 4)
        spec = SPECS["llama"]
        steps(spec, "model", device, torch.float32, count=1)
    finally:
        layer_module.wait_count, fused_step.wait_count = real
    bad = [(seen, target) for seen, target in waits if seen != target]
    assert not bad, f"waits that found another count than their target: {bad[:5]}"
    first_layer_waits = [w for w in waits if w == (0, 0)]
    assert first_layer_waits, "layer 0's qkv programs wait at 0"
    assert any(target > 0 for _, target in waits), waits[:5]


if __name__ == "__main__":
    where = (sys.argv[1:] + ["cpu"])[0]
    check_model_steps(where)
    if where == "cpu":
        check_each_wait_counts_exactly(where)
    print("ok")
