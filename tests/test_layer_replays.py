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
from infermeter.engine.generator import GenerationConfig, Generator, _block_step, _decode_one
from infermeter.engine.model import build_model
from infermeter.specs.presets import PRESETS

# a ring layer (window 12) beside full ones; prompts longer than the window and the chunk
SPEC = PRESETS["debug"].with_updates(n_layers=3, sliding_window=12, sliding_window_layers=(1,))
SPECS = {"odd": SPEC,
         # an even count, and the ring layers on RoPE tables of their own (Gemma 3's local base)
         "local": SPEC.with_updates(name="debug-local", n_layers=4, sliding_window_layers=(0, 2),
                                    rope_local_theta=1000.0)}
CHUNK, CACHE = 24, 96
COMPILED = GenerationConfig(max_new_tokens=4, compile=True)
EAGER = GenerationConfig(max_new_tokens=4)


def _generator(monkeypatch, replays: bool, spec=SPEC) -> Generator:
    """A Generator whose exact compiled prefill runs the eager layer function and whose
    compiled decode step the eager step function (no inductor on the CPU: the replays are the
    prefill's), replaying its layers or not (this object's own setting)."""
    model = build_model(spec, device="cpu", dtype=torch.float32, seed=3)
    gen = Generator(model, max_seq_len=CACHE, prefill_chunk=CHUNK, compile_prefill=True,
                    bucketed_prefill=False)
    gen._compiled_step = _decode_one
    gen.test_replays = replays
    monkeypatch.setattr(Generator, "replays_prefill", lambda self, compiled, forward_len:
                        compiled and getattr(self, "test_replays", False))
    monkeypatch.setattr(Generator, "_block_fn", lambda self: _block_step)
    return gen


def _prompt(length: int) -> torch.Tensor:
    return torch.randint(0, SPEC.vocab_size, (2, length),
                         generator=torch.Generator().manual_seed(length))


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("length,start", [(10, 0), (41, 0), (30, 20), (49, 0)])
def test_replayed_layers_give_the_layer_loop_s_logits_and_cache(monkeypatch, name, length,
                                                                  start):
    """Each layer call goes out as RecordedForwards.run(key, ..., persistent=True) with key
    (layer, [B, T, dim], the start its attention was told): layer i + 1 reads, in place, the
    buffer layer i wrote, and the two buffers alternate. Logits and every layer's cache equal
    the plain loop's (same layer function, no replays), with an odd and an even layer count,
    local RoPE rows beside global ones, and a last chunk of one token (49 = 24 + 24 + 1)."""
    runs = []
    plain = _generator(monkeypatch, replays=False, spec=SPECS[name])
    replayed = _generator(monkeypatch, replays=True, spec=SPECS[name])
    assert not plain.replays_prefill(True, CHUNK) and replayed.replays_prefill(True, CHUNK)
    spec = SPECS[name]
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
    assert len(runs) == spec.n_layers * len(chunks)
    for n, (key, source, persistent, out) in enumerate(runs):
        layer, chunk = n % spec.n_layers, chunks[n // spec.n_layers]
        first_chunk_from_zero = start == 0 and n < spec.n_layers
        assert key == (layer, (2, chunk, spec.dim), 0 if first_chunk_from_zero else None)
        assert persistent
        if layer:  # in place: it reads what the layer before wrote, and writes what that read
            assert source is runs[n - 1][3] and out is runs[n - 1][1] and out is not source


def test_the_generator_replays_only_where_graphs_can_run():
    """On the CPU no graph: the plain layer loop; and the Generator's rule itself: a GPU, one
    rank, a prefill without host syncs."""
    model = build_model(SPEC, device="cpu", dtype=torch.float32, seed=3)
    gen = Generator(model, max_seq_len=CACHE, compile_prefill=True, bucketed_prefill=False)
    assert not gen.replays_prefill(True, CHUNK)  # a CPU
    gen.device = torch.device("cuda")  # the rule, not a run: nothing is allocated on it
    assert gen.replays_prefill(True, CHUNK)
    model.tp_collectives = object()
    assert not gen.replays_prefill(True, CHUNK)
    model.tp_collectives = None
    assert generator_module.prefills_without_sync(model)


def test_replayed_layers_generate_the_plain_loop_s_tokens(monkeypatch):
    """Whole generations (prefill through the replays, then decode): the same first logits and
    greedy tokens as eager, twice over (the second prefill reuses the recorded keys)."""
    tokens = _prompt(41)
    plain = _generator(monkeypatch, replays=False)
    replayed = _generator(monkeypatch, replays=True)
    want = plain.generate(tokens, EAGER).output_token_ids
    plain.prepare(2, 41, 4)
    logits = plain._exact(tokens, 0, False)
    for _ in range(2):
        assert replayed.generate(tokens, COMPILED).output_token_ids == want
        replayed.prepare(2, 41, 4)
        torch.testing.assert_close(replayed._exact(tokens, 0, True), logits, rtol=1e-5,
                                   atol=1e-5)


def test_every_length_is_a_view_of_the_same_buffers(monkeypatch):
    """Lengths share the front of two flat buffers sized for the longest forward seen, the
    same view objects each time (the graphs' inputs); a longer forward reallocates them and
    forgets every graph, keeping the current state current."""
    from infermeter.engine.layer_replays import LayerReplays

    replays = LayerReplays(torch.device("cpu"))
    replays.follow("cache")
    replays.recorded._graphs["old"] = ("graph", [], None)
    cos = torch.zeros(24, 8)

    def views(length):
        return replays._buffers_for(torch.zeros(2, length, 64), cos[:length],
                                    torch.zeros(length, dtype=torch.int64))

    long, short = views(24), views(10)
    assert len(replays.recorded) == 0 and replays.recorded._states == {"cache": {}}
    assert short[0].data_ptr() == long[0].data_ptr() and short[0].shape == (2, 10, 64)
    assert short[1].data_ptr() == long[1].data_ptr() != long[0].data_ptr()
    assert views(10) is short  # the same objects
    replays.recorded._graphs["kept"] = ("graph", [], None)
    assert views(24)[0] is long[0] and len(replays.recorded) == 1  # no growth: graphs kept
    cos = torch.zeros(40, 8)
    longer = views(40)
    assert longer[0].shape == (2, 40, 64) and len(replays.recorded) == 0


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
    assert gen.replays_prefill(True, CHUNK)
    tokens = _prompt(73).cuda()  # chunks 24, 24, 24 and a one-token last
    def prefill(start: int, compile: bool) -> torch.Tensor:
        gen.prepare(2, 73, 4)
        if start:  # the prefix eagerly, as a reload would leave it
            gen._exact(tokens[:, :start], 0, False)
        return gen._exact(tokens[:, start:], start, compile)

    for start in (0, 30):
        want = prefill(start, False)
        for _ in range(2):  # recorded, then replayed
            torch.testing.assert_close(prefill(start, True), want, rtol=1e-4, atol=1e-4)
    gen.prepare(2, 73, 4)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a replay that syncs would raise
    try:
        gen._exact(tokens, 0, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
