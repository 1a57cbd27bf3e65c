"""The offloaded decode (`infermeter offload --offloaded-decode`) on the CPU: the device cache is
two layer buffers from the start, the prompt's prefill writes every layer's K/V back to host
memory through them, and each decode step streams them in again. Same greedy tokens and logits
as the ordinary decode, the host cache bit for bit what an ordinary prefill writes, the
write-back's schedule on a fake clock, and the fit check that counts two buffers, not the
whole cache. No speed is asserted."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from infermeter.engine.generator import GenerationConfig, Generator
from infermeter.engine.model import build_model
from infermeter.errors import InfermeterError
from infermeter.measure.result import Result
from infermeter.offload.fit import check_sizes_fit, offloaded_fit_parts, on_device_refusal
from infermeter.offload.job import measure_offloaded_decode
from infermeter.offload.request import OffloadRequest
from infermeter.offload.streamed import StreamedDecode
from infermeter.offload.streamed_prefill import StreamedPrefill, layer_buffers
from infermeter.offload.table import render_offloaded
from infermeter.offload.windows import DecodeWindows
from infermeter.specs.presets import PRESETS
from tests.cli_in_process import run_cli
from tests.test_offload import FakeClock, _all_contiguous

DEBUG = PRESETS["debug"]
FIVE = DEBUG.with_updates(n_layers=5)  # odd: the last layer's buffer is layer 0's
CONTEXT, STEPS = 16, 6
CONFIG = GenerationConfig(max_new_tokens=STEPS + 1)


def _generator(device="cpu", chunk=None):
    model = build_model(FIVE, device=device, dtype=torch.float32, seed=4)
    return Generator(model, prefill_chunk=chunk)


def _tokens(device="cpu"):
    return torch.randint(DEBUG.vocab_size, (2, CONTEXT),
                         generator=torch.Generator().manual_seed(5)).to(device)


def _ordinary(gen, tokens):
    """The whole cache on the device: its K/V of the prompt per layer, and a decode window's
    tokens and per-step logits [steps, B, V]."""
    gen.prepare(2, CONTEXT, STEPS + 1)
    state = gen.prefill(tokens, CONFIG)
    cache = [(layer.attention.kv_cache.k[:, :, :CONTEXT].clone(),
              layer.attention.kv_cache.v[:, :, :CONTEXT].clone()) for layer in gen.model.layers]
    windows = DecodeWindows(gen, state, CONFIG, STEPS)
    logits: list[torch.Tensor] = []
    handle = gen.model.register_forward_hook(lambda m, a, out: logits.append(out[:, -1]))
    try:
        windows.run()
    finally:
        handle.remove()
    return cache, windows.outputs[0], torch.stack(logits)


def _buffers(gen):
    layer_buffers(gen.model, 2, CONTEXT, STEPS + 1, None, torch.float32, gen.device)


def _distinct_caches(model):
    return {id(layer.attention.kv_cache) for layer in model.layers}


@pytest.mark.parametrize("chunk", [None, 6])
def test_host_cache_after_the_streamed_prefill_is_an_ordinary_prefills_bit_for_bit(chunk):
    """Whole, and in chunks of 6 (the later chunks read the earlier ones back layer by layer)."""
    gen = _generator(chunk=chunk)
    tokens = _tokens()
    want, _, _ = _ordinary(gen, tokens)
    gen.model.drop_cache()
    _buffers(gen)
    assert len(_distinct_caches(gen.model)) == 2  # no layer cache beyond the two buffers
    clock = FakeClock(0.0)  # records the copies: every one contiguous to contiguous
    with StreamedPrefill(gen.model, CONTEXT, stream=clock) as prefill:
        gen.prefill(tokens, CONFIG)
    _all_contiguous(clock.copies)
    assert len(prefill.host) == 5
    for (k, v), (want_k, want_v) in zip(prefill.host, want):
        assert torch.equal(k, want_k) and torch.equal(v, want_v)


@pytest.mark.parametrize("chunk", [None, 6])
def test_offloaded_decode_from_two_layer_buffers_gives_the_ordinary_tokens(chunk):
    gen = _generator(chunk=chunk)
    tokens = _tokens()
    _, want_tokens, want_logits = _ordinary(gen, tokens)
    gen.model.drop_cache()
    _buffers(gen)
    with StreamedPrefill(gen.model, CONTEXT) as prefill:
        state = gen.prefill(tokens, CONFIG)
    windows = DecodeWindows(gen, state, CONFIG, STEPS)
    logits: list[torch.Tensor] = []
    handle = gen.model.register_forward_hook(lambda m, a, out: logits.append(out[:, -1]))
    trace: list[tuple[str, int]] = []
    clock = FakeClock(0.0)  # records the copies: every one contiguous to contiguous
    try:
        with StreamedDecode(gen.model, prefill.host, trace=trace, stream=clock) as streamed:
            assert len(_distinct_caches(gen.model)) == 2
            windows.run(streamed.step_at)
            assert streamed.bytes_per_step == 5 * 2 * (2 * 2 * CONTEXT * 16 * 4)
    finally:
        handle.remove()
    assert windows.outputs == [want_tokens]
    torch.testing.assert_close(torch.stack(logits), want_logits)
    # the buffers are gone: the next prepare allocates a whole cache again
    assert all(layer.attention.kv_cache is None for layer in gen.model.layers)
    assert gen.generate(tokens, CONFIG).output_token_ids[0][1:] == want_tokens[0]
    assert len(_distinct_caches(gen.model)) == 5
    # the first step's schedule: layer i streamed in before it waits and attends; its buffer
    # refilled (layer i + 2) only after it attended; the last layer of each buffer (3 and 4)
    # refills it with the next step's layer that takes it (1 and 0), right after it attended
    step = trace[:trace.index(("attended", 4)) + 2]
    for i in range(5):
        assert step.index(("copy", i)) < step.index(("wait", i)) < step.index(("attended", i))
        if i + 2 < 5:
            assert step.index(("attended", i)) < step.index(("copy", i + 2))
        if i + 1 < 5:  # the next layer's copy already issued
            assert step.index(("copy", i + 1)) < step.index(("attended", i))
    for last, following in ((3, 1), (4, 0)):
        assert step[step.index(("attended", last)) + 1] == ("ahead", following)
    # every later step: its layers 0 and 1 came ahead, the others as in the first step
    later = trace[len(step):]
    assert later == (step[2:]) * (STEPS - 1)
    assert len(trace) == 2 + STEPS * 15  # the first step's own two copies, then 15 a step
    _all_contiguous(clock.copies)
    assert len(clock.marks) == STEPS * 5 + 2  # a mark per layer per step, + the first step's
    # the copy stream carries only the prompt's K/V out of host memory; the decoded tokens'
    # go from the device store on the compute stream
    held = {_storage(t) for pair in prefill.host for t in pair}
    assert clock.copies and all(_storage(src) in held for _, src in clock.copies)


def _streamed_prompt():
    """A generator whose cache is the two buffers, the ordinary decode's tokens, and the
    prompt prefilled through them (its host cache and decode state)."""
    gen = _generator()
    tokens = _tokens()
    _, want_tokens, _ = _ordinary(gen, tokens)
    gen.model.drop_cache()
    _buffers(gen)
    with StreamedPrefill(gen.model, CONTEXT) as prefill:
        state = gen.prefill(tokens, CONFIG)
    return gen, want_tokens, prefill, state


def test_a_steps_copies_alone_stream_every_layer_in_order_through_the_two_buffers():
    """copies_alone: one step's copies with no forward, layer after layer; afterwards each
    buffer holds the prompt K/V of the last layer streamed into it (layers 3 and 4 of 5), and
    the decode that follows still gives the ordinary tokens (step_at streams its own)."""
    gen, want_tokens, prefill, state = _streamed_prompt()
    trace: list[tuple[str, int]] = []
    with StreamedDecode(gen.model, prefill.host, trace=trace) as streamed:
        streamed.copies_alone()
        assert trace == [("copy", i) for i in range(5)]
        for layer, buffer in ((4, streamed.buffers[0]), (3, streamed.buffers[1])):
            k, v = prefill.host[layer]
            assert torch.equal(buffer.k[:, :, :CONTEXT], k)
            assert torch.equal(buffer.v[:, :, :CONTEXT], v)
        windows = DecodeWindows(gen, state, CONFIG, STEPS)
        windows.run(streamed.step_at)
    assert windows.outputs == [want_tokens]


def test_a_windows_first_step_streams_its_own_first_layers_and_copies_alone_drop_the_ahead():
    """What the step before streamed ahead is used only by a step that follows it: a window
    starting again at the context streams layers 0 and 1 itself (so its timing holds them), and
    after copies_alone (which leaves the last layers in the buffers) the next step does too.
    Every window gives the ordinary tokens."""
    gen, want_tokens, prefill, state = _streamed_prompt()
    trace: list[tuple[str, int]] = []
    windows = DecodeWindows(gen, state, CONFIG, STEPS)
    with StreamedDecode(gen.model, prefill.host, trace=trace) as streamed:
        for _ in range(2):
            begin = len(trace)
            windows.run(streamed.step_at)
            assert trace[begin:begin + 2] == [("copy", 0), ("copy", 1)]
            assert trace[begin + 2:].count(("copy", 0)) == 0  # later steps: ahead only
        streamed.copies_alone()
        begin = len(trace)
        streamed.step_at(CONTEXT + 1)  # not a first step, but nothing ahead
        assert trace[begin:] == [("copy", 0), ("copy", 1)]
    assert windows.outputs == [want_tokens, want_tokens]


def test_a_model_with_a_sliding_window_layer_gets_no_layer_buffers():
    for layers, says in ((5, "cannot share 2 KV caches"), (2, "sliding-window layers")):
        window = DEBUG.with_updates(name="debug-window", sliding_window=12, n_layers=layers,
                                    sliding_window_layers=(0,))
        gen = Generator(build_model(window, device="cpu", seed=4))
        with pytest.raises(InfermeterError, match=says):
            _buffers(gen)  # layers 0 and 2 differ; with two layers, each its own buffer
            StreamedPrefill(gen.model, CONTEXT)


class TimedClock(FakeClock):
    """FakeClock that also records when each copy ends, and its destination and source."""

    def __init__(self, copy_ms: float) -> None:
        super().__init__(copy_ms)
        self.ends: list[float] = []

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        super().copy(dst, src)
        self.ends.append(self.copy_end)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("chunk", [None, 6])
def test_on_a_fake_clock_no_layer_writes_a_buffer_before_the_copies_out_of_it_ended(chunk):
    """Copies are slow (3 ms each) against 1 ms of attention: a layer that did not wait would
    start writing its buffer while the copy of the layer before it out of that buffer (and, in
    a later chunk, the copy of its own earlier chunks into it) still runs."""
    gen = _generator(chunk=chunk)
    _buffers(gen)
    clock = TimedClock(3.0)
    model = gen.model
    starts: dict[int, list[float]] = {i: [] for i in range(5)}  # per layer, each forward's
    handles = []
    trace: list[tuple[str, int]] = []
    with StreamedPrefill(model, CONTEXT, trace=trace, stream=clock) as prefill:
        for i, layer in enumerate(model.layers):  # after the prefill's own hooks: after its wait
            def start(module, args, i=i):
                starts[i].append(clock.compute)
            def attend(module, args, out):
                clock.compute += 1.0
            handles += [layer.attention.register_forward_pre_hook(start),
                        layer.attention.register_forward_hook(attend)]
        try:
            gen.prefill(_tokens(), CONFIG)
        finally:
            for handle in handles:
                handle.remove()
    chunks = 1 if chunk is None else 3
    assert all(len(times) == chunks for times in starts.values())
    caches = [model.layers[i].attention.kv_cache for i in range(2)]
    buffers = {_storage(t): i for i, cache in enumerate(caches) for t in (cache.k, cache.v)}
    hosts = {_storage(t): i for i, pair in enumerate(prefill.host) for t in pair}
    # each copy: (the layer whose host cache it reads or writes, out or in, its buffer, end)
    copies = []
    for (dst, src), end in zip(clock.copies, clock.ends):
        out = _storage(dst) in hosts
        layer = hosts[_storage(dst if out else src)]
        copies.append((layer, out, buffers[_storage(src if out else dst)], end))
    assert {c[:3] for c in copies if c[1]} == {(i, True, i % 2) for i in range(5)}
    for i in range(5):
        for n, begin in enumerate(starts[i]):
            # the copies issued before layer i's attention in forward n: out of (and into) its
            # buffer, all ended by the time it starts
            issued = _issued_before(trace, i, n, 2 * 2 * model.layers[0].attention.n_kv_heads)
            before = [c for c in copies[:issued] if c[2] == i % 2]
            assert before or (i < 2 and n == 0)
            assert all(end <= begin for *_, end in before), (i, n, begin, before)
    # the write-back overlaps: a layer's copy out is still running when the next one starts
    assert any(end > starts[i + 1][0] for layer, out, _, end in copies if out
               for i in [layer] if i + 1 < 5)


def _issued_before(trace, layer, forward, pieces):
    """How many copies the trace says were issued before layer `layer` waited in forward
    `forward`: out and in entries before that wait, each of `pieces` copies (K and V, per
    sequence and KV head)."""
    waits = [n for n, entry in enumerate(trace) if entry == ("wait", layer)]
    return pieces * sum(entry[0] in ("out", "in") for entry in trace[:waits[forward]])


def test_the_streamed_prefill_refuses_a_whole_cache_and_a_compiled_prefill():
    gen = _generator()
    gen.prepare(2, CONTEXT, STEPS + 1)
    with pytest.raises(InfermeterError, match="not two layer buffers"):
        StreamedPrefill(gen.model, CONTEXT)
    _buffers(gen)
    with pytest.raises(InfermeterError, match="run it eager"):
        with StreamedPrefill(gen.model, CONTEXT):
            gen.model(_tokens(), torch.arange(CONTEXT), block_fn=lambda *a: None)
    with pytest.raises(InfermeterError, match="wrote 6 of the 16"):
        with StreamedPrefill(gen.model, CONTEXT):
            gen.prefill(_tokens()[:, :6], CONFIG)


def test_the_streamed_prefill_refuses_a_recorded_cuda_graph(monkeypatch):
    """Inside a CUDA graph's recording (the "layer" prefill graphs) the per-layer waits on the
    copy stream cannot be recorded: one error line, before any copy is issued."""
    import infermeter.offload.streamed_prefill as streamed_module

    gen = _generator()
    _buffers(gen)
    monkeypatch.setattr(streamed_module, "recording", lambda: True)
    with pytest.raises(InfermeterError, match="run it eager") as err:
        with StreamedPrefill(gen.model, CONTEXT):
            gen.model(_tokens(), torch.arange(CONTEXT))
    assert "\n" not in str(err.value)


# ---- the fit check ---------------------------------------------------------------------------
LLAMA = PRESETS["llama-3.1-8b"]
GPU = SimpleNamespace(type="cuda")


def _request(**kwargs):
    return OffloadRequest("random:llama-3.1-8b", (16,), (16,), context=32768,
                          offloaded_decode=True, prefill_chunk=4096, **kwargs)


def test_a_cache_too_large_for_the_gpu_is_decoded_from_two_buffers(monkeypatch):
    """Llama-3.1-8B at a 32k context in bf16: the whole cache (4 GiB) does not fit beside the
    weights in the free memory given, its two layer buffers do: the fit check accepts, the
    decode on the device is refused (a reason, for the Result's warning); with 1 byte less
    than the streamed parts, the fit check refuses in one line."""
    from infermeter.offload.fit import traffic_len_for
    from infermeter.specs.sizes import kv_bytes_per_token_layer, kv_cache_bytes, weight_bytes
    from infermeter.units import format_bytes

    request = _request()
    need = sum(offloaded_fit_parts(LLAMA, request, GPU, "bfloat16", "bfloat16").values())
    whole = weight_bytes(LLAMA, "bfloat16") + kv_cache_bytes(LLAMA, 1, 32768 + 33, "bfloat16")
    assert need < whole
    free = {"gpu": need}
    monkeypatch.setattr("infermeter.offload.fit.free_memory",
                        lambda device: (free["gpu"], "free on the GPU"))
    monkeypatch.setattr("infermeter.offload.fit.host_available", lambda: 1 << 40)
    check_sizes_fit(LLAMA, request, GPU, "bfloat16", "bfloat16")
    refusal = on_device_refusal(LLAMA, request, GPU, "bfloat16", "bfloat16")
    assert refusal and "KV cache 4.0 GiB" in refusal and "does not fit" in refusal
    free["gpu"] = whole + (1 << 30)  # room for the whole cache too: the comparison runs
    assert on_device_refusal(LLAMA, request, GPU, "bfloat16", "bfloat16") is None
    free["gpu"] = need - 1
    with pytest.raises(InfermeterError) as refused:
        check_sizes_fit(LLAMA, request, GPU, "bfloat16", "bfloat16")
    line = str(refused.value)
    assert "\n" not in line and line.startswith("offloaded decode of llama-3.1-8b")
    buffers = format_bytes(2 * traffic_len_for(LLAMA, request) * kv_bytes_per_token_layer(
        LLAMA, "bfloat16"))  # two layers' K and V at the cache length, 1 sequence
    assert buffers.endswith(" MiB") and f"two KV layer buffers {buffers}" in line
    assert "prefill activations" in line and "KV cache " not in line
    assert "--prefill-chunk" in line


def test_an_offloaded_decode_that_does_not_fit_even_so_is_one_error_line(monkeypatch):
    """On the CPU (host and device one memory): room for everything but the offloaded decode's
    own parts; the weights must never load."""
    request = _request()
    need = sum(offloaded_fit_parts(LLAMA, request, SimpleNamespace(type="cpu"), "float32",
                                   "float32").values())
    monkeypatch.setattr("infermeter.offload.fit.free_memory",
                        lambda device: (need - 1, "available in host memory"))

    def load_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the memory check refused")
    monkeypatch.setattr("infermeter.engine.checkpoint.load.load_weights", load_weights)
    done = run_cli("offload", "--model", "llama-3.1-8b", "--device", "cpu", "--prefix-len", "16",
                   "--suffix-len", "16", "--offloaded-decode", "--context", "32768",
                   "--prefill-chunk", "4096")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error: offloaded decode of llama-3.1-8b" in lines[0]
    assert "two KV layer buffers" in lines[0] and done.stdout == ""


def test_without_room_for_the_whole_cache_the_result_has_the_link_bound_only(monkeypatch,
                                                                            tmp_path):
    """The command, told the whole cache does not fit: the offloaded decode still runs, its
    on-device figures are null, a warning says why, and the table says so."""
    says = "the whole KV cache at context 24 does not fit: (faked)"
    monkeypatch.setattr("infermeter.offload.job.on_device_refusal", lambda *args: says)
    out = tmp_path / "offload.jsonl"
    done = run_cli("offload", "--model", "debug", "--device", "cpu", "--prefix-len", "8",
                   "--suffix-len", "4", "--repeats", "1", "--warmup", "0", "--new-tokens", "2",
                   "--offloaded-decode", "--decode-steps", "3", "--context", "24",
                   "--prefill-chunk", "10", "--json", "--output", str(out))
    assert done.returncode == 0, done.stderr
    result = Result.from_dict(json.loads(done.stdout))
    entry = result.metrics["offloaded_decode"]
    assert entry["on_device_tpot_ms"] is None and entry["on_device_tok_per_s"] is None
    assert entry["same_tokens"] is None and entry["tok_per_s"] > 0
    assert entry["bound_tok_per_s"] > 0 and "on_device" not in result.samples["offloaded_decode"]
    assert any(says in w and "no decode with the KV cache on the device" in w
               for w in result.warnings)
    table = render_offloaded(entry)
    assert "does not fit" in table and "not compared" in table


def test_measure_offloaded_decode_gives_the_on_device_tokens(monkeypatch):
    gen = _generator(chunk=5)
    request = OffloadRequest("random:debug", (8,), (4,), batch_size=2, context=CONTEXT,
                             decode_steps=STEPS, repeats=1, warmup=1, offloaded_decode=True)
    metrics, samples, notes = measure_offloaded_decode(gen, request)
    assert metrics["same_tokens"] is True, notes
    assert len(samples["on_device"]) == len(samples["streamed"]) == 1
    assert all(layer.attention.kv_cache is None for layer in gen.model.layers)
    # a step's copies alone: timed beside the step, their GB/s from the same bytes
    (copies,) = samples["copies_alone"]
    assert metrics["copies_alone_ms"] == copies > 0
    assert metrics["copies_gbps"] == pytest.approx(metrics["bytes_per_step"] / copies / 1e6)
    assert metrics["pct_of_copies"] == pytest.approx(100 * copies / metrics["tpot_ms"])
    assert metrics["trace"] is None
    assert "a step's copies alone" in render_offloaded(metrics)


def test_trace_profiles_a_few_offloaded_decode_steps(tmp_path):
    gen = _generator()
    folder = tmp_path / "trace"
    request = OffloadRequest("random:debug", (8,), (4,), batch_size=2, context=CONTEXT,
                             decode_steps=STEPS, repeats=1, warmup=0, offloaded_decode=True,
                             trace=str(folder))
    metrics, _, _ = measure_offloaded_decode(gen, request)
    path = folder / "trace-rank0.json"
    assert metrics["trace"] == str(path)
    data = json.loads(path.read_text())
    assert data["infermeter"] == {"offloaded_decode": True} and data["traceEvents"]
    assert f"profiler trace: {path}" in render_offloaded(metrics)


def test_the_trace_fits_a_cache_sized_exactly_for_the_timed_windows(tmp_path):
    """The traced steps start where the timed windows start: with context + steps + 1 a
    multiple of the cache's rounding (256 slots, none to spare), steps past the timed ones
    would run off the cache after every measurement was done."""
    gen = _generator()
    request = OffloadRequest("random:debug", (8,), (4,), batch_size=2, context=249,
                             decode_steps=STEPS, repeats=1, warmup=0, offloaded_decode=True,
                             trace=str(tmp_path / "trace"))
    metrics, _, notes = measure_offloaded_decode(gen, request)
    assert metrics["same_tokens"] is True, notes
    assert (tmp_path / "trace" / "trace-rank0.json").is_file()


def test_leaving_waits_for_the_last_steps_copies_ahead():
    """The last step's copies of the next step's layers 0 and 1 are still in flight when a
    window ends: on leaving, the compute stream waits for them before the buffers are freed."""
    gen, _, prefill, state = _streamed_prompt()
    clock = FakeClock(3.0)
    windows = DecodeWindows(gen, state, CONFIG, STEPS)
    with StreamedDecode(gen.model, prefill.host, stream=clock) as streamed:
        windows.run(streamed.step_at)
        assert clock.compute < clock.marks[-1]  # the compute stream never waited for them
    assert clock.compute == clock.marks[-1]


def test_trace_without_the_offloaded_decode_is_one_error_line(tmp_path):
    done = run_cli("offload", "--model", "debug", "--device", "cpu", "--prefix-len", "8",
                   "--trace", str(tmp_path / "t"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == ("infermeter: error: --trace profiles the offloaded decode: "
                                   "give --offloaded-decode too")
    assert not (tmp_path / "t").exists()


# ---- on a GPU: the copy stream, pinned memory ---------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [None, 6])
def test_on_cuda_the_offloaded_decode_from_two_buffers_gives_the_ordinary_tokens(chunk):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = _generator("cuda", chunk)
    tokens = _tokens("cuda")
    want, want_tokens, _ = _ordinary(gen, tokens)
    gen.model.drop_cache()
    _buffers(gen)
    with StreamedPrefill(gen.model, CONTEXT) as prefill:
        state = gen.prefill(tokens, CONFIG)
    torch.cuda.synchronize()
    assert all(k.is_pinned() and v.is_pinned() for k, v in prefill.host)
    for (k, v), (want_k, want_v) in zip(prefill.host, want):
        assert torch.equal(k, want_k.cpu()) and torch.equal(v, want_v.cpu())
    windows = DecodeWindows(gen, state, CONFIG, STEPS)
    with StreamedDecode(gen.model, prefill.host) as streamed:
        windows.run(streamed.step_at)
    assert windows.outputs == [want_tokens]


@pytest.mark.parametrize("copy_ms", [0.01, 3.0])
def test_on_a_fake_clock_no_decode_copy_into_a_buffer_overlaps_an_attention_on_it(copy_ms):
    """The host-order trace above cannot show what a GPU does: copies on the copy stream run
    whenever that stream gets to them. On the fake clock, fast copies (0.01 ms against 1 ms of
    attention) would refill a buffer while the layer before still attends in it, were the refill
    not made to follow the compute stream; slow ones (3 ms) would be read before they ended,
    were the layer not made to wait."""
    gen = _generator(chunk=6)
    _buffers(gen)
    with StreamedPrefill(gen.model, CONTEXT) as prefill:
        state = gen.prefill(_tokens(), CONFIG)
    model, clock = gen.model, TimedClock(copy_ms)
    caches = [model.layers[i].attention.kv_cache for i in range(2)]
    buffers = {_storage(t): i for i, cache in enumerate(caches) for t in (cache.k, cache.v)}
    attended: list[tuple[int, float, float]] = []  # (buffer, begin, end) on the compute clock
    handles = []
    for i, layer in enumerate(model.layers):
        def attend(module, args, out, i=i):  # before StreamedDecode's own after-hook (prepend)
            attended.append((i % 2, clock.compute, clock.compute + 1.0))
            clock.compute += 1.0
        handles.append(layer.attention.register_forward_hook(attend, prepend=True))
    windows = DecodeWindows(gen, state, CONFIG, STEPS)
    try:
        with StreamedDecode(model, prefill.host, stream=clock) as streamed:
            windows.run(streamed.step_at)
    finally:
        for handle in handles:
            handle.remove()
    copies = [(buffers[_storage(dst)], end - copy_ms, end)
              for (dst, _), end in zip(clock.copies, clock.ends, strict=True)]
    assert len(attended) == STEPS * 5 and {c[0] for c in copies} == {0, 1}
    for buffer, begin, end in attended:
        assert not [c for c in copies if c[0] == buffer and c[1] < end and begin < c[2]], \
            (buffer, begin, end)
