"""The engine's transformer: cached decode == full forward, cache bytes == kvsize, names, dtypes."""

from __future__ import annotations

import pytest
import torch

from infermeter.engine import model as model_module
from infermeter.engine import self_attention as attention_module
from infermeter.engine.model import Transformer, build_model
from infermeter.errors import InfermeterError
from infermeter.specs import sizes
from infermeter.specs.model import RopeScaling
from infermeter.specs.presets import PRESETS

DEBUG = PRESETS["debug"]  # 2 layers, dim 64, 4 query heads sharing 2 KV heads, vocab 256
SPECS = {
    "gqa": DEBUG,
    "mqa": DEBUG.with_updates(n_kv_heads=1),
    "qkv-bias": DEBUG.with_updates(arch="qwen2", qkv_bias=True, tie_embeddings=True),
    "llama3-rope": DEBUG.with_updates(rope_theta=500000.0,
                                      rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 16)),
    "linear-rope": DEBUG.with_updates(rope_scaling=RopeScaling("linear", 4.0)),
    # Layer 1 slides over 5 tokens, layer 0 attends to everything: one ring, one full cache.
    "window": DEBUG.with_updates(arch="mistral", sliding_window=5, sliding_window_layers=(1,)),
    "qwen3": DEBUG.with_updates(arch="qwen3", qk_norm=True, head_dim=32),  # q/k norms
    # Gemma 3: layer 0 slides over 5 tokens with its own RoPE base, layer 1 is global.
    "gemma3": DEBUG.with_updates(arch="gemma3_text", qk_norm=True, head_dim=32,
                                 tie_embeddings=True, sliding_window=5, sliding_window_layers=(0,),
                                 norms_per_layer=4, rope_local_theta=10000.0,
                                 query_pre_attn_scalar=24.0, final_logit_softcap=30.0),
}
SEQ = 20


def _model(spec, batch: int = 2, max_seq_len: int = 32, kv_dtype=None, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(spec)
    model.setup_cache(batch, max_seq_len, dtype=kv_dtype)
    return model


def _tokens(batch: int = 2, length: int = SEQ) -> torch.Tensor:
    return torch.randint(0, DEBUG.vocab_size, (batch, length),
                         generator=torch.Generator().manual_seed(0))


def _run_chunks(model: Transformer, tokens: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    model.reset_cache()
    outs, start = [], 0
    for size in sizes:
        outs.append(model(tokens[:, start:start + size], torch.arange(start, start + size)))
        start += size
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", list(SPECS))
@torch.inference_mode()
def test_cached_decode_equals_full_forward(name: str) -> None:
    model = _model(SPECS[name])
    tokens = _tokens()
    full = _run_chunks(model, tokens, [SEQ])
    assert full.shape == (2, SEQ, DEBUG.vocab_size) and full.dtype == torch.float32
    stepwise = _run_chunks(model, tokens, [1] * SEQ)
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=0)
    # Prefill chunks that wrap the 5-slot ring (7 > 5), then decode, then another chunk.
    mixed = _run_chunks(model, tokens, [7, 1, 1, 3, 8])
    torch.testing.assert_close(mixed, full, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_window_changes_the_result() -> None:
    """Guard against a window that is silently ignored: beyond it, the logits must differ."""
    windowed = _model(SPECS["window"])
    plain = _model(SPECS["window"].with_updates(sliding_window=None, sliding_window_layers=()))
    tokens = _tokens()
    a = windowed(tokens, torch.arange(SEQ))
    b = plain(tokens, torch.arange(SEQ))
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-5, rtol=0)  # inside the window
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize(("name", "batch", "seq_len", "kv_dtype"), [
    ("gqa", 1, 32, None),
    ("gqa", 3, 17, torch.float16),
    ("mqa", 2, 8, torch.bfloat16),
    ("window", 2, 32, None),       # ring: layer 1 holds 5 tokens
    ("window", 2, 4, "fp16"),      # window longer than the cache: holds 4
    ("qkv-bias", 4, 64, "bf16"),
])
def test_cache_bytes_match_kvsize(name: str, batch: int, seq_len: int, kv_dtype) -> None:
    spec = SPECS[name]
    model = _model(spec, batch, seq_len, kv_dtype)
    expected_dtype = {None: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                      "fp16": "float16", "bf16": "bfloat16"}[kv_dtype]
    assert model.cache_bytes() == sizes.kv_cache_bytes(spec, batch, seq_len, expected_dtype)
    tensors = model.cache_tensors()
    assert len(tensors) == 2 * spec.n_layers
    # The real allocated tensors, in [layer0.k, layer0.v, layer1.k, ...] order.
    assert tensors[0] is model.layers[0].attention.kv_cache.k
    assert tensors[3] is model.layers[1].attention.kv_cache.v
    assert tensors[0].shape[:2] == (batch, spec.n_kv_heads)
    assert tensors[0].dtype == model.cache_dtype


@torch.inference_mode()
def test_half_precision_kv_cache_with_fp32_model() -> None:
    model = _model(DEBUG, kv_dtype=torch.bfloat16)
    tokens = _tokens()
    full = _run_chunks(model, tokens, [SEQ])
    stepwise = _run_chunks(model, tokens, [1] * SEQ)
    torch.testing.assert_close(stepwise, full, atol=2e-2, rtol=0)  # bf16 K/V rounding only
    assert model.cache_tensors()[0].abs().sum() > 0  # K really went into the bf16 cache


@pytest.mark.parametrize("kv_dtype", ["fp8", "int8", torch.float8_e4m3fn])
def test_fp8_and_int8_kv_are_refused_clearly(kv_dtype) -> None:
    model = build_model(DEBUG)
    with pytest.raises(InfermeterError, match="not supported by the engine yet"):
        model.setup_cache(1, 8, dtype=kv_dtype)


def test_reset_cache_and_cache_required() -> None:
    model = build_model(DEBUG)
    with pytest.raises(InfermeterError, match="setup_cache"):
        model(_tokens(1, 2), torch.arange(2))
    model.setup_cache(1, 8)
    with torch.inference_mode():
        model(_tokens(1, 3), torch.arange(3))
    assert all(t.abs().sum() > 0 for t in model.cache_tensors())
    model.reset_cache()
    assert all(t.abs().sum() == 0 for t in model.cache_tensors())


def test_meta_parameter_names_and_tied_embeddings() -> None:
    model = build_model(SPECS["qkv-bias"], on_meta=True)
    names = set(model.state_dict())
    layer = {f"layers.0.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
    layer |= {f"layers.0.attention.{w}.bias" for w in ("wq", "wk", "wv")}
    layer |= {f"layers.0.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
    layer |= {"layers.0.attention_norm.weight", "layers.0.ffn_norm.weight"}
    top = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    assert names == top | layer | {n.replace("layers.0.", "layers.1.") for n in layer}
    assert model.output.weight is model.tok_embeddings.weight
    assert model.tok_embeddings.weight.device.type == "meta"
    assert "layers.0.attention.wo.bias" not in names


def test_unsupported_architecture_and_rope_are_clear_errors() -> None:
    with pytest.raises(InfermeterError, match="can be sized but not run"):
        Transformer(PRESETS["phi-3-mini"])
    # Phi-3's LongRoPE (per-frequency factors) is not one the engine computes
    longrope = DEBUG.with_updates(rope_scaling=RopeScaling("longrope", 4.0))
    with pytest.raises(InfermeterError, match="RoPE scaling 'longrope' is not supported"):
        build_model(longrope)


@torch.inference_mode()
def test_random_weights_seeded_and_finite_in_fp16_deep_model() -> None:
    deep = DEBUG.with_updates(n_layers=48)
    a, b = build_model(deep, dtype=torch.float16), build_model(deep, dtype=torch.float16)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))
    assert a.layers[0].attention.wq.weight.dtype == torch.float16
    a.setup_cache(2, 16)
    logits = a(_tokens(2, 16), torch.arange(16))
    assert torch.isfinite(logits).all() and logits.abs().max() < 100


@torch.inference_mode()
def test_decode_step_traces_without_graph_breaks() -> None:
    """fullgraph=True fails on .item(), host syncs or value-dependent Python branches.

    backend="eager" checks the tracing (what fullgraph promises) without inductor's C++ build,
    which keeps the test fast; inductor and CUDA graphs run in the GPU benchmarks.
    """
    model = _model(SPECS["window"], batch=1, max_seq_len=12)
    step = torch.compile(model, fullgraph=True, dynamic=False, backend="eager")
    tokens = _tokens(1, 12)
    outs = [step(tokens[:, i:i + 1], torch.tensor([i])) for i in range(12)]
    full = _run_chunks(model, tokens, [12])
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=0)


def _stepwise_logits(name: str, kind: str) -> torch.Tensor:
    """An 8-token prefill then one-token steps to SEQ, every layer attending as `kind`."""
    model = _model(SPECS[name])
    for layer in model.layers:
        layer.attention.decode_attention = kind
    return _run_chunks(model, _tokens(length=SEQ), [8] + [1] * (SEQ - 8))


@pytest.mark.parametrize("name", ["gqa", "mqa", "window"])
@torch.inference_mode()
def test_math_decode_attention_equals_sdpa(name: str) -> None:
    """The two ways a one-token step attends (attention.py) give the same logits."""
    results = [_stepwise_logits(name, kind) for kind in ("sdpa", "math")]
    assert (results[0] - results[1]).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["gqa", "mqa", "window"])
@torch.inference_mode()
def test_flex_decode_attention_equals_math(name: str, monkeypatch) -> None:
    """"flex" decode (flex_attention with the mask rebuilt from key positions) == "math".

    The model takes the flex path only while torch.compile traces; pretending to trace runs
    flex_attention's eager reference through the same code. The window spec's ring layer wraps
    (20 positions in 5 slots), so the mask's window and empty-slot rules are both exercised.
    """
    math = _stepwise_logits(name, "math")
    with monkeypatch.context() as patch:
        patch.setattr(model_module, "compiling", lambda: True)
        patch.setattr(attention_module, "compiling", lambda: True)  # the flex path's
        flex = _stepwise_logits(name, "flex")
    torch.testing.assert_close(flex, math, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_flex_decode_traces_in_one_graph_and_matches_math() -> None:
    """The flex decode step compiles with fullgraph=True (aot_eager: the traced graph runs
    without inductor's C++ build) and gives the math step's logits."""
    spec = SPECS["window"]
    tokens = _tokens(1, 12)
    reference = _run_chunks(_model(spec, batch=1, max_seq_len=12), tokens, [4] + [1] * 8)
    model = _model(spec, batch=1, max_seq_len=12)
    for layer in model.layers:
        layer.attention.decode_attention = "flex"
    step = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    model.reset_cache()
    outs = [model(tokens[:, :4], torch.arange(4))]
    outs += [step(tokens[:, i:i + 1], torch.tensor([i])) for i in range(4, 12)]
    torch.testing.assert_close(torch.cat(outs, dim=1), reference, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_full_layer_positions_are_constant_and_ring_positions_tracked() -> None:
    """A full layer's slot j holds position j (no per-step write); a ring remembers its slots."""
    model = _model(SPECS["window"], batch=1, max_seq_len=12)
    _run_chunks(model, _tokens(1, 7), [7])
    full, ring = (layer.attention.kv_cache for layer in model.layers)
    assert torch.equal(full.key_pos, torch.arange(12))
    assert ring.key_pos.tolist() == [5, 6, 2, 3, 4]  # positions 5, 6 overwrote slots 0, 1
    model.reset_cache()
    assert torch.equal(full.key_pos, torch.arange(12)) and ring.key_pos.tolist() == [-1] * 5


@torch.inference_mode()
def test_a_rerun_without_reset_ignores_the_longer_stale_sequence() -> None:
    """Slots beyond the new positions still hold the previous run's K/V; they are masked."""
    model = _model(SPECS["window"], batch=1, max_seq_len=16)
    fresh = _run_chunks(model, _tokens(1, 6), [3, 1, 1, 1])
    model(_tokens(1, 16).flip(1), torch.arange(16))  # fill every slot with another sequence
    tokens, outs = _tokens(1, 6), []
    for start, size in ((0, 3), (3, 1), (4, 1), (5, 1)):
        outs.append(model(tokens[:, start:start + size], torch.arange(start, start + size)))
    torch.testing.assert_close(torch.cat(outs, dim=1), fresh, atol=1e-5, rtol=0)


def test_silu_mul_op_passes_opcheck_on_chunk_views() -> None:
    """The opaque SwiGLU activation: registered correctly (fake = real shapes and strides,
    works under torch.compile's checks) and equal to the eager expression."""
    from infermeter.engine.model import silu_mul

    h13 = torch.randn(3, 1, 2 * 24)
    gate, up = h13.chunk(2, dim=-1)  # what FeedForward passes: views into the fused output
    torch.library.opcheck(silu_mul, (gate, up))
    assert torch.equal(silu_mul(gate, up), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("batch", [1, 2])
@torch.inference_mode()
def test_compiled_step_routes_activation_and_norm_through_opaque_ops(batch: int) -> None:
    """While compiling, FeedForward calls infermeter::silu_mul (one graph node per layer), and,
    when asked, a one-row step (batch 1) materializes each attention norm; eager does neither.
    Logits equal either way."""
    from infermeter.engine.model import materialize

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = _model(DEBUG, batch=batch, max_seq_len=8)
    assert not model.layers[0].materialize_norm  # measured slower on an H100: off by default
    for layer in model.layers:
        layer.materialize_norm = True
    step = torch.compile(model, fullgraph=True, dynamic=False, backend=keep)
    tokens = _tokens(batch, 4)
    compiled = _run_chunks(model, tokens, [3])  # eager prefill
    compiled = torch.cat((compiled, step(tokens[:, 3:4], torch.tensor([3]))), dim=1)
    targets = [str(node.target) for node in graphs[0].graph.nodes]
    assert targets.count("infermeter.silu_mul.default") == DEBUG.n_layers
    assert targets.count("infermeter.materialize.default") == (DEBUG.n_layers if batch == 1
                                                               else 0)
    eager = _run_chunks(model, tokens, [3, 1])
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)
    x = torch.randn(1, 1, 8)
    torch.library.opcheck(materialize, (x,))
    copy = materialize(x)
    assert torch.equal(copy, x) and copy.data_ptr() != x.data_ptr()


@torch.inference_mode()
def test_a_fused_one_token_step_gathers_ropes_rows_once(monkeypatch) -> None:
    """While compiling a one-token step whose layers run the fused kernels, the model gathers
    RoPE's rows through kernels/rope_rows.py's op, once a step (inductor re-gathered them for
    every few layers' custom ops), from the tables at the position. A split step, a longer
    chunk, and tables where Triton cannot run index the tables as before. The kernel's own
    values are checked under Triton's interpreter (tests/fused_step_worker.py)."""
    from infermeter.engine.kernels import rope_rows as rope_rows_module
    from infermeter.engine.kernels import triton_support

    model = _model(DEBUG, batch=1, max_seq_len=8)
    calls = []
    monkeypatch.setattr(model_module, "compiling", lambda: True)
    monkeypatch.setattr(triton_support, "triton_runs_on", lambda x: True)
    monkeypatch.setattr(rope_rows_module, "rope_rows",
                        lambda *a: calls.append(a) or (a[0][a[2]], a[1][a[2]]))
    position, chunk = torch.tensor([5]), torch.arange(2)
    plain = model._rope_rows(model.rope_cos, model.rope_sin, position)
    for layer in model.layers:
        layer.step_kernels = "fused"
    assert not calls and model._rope_rows(model.rope_cos, model.rope_sin, chunk) is not None
    assert not calls
    cos, sin = model._rope_rows(model.rope_cos, model.rope_sin, position)
    assert len(calls) == 1 and torch.equal(cos, plain[0]) and torch.equal(sin, plain[1])
    table_cos, table_sin, at = calls[0]
    assert table_cos is model.rope_cos and table_sin is model.rope_sin and at is position
    assert torch.equal(plain[0], model.rope_cos[5:6]) and torch.equal(plain[1], model.rope_sin[5:6])
    monkeypatch.setattr(triton_support, "triton_runs_on", lambda x: False)  # indexed, no kernel
    assert torch.equal(model._rope_rows(model.rope_cos, model.rope_sin, position)[0], plain[0])
    assert len(calls) == 1
