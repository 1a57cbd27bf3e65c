"""Prefill attention over only what it can see (Attention.forward, model.prefill_from): a forward
from position 0 attends to its own K/V, causal and unmasked (the flash kernel on CUDA); an eager
forward from a known later start over the cache's first start + T slots with a lower-right
causal mask. Both must give what attending over the whole cache with a mask gives (the path a
forward of unknown start still takes): the same logits at every real position (float32), the
same cache wherever a later token reads it, the same greedy tokens after. GQA, MHA, a ring layer
shorter than the prompt and one longer, Gemma 2's capped products; whole, chunked, and bucketed
with its pads (the compiled forward run uncompiled: the padding and the attention are under
test). The flash kernel itself is checked on a GPU (marked gpu).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import infermeter.engine.generator as generator_module
import infermeter.engine.self_attention as attention_module
from infermeter.engine.generator import GenerationConfig, Generator, _block_step, _prefill_forward
from infermeter.engine.kv_cache import LayerKVCache
from infermeter.engine.model import build_model
from infermeter.specs.presets import PRESETS

DEBUG = PRESETS["debug"].with_updates(n_layers=2)  # 4 query heads share 2 KV heads: GQA
SPECS = {
    "gqa": DEBUG,
    "mha": DEBUG.with_updates(name="debug-mha", n_kv_heads=DEBUG.n_heads),
    "window12": DEBUG.with_updates(name="debug-w12", sliding_window=12,
                                   sliding_window_layers=(0,)),
    "window40": DEBUG.with_updates(name="debug-w40", sliding_window=40,
                                   sliding_window_layers=(0,)),
    # Gemma 2's shape: capped scores (matrix products, cut to the slots a forward sees)
    "capped": DEBUG.with_updates(name="debug-capped", arch="gemma2", head_dim=16,
                                 tie_embeddings=True, sliding_window=12,
                                 sliding_window_layers=(0,), norms_per_layer=4,
                                 final_logit_softcap=5.0, attn_logit_softcap=1.5),
}
CACHE, CHUNK, N_NEW = 96, 24, 5
# (prefill, chunk, prompt lengths): 65 pads to 128, past the 96-token cache
CASES = [("exact", None, (5, 17, 33, 64)), ("exact", CHUNK, (25, 41, 64)),
         ("bucketed", None, (5, 17, 33, 65)), ("bucketed", CHUNK, (25, 41, 64))]
CONFIG = GenerationConfig(max_new_tokens=N_NEW)


@pytest.fixture(scope="module", params=sorted(SPECS))
def model(request):
    return build_model(SPECS[request.param], device="cpu", dtype=torch.float32, seed=3)


@contextmanager
def _whole_cache(model, start):
    """prefill_from as it was: every forward attends over the whole cache with a mask."""
    yield


def _prefill(model, prefill: str, chunk: int | None, tokens: torch.Tensor,
             chunk_attention: str = "mask"):
    """(logits of every real prompt position [B, T, V], each layer's (key_pos, K, V) after the
    prefill, the greedy tokens)."""
    bucketed = prefill == "bucketed"
    gen = Generator(model, max_seq_len=CACHE, prefill_chunk=chunk, bucketed_prefill=bucketed)
    gen._compiled_prefill = _prefill_forward  # the compiled graph's function, run eagerly
    gen._compiled_layer = _block_step  # the layer graphs' function, eagerly
    gen.chunk_attention = chunk_attention  # "flex" as a GPU resolves it (its reference here)
    config = GenerationConfig(max_new_tokens=N_NEW, compile=bucketed)
    rows = []
    handle = model.register_forward_hook(lambda mod, args, out: rows.append(out))
    gen.prepare(*tokens.shape, N_NEW)
    try:
        state = gen.prefill(tokens, config)
    finally:
        handle.remove()
    real = [n for n, _ in gen_forwards(gen, tokens.shape[1], bucketed)]
    logits = torch.cat([out[:, :n] for out, n in zip(rows, real)], dim=1)
    caches = [(c.key_pos.clone(), c.k.clone(), c.v.clone()) for c in model._caches()]
    tokens_out = [state.token.clone()]
    for _ in range(N_NEW - 1):  # eager steps: the prefill's cache is what is under test
        tokens_out.append(gen.decode_step(state, GenerationConfig(max_new_tokens=N_NEW)).clone())
    return logits, caches, torch.stack(tokens_out, dim=1)


def gen_forwards(gen: Generator, prompt_len: int, bucketed: bool) -> list[tuple[int, int]]:
    lengths = gen.prefill_lengths(prompt_len, bucketed)
    real, left = [], prompt_len
    for length in lengths:
        real.append((min(length, left), length))
        left -= real[-1][0]
    return real


def _read_slots(key_pos: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The slots a later token reads: those holding a prompt position (the pads' slot, the first
    decode step's own, is written by that step before it reads)."""
    return (key_pos >= 0) & (key_pos < prompt_len)


@pytest.mark.parametrize("prefill,chunk,lengths", CASES)
def test_prefill_over_what_it_sees_gives_the_whole_cache_masks_results(model, prefill, chunk,
                                                                       lengths, monkeypatch):
    for length in lengths:
        tokens = torch.randint(0, DEBUG.vocab_size, (2, length),
                               generator=torch.Generator().manual_seed(length))
        logits, caches, out = _prefill(model, prefill, chunk, tokens)
        with monkeypatch.context() as patch:
            patch.setattr(generator_module, "prefill_from", _whole_cache)
            ref_logits, ref_caches, ref_out = _prefill(model, prefill, chunk, tokens)
        where = f"{model.spec.name} {prefill} chunk {chunk} length {length}"
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5, msg=where)
        for (pos, k, v), (ref_pos, ref_k, ref_v) in zip(caches, ref_caches):
            read = _read_slots(ref_pos, length)
            assert torch.equal(pos[read], ref_pos[read]), where
            torch.testing.assert_close(k[:, :, read], ref_k[:, :, read], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v[:, :, read], ref_v[:, :, read], rtol=1e-5, atol=1e-5)
        assert torch.equal(out, ref_out), where


@pytest.mark.parametrize("name", ["capped", "sinks"])
def test_later_chunks_on_flex_give_the_mask_s_results_with_a_cap_or_sinks(name):
    # what --chunk-attention auto runs for Gemma 2 and gpt-oss on a GPU, against the mask
    spec = SPECS["capped"] if name == "capped" else DEBUG.with_updates(
        name="debug-sinks", attn_sinks=True, sliding_window=12, sliding_window_layers=(0,))
    model = build_model(spec, device="cpu", dtype=torch.float32, seed=3)
    if model.layers[0].attention.sinks is not None:  # nonzero sinks: they must count
        for layer in model.layers:
            torch.nn.init.normal_(layer.attention.sinks, std=1.0)
    for length in (41, 64):
        tokens = torch.randint(0, DEBUG.vocab_size, (2, length),
                               generator=torch.Generator().manual_seed(length))
        logits, caches, out = _prefill(model, "bucketed", CHUNK, tokens, "flex")
        ref_logits, ref_caches, ref_out = _prefill(model, "bucketed", CHUNK, tokens)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        for (pos, k, v), (ref_pos, ref_k, ref_v) in zip(caches, ref_caches):
            read = _read_slots(ref_pos, length)
            assert torch.equal(pos[read], ref_pos[read])
            torch.testing.assert_close(k[:, :, read], ref_k[:, :, read], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v[:, :, read], ref_v[:, :, read], rtol=1e-5, atol=1e-5)
        assert torch.equal(out, ref_out)


def _count_paths(monkeypatch) -> dict[str, list[int]]:
    """Per attention path, the key length each call attended over."""
    seen: dict[str, list[int]] = {"own": [], "cut": [], "whole": []}
    own, cut, whole = (attention_module.causal_prefill_attention, LayerKVCache.update_from,
                       LayerKVCache.update)

    def counted_own(q, keys, values):
        seen["own"].append(keys.shape[2])
        return own(q, keys, values)

    def counted_cut(self, k, v, input_pos, start):
        span = cut(self, k, v, input_pos, start)
        if span is not None:
            seen["cut"].append(span[0].shape[2])
        return span

    def counted_whole(self, k, v, input_pos):
        span = whole(self, k, v, input_pos)
        if k.shape[2] > 1:  # decode steps are not prefill
            seen["whole"].append(span[0].shape[2])
        return span

    monkeypatch.setattr(attention_module, "causal_prefill_attention", counted_own)
    monkeypatch.setattr(LayerKVCache, "update_from", counted_cut)
    monkeypatch.setattr(LayerKVCache, "update", counted_whole)
    return seen


def test_each_forward_attends_only_over_the_positions_it_needs(monkeypatch):
    model = build_model(SPECS["gqa"], device="cpu", dtype=torch.float32, seed=3)
    tokens = torch.randint(0, DEBUG.vocab_size, (1, 41), generator=torch.Generator().manual_seed(1))
    seen = _count_paths(monkeypatch)
    Generator(model, max_seq_len=CACHE).generate(tokens, CONFIG)
    assert seen == {"own": [41, 41], "cut": [], "whole": []}  # a whole prompt: its own K/V
    seen.update(own=[], cut=[], whole=[])
    Generator(model, max_seq_len=CACHE, prefill_chunk=CHUNK).generate(tokens, CONFIG)
    # the first chunk its own 24 tokens, the second the cache's first 24 + 17 slots
    assert seen == {"own": [24, 24], "cut": [41, 41], "whole": []}
    seen.update(own=[], cut=[], whole=[])
    gen = Generator(model, max_seq_len=CACHE, prefill_chunk=CHUNK, bucketed_prefill=True)
    gen._compiled_prefill = _prefill_forward
    gen._compiled_layer = _block_step  # the layer graphs' function, eagerly
    gen.generate(tokens, GenerationConfig(max_new_tokens=N_NEW, compile=True))
    # one graph a chunk length: a later chunk's start is not a constant of it (whole cache)
    assert seen == {"own": [24, 24], "cut": [], "whole": [CACHE, CACHE]}
    assert all(layer.attention.prefill_start is None for layer in model.layers)


def test_a_ring_layer_past_its_window_and_a_capped_model_keep_their_masks(monkeypatch):
    tokens = torch.randint(0, DEBUG.vocab_size, (1, 17), generator=torch.Generator().manual_seed(2))
    seen = _count_paths(monkeypatch)
    Generator(build_model(SPECS["window12"], seed=3), max_seq_len=CACHE).generate(tokens, CONFIG)
    # layer 0's ring of 12 attends over old and new (its window masks), layer 1 over its own
    assert seen == {"own": [17], "cut": [], "whole": [12 + 17]}
    seen.update(own=[], cut=[], whole=[])
    Generator(build_model(SPECS["capped"], seed=3), max_seq_len=CACHE).generate(tokens, CONFIG)
    # capped scores by matrix products: the full layer's over the 17 slots it sees
    assert seen == {"own": [], "cut": [17], "whole": [12 + 17]}


@pytest.mark.gpu
def test_a_long_whole_prompt_prefills_through_the_flash_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    spec = PRESETS["debug"].with_updates(max_seq_len=8192)  # GQA, head_dim 16
    for dtype in (torch.float16, torch.bfloat16):
        model = build_model(spec, device="cuda", dtype=dtype, seed=3)
        tokens = torch.randint(0, spec.vocab_size, (1, 4096), device="cuda",
                               generator=torch.Generator("cuda").manual_seed(1))
        gen = Generator(model, max_seq_len=4096 + 8)
        gen.prepare(1, 4096, 2)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises where flash cannot run
            state = gen.prefill(tokens, CONFIG)
        assert 0 <= int(state.token[0]) < spec.vocab_size


@pytest.mark.parametrize("mode,prefill,chunk,length,flex", [
    ("eager", "exact", None, 40, False), ("eager", "exact", CHUNK, 41, False),
    ("eager", "exact", None, 1, False), ("compiled", "bucketed", None, 17, False),
    ("compiled", "bucketed", CHUNK, 41, False),
    ("compiled", "bucketed", None, 90, False),  # 90 pads to 128, past the cache: whole cache
    # gpt-oss's sinks: its full layer on flex where the start is known (no scores held)
    ("eager", "exact", CHUNK, -41, False), ("compiled", "bucketed", CHUNK, -41, False),
    # later compiled chunks on flex (chunk attention "flex", auto's pick for these models on a
    # GPU): only the ring layer's scores, or the first chunk's, are held
    ("compiled", "bucketed", CHUNK, 41, True), ("compiled", "bucketed", CHUNK, -41, True)])
def test_the_fit_check_counts_the_capped_scores_the_prefill_holds(mode, prefill, chunk, length,
                                                                  flex, monkeypatch):
    from infermeter.generate.memory import capped_score_elements

    spec = SPECS["capped"] if length > 0 else DEBUG.with_updates(
        name="debug-sinks", attn_sinks=True, sliding_window=4, sliding_window_layers=(0,))
    length = abs(length)
    model = build_model(spec, seed=3)
    groups = spec.n_heads // spec.n_kv_heads
    held = []
    scores = attention_module.decode_attention

    def counted(q, keys, values, mask, softcap=None, sinks=None):
        held.append(q.shape[2] // groups * keys.shape[2])  # T x keys, a sequence and head
        return scores(q, keys, values, mask, softcap, sinks)

    monkeypatch.setattr(attention_module, "decode_attention", counted)
    bucketed = prefill == "bucketed"
    gen = Generator(model, max_seq_len=CACHE, prefill_chunk=chunk, bucketed_prefill=bucketed)
    gen._compiled_prefill = _prefill_forward
    gen._compiled_layer = _block_step  # the layer graphs' function, eagerly
    if flex:  # as a GPU resolves it (flex's reference implementation runs it here)
        gen.chunk_attention = "flex"
    gen.prepare(1, length, 1)
    gen.prefill(torch.zeros(1, length, dtype=torch.int64),
                GenerationConfig(max_new_tokens=1, compile=bucketed))
    expected = capped_score_elements(spec, length, CACHE, mode, chunk, prefill, flex)
    assert max(held) == expected
    if flex:  # fewer than the mask's whole-cache scores
        assert expected < capped_score_elements(spec, length, CACHE, mode, chunk, prefill)
