"""Parity with transformers: same weights, same logits (< 1e-4), same greedy tokens.

Each case builds a small random HF model (eager attention, float32), saves it with
save_pretrained (safetensors), loads it with infermeter and compares. Norm weights and qkv biases
are randomised too (HF initialises them to 1 and 0, which would hide layout bugs in them), and
weights use a larger std than HF's default so greedy choices are not near-ties.
"""

from __future__ import annotations

import pytest
import torch

from infermeter.engine.checkpoint.load import load_model
from tests.hf_reference import greedy_through_cache, tiny_hf_model

transformers = pytest.importorskip("transformers")

VOCAB = 128
COMMON = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
          "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": VOCAB,
          "max_position_embeddings": 256, "initializer_range": 0.1,
          "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-mqa": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 1}),
    "llama3.1-rope": ("LlamaConfig", "LlamaForCausalLM",
                      {"rope_scaling": LLAMA31_ROPE, "rope_theta": 500000.0}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 6}),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", {}),
}


def _spread(name: str, param: torch.nn.Parameter) -> None:
    if "norm" in name:
        param.normal_(1.0, 0.1)
    elif name.endswith("bias"):
        param.normal_(0.0, 0.1)


def _hf_model(case: str, tmp_path):
    config_cls, model_cls, extra = CASES[case]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    return tiny_hf_model(tmp_path, config, getattr(transformers, model_cls), _spread)




@pytest.mark.parametrize("case", list(CASES))
@torch.inference_mode()
def test_logits_and_greedy_match_transformers(case: str, tmp_path) -> None:
    hf = _hf_model(case, tmp_path)
    model = load_model(tmp_path, max_batch_size=2, max_seq_len=64)
    spec = model.spec
    if case == "mistral-window":  # the test is only meaningful if the window is in force
        assert spec.sliding_window_layers == (0, 1, 2) and spec.sliding_window == 6
    if case == "llama3.1-rope":
        assert spec.rope_scaling is not None and spec.rope_scaling.kind == "llama3"
    assert model.output.weight is model.tok_embeddings.weight if spec.tie_embeddings else True

    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=gen)
    reference = hf(tokens).logits
    ours = model(tokens, torch.arange(24))
    assert ours.dtype == torch.float32
    assert (ours - reference).abs().max().item() < 1e-4

    prompt, steps = tokens[:, :10], 20  # 10 + 20 > window 6: the ring buffer wraps
    expected = hf.generate(prompt, max_new_tokens=steps, do_sample=False,
                           min_new_tokens=steps)[:, prompt.shape[1]:]
    assert torch.equal(greedy_through_cache(model, prompt, steps), expected)
