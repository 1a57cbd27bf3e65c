"""Bucketed prefill (Generator(bucketed_prefill=True), generate's default in compiled mode): each
prefill forward padded up to a bucket length must give what one unpadded eager forward of every
row gives: the same logits at the prompt's last position, the only row a prefill projects to
the vocabulary (float32), the same K/V wherever a later token reads them (full layers and ring
layers, whose padded writes could wrap onto held positions), and the same greedy tokens after.
GQA, MHA, and two sliding windows (one shorter than the buckets, one longer than some), prompt
lengths on both sides of every bucket edge used, whole and chunked.
CPU: the compiled forward is replaced by the same function uncompiled (the padding is what is
under test); one test traces it with torch.compile (aot_eager) to count its graphs, static and
dynamic.
"""

from __future__ import annotations

import pytest
import torch

from infermeter.engine.generator import (
    GenerationConfig,
    Generator,
    _block_step,
    _prefill_forward,
)
from infermeter.engine.model import build_model, prefill_from
from infermeter.engine.prefill_buckets import bucket_length, prefill_forwards
from infermeter.errors import InfermeterError
from infermeter.specs.presets import PRESETS

DEBUG = PRESETS["debug"].with_updates(n_layers=2)  # 4 query heads share 2 KV heads: GQA
SPECS = {
    "gqa": DEBUG,
    "mha": DEBUG.with_updates(name="debug-mha", n_kv_heads=DEBUG.n_heads),
    # a ring layer beside a full one: shorter than every bucket, and longer than 16 and 32
    "window12": DEBUG.with_updates(name="debug-w12", sliding_window=12, sliding_window_layers=(0,)),
    "window40": DEBUG.with_updates(name="debug-w40", sliding_window=40, sliding_window_layers=(0,)),
}
# both sides of buckets 16, 32 and 64 (65 pads to 128, past the 96-token cache: every pad
# shares one position, so a forward may be longer than the cache)
LENGTHS = (1, 16, 17, 32, 33, 64, 65)
CHUNK = 24  # chunked: full chunks of 24, the last part at 16 or 24 (capped at the chunk)
CHUNKED_LENGTHS = (24, 25, 40, 41)
CACHE = 96
N_NEW = 6
EAGER = GenerationConfig(max_new_tokens=N_NEW)
COMPILED = GenerationConfig(max_new_tokens=N_NEW, compile=True)


@pytest.fixture(scope="module", params=sorted(SPECS))
def model(request):
    return build_model(SPECS[request.param], device="cpu", dtype=torch.float32, seed=1)


def prompt(length: int) -> torch.Tensor:
    """Batch 2 of `length` seeded random ids [2, T]."""
    return torch.randint(0, DEBUG.vocab_size, (2, length),
                         generator=torch.Generator().manual_seed(length))


def bucketed(model, chunk=None, chunk_attention="mask", graphs="static") -> Generator:
    gen = Generator(model, max_seq_len=CACHE, prefill_chunk=chunk, bucketed_prefill=True,
                    prefill_graphs=graphs)
    gen._compiled_prefill = _prefill_forward  # the compiled graph's function, run eagerly
    gen._compiled_layer = _block_step  # the "layer" graphs' compiled layer, run eagerly
    # "flex" runs only compiled on a GPU; here flex_attention's reference runs the same tiles
    gen.chunk_attention = chunk_attention
    return gen


def run(gen: Generator, tokens: torch.Tensor, config: GenerationConfig):
    """Prefill (config decides the path), then N_NEW - 1 eager decode steps: (the logits the
    first token was sampled from [B, V], the caches after the prefill, each sequence's greedy
    tokens)."""
    outputs: list[torch.Tensor] = []
    lengths: list[int] = []
    handle = gen.model.register_forward_hook(lambda m, a, out: outputs.append(out))
    pre = gen.model.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    gen.prepare(*tokens.shape, N_NEW)
    try:
        state = gen.prefill(tokens, config)
    finally:
        handle.remove()
        pre.remove()
    assert lengths == gen.prefill_lengths(tokens.shape[1], config.compile)
    # one row projected a bucketed forward (one graph at every length); an exact prefill's
    # chunks before the last project none
    rows = [1] * len(lengths) if config.compile else [0] * (len(lengths) - 1) + [1]
    assert [o.shape[1] for o in outputs] == rows
    caches = caches_of(gen.model)
    ids = [state.token] + [gen.decode_step(state, EAGER) for _ in range(N_NEW - 1)]
    return outputs[-1][:, 0], caches, torch.stack(ids, dim=1).tolist()


def caches_of(model) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [(c.k.clone(), c.v.clone(), c.key_pos.clone()) for c in model._caches()]


@torch.no_grad()
def one_forward(model, tokens: torch.Tensor, cache: int = CACHE):
    """One eager forward of the whole prompt into an empty cache, logits for every row:
    (logits [B, T, V], the caches after it)."""
    Generator(model, max_seq_len=cache).prepare(tokens.shape[0], tokens.shape[1], 1)
    with prefill_from(model, 0):
        logits = model(tokens, torch.arange(tokens.shape[1]))
    return logits, caches_of(model)


def unpadded(model, tokens: torch.Tensor):
    """one_forward, and the greedy tokens of an eager generate after it."""
    Generator(model, max_seq_len=CACHE).prepare(*tokens.shape, N_NEW)
    logits, caches = one_forward(model, tokens)
    ids = Generator(model, max_seq_len=CACHE).generate(tokens, EAGER).output_token_ids
    assert [row[0] for row in ids] == logits[:, -1].argmax(-1).tolist()
    return logits, caches, ids


def assert_same_where_read(model, want, got, prompt_len: int) -> None:
    """K/V of every slot a later token reads: a full layer's positions < T, a ring layer's
    positions the first decode step's window still covers (> T - window)."""
    for layer, (k0, v0, pos0), (k1, v1, pos1) in zip(model.layers, want, got):
        window = layer.attention.kv_cache.window
        read = (pos0 >= 0) & (pos0 < prompt_len)
        if window is not None:
            read &= pos0 > prompt_len - window
        assert torch.equal(pos0[read], pos1[read])
        torch.testing.assert_close(k1[:, :, read], k0[:, :, read], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v1[:, :, read], v0[:, :, read], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk,length,attention,graphs",
                         [(None, n, "mask", "static") for n in LENGTHS]
                         + [(CHUNK, n, "mask", "static") for n in CHUNKED_LENGTHS]
                         + [(CHUNK, n, "flex", "static") for n in (25, 41)]  # 2, 3 chunks
                         # the forward whose layers run one function, padded, in chunks
                         + [(None, 17, "mask", "layer"), (CHUNK, 41, "mask", "layer"),
                            (CHUNK, 41, "flex", "layer")])
def test_bucketed_prefill_gives_the_unpadded_logits_cache_and_tokens(model, chunk, length,
                                                                     attention, graphs,
                                                                     monkeypatch):
    """Chunked, the chunks after the first attend with each chunk attention (flex: the full
    layers through chunk_attention.py's tiles, ring layers keep the mask); "layer" graphs: each
    layer through the one layer function, the tiles handed to it."""
    import infermeter.engine.self_attention as attention_module

    tokens = prompt(length)
    want_logits, want_cache, want_ids = unpadded(model, tokens)
    gen = bucketed(model, chunk, attention, graphs)
    calls = []
    flex = attention_module.chunk_flex_attention
    monkeypatch.setattr(attention_module, "chunk_flex_attention",
                        lambda *a: calls.append(1) or flex(*a))
    logits, cache, ids = run(gen, tokens, COMPILED)
    full = sum(not layer.attention.kv_cache.is_ring for layer in model.layers)
    chunks = len(gen.prefill_lengths(length, True))
    assert len(calls) == (full * (chunks - 1) if attention == "flex" else 0)
    assert gen.prefill_lengths(length, True)[-1] == bucket_length(
        length - (length - 1) // (chunk or length) * (chunk or length), chunk)
    torch.testing.assert_close(logits, want_logits[:, -1], rtol=1e-4, atol=1e-4)
    assert_same_where_read(model, want_cache, cache, length)
    assert ids == want_ids


# one layer: the sweeps below run ~200 prefills; a full-attention layer and a ring layer
TINY = {"full": DEBUG.with_updates(name="debug-1l", n_layers=1),
        "window24": DEBUG.with_updates(name="debug-1l-w24", n_layers=1, sliding_window=24,
                                       sliding_window_layers=(0,))}


@torch.no_grad()
def bucketed_logits(gen: Generator, tokens: torch.Tensor):
    """A bucketed prefill of tokens [B, T] into an empty cache: (the last real token's logits
    [B, V], the caches after it)."""
    gen.prepare(tokens.shape[0], tokens.shape[1], 1)
    return gen._bucketed(tokens, 0), caches_of(gen.model)


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_prompt_length_across_the_bucket_edges(name):
    """Every length from 1 to 90 (bucket edges 16, 32 and 64; 65 to 90 pad to 128), whole and in
    chunks of 24 (the last part at 16 or 24): the last token's logits and the cache a later
    token reads equal one unpadded eager forward's."""
    model = build_model(TINY[name], device="cpu", dtype=torch.float32, seed=3)
    for chunk in (None, CHUNK):
        gen = bucketed(model, chunk)
        for length in range(1, 91):
            tokens = prompt(length)
            want_logits, want_cache = one_forward(model, tokens)
            logits, cache = bucketed_logits(gen, tokens)
            last = length - (length - 1) // (chunk or length) * (chunk or length)
            assert gen.prefill_lengths(length, True)[-1] == bucket_length(last, chunk)
            torch.testing.assert_close(logits, want_logits[:, -1], rtol=1e-4, atol=1e-4)
            assert_same_where_read(model, want_cache, cache, length)


@pytest.mark.parametrize("length,chunk,forwards", [
    (512, None, [512]),  # the last power-of-two bucket
    (513, None, [1024]),  # the first multiple of 512 past it
    (1025, 1024, [1024, 16]),  # a full chunk at the largest bucket, one token padded to 16
])
def test_the_largest_bucket_edges(length, chunk, forwards):
    spec = TINY["window24"].with_updates(max_seq_len=2048)
    model = build_model(spec, device="cpu", dtype=torch.float32, seed=3)
    tokens = torch.randint(0, spec.vocab_size, (1, length),
                           generator=torch.Generator().manual_seed(length))
    want_logits, want_cache = one_forward(model, tokens, cache=1088)
    gen = Generator(model, max_seq_len=1088, prefill_chunk=chunk, bucketed_prefill=True)
    gen._compiled_prefill = _prefill_forward
    gen._compiled_layer = _block_step  # the layer graphs' function, eagerly
    gen.prepare(1, length, 1)
    assert gen.prefill_lengths(length, True) == forwards
    logits, cache = bucketed_logits(gen, tokens)
    torch.testing.assert_close(logits, want_logits[:, -1], rtol=1e-4, atol=1e-4)
    assert_same_where_read(model, want_cache, cache, length)


def test_bucket_lengths_and_forwards():
    # steps of 16 to 128, doubling to 512, steps of 512 after
    lengths = (1, 15, 16, 17, 80, 100, 128, 129, 300, 512, 513, 1500)
    assert [bucket_length(n) for n in lengths] == \
        [16, 16, 16, 32, 80, 112, 128, 256, 512, 512, 1024, 1536]
    assert all(bucket_length(n) - n < 16 for n in range(1, 129))  # under 16 pads up to 128
    assert bucket_length(300, chunk=384) == 384 and bucket_length(17, chunk=20) == 20
    assert prefill_forwards(2100, 1024, 4096) == [(1024, 1024), (1024, 1024), (52, 64)]
    assert prefill_forwards(81, None, 512) == [(81, 96)]
    assert prefill_forwards(80, None, 512) == [(80, 80)]  # the reference prompt: no pads
    # no position left after the prompt for the pads (a prefill that fills the cache)
    assert prefill_forwards(80, None, 80) == [(80, 80)]


def test_the_pads_stay_inside_the_cache():
    """A prompt that leaves one free slot pads into it; one that fills the cache runs exact
    (prefill(start=) after cached positions counts the room from start)."""
    gen = bucketed(build_model(SPECS["window12"], device="cpu", dtype=torch.float32, seed=1))
    gen.prepare(2, 19, 1)  # cache 256 (rounded): room for the pads
    assert gen.prefill_lengths(19, True) == [32]
    assert gen.prefill_lengths(19, True, start=256 - 19) == [19]
    assert gen.prefill_lengths(19, False) == [19]


def test_dynamic_prefill_graphs_compile_one_graph_for_every_bucket(monkeypatch):
    """torch.compile of the bucketed forward, through the Generator's own call (its backend
    swapped for aot_eager: dynamo's fullgraph trace without inductor's C++ build): "static"
    compiles one graph a bucket (prompts 5 and 9 share bucket 16's, 17 takes 32's, 40 48's);
    "dynamic" traces the forward once with a symbolic length and every bucket runs that graph;
    "layer" compiles one layer a bucket for each kind of layer: the ring layer's, and one the
    two full layers share (6, not 9). Same first tokens as the eager prefill every way; an
    unknown kind is one error line."""
    from torch._dynamo.utils import counters

    import infermeter.engine.generator as generator_module

    real = torch.compile
    asked = []

    def on_aot_eager(fn, **options):
        asked.append(options["dynamic"])
        options.pop("options", None)
        return real(fn, **{**options, "backend": "aot_eager"})

    monkeypatch.setattr(generator_module.torch, "compile", on_aot_eager)
    spec = SPECS["window12"].with_updates(n_layers=3)  # layer 0 a ring, 1 and 2 full
    model = build_model(spec, device="cpu", dtype=torch.float32, seed=1)
    eager = Generator(model, max_seq_len=CACHE)
    graphs = {}
    for kind in ("static", "dynamic", "layer"):
        gen = Generator(model, max_seq_len=CACHE, bucketed_prefill=True, prefill_graphs=kind)
        torch._dynamo.reset()
        counters.clear()
        for length in (5, 9, 17, 40):
            tokens = prompt(length)
            eager.prepare(2, length, N_NEW)
            want = eager.prefill(tokens, EAGER).token
            gen.prepare(2, length, N_NEW)
            assert torch.equal(gen.prefill(tokens, COMPILED).token, want), (kind, length)
        graphs[kind] = counters["stats"]["unique_graphs"]
    # dynamic=None: the marked length symbolic, the rest static
    assert asked == [False, None, False]
    assert graphs == {"static": 3, "dynamic": 1, "layer": 6}
    with pytest.raises(InfermeterError, match="unknown prefill graphs 'tiled'") as err:
        Generator(model, prefill_graphs="tiled")
    assert "\n" not in str(err.value)


def test_the_layer_graphs_are_the_default_and_give_way_where_no_layer_function_runs():
    """"layer" by default; "static" under tensor parallelism (each layer's all-reduce hooks
    are closures of their own: a graph a layer; add_norm: Transformer.forward refuses a
    block_fn) or where the cudagraphs backend compiles (no inductor to compile a layer alone);
    what was asked for otherwise."""
    model = build_model(DEBUG, device="cpu", dtype=torch.float32, seed=1)
    gen = Generator(model, max_seq_len=CACHE, bucketed_prefill=True)
    assert gen.prefill_graphs == "layer"
    assert Generator(model, prefill_graphs="dynamic").prefill_graphs == "dynamic"
    gen.compile_backend = "cudagraphs"  # a CUDA device's choice: set here on the CPU
    assert gen.prefill_graphs == "static"
    gen.compile_backend = "inductor"
    for name in ("add_norm", "tp_collectives"):  # what tensor parallelism sets on the model
        setattr(model, name, object())
        try:
            assert gen.prefill_graphs == "static", name
        finally:
            setattr(model, name, None)
    assert gen.prefill_graphs == "layer"


def test_moe_and_eager_prefill_exactly():
    """An MoE model's prefill has data-dependent shapes: bucketed is not used; eager mode never
    pads."""
    moe = PRESETS["debug"].with_updates(name="debug-moe", n_experts=4, n_active_experts=2,
                                        moe_ffn_dim=32)
    gen = Generator(build_model(moe, device="cpu", dtype=torch.float32), bucketed_prefill=True)
    assert not gen.bucketed_prefill
    gen = bucketed(build_model(DEBUG, device="cpu", dtype=torch.float32))
    gen.prepare(1, 5, 2)
    assert (gen.prefill_lengths(5, False), gen.prefill_lengths(5, True)) == ([5], [16])


def test_the_fit_check_counts_the_padded_forward():
    """generate's fit check sizes the prefill's activations at the bucket the prompt runs at."""
    from infermeter.generate.memory import case_memory
    from infermeter.specs.sizes import prefill_activation_bytes

    spec = PRESETS["llama-2-7b"]
    def acts(**kw):
        return case_memory(spec, 1, 600, 1024, "fp16", "fp16", "compiled", **kw)[
            "prefill activations"]

    assert acts(prefill="bucketed") == prefill_activation_bytes(spec, 1, 1024, "fp16")
    assert acts(prefill="exact") == prefill_activation_bytes(spec, 1, 600, "fp16")
    assert acts(prefill="bucketed", prefill_chunk=256) == \
        prefill_activation_bytes(spec, 1, 256, "fp16")  # 256, 256, then 88 padded to 128

    # one row a sequence reaches the vocabulary (fp16 logits and their float32 copy, 6 B a
    # value); the hf mode's transformers forward may project every row
    ffn = 3 * 600 * spec.ffn_dim * 2
    assert acts(prefill="exact") == ffn + 6 * spec.vocab_size
    hf = case_memory(spec, 1, 600, 1024, "fp16", "fp16", "hf")["prefill activations"]
    assert hf == ffn + 6 * 600 * spec.vocab_size
    # the exact compiled prefill's layer replays (--compile-prefill) keep two [B, T, dim]
    # buffers; bucketed none
    exact = case_memory(spec, 1, 600, 1024, "fp16", "fp16", "compiled", prefill="exact",
                        compile_prefill=True)
    assert exact["prefill layer buffers"] == 2 * 600 * spec.dim * 2
    assert "prefill layer buffers" not in case_memory(spec, 1, 600, 1024, "fp16", "fp16",
                                                      "compiled", prefill="bucketed")


def test_a_prompt_longer_than_the_cache_or_context_is_one_error_line():
    gen = bucketed(build_model(DEBUG, device="cpu", dtype=torch.float32))
    with pytest.raises(InfermeterError, match="does not fit in the KV cache of 96 tokens") as err:
        gen.generate([[1] * 100], COMPILED)
    assert "\n" not in str(err.value)
    long = Generator(build_model(DEBUG, device="cpu", dtype=torch.float32),
                     bucketed_prefill=True)
    with pytest.raises(InfermeterError, match="context of 256 tokens") as err:
        long.generate([[1] * 300], COMPILED)
    assert "\n" not in str(err.value)


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", ["static", "dynamic", "layer"])
@torch.no_grad()  # Generator.prefill's grad mode (a dynamo guard): no second graph a length
def test_bucketed_prefill_on_cuda_matches_the_exact_one(graphs):
    """Inductor's graphs replayed as CUDA graphs (recorded in warmup(); "layer": our recording
    of the whole forward, recorded_forward.py): the last real token's logits equal the exact
    eager prefill's (float32), and the greedy tokens of a whole compiled generate equal
    eager's; 41 tokens run in chunks of 24 (a later chunk's graph)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = build_model(SPECS["window12"], device="cuda", dtype=torch.float32, seed=1)
    gen = Generator(model, max_seq_len=CACHE, bucketed_prefill=True, prefill_graphs=graphs,
                    prefill_chunk=CHUNK)
    for length in (5, 17, 33, 41):
        tokens = prompt(length).cuda()
        gen.warmup(2, length, COMPILED)
        gen.prepare(2, length, N_NEW)
        padded = gen._bucketed(tokens, 0).clone()  # [B, V]
        gen.prepare(2, length, N_NEW)
        torch.testing.assert_close(padded, gen._exact(tokens, 0, False), rtol=1e-4, atol=1e-4)
        want = gen.generate(tokens, EAGER).output_token_ids
        assert gen.generate(tokens, COMPILED).output_token_ids == want


@pytest.mark.gpu
@torch.no_grad()
def test_a_recording_prefill_runs_each_chunk_once():
    """The first prefill of a key records its graph and returns the recording run's own
    logits: a chunk is never run twice, which a ring layer would not survive (its update reads
    the window it then overwrites). Chunks of 24 past a 12-token window, no warm-up: the first
    and the replayed prefills both equal the exact one."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = build_model(SPECS["window12"], device="cuda", dtype=torch.float32, seed=1)
    gen = Generator(model, max_seq_len=CACHE, bucketed_prefill=True, prefill_graphs="layer",
                    prefill_chunk=CHUNK)
    tokens = prompt(41).cuda()
    gen.prepare(2, 41, 1)
    want = gen._exact(tokens, 0, False)
    for _ in range(2):  # recorded, then replayed
        gen.prepare(2, 41, 1)
        torch.testing.assert_close(gen._bucketed(tokens, 0), want, rtol=1e-4, atol=1e-4)
    assert len(gen.recorded) == 2  # 24 from position 0, 24 later (17 padded)


@pytest.mark.gpu
@torch.no_grad()
def test_recorded_layer_graphs_follow_a_new_cache():
    """A recorded graph writes the KV cache at the addresses it was recorded with: the same
    cache keeps the graphs (two buckets, two graphs), a cache of a new shape (prepare() for
    another batch size) drops them and records anew, and the logits stay the exact prefill's."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = build_model(SPECS["gqa"], device="cuda", dtype=torch.float32, seed=1)
    gen = Generator(model, max_seq_len=CACHE, bucketed_prefill=True, prefill_graphs="layer")
    for length in (17, 5):  # buckets 32 and 16, one cache of batch 2
        gen.prepare(2, length, 1)
        gen._bucketed(prompt(length).cuda(), 0)
    assert len(gen.recorded) == 2
    tokens = prompt(17)[:1].cuda()
    gen.prepare(1, 17, 1)  # a cache of batch 1
    padded = gen._bucketed(tokens, 0)
    assert (model.max_batch_size, len(gen.recorded)) == (1, 1)
    gen.prepare(1, 17, 1)
    torch.testing.assert_close(padded, gen._exact(tokens, 0, False), rtol=1e-4, atol=1e-4)


def test_a_recording_clears_cublas_workspaces_before_and_after(monkeypatch):
    """cuBLAS's cached workspace must belong to the recording's own pool and outlive no pool:
    a recording (fakes stand in for the CUDA calls, which need a GPU) clears the workspaces
    right before the capture and right after it, also when the capture fails; the first run
    (on the side stream, before) and replays (after) see no clearing."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from infermeter.engine import recorded_forward as module

    events: list[str] = []

    class Graph:
        def pool(self):
            return (0, 1)

        def replay(self):
            events.append("replay")

    @contextmanager
    def record(graph, pool=None):
        events.append("capture")
        yield
        events.append("captured")

    @contextmanager
    def on_stream(stream):
        yield

    stream = SimpleNamespace(wait_stream=lambda other: None)
    fake = SimpleNamespace(Stream=lambda device: stream, current_stream=lambda device: stream,
                           stream=on_stream, CUDAGraph=Graph, graph=record)
    monkeypatch.setattr(module.torch, "cuda", fake)
    monkeypatch.setattr(module, "_clear_workspaces", lambda: events.append("clear"))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: None)
    recorded = module.RecordedForwards(torch.device("cuda"))
    recorded.follow("cache")

    def forward(x):
        events.append("forward")
        return x * 2

    assert recorded.run("key", forward, [torch.ones(2)]).tolist() == [2.0, 2.0]
    assert events == ["forward", "clear", "capture", "forward", "captured", "clear"]
    events.clear()
    recorded.run("key", forward, [torch.ones(2)])
    assert events == ["replay"]

    def failing(x):
        if "clear" in events:  # the capture's run, not the first one
            raise RuntimeError("capture failed")
        return x

    events.clear()
    with pytest.raises(RuntimeError, match="capture failed"):
        recorded.run("other", failing, [torch.ones(2)])
    assert events == ["clear", "capture", "clear"]

    # persistent: the graph reads the caller's buffer in place and returns the one it writes
    buffer, written = torch.ones(2), torch.zeros(2)

    def into(x):
        return written.copy_(x * 3)

    assert recorded.run("kept", into, [buffer], persistent=True) is written
    buffer.fill_(5.0)
    events.clear()
    assert recorded.run("kept", into, [buffer], persistent=True) is written  # a replay
    assert events == ["replay"]
    with pytest.raises(ValueError, match="reads the buffers it was recorded with"):
        recorded.run("kept", into, [buffer.clone()], persistent=True)


@pytest.mark.gpu
@torch.no_grad()
def test_a_generator_s_graphs_outlive_another_generator_s():
    """Two Generators in one process, as `infermeter run` has: both record their prefill
    graphs (the first's while the second is alive: all recordings share torch's capture
    stream, and cuBLAS caches a workspace per stream), then the first goes with its graphs'
    pool; the second's replays still give the exact prefill's logits. Before each recording
    cleared the workspaces, the second's graphs used a workspace in the first's pool: on an
    H100 a replay then hit an illegal address. No decode step runs here (inductor's graph
    trees clear the workspaces themselves, which would hide it)."""
    import gc

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    tokens = prompt(41)[:1].cuda()
    gens = []
    for seed in (1, 2):
        model = build_model(SPECS["gqa"], device="cuda", dtype=torch.float32, seed=seed)
        gen = Generator(model, max_seq_len=CACHE, bucketed_prefill=True, prefill_graphs="layer",
                        prefill_chunk=CHUNK)
        gen.prepare(1, 41, 1)
        gen._bucketed(tokens, 0)  # records both chunks' graphs
        gens.append(gen)
    first, second = gens
    del gens, first, gen, model
    gc.collect()
    torch.cuda.empty_cache()  # the first Generator's pool is given back
    second.prepare(1, 41, 1)
    replayed = second._bucketed(tokens, 0).clone()
    torch.cuda.synchronize()
    second.prepare(1, 41, 1)
    torch.testing.assert_close(replayed, second._exact(tokens, 0, False), rtol=1e-4, atol=1e-4)


def test_recorded_graphs_are_kept_per_buffer_state():
    """RecordedForwards' bookkeeping (the graphs themselves need a GPU: entries stand in for
    them): a state's graphs come back with the state, a new state starts with none, at most
    STATES_KEPT states are kept (the least recent dropped), and the pool is forgotten once no
    graph is left (a pool no graph holds cannot record again)."""
    from infermeter.engine import recorded_forward as module

    recorded = module.RecordedForwards(torch.device("cpu"))
    recorded.follow("a")
    recorded._graphs[16] = recorded._graphs[32] = ("graph", [], None)
    recorded._pool = (1, 2)
    recorded.follow("b")
    assert len(recorded) == 0
    recorded.follow("a")
    assert len(recorded) == 2
    for state in range(module.STATES_KEPT - 1):  # "a" becomes the least recent, then goes
        recorded.follow(state)
    assert recorded._pool == (1, 2)
    recorded.follow("c")
    assert "a" not in recorded._states and len(recorded._states) == module.STATES_KEPT
    assert recorded._pool is None
    assert recorded.run(0, lambda x: x + 1, [torch.ones(2)]).tolist() == [2.0, 2.0]  # no graph
