"""Checks of the split-KV decode kernel's attention-logit soft cap (Gemma 2), run by
tests/test_gemma2.py in a subprocess with TRITON_INTERPRET=1 (Triton executes the kernel on the
CPU; the variable must be set before Triton is imported). Exits non-zero with the failing
check's message; prints "ok" at the end."""

from __future__ import annotations

import torch

from infermeter.engine import model as model_module
from infermeter.engine import self_attention as attention_module
from infermeter.engine.attention import decode_attention
from infermeter.engine.kernels import decode_attention as attention_kernels
from infermeter.engine.kernels.decode_attention import BLOCK_N, split_kv_decode
from infermeter.engine.model import build_model
from infermeter.specs.presets import PRESETS

# Gemma 2 at its smallest: layer 0 slides over 6 tokens, layer 1 is global; scores capped at 1.5.
SPEC = PRESETS["debug"].with_updates(
    arch="gemma2", head_dim=32, norm_eps=1e-6, tie_embeddings=True, sliding_window=6,
    sliding_window_layers=(0,), norms_per_layer=4, query_pre_attn_scalar=24.0,
    final_logit_softcap=5.0, attn_logit_softcap=1.5)


def check_against_math() -> None:
    """GQA, batch 2, scores several times the cap: full and ring layouts, with a window, 1 and 3
    splits; the capped kernel equals the capped math path, and differs from the uncapped one."""
    gen = torch.Generator().manual_seed(0)
    slots = BLOCK_N + 7
    q = torch.randn(2, 2, 4, 32, generator=gen) * 3
    k, v = (torch.randn(2, 2, slots, 32, generator=gen) for _ in range(2))
    pos = 50
    for is_ring, window in ((False, 0), (True, 9)):
        key_pos = torch.randperm(slots, generator=gen) - 3 if is_ring else torch.arange(slots)
        key_pos[pos % slots] = pos
        visible = (key_pos >= 0) & (key_pos <= pos)
        if window:
            visible &= pos - key_pos < window
        want = decode_attention(q, k, v, visible.expand(4, -1), softcap=1.5)
        plain = decode_attention(q, k, v, visible.expand(4, -1))
        for splits in (1, 3):
            got = split_kv_decode(q, k, v, key_pos, torch.tensor([pos]), window, is_ring,
                                  splits, 1.5)
            err = (got - want).abs().max().item()
            case = f"ring {is_ring} window {window} splits {splits}"
            assert err < 1e-5, f"{case}: max error {err}"
            assert (got - plain).abs().max().item() > 0.05, f"{case}: the cap had no effect"


def check_model_decode() -> None:
    """The Gemma 2 model's one-token steps with decode_attention="triton" (while 'compiling')
    give the math path's logits; 8 steps after a 4-token prompt wrap the 6-token ring."""
    # the kernel is picked only while tracing (self_attention.py); the layers' own checks too
    model_module.compiling = attention_module.compiling = lambda: True
    calls = []

    def counted(*args, fused_step=False):
        calls.append(args[8])  # the soft cap the model passes (after it: the sinks, None)
        assert not fused_step  # Gemma 2's layers run the split step here
        return split_kv_decode(*args)

    attention_kernels.decode_attention_kernel = counted  # the model imports it from there
    tokens = torch.randint(0, SPEC.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    logits = {}
    for kind in ("math", "triton"):
        model = build_model(SPEC, seed=3)
        model.setup_cache(2, 16)
        for layer in model.layers:
            layer.attention.decode_attention = kind
        with torch.inference_mode():
            outs = [model(tokens[:, :4], torch.arange(4))]
            outs += [model(tokens[:, i:i + 1], torch.tensor([i])) for i in range(4, 12)]
        logits[kind] = torch.cat(outs, dim=1)
    assert calls == [SPEC.attn_logit_softcap] * 8 * SPEC.n_layers, calls[:4]
    err = (logits["triton"] - logits["math"]).abs().max().item()
    assert err < 1e-5, f"model logits differ by {err}"


if __name__ == "__main__":
    check_against_math()
    check_model_decode()
    print("ok")
