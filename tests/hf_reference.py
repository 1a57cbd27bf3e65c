"""What the engine's parity tests against transformers share: a tiny random transformers model
written as a checkpoint, and greedy decoding through the engine's KV cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def tiny_hf_model(folder: Path, config: Any, model_class: Any,
                  spread: Callable[[str, torch.nn.Parameter], None] | None = None) -> Any:
    """transformers' `model_class` for `config`, float32 eager attention, seed 0; `spread` may
    redraw parameters by name (norm weights away from their identity, routers, biases) so a
    wrong use of them shows; saved to `folder` and returned."""
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation="eager",
                                     dtype=torch.float32).eval()
    if spread is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                spread(name, param)
    model.save_pretrained(folder)
    return model


def greedy_through_cache(model: Any, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Prefill the prompt [B, T] in one call, then decode one token at a time through the cache:
    the greedy tokens [B, steps]."""
    model.reset_cache()
    length = prompt.shape[1]
    logits = model(prompt, torch.arange(length))
    tokens = [logits[:, -1].argmax(-1)]
    for i in range(steps - 1):
        tokens.append(model(tokens[-1][:, None], torch.tensor([length + i]))[:, -1].argmax(-1))
    return torch.stack(tokens, dim=1)


def assert_matches_transformers(model: Any, hf: Any, vocab: int, steps: int,
                                lengths: tuple[int, ...] = (1, 5, 17)) -> None:
    """The engine's logits over 40 tokens [2, 40] within 1e-4 of transformers', and its greedy
    tokens after prompts of each length equal transformers' generate()."""
    tokens = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    reference = hf(tokens).logits
    ours = model(tokens, torch.arange(40))
    assert (ours - reference).abs().max().item() < 1e-4
    for length in lengths:
        prompt = tokens[:, :length]
        expected = hf.generate(prompt, max_new_tokens=steps, do_sample=False,
                               min_new_tokens=steps)[:, length:]
        assert torch.equal(greedy_through_cache(model, prompt, steps), expected), length


def assert_written_checkpoint_round_trips(source: Any, folder: Path, spec: Any, vocab: int,
                                          n_tokens: int, cache_len: int) -> tuple[Any, Any]:
    """The engine's checkpoint written to `folder` loads back as `spec` with every tensor equal,
    and transformers reads it: its logits over n_tokens random tokens [1, n_tokens] within 1e-4
    of the engine's. Returns (tokens, the engine's logits)."""
    import transformers

    from infermeter.engine.checkpoint.load import load_weights

    loaded = load_weights(folder)
    assert loaded.spec == spec.with_updates(name=folder.name)
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    tokens = torch.randint(0, vocab, (1, n_tokens), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        source.setup_cache(1, cache_len)
        ours = source(tokens, torch.arange(n_tokens))
        assert (ours - hf(tokens).logits).abs().max().item() < 1e-4
    return tokens, ours
