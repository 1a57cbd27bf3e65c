"""The exact compiled prefill's layers replayed as CUDA graphs (engine/layer_replays.py).

The graphs need a GPU; on the CPU RecordedForwards runs each call, so these tests check the
rest: the Generator takes the replays where it should, each layer's call goes out under its own
key (layer, length, start) reading two shared activation buffers in turn, and the logits, cache
and tokens are the plain layer loop's, chunked, from a later start, beside a ring layer. The
compiled layer function is the eager one here (inductor on the CPU would only slow the test)."""

from __future__ import annotations

import pytest
import torch

from infermeter.engine import generator as generator_module
from infermeter.engine.generator import GenerationConfig, Generator, _block_step
from infermeter.engine.model import build_model
from infermeter.specs.presets import PRESETS

# a ring layer (window 12) beside a full one; prompts longer than the window and the chunk
SPEC = PRESETS["debug"].with_updates(n_layers=3, sliding_window=12, sliding_window_layers=(1,))
CHUNK, CACHE = 24, 96
COMPILED = GenerationConfig(max_new_tokens=4, compile=True)
EAGER = GenerationConfig(max_new_tokens=4)


def _generator(monkeypatch, replays: bool) -> Generator:
    model = build_model(SPEC, device="cpu", dtype=torch.float32, seed=3)
    gen = Generator(model, max_seq_len=CACHE, prefill_chunk=CHUNK, compile_prefill=True,
                    bucketed_prefill=False)
    monkeypatch.setattr(Generator, "replays_layers", property(lambda self: replays))
    monkeypatch.setattr(Generator, "_block_fn", lambda self: _block_step)
    return gen


def _prompt(length: int) -> torch.Tensor:
    return torch.randint(0, SPEC.vocab_size, (2, length),
                         generator=torch.Generator().manual_seed(length))


@pytest.mark.parametrize("length,start", [(10, 0), (41, 0), (30, 20)])
def test_replayed_layers_give_the_layer_loop_s_logits_and_cache(monkeypatch, length, start):
    """Each layer call goes out as RecordedForwards.run(key, ..., persistent=True) with key
    (layer, [B, T, dim], the start its attention was told): layer i + 1 reads, in place, the
    buffer layer i wrote, and the two buffers alternate. Logits and every layer's cache equal
    the plain loop's (same compiled function, no replays)."""
    runs = []
    plain = _generator(monkeypatch, replays=False)
    replayed = _generator(monkeypatch, replays=True)
    real = replayed.layer_replays.recorded.run

    def spy(key, forward, inputs, persistent=False):
        runs.append((key, inputs[0], persistent))
        out = real(key, forward, inputs, persistent)
        runs[-1] += (out,)
        return out

    monkeypatch.setattr(replayed.layer_replays.recorded, "run", spy)
    tokens = _prompt(start + length)
    results = []
    for gen in (plain, replayed):
        gen.prepare(2, start + length, 4)
        if start:  # the prefix first, eagerly: the cache a reload would leave
            gen._exact(tokens[:, :start], 0, False)
        results.append((gen._exact(tokens[:, start:], start, True),
                        [(c.k.clone(), c.v.clone()) for c in
                         (layer.attention.kv_cache for layer in gen.model.layers)]))
    (want, want_cache), (got, got_cache) = results
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for (k, v), (k2, v2) in zip(want_cache, got_cache):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    chunks = [min(CHUNK, length - offset) for offset in range(0, length, CHUNK)]
    assert len(runs) == SPEC.n_layers * len(chunks)
    for n, (key, source, persistent, out) in enumerate(runs):
        layer, chunk = n % SPEC.n_layers, chunks[n // SPEC.n_layers]
        first_chunk_from_zero = start == 0 and n < SPEC.n_layers
        assert key == (layer, (2, chunk, SPEC.dim), 0 if first_chunk_from_zero else None)
        assert persistent
        if layer:  # in place: it reads what the layer before wrote, and writes what that read
            assert source is runs[n - 1][3] and out is runs[n - 1][1] and out is not source


def test_the_generator_replays_only_where_graphs_can_run():
    """On the CPU no graph: the plain layer loop; and the Generator's rule itself: a GPU, one
    rank, a prefill without host syncs."""
    model = build_model(SPEC, device="cpu", dtype=torch.float32, seed=3)
    gen = Generator(model, max_seq_len=CACHE, compile_prefill=True, bucketed_prefill=False)
    assert not gen.replays_layers  # a CPU
    gen.device = torch.device("cuda")  # the rule, not a run: nothing is allocated on it
    assert gen.replays_layers
    model.tp_collectives = object()
    assert not gen.replays_layers
    model.tp_collectives = None
    assert generator_module.prefills_without_sync(model)


def test_replayed_layers_generate_the_plain_loop_s_tokens(monkeypatch):
    """Whole generations (prefill through the replays, then decode): the same greedy tokens
    as the plain loop and as eager, twice over (the second prefill reuses the recorded keys)."""
    tokens = _prompt(41)
    plain = _generator(monkeypatch, replays=False)
    replayed = _generator(monkeypatch, replays=True)
    want = plain.generate(tokens, EAGER).output_token_ids
    for _ in range(2):
        assert replayed.generate(tokens, COMPILED).output_token_ids == want


@pytest.mark.gpu
@torch.no_grad()
def test_on_cuda_replayed_layers_give_the_eager_prefill():
    """The real graphs (float32, a ring layer, chunks of 24, from 0 and from a later start):
    the first prefill records every (layer, length, start) and the second replays them; both
    give the eager exact prefill's logits, and the replays need no host sync."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = build_model(SPEC, device="cuda", dtype=torch.float32, seed=3)
    gen = Generator(model, max_seq_len=CACHE, prefill_chunk=CHUNK, compile_prefill=True,
                    bucketed_prefill=False)
    assert gen.replays_layers
    tokens = _prompt(71).cuda()
    def prefill(start: int, compile: bool) -> torch.Tensor:
        gen.prepare(2, 71, 4)
        if start:  # the prefix eagerly, as a reload would leave it
            gen._exact(tokens[:, :start], 0, False)
        return gen._exact(tokens[:, start:], start, compile)

    for start in (0, 30):
        want = prefill(start, False)
        for _ in range(2):  # recorded, then replayed
            torch.testing.assert_close(prefill(start, True), want, rtol=1e-4, atol=1e-4)
    gen.prepare(2, 71, 4)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a replay that syncs would raise
    try:
        gen._exact(tokens, 0, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
