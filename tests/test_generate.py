"""Generation: eager against a no-cache reference, compiled against eager, stops, sampling.

CPU float32 on the debug preset with seeded random weights. The inductor compile (the slow part)
happens once, in the module-scoped `compiled` fixture. GPU tests (CUDA graphs, fp16/bf16, no
host sync under torch.cuda.set_sync_debug_mode) are marked `gpu`.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from infermeter.engine.generator import GenerationConfig, Generator, _decode_one
from infermeter.engine.model import build_model
from infermeter.engine.sampling import sample, uniform_noise
from infermeter.errors import InfermeterError
from infermeter.specs.presets import PRESETS
from tests.test_held_step import recorded

SPEC = PRESETS["debug"]
# Batch 2, T = 7; chosen so that neither greedy continuation repeats one token (stop tests).
PROMPTS = [[10, 20, 30, 40, 50, 60, 70], [5, 4, 3, 2, 1, 0, 128]]
N_NEW = 12


@pytest.fixture(scope="module")
def model():
    return build_model(SPEC, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def greedy_ids(model) -> list[list[int]]:
    out = Generator(model).generate(PROMPTS, GenerationConfig(max_new_tokens=N_NEW))
    return out.output_token_ids


@pytest.fixture(scope="module")
def compiled(model) -> Generator:
    """One Generator whose compiled decode step is reused by every test that needs it."""
    return Generator(model)


@torch.no_grad()
def reference_greedy(model, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    """Recompute the whole sequence every step (no K/V reuse) and take the last argmax."""
    seqs = torch.tensor(prompts)
    for _ in range(n_new):
        model.reset_cache()  # forward writes the cache; every position is rewritten anyway
        logits = model(seqs, torch.arange(seqs.shape[1]))
        seqs = torch.cat([seqs, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seqs[:, len(prompts[0]):].tolist()


def test_greedy_matches_no_cache_reference(model, greedy_ids):
    gen = Generator(model)
    # The reference needs a cache as long as the full sequence; prepare() sizes it.
    gen.prepare(len(PROMPTS), len(PROMPTS[0]), N_NEW)
    assert greedy_ids == reference_greedy(model, PROMPTS, N_NEW)
    assert all(len(ids) == N_NEW for ids in greedy_ids)


def test_output_counts_and_hook_events(model):
    events = []
    out = Generator(model).generate(PROMPTS, GenerationConfig(max_new_tokens=5),
                                    hook=lambda event, step: events.append((event, step)))
    assert out.prompt_len == 7 and out.batch_size == 2 and out.num_prefill_tokens == 14
    assert out.num_decode_steps == 4 and out.num_new_tokens == 10
    assert out.finished == [False, False]
    assert events == [("start", 0), ("prefill", 0)] + [("decode", i) for i in range(1, 5)]


def test_compiled_greedy_matches_eager(model, compiled, greedy_ids):
    # Real inductor on CPU, fullgraph=True: a graph break (an .item(), a .tolist()) would raise.
    out = compiled.generate(PROMPTS, GenerationConfig(max_new_tokens=N_NEW, compile=True))
    assert out.output_token_ids == greedy_ids
    again = compiled.generate(PROMPTS, GenerationConfig(max_new_tokens=N_NEW, compile=True))
    assert again.output_token_ids == greedy_ids  # cache reset between calls


def test_compiled_sampling_matches_eager(model, compiled):
    # Counter-based noise: eager and compiled draw the same numbers, so the same tokens.
    config = GenerationConfig(max_new_tokens=8, greedy=False, temperature=0.7, top_p=0.9, seed=5)
    eager = Generator(model).generate(PROMPTS, config).output_token_ids
    from dataclasses import replace
    assert compiled.generate(PROMPTS, replace(config, compile=True)).output_token_ids == eager


@pytest.mark.parametrize("greedy", [True, False])
def test_decode_step_has_no_graph_break(model, greedy):
    """fullgraph=True fails on any graph break, and a host sync (.item()) is one."""
    gen = Generator(model)
    gen.prepare(2, 4, 4)
    state = gen.prefill(torch.zeros(2, 4, dtype=torch.int64), GenerationConfig())
    step = torch.compile(_decode_one, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        token, done = step(model, state.token, state.input_pos, state.done, state.stop_ids,
                           state.seed, greedy=greedy, temperature=0.8, top_p=0.9)
    assert token.shape == (2,) and token.dtype == torch.int64 and done.dtype == torch.bool


def _stop_choice(row: list[int], other: list[int]) -> int:
    """An index k >= 2 whose token first appears at k in `row` and never in `other`."""
    for k in range(2, len(row)):
        if row[k] not in row[:k] and row[k] not in other:
            return k
    pytest.fail(f"no usable stop token in {row}: pick other PROMPTS")


def test_stop_id_cuts_one_sequence_only(model, greedy_ids):
    k = _stop_choice(greedy_ids[0], greedy_ids[1])
    config = GenerationConfig(max_new_tokens=N_NEW, stop_ids={greedy_ids[0][k]})
    out = Generator(model).generate(PROMPTS, config)
    assert out.output_token_ids[0] == greedy_ids[0][:k]  # the stop id itself is excluded
    assert out.output_token_ids[1] == greedy_ids[1]  # the other sequence runs on
    assert out.finished == [True, False]
    assert out.num_decode_steps == N_NEW - 1


def test_all_stopped_ends_loop_at_next_check(model, greedy_ids):
    k0 = _stop_choice(greedy_ids[0], [])
    k1 = _stop_choice(greedy_ids[1], [])
    config = GenerationConfig(max_new_tokens=N_NEW, stop_check_interval=2,
                              stop_ids={greedy_ids[0][k0], greedy_ids[1][k1]})
    out = Generator(model).generate(PROMPTS, config)
    assert out.finished == [True, True]
    assert out.output_token_ids[0] == greedy_ids[0][:k0]
    assert out.output_token_ids[1] == greedy_ids[1][:k1]
    # Token i (0-based) comes from decode step i; the host notices at the next even step.
    last = max(k0, k1)
    assert out.num_decode_steps == last + last % 2


def test_host_checks_only_every_interval(model, monkeypatch):
    gen = Generator(model)
    calls = []
    monkeypatch.setattr(gen, "_all_done", lambda done: calls.append(1) or False)
    gen.generate(PROMPTS, GenerationConfig(max_new_tokens=40, stop_check_interval=16))
    assert calls == []  # no stop ids: no check at all until the final read-back
    gen.generate(PROMPTS, GenerationConfig(max_new_tokens=40, stop_check_interval=16,
                                           stop_ids={SPEC.vocab_size + 1}))
    assert len(calls) == 2  # before decode steps 17 and 33 of 39


def test_sampling_is_seeded(model, greedy_ids):
    gen = Generator(model)
    config = GenerationConfig(max_new_tokens=N_NEW, greedy=False, temperature=1.5, seed=1)
    first = gen.generate(PROMPTS, config).output_token_ids
    assert gen.generate(PROMPTS, config).output_token_ids == first
    other = GenerationConfig(max_new_tokens=N_NEW, greedy=False, temperature=1.5, seed=2)
    assert gen.generate(PROMPTS, other).output_token_ids != first
    tiny_p = GenerationConfig(max_new_tokens=N_NEW, greedy=False, top_p=1e-6, seed=3)
    assert gen.generate(PROMPTS, tiny_p).output_token_ids == greedy_ids


def test_sample_distribution_and_top_p_support():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4).contiguous()  # 20000 rows = 20000 independent draws
    seed, pos = torch.tensor(11), torch.tensor([3])

    def freq(**kw) -> torch.Tensor:
        drawn = sample(logits, greedy=False, seed=seed, pos=pos, **kw)
        return torch.bincount(drawn, minlength=4) / len(drawn)

    torch.testing.assert_close(freq(temperature=1.0, top_p=1.0), probs, atol=0.015, rtol=0)
    hot = torch.softmax(probs.log() / 2.0, dim=-1)
    torch.testing.assert_close(freq(temperature=2.0, top_p=1.0), hot, atol=0.015, rtol=0)
    # top_p = 0.7 keeps {0, 1} (mass before token 2 is 0.8): renormalised 0.625 / 0.375.
    nucleus = freq(temperature=1.0, top_p=0.7)
    assert nucleus[2] == 0 and nucleus[3] == 0
    torch.testing.assert_close(nucleus[:2], torch.tensor([0.625, 0.375]), atol=0.015, rtol=0)
    greedy = sample(logits, greedy=True, temperature=1.0, top_p=1.0, seed=seed, pos=pos)
    assert (greedy == 0).all()


def test_uniform_noise_is_uniform_and_keyed():
    ids = torch.arange(1000)
    u = uniform_noise(torch.tensor(0), torch.tensor([5]), ids, 50)  # [50, 1000]
    assert u.shape == (50, 1000) and u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    # Row b's stream does not depend on the batch size; position and seed change it.
    assert torch.equal(uniform_noise(torch.tensor(0), torch.tensor([5]), ids, 3), u[:3])
    assert not torch.equal(uniform_noise(torch.tensor(0), torch.tensor([6]), ids, 50), u)
    assert not torch.equal(uniform_noise(torch.tensor(1), torch.tensor([5]), ids, 50), u)


def test_prompt_too_long_for_the_cache(model):
    with pytest.raises(InfermeterError, match="does not fit in the KV cache of 32 tokens"):
        Generator(model, max_seq_len=32).generate([[1] * 20], GenerationConfig(max_new_tokens=13))
    with pytest.raises(InfermeterError, match="context of 256 tokens"):
        Generator(model).generate([[1] * 250], GenerationConfig(max_new_tokens=7))
    with pytest.raises(InfermeterError, match="cache length"):
        Generator(model, max_seq_len=SPEC.max_seq_len + 1)


def test_exact_fit_uses_the_last_cache_slot(model):
    gen = Generator(model, max_seq_len=16)
    out = gen.generate([[1] * 10, [2] * 10], GenerationConfig(max_new_tokens=6))
    assert [len(ids) for ids in out.output_token_ids] == [6, 6]
    assert model.max_seq_len == 16


@pytest.mark.parametrize("prompts, match", [
    ([[1, 2, 3], [1, 2]], "equal length"),
    ([], "no prompts"),
    ([[]], "empty prompt"),
    ([[1, SPEC.vocab_size]], "outside the vocabulary"),
    ([[-1, 2]], "outside the vocabulary"),
])
def test_bad_prompts(model, prompts, match):
    with pytest.raises(InfermeterError, match=match):
        Generator(model).generate(prompts, GenerationConfig(max_new_tokens=2))


@pytest.mark.parametrize("kwargs", [
    {"max_new_tokens": 0},
    {"greedy": False, "temperature": 0.0},
    {"top_p": 0.0},
    {"top_p": 1.5},
    {"stop_check_interval": 0},
])
def test_bad_configs(kwargs):
    with pytest.raises(InfermeterError):
        GenerationConfig(**kwargs)


def test_kv_dtype_is_used_for_the_cache():
    model = build_model(SPEC, device="cpu", dtype=torch.float32)
    out = Generator(model, kv_dtype="bf16").generate(PROMPTS, GenerationConfig(max_new_tokens=3))
    assert model.cache_dtype == torch.bfloat16 and out.num_new_tokens == 6


def test_warmup_keeps_the_cache_for_generate(model):
    gen = Generator(model, max_seq_len=64)
    config = GenerationConfig(max_new_tokens=8)
    gen.warmup(2, 7, config)
    before = [t.data_ptr() for t in model.cache_tensors()]
    gen.generate(PROMPTS, config)
    assert [t.data_ptr() for t in model.cache_tensors()] == before


def peaked_cuda_model(spec, dtype):
    """The GPU tests' model: random weights on CUDA with the output head scaled 50x. Random
    weights give near-flat logits (top-2 gaps ~1e-3, below fp16 rounding); a sharper head makes
    greedy decisions robust to eager-vs-inductor rounding differences."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = build_model(spec, device="cuda", dtype=dtype)
    with torch.no_grad():
        model.output.weight.mul_(50)
    return model


def assert_compiled_gives_eager_tokens(gen: Generator, prompts: list[list[int]]) -> None:
    """24 greedy tokens of `prompts`, eager, then compiled after its warm-up: the same."""
    eager = gen.generate(prompts, GenerationConfig(max_new_tokens=24)).output_token_ids
    compiled = GenerationConfig(max_new_tokens=24, compile=True)
    gen.warmup(len(prompts), len(prompts[0]), compiled)
    assert gen.generate(prompts, compiled).output_token_ids == eager


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("graphs", ["trees", "recorded"])
def test_cuda_graph_decode_matches_eager_without_syncs(dtype, graphs):
    """Inductor's graph trees or our recording of the compiled step (generator.STEP_GRAPHS):
    the eager tokens, and no host sync once warmed up."""
    model = peaked_cuda_model(SPEC, dtype)
    gen = Generator(model, max_seq_len=64, step_graphs=graphs)
    assert gen.step_graphs == graphs
    assert_compiled_gives_eager_tokens(gen, PROMPTS)
    sampled = GenerationConfig(max_new_tokens=24, greedy=False, top_p=0.9, seed=3, compile=True)
    gen.warmup(2, 7, sampled)
    # Any device->host sync inside prefill or the decode steps raises under "error".
    gen.prepare(2, 7, 24)
    tokens = torch.tensor(PROMPTS, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        state = gen.prefill(tokens, sampled)
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()  # prefill checked on its own: a failure names the phase
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(16):
            gen.decode_step(state, sampled)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_compiled_prefill_on_cuda_gives_the_eager_tokens():
    """--compile-prefill with inductor on a GPU: same greedy tokens as eager (peaked head)."""
    model = peaked_cuda_model(SPEC, torch.float16)
    assert_compiled_gives_eager_tokens(Generator(model, max_seq_len=64, compile_prefill=True),
                                       PROMPTS)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("attention", ["flex", "triton"])
def test_compiled_decode_attention_kinds_on_cuda_give_the_eager_tokens(attention, dtype):
    """decode_attention="flex" (inductor's flex-decoding kernel) and "triton" (decode_kernel.py's
    split-KV kernel, with swiglu_kernel.py's activation) in the CUDA-graph decode step, on a
    model with a sliding-window ring layer and GQA, give eager's greedy tokens."""
    spec = SPEC.with_updates(arch="mistral", sliding_window=5, sliding_window_layers=(1,))
    model = peaked_cuda_model(spec, dtype)
    for layer in model.layers:
        layer.attention.decode_attention = attention
        if attention == "triton":  # swiglu_kernel.py too: every Triton kernel of the step
            layer.feed_forward.activation_kernel = "triton"
    assert_compiled_gives_eager_tokens(Generator(model, max_seq_len=64), PROMPTS)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_gemv_kernel_on_cuda_gives_the_eager_tokens(dtype):
    """Every Linear's one-row products on gemv_kernel.py's GEMV in the CUDA-graph decode step
    (batch 1): eager's greedy tokens."""
    from infermeter.engine.linear import set_matvec_kernel

    model = peaked_cuda_model(SPEC, dtype)
    gen = Generator(model, max_seq_len=64)
    set_matvec_kernel(model, "triton")  # after the Generator fused wqkv / w13
    assert_compiled_gives_eager_tokens(gen, PROMPTS[:1])


def test_one_process_compiles_more_step_graphs_than_dynamos_default(monkeypatch):
    """Every (batch size, cache length) is one graph of the same step function; dynamo fails a
    fullgraph compile past its recompile_limit (8) unless the Generator raises it: ten batch
    sizes in one process (a sweep, the GPU test suite) must compile. The eager backend stands in
    for inductor (same dynamo guards and limits, no code generation), and a one-layer model for
    the debug one: the limit counts graphs of the step function, whatever each one holds."""
    import infermeter.engine.generator as generate_module

    real_compile = torch.compile
    monkeypatch.setattr(generate_module.torch, "compile", lambda fn, **kw: real_compile(
        fn, backend="eager", fullgraph=True, dynamic=False))
    torch._dynamo.reset()
    config = GenerationConfig(max_new_tokens=2, compile=True)
    model = build_model(SPEC.with_updates(n_layers=1), device="cpu", dtype=torch.float32)
    with torch._dynamo.config.patch(recompile_limit=8):  # dynamo's default; restored after
        for batch in range(1, 11):
            gen = Generator(model, max_seq_len=16)
            out = gen.generate([[1, 2, 3]] * batch, config)
            assert len(out.output_token_ids) == batch
        assert torch._dynamo.config.recompile_limit >= 10
    torch._dynamo.reset()


def test_decode_attention_is_checked_and_set_on_every_layer():
    model = build_model(SPEC, device="cpu", dtype=torch.float32)
    with pytest.raises(InfermeterError, match="unknown decode attention 'paged'"):
        Generator(model, decode_attention="paged")
    assert Generator(model).decode_attention == "auto"  # attention.DECODE_ATTENTION
    gen = Generator(model, decode_attention="flex")
    assert gen.decode_attention == "flex"
    assert {layer.attention.decode_attention for layer in model.layers} == {"flex"}


def test_auto_attention_picks_by_batch_size():
    from infermeter.engine.attention import AUTO_TRITON_MIN_BATCH, resolve_attention

    assert AUTO_TRITON_MIN_BATCH == 1  # measured: the kernel wins from batch 1 (attention.py)
    assert resolve_attention("auto", 1) == "triton"
    assert resolve_attention("auto", AUTO_TRITON_MIN_BATCH - 1) == "math"
    assert resolve_attention("auto", AUTO_TRITON_MIN_BATCH) == "triton"
    assert resolve_attention("auto", 64) == "triton"
    assert [resolve_attention(kind, 64) for kind in ("math", "sdpa", "flex", "triton")] == \
        ["math", "sdpa", "flex", "triton"]  # a kind asked for is kept at any batch


def test_decode_attention_used_says_what_really_runs(monkeypatch):
    """The Result records what ran: auto by batch size, flex/triton only compiled, triton only
    where Triton runs (the CPU without its interpreter runs math) and only for power-of-two
    head sizes."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = build_model(SPEC, device="cpu", dtype=torch.float32)

    def used(kind: str, compiled: bool, batch: int = 1, of=model) -> str:
        return Generator(of, decode_attention=kind).decode_attention_used(compiled, batch)

    assert (used("triton", False), used("triton", True, 32)) == ("math", "math")
    assert (used("flex", False), used("flex", True)) == ("math", "flex")
    assert (used("sdpa", False), used("sdpa", True)) == ("sdpa", "sdpa")
    assert (used("auto", True, 1), used("auto", True, 32)) == ("math", "math")  # no Triton
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # where the kernel can run
    assert (used("triton", True), used("triton", False)) == ("triton", "math")
    assert (used("auto", True, 1), used("auto", True, 32)) == ("triton", "triton")
    odd = build_model(SPEC.with_updates(head_dim=24, n_heads=4, n_kv_heads=2, dim=96))
    assert used("triton", True, of=odd) == "math"


@pytest.mark.gpu
def test_recorded_steps_follow_a_new_cache():
    """A recorded step writes the KV cache at the addresses it was recorded with: a cache of
    another batch size records anew (one graph, not two), and the tokens stay eager's."""
    model = peaked_cuda_model(SPEC, torch.float16)
    gen = Generator(model, max_seq_len=64, step_graphs="recorded")
    assert_compiled_gives_eager_tokens(gen, PROMPTS)
    assert len(gen.recorded_steps) == 1
    assert_compiled_gives_eager_tokens(gen, PROMPTS[:1])
    assert len(gen.recorded_steps) == 1 and model.max_batch_size == 1


def test_step_graphs_are_checked_and_say_what_runs(model, monkeypatch):
    """One error line for an unknown kind; off a GPU no graph runs (None); on one the kind asked
    for, graph trees under the cudagraphs backend and for an MoE model; the recorded step
    compiles without inductor's own graphs (triton.cudagraphs off), the trees with them."""
    import infermeter.engine.generator as generator_module

    with pytest.raises(InfermeterError, match="unknown step graphs 'tiled'") as err:
        Generator(model, step_graphs="tiled")
    assert "\n" not in str(err.value)
    assert Generator(model, step_graphs="recorded").step_graphs is None  # this CPU
    asked = []
    monkeypatch.setattr(generator_module.torch, "compile",
                        lambda fn, **kw: asked.append(kw.get("options", {})) or fn)
    for kind in ("trees", "recorded"):
        gen = Generator(model, step_graphs=kind)
        gen.device = torch.device("cuda")  # what the property reads: a GPU's Generator
        assert gen.step_graphs == kind
        gen._compile_step()
        gen.compile_backend = "cudagraphs"
        assert gen.step_graphs == "trees"
    assert [options["triton.cudagraphs"] for options in asked] == [True, False]
    # an MoE layer notes its routed experts in Python each step: no replay would repeat it
    moe = build_model(SPEC.with_updates(name="debug-moe", n_experts=4, n_active_experts=2,
                                        moe_ffn_dim=32), device="cpu", dtype=torch.float32)
    gen = Generator(moe, step_graphs="recorded")
    gen.device = torch.device("cuda")
    assert gen.step_graphs == "trees"


def test_the_recorded_step_passes_the_state_and_sampling_as_the_trees_do(model, monkeypatch):
    """The recorded branch of decode_step (forced here: on the CPU the recording runs the step
    itself) hands the compiled step the state's tensors and the sampling constants as the
    graph trees' branch does: the same sampled tokens."""
    sampled = GenerationConfig(max_new_tokens=12, greedy=False, top_p=0.9, seed=5,
                               compile=True)
    want = Generator(model, max_seq_len=64).generate(PROMPTS, replace(sampled, compile=False))
    gen = recorded(model, monkeypatch)  # the compiled step's function, run eagerly
    calls = []
    run = gen.recorded_steps.run

    def noted(key, fn, inputs, persistent=False):
        calls.append((key, persistent, inputs))
        return run(key, fn, inputs, persistent)

    monkeypatch.setattr(gen.recorded_steps, "run", noted)
    assert gen.generate(PROMPTS, sampled).output_token_ids == want.output_token_ids
    # the inputs' shapes (token, input_pos, done, stop ids, seed), the cache's length, then the
    # sampling constants; read in place, the same tensors every step
    assert [key for key, _, _ in calls] == \
        [((2,), (1,), (2,), (1,), (), 64, False, sampled.temperature, 0.9)] * 11
    assert all(persistent for _, persistent, _ in calls)
    assert all(a is b for _, _, inputs in calls for a, b in zip(inputs, calls[0][2], strict=True))


def test_compile_backend_is_checked(model):
    with pytest.raises(InfermeterError, match="unknown compile backend 'tvm'"):
        Generator(model, compile_backend="tvm")
    with pytest.raises(InfermeterError, match="needs a CUDA device"):
        Generator(model, compile_backend="cudagraphs")
    assert Generator(model).compile_backend == "inductor"


def test_compiled_prefill_matches_eager_with_one_graph_for_every_layer_and_length():
    """--compile-prefill: the prefill's layers go through one compiled function; every layer
    and both prompt lengths share one graph, and logits and first tokens equal eager's."""
    from torch._dynamo.utils import counters

    from infermeter.engine.generator import _block_step
    from infermeter.engine.model import prefill_from

    spec = PRESETS["debug"].with_updates(n_layers=3)
    plain, other = build_model(spec, seed=2), build_model(spec, seed=2)
    eager, compiled = Generator(plain, 48), Generator(other, 48, compile_prefill=True)
    # aot_eager: dynamo and AOT tracing without inductor's C++ build on the CPU
    compiled._compiled_block = torch.compile(_block_step, dynamic=True, backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    for length in (7, 12):
        tokens = torch.randint(0, spec.vocab_size, (2, length),
                               generator=torch.Generator().manual_seed(length))
        for generator in (eager, compiled):
            generator.prepare(2, length, 6)
        config = GenerationConfig(max_new_tokens=6, compile=True)  # prefill only: no decode
        want, got = eager.prefill(tokens, GenerationConfig(max_new_tokens=6)), \
            compiled.prefill(tokens, config)
        assert torch.equal(want.token, got.token)
        compiled.prepare(2, length, 6)
        positions = torch.arange(length)
        with torch.no_grad(), prefill_from(plain, 0), prefill_from(other, 0):
            plain.reset_cache()  # a prompt from position 0, as Generator.prefill runs it
            diff = plain(tokens, positions) - other(tokens, positions,
                                                    block_fn=compiled._block_fn())
        assert diff.abs().max() < 1e-5
    assert counters["stats"]["unique_graphs"] == 1  # 3 layers x 2 lengths: one graph


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pdl_step_on_cuda_gives_the_same_tokens_as_without(dtype):
    """--pdl (kernels/pdl.py): the CUDA-graph step with every kernel launched early (inductor's,
    the GEMV, the split-KV attention and combine, the activation) gives, bit for bit, the
    greedy tokens of the same step without PDL. Random weights (flat logits: any value read
    before its producer finished would change a token) and batch 1 (every Triton kernel)."""
    from infermeter.engine.kernels.pdl import supported
    from infermeter.engine.linear import set_matvec_kernel

    if not torch.cuda.is_available() or not supported(torch.device("cuda")):
        pytest.skip("needs a Hopper GPU and a torch with inductor PDL")
    model = build_model(SPEC, device="cuda", dtype=dtype)
    config = GenerationConfig(max_new_tokens=40, compile=True)
    tokens = {}
    for pdl in (False, True):
        gen = Generator(model, max_seq_len=64, pdl=pdl)
        set_matvec_kernel(model, "triton")  # after the Generator fused wqkv / w13
        gen.warmup(1, len(PROMPTS[0]), config)
        tokens[pdl] = gen.generate(PROMPTS[:1], config).output_token_ids
    assert tokens[True] == tokens[False]


def test_pdl_refused_where_it_cannot_run(model):
    """Generator(pdl=True) on the CPU: one clear error naming what PDL needs."""
    with pytest.raises(InfermeterError, match="compute capability 9.0"):
        Generator(model, pdl=True)
