"""Chunked prefill (Generator(prefill_chunk=C)): a prompt longer than C tokens is prefilled C at a
time into the KV cache and must give what one unchunked eager forward of every row gives: the
same logits at the prompt's last position (close, float32) and the same greedy tokens, with the
output projection run for that one row only (chunks before the last compute no logits). GQA and
MHA specs, a sliding-window spec whose window the prompt outgrows (a ring-buffer cache), and
prompt lengths on both sides of the chunk edges. CPU, seeded random weights.
"""

from __future__ import annotations

import pytest
import torch

from infermeter.engine.generator import GenerationConfig, Generator
from infermeter.engine.model import build_model, prefill_from
from infermeter.errors import InfermeterError
from infermeter.specs.presets import PRESETS

DEBUG = PRESETS["debug"]  # 4 query heads share 2 KV heads: GQA
SPECS = {
    "gqa": DEBUG,
    "mha": DEBUG.with_updates(name="debug-mha", n_kv_heads=DEBUG.n_heads),
    # a 12-token window on layer 0 only: a ring layer beside a full one
    "window": DEBUG.with_updates(name="debug-window", sliding_window=12,
                                 sliding_window_layers=(0,)),
}
CHUNK = 8
LENGTHS = (CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5)
CACHE = 64
N_NEW = 6


@pytest.fixture(scope="module", params=sorted(SPECS))
def model(request):
    return build_model(SPECS[request.param], device="cpu", dtype=torch.float32, seed=1)


def prompts(length: int) -> list[list[int]]:
    """Batch 2 of `length` seeded random ids."""
    ids = torch.randint(0, DEBUG.vocab_size, (2, length),
                        generator=torch.Generator().manual_seed(length))
    return ids.tolist()


class Recorder:
    """Every forward's logits [B, R, V] during one prefill (R: the rows it projects)."""

    def __init__(self, model):
        self.outputs: list[torch.Tensor] = []
        self.handle = model.register_forward_hook(lambda m, a, out: self.outputs.append(out))

    def prefill_logits(self, gen: Generator, tokens: list[list[int]]) -> torch.Tensor:
        """The logits prefill() sampled from: the last forward's one row [B, V]."""
        t = gen.prompt_tensor(tokens)
        gen.prepare(*t.shape, N_NEW)
        self.outputs.clear()
        gen.prefill(t, GenerationConfig(max_new_tokens=N_NEW))
        self.handle.remove()
        assert [o.shape[1] for o in self.outputs] == [0] * (len(self.outputs) - 1) + [1]
        return self.outputs[-1][:, 0]


@torch.no_grad()
def full_forward(model, tokens: list[list[int]]) -> torch.Tensor:
    """One eager forward of the whole prompt with logits for every row [B, T, V]."""
    t = torch.tensor(tokens)
    model.setup_cache(t.shape[0], CACHE)
    with prefill_from(model, 0):
        return model(t, torch.arange(t.shape[1]))


@pytest.mark.parametrize("length", LENGTHS)
def test_chunked_prefill_gives_the_unchunked_logits_and_tokens(model, length):
    tokens = prompts(length)
    whole = full_forward(model, tokens)  # [B, T, V]
    chunked_gen = Generator(model, max_seq_len=CACHE, prefill_chunk=CHUNK)
    lengths: list[int] = []
    pre = model.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    recorder = Recorder(model)
    try:
        chunked = recorder.prefill_logits(chunked_gen, tokens)
    finally:
        pre.remove()
    assert len(lengths) == -(-length // CHUNK)  # forwards of at most CHUNK tokens
    assert max(lengths) == min(length, CHUNK)
    torch.testing.assert_close(chunked, whole[:, -1], rtol=1e-4, atol=1e-4)
    config = GenerationConfig(max_new_tokens=N_NEW)
    expected = Generator(model, max_seq_len=CACHE).generate(tokens, config).output_token_ids
    assert [row[0] for row in expected] == whole[:, -1].argmax(-1).tolist()
    assert chunked_gen.generate(tokens, config).output_token_ids == expected


def test_a_chunk_longer_than_the_window_keeps_the_window():
    """A chunk of 20 tokens outgrows a 12-token ring: only its last 12 stay, as unchunked."""
    model = build_model(SPECS["window"], device="cpu", dtype=torch.float32, seed=1)
    tokens = prompts(3 * CHUNK + 5)
    whole = full_forward(model, tokens)[:, -1]
    wide = Recorder(model).prefill_logits(Generator(model, max_seq_len=CACHE, prefill_chunk=20),
                                          tokens)
    torch.testing.assert_close(wide, whole, rtol=1e-4, atol=1e-4)


def test_chunked_prompt_longer_than_the_cache_or_context_is_one_error_line():
    model = build_model(DEBUG, device="cpu", dtype=torch.float32)
    gen = Generator(model, max_seq_len=32, prefill_chunk=CHUNK)
    with pytest.raises(InfermeterError, match="does not fit in the KV cache of 32 tokens") as err:
        gen.generate([[1] * 40], GenerationConfig(max_new_tokens=2))
    assert "\n" not in str(err.value)
    with pytest.raises(InfermeterError, match="context of 256 tokens") as err:
        Generator(model, prefill_chunk=CHUNK).generate([[1] * 300], GenerationConfig())
    assert "\n" not in str(err.value)
    with pytest.raises(InfermeterError, match="at least 1 token"):
        Generator(model, prefill_chunk=0)
