"""chunk_attention.py: a bucketed prefill chunk from a later start attending over a full layer's
cache through flex attention's tiles gives what the mask over the whole cache gives (float32,
flex_attention's reference outside torch.compile), across several 128-token tiles, a start
that is no multiple of a tile, GQA and MHA, and Gemma 2's logit cap; the Generator runs "flex"
only where inductor compiles it on a GPU and says so; the CLI's kinds are the engine's."""

from __future__ import annotations

import warnings

import pytest
import torch

from infermeter.engine.attention import decode_attention
from infermeter.engine.chunk_attention import (
    CHUNK_ATTENTIONS,
    TILE,
    block_lists,
    chunk_flex_attention,
)
from infermeter.engine.generator import Generator
from infermeter.engine.model import build_model
from infermeter.errors import InfermeterError
from infermeter.specs.presets import PRESETS

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def masked(q, keys, values, first, softcap=None):
    """The mask path's attention: query i sees slots <= first + i ([B, H, T, D])."""
    bsz, heads, length, dim = q.shape
    groups = heads // keys.shape[1]
    mask = torch.arange(keys.shape[2])[None, :] <= first + torch.arange(length)[:, None]
    folded = q.reshape(bsz, keys.shape[1], groups * length, dim)
    out = decode_attention(folded, keys, values, mask.repeat(groups, 1), softcap)
    return out.reshape(bsz, heads, length, dim)


@pytest.mark.parametrize("heads,kv_heads,first,length,slots,softcap", [
    (4, 2, 300, 200, 700, None),   # GQA; tiles 2 x 6, the diagonal inside tiles
    (4, 4, 128, 256, 512, None),   # MHA; a start and a length on tile edges
    (4, 1, 5, 140, 300, 20.0),     # MQA, Gemma 2's cap, a start inside the first tile
])
def test_flex_tiles_give_the_mask_s_attention(heads, kv_heads, first, length, slots, softcap):
    gen = torch.Generator().manual_seed(first)
    q = torch.randn(2, heads, length, 16, generator=gen)
    keys, values = (torch.randn(2, kv_heads, slots, 16, generator=gen) for _ in range(2))
    lists = block_lists(first, length, slots, torch.device("cpu"))
    kv_num, kv_index, full_num, full_index, start = lists
    assert kv_index.shape[-2:] == (-(-length // TILE), -(-slots // TILE))
    assert start.tolist() == [first]
    # a tile row sees no slot after its last query's position: later tiles are skipped
    last_tile = (first + min(length, TILE) - 1) // TILE
    assert int(kv_num[0, 0, 0] + full_num[0, 0, 0]) == last_tile + 1
    out = chunk_flex_attention(q, keys, values, lists, softcap)
    torch.testing.assert_close(out, masked(q, keys, values, first, softcap),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sinks", [False, True])
def test_a_short_chunk_asks_for_flex_s_main_kernel(sinks, monkeypatch):
    """A chunk of fewer than 128 queries would get inductor's flex decoding kernel, which with
    GQA finds no tile size that divides the 128-query tiles (no kernel at all: seen on an H100):
    every chunk asks for the main kernel, with or without sinks, and still gives the mask's
    attention."""
    from infermeter.engine import attention

    asked = []
    real = attention.flex_attention

    def spy(*args, **kwargs):
        asked.append(kwargs.get("kernel_options"))
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "flex_attention", spy)
    gen = torch.Generator().manual_seed(80)
    q = torch.randn(1, 4, 80, 16, generator=gen)  # [B, H, T, D]: 80 queries, 2 per KV head
    keys, values = (torch.randn(1, 2, 384, 16, generator=gen) for _ in range(2))
    lists = block_lists(200, 80, 384, torch.device("cpu"))
    out = chunk_flex_attention(q, keys, values, lists, None,
                               torch.zeros(4) if sinks else None)
    assert asked == [{"FORCE_USE_FLEX_ATTENTION": True}]
    expected = masked(q, keys, values, 200)
    if sinks:  # a zero sink logit: the row's weights scaled by 1 - sigmoid(-lse)
        torch.testing.assert_close(out.abs() <= expected.abs() + 1e-6,
                                   torch.ones_like(out, dtype=torch.bool))
    else:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_the_generator_runs_flex_only_compiled_by_inductor_on_a_gpu():
    model = build_model(PRESETS["debug"].with_updates(n_layers=1), device="cpu",
                        dtype=torch.float32)
    gen = Generator(model, bucketed_prefill=True, chunk_attention="flex")
    assert gen.chunk_attention == "mask"  # a CPU: inductor's flex kernel is for GPUs here
    with pytest.raises(InfermeterError, match="unknown chunk attention 'tiles'") as err:
        Generator(model, chunk_attention="tiles")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind,runs,expected", [
    ("auto", True, "flex"), ("mask", True, "mask"), ("flex", True, "flex"),
    ("auto", False, "mask"), ("flex", False, "mask"), ("mask", False, "mask")])
def test_auto_takes_flex_wherever_flex_runs(kind, runs, expected):
    from infermeter.engine.chunk_attention import chunk_attention_for, flex_runs

    assert chunk_attention_for(kind, runs) == expected
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert flex_runs(cuda, "inductor", True)
    assert not flex_runs(cpu, "inductor", True)
    assert not flex_runs(cuda, "cudagraphs", True)
    assert not flex_runs(cuda, "inductor", False)


def test_the_cli_offers_the_engine_s_kinds_and_records_them():
    from infermeter.cli import build_parser
    from infermeter.commands.generate import CHUNK_ATTENTIONS as CLI_KINDS

    assert CLI_KINDS == CHUNK_ATTENTIONS
    args = build_parser().parse_args(["generate", "--model", "debug", "--chunk-attention",
                                      "flex"])
    assert args.chunk_attention == "flex"
    with warnings.catch_warnings(), pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--model", "debug", "--chunk-attention", "x"])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["plain", "sinks", "capped"])
@torch.no_grad()  # Generator.prefill's grad mode (a dynamo guard): no second graphs
def test_compiled_flex_chunks_on_cuda_give_the_exact_prefill(kind):
    """Inductor's flex kernel inside the bucketed graph (tile lists as inputs, one graph for
    every start): the last real token's logits equal the exact eager prefill's (float32) and
    a compiled generate's greedy tokens equal eager's, for prompts of 2 to 4 chunks beside a
    ring layer; asked for ("plain"), and as "auto" picks it for gpt-oss's sinks (through the
    lse) and Gemma 2's soft cap (a score modifier)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from infermeter.engine.generator import GenerationConfig

    spec = PRESETS["debug"].with_updates(n_layers=2, sliding_window=40,
                                         sliding_window_layers=(0,), max_seq_len=512)
    if kind == "sinks":
        spec = spec.with_updates(name="debug-sinks", attn_sinks=True)
    if kind == "capped":
        spec = spec.with_updates(name="debug-capped", arch="gemma2", head_dim=16,
                                 tie_embeddings=True, norms_per_layer=4,
                                 final_logit_softcap=5.0, attn_logit_softcap=1.5)
    model = build_model(spec, device="cuda", dtype=torch.float32, seed=1)
    if model.layers[0].attention.sinks is not None:  # nonzero sinks: they must count
        for layer in model.layers:
            torch.nn.init.normal_(layer.attention.sinks, std=1.0)
    gen = Generator(model, max_seq_len=512, prefill_chunk=128, bucketed_prefill=True,
                    chunk_attention="flex" if kind == "plain" else "auto")
    assert gen.chunk_attention == "flex"
    eager, compiled = (GenerationConfig(max_new_tokens=6, compile=c) for c in (False, True))
    for length in (200, 300, 450):
        tokens = torch.randint(0, spec.vocab_size, (1, length),
                               generator=torch.Generator().manual_seed(length)).cuda()
        gen.warmup(1, length, compiled)
        gen.prepare(1, length, 6)
        tiled = gen._bucketed(tokens, 0).clone()  # [B, V]
        gen.prepare(1, length, 6)
        torch.testing.assert_close(tiled, gen._exact(tokens, 0, False), rtol=1e-4, atol=1e-4)
        assert gen.generate(tokens, compiled).output_token_ids == \
            gen.generate(tokens, eager).output_token_ids


@pytest.mark.parametrize("graphs,expected", [("static", 3), ("layer", 6)])
def test_one_traced_graph_serves_every_later_start(graphs, expected):
    """torch.compile's trace (aot_eager: dynamo's fullgraph trace without inductor's build) of
    the bucketed forward with flex chunks: the tile lists are inputs, so chunks at starts 24
    and 48 of two prompts share one graph; three graphs in all (24 from position 0, 24 and the
    padded 16 later), and the first tokens equal the eager prefill's. The layer graphs: the
    same three for each of the two kinds of layer (a ring and a full one)."""
    from torch._dynamo.utils import counters

    from infermeter.engine.generator import GenerationConfig, _block_step, _prefill_forward

    spec = PRESETS["debug"].with_updates(n_layers=2, sliding_window=12,
                                         sliding_window_layers=(0,))
    model = build_model(spec, device="cpu", dtype=torch.float32, seed=1)
    gen = Generator(model, max_seq_len=96, prefill_chunk=24, bucketed_prefill=True,
                    prefill_graphs=graphs)
    gen.chunk_attention = "flex"  # as the Generator sets it on a GPU
    traced = {"fullgraph": True, "dynamic": False, "backend": "aot_eager"}
    gen._compiled_prefill = torch.compile(_prefill_forward, **traced)
    gen._compiled_layer = torch.compile(_block_step, **traced)
    eager = Generator(model, max_seq_len=96)
    torch._dynamo.reset()
    counters.clear()
    for length, forwards in ((49, [24, 24, 16]), (70, [24, 24, 24])):
        tokens = torch.randint(0, spec.vocab_size, (2, length),
                               generator=torch.Generator().manual_seed(length))
        eager.prepare(2, length, 2)
        want = eager.prefill(tokens, GenerationConfig(max_new_tokens=2)).token
        gen.prepare(2, length, 2)
        assert gen.prefill_lengths(length, True) == forwards
        got = gen.prefill(tokens, GenerationConfig(max_new_tokens=2, compile=True)).token
        assert torch.equal(got, want)
    assert counters["stats"]["unique_graphs"] == expected
