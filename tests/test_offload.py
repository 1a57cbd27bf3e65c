"""`infermeter offload` on the CPU: a prefix's KV cache kept in a second CPU buffer, reloaded
whole (serial) or layer by layer under the suffix's forward, against a prefill of prefix +
suffix. Same greedy tokens all three ways (GQA and a ring layer), the layer-wise schedule's
order from recorded events, the break-even arithmetic on synthetic numbers, one error line for
what cannot fit or is not a length. No speed is asserted."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from infermeter.engine.generator import GenerationConfig, Generator
from infermeter.engine.model import build_model
from infermeter.errors import InfermeterError
from infermeter.measure.result import Result, read_results
from infermeter.offload.breakeven import break_even
from infermeter.offload.case import measure_case
from infermeter.offload.job import break_evens, paged_break_evens
from infermeter.offload.paged import PagedHostPrefix
from infermeter.offload.reload import (
    STAGE_SLOTS,
    HostPrefix,
    LayerCopies,
    LayerwiseReload,
    layer_caches,
)
from infermeter.offload.request import OffloadRequest
from infermeter.offload.streams import CurrentStream
from infermeter.offload.table import render_offload
from infermeter.offload.traffic import CopyTraffic, decode_under_traffic
from infermeter.specs.presets import PRESETS
from tests.cli_in_process import run_cli

DEBUG = PRESETS["debug"]
SPECS = {"gqa": DEBUG,
         # a 12-token window on layer 0: the prefix outgrows it, so that layer is a ring
         "window": DEBUG.with_updates(name="debug-window", sliding_window=12,
                                      sliding_window_layers=(0,))}
PREFIX, SUFFIX = 20, 7


@pytest.fixture(scope="module", params=sorted(SPECS))
def generator(request):
    return Generator(build_model(SPECS[request.param], device="cpu", seed=3), prefill_chunk=None)


ONE = GenerationConfig(max_new_tokens=1)  # a prefill's settings: greedy, no stop ids


def _tokens(batch: int = 2) -> torch.Tensor:
    return torch.randint(DEBUG.vocab_size, (batch, PREFIX + SUFFIX),
                         generator=torch.Generator().manual_seed(5))


# ---- the three ways agree ------------------------------------------------------------------
def test_same_greedy_tokens_all_three_ways(generator):
    request = OffloadRequest("random:debug", (PREFIX,), (SUFFIX,), batch_size=2, new_tokens=5,
                             repeats=1, warmup=0)
    case, raw, notes = measure_case(generator, request, PREFIX, SUFFIX)
    assert case["same_tokens"]
    assert [note for note in notes if "differ" in note] == []
    assert len(case["output_token_ids"]) == 2 and len(case["output_token_ids"][0]) == 5
    assert set(raw) == {"reload", "suffix_prefill", "serial", "layerwise", "recompute"}
    assert all(len(samples) == 1 for samples in raw.values())
    assert case["reload_bytes"] > 0


@pytest.mark.parametrize("way", ["serial", "layerwise"])
def test_reloaded_cache_gives_the_recomputed_logits(generator, way):
    """The suffix's last logits after a reload into a zeroed cache equal recompute's; without
    the reload they do not (so the check can fail)."""
    model, tokens = generator.model, _tokens()
    generator.prepare(2, PREFIX + SUFFIX, 1)
    generator.prefill(tokens[:, :PREFIX], ONE)  # the prefix's cache, as a request left it
    host = HostPrefix(model, PREFIX)
    model.reset_cache()
    whole = model(tokens, torch.arange(PREFIX + SUFFIX))[:, -1]  # [B, V]
    seen = []
    handle = model.register_forward_hook(lambda m, a, out: seen.append(out[:, -1]))
    try:
        model.reset_cache()
        generator.prefill(tokens[:, PREFIX:], ONE, start=PREFIX)  # nothing reloaded
        model.reset_cache()
        if way == "serial":
            host.reload(model)
            generator.prefill(tokens[:, PREFIX:], ONE, start=PREFIX)
        else:
            with LayerwiseReload(model, host) as reload:
                reload.start()
                generator.prefill(tokens[:, PREFIX:], ONE, start=PREFIX)
    finally:
        handle.remove()
    empty, reloaded = seen
    assert not torch.allclose(empty, whole, atol=1e-3)
    torch.testing.assert_close(reloaded, whole, atol=1e-4, rtol=1e-4)


# ---- the layer-wise schedule ---------------------------------------------------------------
class FakeClock:
    """A CopyStream on a fake clock: copies run back to back on the copy stream, `copy_ms` each
    (really done, so the cache ends right); the compute stream's clock moves only by the layers'
    work (the test adds it) and by waits. Records every copy issued and each layer's mark."""

    def __init__(self, copy_ms: float) -> None:
        self.copy_ms = copy_ms
        self.compute = 0.0  # when the compute stream's next work starts
        self.copy_end = 0.0  # when the copy stream's last copy ends
        self.marks: list[float] = []  # per mark: when the copies issued before it are done
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []

    def follow_compute(self) -> None:
        self.copy_end = max(self.copy_end, self.compute)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)
        self.copies.append((dst, src))
        self.copy_end += self.copy_ms

    def copy_all(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
        for dst, src in zip(dsts, srcs, strict=True):
            self.copy(dst, src)

    def gather(self, dst: torch.Tensor, src: torch.Tensor, rows: torch.Tensor) -> None:
        """A gather kernel on the copy stream (the paged mapped way): one copy on this clock."""
        torch.index_select(src, 0, rows, out=dst)
        self.copies.append((dst, src))
        self.copy_end += self.copy_ms

    def mark(self) -> float:
        self.marks.append(self.copy_end)
        return self.copy_end

    def wait(self, token: float) -> None:
        self.compute = max(self.compute, token)

    def settle(self) -> None:
        self.compute = max(self.compute, self.copy_end)


def _schedule(generator, lookahead, clock=None, layer_ms=1.0, block_fn=None, trace=None):
    """The events of one layer-wise reload + forward; ("attention", i) when layer i's attention
    first touches its cache (each of LayerKVCache's entry points, wrapped on the instance: a
    forward from a later start calls update_from, a ring layer then update). With a fake clock,
    also per layer (the clock when it attends, the layers' copies issued by then); each
    attention then takes layer_ms of compute."""
    model = generator.model
    trace = [] if trace is None else trace
    attended: list[tuple[float, int]] = []
    caches = [layer.attention.kv_cache for layer in model.layers]
    entries = ("update", "update_from", "write_own")
    for i, cache in enumerate(caches):
        for name in entries:
            original = getattr(cache, name)

            def touch(*args, i=i, original=original):
                if ("attention", i) not in trace:
                    trace.append(("attention", i))
                    if clock is not None:
                        attended.append((clock.compute, len(clock.marks)))
                        clock.compute += layer_ms
                return original(*args)
            setattr(cache, name, touch)
    host = HostPrefix(model, PREFIX)
    tokens = _tokens()[:, PREFIX:]
    try:
        with LayerwiseReload(model, host, lookahead=lookahead, trace=trace,
                             stream=clock) as reload:
            reload.start()
            if block_fn is None:
                generator.prefill(tokens, ONE, start=PREFIX)
            else:  # the Generator's compiled prefill calls the model so
                model(tokens, torch.arange(PREFIX, PREFIX + SUFFIX), block_fn=block_fn)
    finally:
        for cache in caches:
            for name in entries:
                delattr(cache, name)
    return trace, attended


def test_the_layerwise_reload_refuses_a_recorded_cuda_graph(generator, monkeypatch):
    """Inside a CUDA graph's recording (the "layer" prefill graphs) a wait between layers on
    the copy stream cannot be recorded: one error line."""
    import infermeter.offload.reload as reload_module

    generator.prepare(2, PREFIX + SUFFIX, 1)
    monkeypatch.setattr(reload_module, "recording", lambda: True)
    with pytest.raises(InfermeterError, match="recorded CUDA graph") as err:
        _schedule(generator, 1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("lookahead", [None, 1])
def test_each_layer_attends_after_its_copy_and_copies_go_ahead(generator, lookahead):
    model = generator.model
    generator.prepare(2, PREFIX + SUFFIX, 1)
    trace, _ = _schedule(generator, lookahead)
    n = len(model.layers)
    assert sorted(trace) == sorted([(what, i) for i in range(n)
                                    for what in ("copy", "wait", "attention")])
    for i in range(n):
        assert trace.index(("copy", i)) < trace.index(("wait", i)) < trace.index(("attention", i))
        if i + 1 < n:  # the next layer's copy is in flight while this layer computes
            assert trace.index(("copy", i + 1)) < trace.index(("attention", i))
    copies = [i for what, i in trace if what == "copy"]
    assert copies == list(range(n))
    if lookahead is None:  # as many copies as the staging slots hold, before any layer
        assert trace[:n] == [("copy", i) for i in range(n)] and n <= STAGE_SLOTS
    else:  # one ahead: layer 1's copies go out once layer 0 has waited (and been placed)
        assert trace[:3] == [("copy", 0), ("wait", 0), ("copy", 1)]


@pytest.mark.parametrize("lookahead", [None, 1])
@pytest.mark.parametrize("copy_ms", [0.5, 0.001])
def test_on_a_fake_clock_each_layer_waits_for_its_copy_and_copies_run_ahead(generator,
                                                                           lookahead, copy_ms):
    """Copies slower than the layers (0.5 ms a piece): each layer attends exactly when its own
    copies are done, never before. Copies faster: no layer waits, the copies hide under the
    compute. Either way, when layer i attends, the copies of layers up to i + lookahead are
    issued (every layer's with no lookahead)."""
    model = generator.model
    generator.prepare(2, PREFIX + SUFFIX, 1)
    clock = FakeClock(copy_ms)
    _, attended = _schedule(generator, lookahead, clock)
    n = len(model.layers)
    assert len(attended) == len(clock.marks) == n
    ahead = n if lookahead is None else lookahead
    assert [issued for _, issued in attended] == [min(i + 1 + ahead, n) for i in range(n)]
    # layer i starts when both the layer before it (1 ms) and its own copies are done
    want, ready = [], 0.0
    for mark in clock.marks:
        want.append(max(ready, mark))
        ready = want[-1] + 1.0
    starts = [start for start, _ in attended]
    assert starts == pytest.approx(want)
    if copy_ms == 0.5:  # copy-bound: each attention starts the moment its copies end
        assert starts == pytest.approx(clock.marks)
    else:  # compute-bound: only layer 0 waits, the later copies hide under the compute
        assert starts == pytest.approx([clock.marks[0] + i for i in range(n)])


def test_the_waits_run_outside_the_forwards_block_fn(generator):
    """The Generator's compiled prefill hands the model a block_fn (its compiled layer): the
    reload wraps it, so each layer's wait comes before that block_fn runs the layer, in the
    model's Python loop, and the block_fn still runs every layer."""
    model = generator.model
    generator.prepare(2, PREFIX + SUFFIX, 1)
    trace: list[tuple[str, int]] = []

    def block_fn(layer, h, cos, sin, positions, blocks=None):  # as Generator._block_fn()
        trace.append(("block_fn", list(model.layers).index(layer)))
        return layer(h, cos, sin, positions, blocks)

    _schedule(generator, 1, block_fn=block_fn, trace=trace)
    n = len(model.layers)
    for i in range(n):  # the wait, copies issued ahead, the block_fn that runs the layer, then
        wait = trace.index(("wait", i))  # its attention
        after = [event for event in trace[wait + 1:] if event[0] != "copy"]
        assert after[:2] == [("block_fn", i), ("attention", i)]


class StagedHost(LayerCopies):
    """A host copy of `n` staged layers that only records, on a fake clock: ("fetch", i) on the
    copy stream (1 ms of DMAs, and when they start), ("place", i) on the compute stream
    (0.25 ms, and when it ends)."""

    def __init__(self, n: int, clock: FakeClock, events: list[tuple[str, int]]) -> None:
        self.layers, self.clock, self.events = [None] * n, clock, events
        self.slot_of = [i % STAGE_SLOTS for i in range(n)]
        self.fetch_starts: list[float] = []
        self.place_ends: list[float] = []

    def fetch_layer(self, model, index, copies=None) -> None:
        self.events.append(("fetch", index))
        self.fetch_starts.append(self.clock.copy_end)
        self.clock.copy_end += 1.0

    def place_layer(self, model, index, copy=None) -> None:
        self.events.append(("place", index))
        self.clock.compute += 0.25
        self.place_ends.append(self.clock.compute)


@pytest.mark.parametrize("lookahead", [None, 1, 4])
def test_a_staging_slot_is_fetched_into_only_after_its_last_layer_is_placed(lookahead):
    """Six staged layers, two slots: each layer is placed right after its own wait, and a
    layer's DMAs are issued only once the layer that last used its slot (two before it) has
    been placed, whatever the lookahead asks (a lookahead of 1 issues one layer ahead). On the
    fake clock, with layers slower than their DMAs (3 ms against 1), the DMAs into a slot start
    only after that placement has ended: the copy stream follows the compute stream."""
    from infermeter.engine.model import build_model

    model = build_model(DEBUG.with_updates(n_layers=6), seed=0)
    clock, events = FakeClock(1.0), []
    host = StagedHost(6, clock, events)
    trace: list[tuple[str, int]] = []
    reload = LayerwiseReload(model, host, lookahead=lookahead, trace=trace, stream=clock)
    reload.start()
    for index in range(6):
        reload.before_layer(index)
        clock.compute += 3.0  # the layer's work
    if lookahead == 1:
        want = [("fetch", 0)] + [e for i in range(6) for e in (("place", i), ("fetch", i + 1))]
    else:  # two ahead: as many as the slots hold
        want = [("fetch", 0), ("fetch", 1)] + [
            e for i in range(6) for e in (("place", i), ("fetch", i + 2))]
    assert events == [e for e in want if e[1] < 6]
    assert [i for what, i in trace if what == "wait"] == list(range(6))
    for j in range(STAGE_SLOTS, 6):
        assert host.fetch_starts[j] >= host.place_ends[j - STAGE_SLOTS]
    # the layers' work bounds it: each waits for its DMAs only at the start
    assert host.place_ends[-1] == pytest.approx(1.0 + 0.25 + 5 * 3.25)


def test_with_ring_layers_between_them_the_staged_layers_take_both_slots_in_turn():
    """Gemma's shape of model: window layers (0, 2, 4) that the prefix fills, full ones between
    them that it does not. The full layers take the two staging slots in turn (by their order
    among the staged layers, not their index, which would put them all in one), a ring layer's
    copies go straight in and wait for no slot, and a whole reload on the fake clock (DMAs
    issued on its copy stream, placements on the compute stream) leaves the cache bit for bit
    the prefix's prefill, its tokens after the suffix those of recompute."""
    spec = DEBUG.with_updates(name="debug-gemma-like", n_layers=6, sliding_window=12,
                              sliding_window_layers=(0, 2, 4))
    gen = Generator(build_model(spec, device="cpu", seed=3), prefill_chunk=None)
    model, tokens = gen.model, _tokens()
    gen.prepare(2, PREFIX + SUFFIX, 1)
    gen.prefill(tokens[:, :PREFIX], ONE)
    want = [(c.k.clone(), c.v.clone(), c.key_pos.clone()) for c in layer_caches(model)]
    host = HostPrefix(model, PREFIX)
    assert host.slot_of == [None, 0, None, 1, None, 0]
    assert [host.reuses(i) for i in range(6)] == [None, None, None, None, None, 1]
    assert len(host.stage) == 2 * STAGE_SLOTS
    model.reset_cache()
    clock, trace = FakeClock(1.0), []
    LayerwiseReload(model, host, trace=trace, stream=clock).whole()
    for (k, v, key_pos), cache in zip(want, layer_caches(model)):
        assert torch.equal(cache.k, k) and torch.equal(cache.v, v)
        assert torch.equal(cache.key_pos, key_pos)
    # layer 5 reuses layer 1's slot: its DMAs go out only after layer 1 waited (was placed)
    assert trace.index(("wait", 1)) < trace.index(("copy", 5))
    # nothing else waits for a slot: layers 0-4 all issued before any layer waits
    assert trace[:5] == [("copy", i) for i in range(5)]
    staged = {t.untyped_storage().data_ptr(): i for i, t in enumerate(host.stage)}
    into = {staged[dst.untyped_storage().data_ptr()] // 2 for dst, _ in clock.copies
            if dst.untyped_storage().data_ptr() in staged}
    assert into == {0, 1}  # both slots used


class Recording(CurrentStream):
    """Copies on the current stream, each (dst, src) kept in `pieces`; `batches` counts the
    copy_all calls (one a layer's blocks, K's and V's, for a paged reload)."""

    def __init__(self, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.pieces, self.batches = pieces, 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.pieces.append((dst, src))
        dst.copy_(src)

    def copy_all(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
        self.batches += 1
        self.pieces.extend(zip(dsts, srcs))
        super().copy_all(dsts, srcs)  # the foreach copy itself


def _all_contiguous(pieces, stage=()) -> None:
    """Every copy from host memory is contiguous on both sides; a paged reload's copies out of
    its device staging buffer (`stage`) are device-to-device, strided by design."""
    staged = {t.untyped_storage().data_ptr() for t in stage}
    from_host = [(dst, src) for dst, src in pieces
                 if src.untyped_storage().data_ptr() not in staged]
    assert from_host
    for dst, src in from_host:
        assert dst.is_contiguous() and src.is_contiguous(), (dst.shape, dst.stride())
        assert dst.shape == src.shape


@pytest.mark.parametrize("way", ["serial", "layerwise", "paged"])
def test_every_reload_copy_is_contiguous_to_contiguous_and_gives_the_recomputed_cache(
        generator, way):
    """The cache is [B, H_kv, S, D] and longer than the prefix: its [:, :, :P] is strided, so
    a full layer's K and V each come back in one copy into the staging buffer and one out of it
    (the ring layer, whose window the prefix fills, in one copy each, straight in); a paged
    reload copies whole blocks into its staging buffer. After it the cache is, bit for bit, the
    one the prefix's prefill left."""
    model = generator.model
    generator.prepare(2, PREFIX + SUFFIX, 1)
    generator.prefill(_tokens()[:, :PREFIX], ONE)
    recomputed = [(c.k.clone(), c.v.clone(), c.key_pos.clone()) for c in layer_caches(model)]
    assert model.max_seq_len > PREFIX and recomputed[-1][0].abs().sum() > 0
    host = PagedHostPrefix(model, PREFIX, 7) if way == "paged" else HostPrefix(model, PREFIX)
    model.reset_cache()
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
    if way == "layerwise":  # the schedule without a forward: each layer's wait in turn
        clock = FakeClock(0.0)
        with LayerwiseReload(model, host, stream=clock) as reload:
            reload.start()
            for index in range(len(model.layers)):
                reload.before_layer(index)
        pieces = clock.copies  # the DMAs; a staged layer's placement is on the compute stream
    else:
        host.reload(model, Recording(pieces))
    _all_contiguous(pieces, getattr(host, "stage", ()))
    if way != "paged":  # per layer: K and V, through the stage where the prefix leaves room
        rings = sum(cache.is_ring for cache in layer_caches(model))
        full = len(model.layers) - rings
        placed = 2 * full if way == "serial" else 0  # out of the stage: serial's on its stream
        assert len(pieces) == 2 * full + placed + 3 * rings  # a ring's key_pos goes back too
    for (k, v, key_pos), cache in zip(recomputed, layer_caches(model)):
        assert torch.equal(cache.k, k) and torch.equal(cache.v, v)
        assert torch.equal(cache.key_pos, key_pos)


def test_a_ring_layers_key_pos_is_its_own_host_copy(generator):
    """key_pos goes to host memory as a copy (pinned on a GPU), not a view of the cache's."""
    model = generator.model
    generator.prepare(2, PREFIX + SUFFIX, 1)
    generator.prefill(_tokens()[:, :PREFIX], ONE)
    host = HostPrefix(model, PREFIX)
    rings = [(layer, cache) for layer, cache in zip(host.layers, layer_caches(model))
             if cache.is_ring]
    assert all(layer.key_pos is None for layer, cache in zip(host.layers, layer_caches(model))
               if not cache.is_ring)
    for layer, cache in rings:
        assert torch.equal(layer.key_pos, cache.key_pos)
        assert layer.key_pos.data_ptr() != cache.key_pos.data_ptr()


def test_hooks_leave_with_the_reload_and_a_forward_without_start_is_refused(generator):
    model = generator.model
    generator.prepare(2, PREFIX + SUFFIX, 1)
    reload = LayerwiseReload(model, HostPrefix(model, PREFIX))
    with reload, pytest.raises(InfermeterError, match="start"):
        generator.prefill(_tokens()[:, PREFIX:], ONE, start=PREFIX)
    assert not model._forward_pre_hooks
    assert all(not layer.attention._forward_pre_hooks for layer in model.layers)


def test_leaving_a_reload_waits_for_the_copies_no_layer_waited_for(generator):
    """A forward that never came (or raised) leaves the first layers' copies in flight: on
    leaving, the compute stream waits for every copy issued, before the prefix or the cache
    can be freed."""
    model = generator.model
    generator.prepare(2, PREFIX + SUFFIX, 1)
    generator.prefill(_tokens(), ONE)
    clock = FakeClock(3.0)
    with LayerwiseReload(model, HostPrefix(model, PREFIX), stream=clock) as reload:
        reload.start()
        assert clock.copy_end > 0 and clock.compute == 0.0
    assert clock.compute == clock.copy_end


# ---- break-even arithmetic -----------------------------------------------------------------
def _points(reload, recompute, lengths=(100, 200, 300, 400)):
    return [(p, reload(p), recompute(p)) for p in lengths]


def test_break_even_interpolates_between_the_measured_lengths():
    found = break_even(_points(lambda p: 10 + 0.01 * p, lambda p: 0.05 * p))
    assert found.status == "measured"
    assert found.prefix_len == pytest.approx(250.0)
    # any order in, the same answer
    assert break_even(_points(lambda p: 10 + 0.01 * p, lambda p: 0.05 * p)[::-1]) == found


def test_break_even_outside_the_range_is_not_extrapolated():
    below = break_even(_points(lambda p: 1.0, lambda p: 0.05 * p))
    above = break_even(_points(lambda p: 100.0, lambda p: 0.05 * p))
    assert (below.status, below.prefix_len, below.shortest) == ("below", None, 100)
    assert (above.status, above.prefix_len, above.longest) == ("above", None, 400)
    assert break_even([(64, 1.0, 1.0)]).status == "above"  # a tie is no win


def test_break_even_takes_the_last_crossing():
    # reload wins at 100, loses at 200, wins from there: the crossing between 200 and 300
    gains = {100: 1.0, 200: -3.0, 300: 1.0, 400: 5.0}
    found = break_even([(p, 10.0, 10.0 + g) for p, g in gains.items()])
    assert found.prefix_len == pytest.approx(275.0)


def test_break_evens_per_suffix_and_way():
    cases = [{"prefix_len": p, "suffix_len": s,
              "ttft_ms": {"serial": 10 + 0.01 * p, "layerwise": 5 + 0.01 * p,
                          "recompute": 0.05 * p}}
             for s in (8, 32) for p in (100, 200, 300, 400)]
    rows = break_evens(cases, (8, 32))
    assert [(r["suffix_len"], r["way"], r["prefix_len"]) for r in rows] == [
        (8, "serial", pytest.approx(250.0)), (8, "layerwise", pytest.approx(125.0)),
        (32, "serial", pytest.approx(250.0)), (32, "layerwise", pytest.approx(125.0))]


def test_paged_break_evens_per_suffix_block_and_way():
    # recompute 1, 2, 4 ms at 8, 16, 32 tokens; blocks of 16: serial 3 ms (gains -2, -1, +1:
    # the crossing half way from 16 to 32), layer-wise 5 (recompute always); blocks of 256 0.5
    paged = {16: {"serial": 3.0, "layerwise": 5.0}, 256: {"serial": 0.5, "layerwise": 0.5}}
    cases = [{"prefix_len": p, "suffix_len": 4, "ttft_ms": {"recompute": r},
              "paged": [{"block_size": b, "ttft_ms": t} for b, t in paged.items()]}
             for p, r in ((8, 1.0), (16, 2.0), (32, 4.0))]
    rows = paged_break_evens(cases, (4,), (16, 256))
    assert [(r["block_size"], r["way"], r["status"], r["prefix_len"]) for r in rows] == [
        (16, "serial", "measured", pytest.approx(24.0)), (16, "layerwise", "above", None),
        (256, "serial", "below", None), (256, "layerwise", "below", None)]


# ---- the paged layout ----------------------------------------------------------------------
@pytest.mark.parametrize("block", [7, 16, 64])
def test_a_paged_reload_puts_back_what_a_whole_reload_does(generator, block):
    """Block by block from a scattered pool (the last block partly filled, a ring layer's slots
    too), the cache ends as a whole reload leaves it, bytes and all."""
    model = generator.model
    generator.prepare(2, PREFIX + SUFFIX, 1)
    generator.prefill(_tokens()[:, :PREFIX], ONE)
    host, paged = HostPrefix(model, PREFIX), PagedHostPrefix(model, PREFIX, block, seed=1)
    model.reset_cache()
    host.reload(model)
    whole = [(c.k.clone(), c.v.clone(), c.key_pos.clone()) for c in layer_caches(model)]
    assert whole[0][0].abs().sum() > 0  # a filled cache is compared
    model.reset_cache()
    paged.reload(model)
    for (k, v, key_pos), cache in zip(whole, layer_caches(model)):
        assert torch.equal(cache.k, k) and torch.equal(cache.v, v)
        assert torch.equal(cache.key_pos, key_pos)
    assert paged.nbytes == host.nbytes
    slots = [min(PREFIX, cache.size) for cache in layer_caches(model)]
    # one host copy per block of K and of V, every KV head in it: B = 2
    assert paged.copies == sum(2 * 2 * math.ceil(n / block) for n in slots)
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
    model.reset_cache()
    recording = Recording(pieces)
    paged.reload(model, recording)
    assert recording.batches == len(model.layers)  # a layer's blocks from one call
    staged = {t.untyped_storage().data_ptr() for t in paged.stage}
    from_host = [src for _, src in pieces if src.untyped_storage().data_ptr() not in staged]
    blocks = [src for src in from_host if src.dim() == 3]  # key_pos copies are 1-D
    assert len(blocks) == paged.copies
    assert all(src.shape == (DEBUG.n_kv_heads, block, DEBUG.head_dim) for src in blocks)
    if block == 7:  # the pool's slots are a permutation, not the sequences' order
        pool = [slot for *_, slot in paged.layers[-1].blocks]
        assert sorted(pool) == list(range(len(pool))) and pool != sorted(pool)


def test_a_divergence_names_where_the_tokens_part_and_how_near_the_choice_was():
    """Two sequences of 4 tokens: the second parts at step 2, the first at step 3. The report
    is the earliest (step 2, sequence 1), the reference's top-two gap there, and the largest
    logit difference over steps 0-2 of every sequence (step 3's inputs already differ)."""
    from infermeter.offload.divergence import describe, divergence

    want = torch.zeros(2, 4, 5)
    want[:, :, 1] = 1.0  # token 1 every step, by a margin of 1.0
    want[1, 2, 3] = 0.75  # at sequence 1's step 2 the runner-up is 0.25 behind
    got = want.clone()
    got[1, 2, 3] = 1.25  # ... and the other way's logit there passes it: token 3
    got[0, 3, 4] = 9.0  # far off, but after the first parting: not counted
    got[0, 1, 0] = 0.1  # 0.1 off before it: counted
    tokens = [[1, 1, 1, 1], [1, 1, 1, 1]]
    parted = [[1, 1, 1, 4], [1, 1, 3, 1]]
    assert divergence(tokens, want, tokens, got) is None
    found = divergence(tokens, want, parted, got)
    assert found == {"step": 2, "sequence": 1, "top2_gap": pytest.approx(0.25),
                     "max_logit_diff": pytest.approx(0.5), "finite": True}
    assert "token 3 of sequence 1" in describe(found) and "0.25 apart" in describe(found)
    assert divergence(tokens, None, parted, None) == {
        "step": 2, "sequence": 1, "top2_gap": None, "max_logit_diff": None, "finite": True}
    # a NaN logit (a cache of garbage): no NaN in the Result, whose JSON refuses it
    got[0, 0, 2] = float("nan")
    broken = divergence(tokens, want, parted, got)
    assert broken["max_logit_diff"] is None and broken["finite"] is False
    assert broken["top2_gap"] == pytest.approx(0.25)
    json.dumps(broken, allow_nan=False)
    assert "not all finite" in describe(broken)


def test_a_way_whose_tokens_differ_is_a_warning_that_says_where(generator, monkeypatch):
    """A reload that leaves the cache wrong (its DMAs replaced by zeroing the staging) gives
    other tokens than recompute: the case says which ways, where they part and by how much the
    logits differed up to there (far more than rounding), each checked token's logits being what
    its greedy choice was made from."""
    import infermeter.offload.case as case_module

    logits_seen = []
    greedy = case_module.greedy_tokens

    def keep(*args, **kwargs):
        tokens, logits = greedy(*args, **kwargs)
        logits_seen.append((tokens, logits))
        return tokens, logits

    monkeypatch.setattr(case_module, "greedy_tokens", keep)
    def fetch_nothing(self, model, index, copies=None) -> None:  # staging left zero
        for staging in self.stage:
            staging.zero_()

    monkeypatch.setattr(HostPrefix, "fetch_layer", fetch_nothing)
    request = OffloadRequest("random:debug", (PREFIX,), (SUFFIX,), batch_size=2, new_tokens=5,
                             repeats=1, warmup=0)
    case, _, notes = measure_case(generator, request, PREFIX, SUFFIX)
    assert not case["same_tokens"] and set(case["divergence"]) == {"serial", "layerwise"}
    for found in case["divergence"].values():
        assert found["max_logit_diff"] > 1e-2 and found["top2_gap"] >= 0
    assert any("greedy tokens of layerwise differ from recompute's, first at token" in note
               for note in notes)
    for tokens, logits in logits_seen:  # [B, new, V]: each token is its logits' argmax
        assert logits.shape[:2] == (2, 5) and logits.argmax(-1).tolist() == tokens


def test_same_greedy_tokens_from_the_paged_copy(generator):
    request = OffloadRequest("random:debug", (PREFIX,), (SUFFIX,), batch_size=2, new_tokens=4,
                             repeats=1, warmup=0, block_sizes=(16, 7, 16))
    assert request.block_sizes == (7, 16)
    case, raw, notes = measure_case(generator, request, PREFIX, SUFFIX)
    assert [entry["block_size"] for entry in case["paged"]] == [7, 16]
    assert all(entry["same_tokens"] for entry in case["paged"]) and case["same_tokens"]
    assert [note for note in notes if "differ" in note] == []
    assert {"paged7_reload", "paged7_serial", "paged7_layerwise"} <= set(raw)
    assert case["paged"][0]["reload_bytes"] == case["reload_bytes"]


# ---- bad input: one line, exit 2 -----------------------------------------------------------
@pytest.mark.parametrize("args, says", [
    (["--prefix-len", "300"], "context of 256 tokens"),
    (["--prefix-len", "60", "--max-seq-len", "64"], "KV cache of 64 tokens"),
    (["--prefix-len"], "expected at least one argument"),
    (["--prefix-len", "0"], "must be a positive integer"),
    (["--prefix-len", "8", "--suffix-len", "0"], "must be a positive integer"),
    (["--prefix-len", "8", "--suffix-len"], "expected at least one argument"),
    (["--prefix-len", "8", "--batch-size", "0"], "must be a positive integer"),
    (["--prefix-len", "200", "--batch-size", "1000000000"], "does not fit"),  # sized, not made
    (["--prefix-len", "8", "--traffic", "d2h", "--context", "250"], "decode under copy traffic"),
    (["--prefix-len", "8", "--traffic", "sideways"], "invalid choice"),
    (["--prefix-len", "8", "--block-size", "0"], "must be a positive integer"),
    # ran without any decode, ignoring them
    (["--prefix-len", "8", "--context", "16"], "--context sets the decode of --traffic and "
     "--offloaded-decode: give one of them too"),
    (["--prefix-len", "8", "--decode-steps", "4"], "--decode-steps sets the decode"),
])
def test_bad_input_is_one_error_line(args, says):
    done = run_cli("offload", "--model", "debug", "--suffix-len", "8", *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and says in lines[0], done.stderr
    assert done.stdout == ""


def test_a_traffic_context_too_large_for_memory_is_refused_before_loading(monkeypatch):
    """Decode under traffic at a 32k context needs a 32k-token cache (8.6 GB for Llama-3.1-8B in
    fp32 on the CPU), far more than the cases' 36 tokens: the CPU's one sum counts the larger
    cache. Free memory is set between the two; the weights must never load."""
    from infermeter.specs.sizes import kv_cache_bytes, weight_bytes

    spec = PRESETS["llama-3.1-8b"]
    free = weight_bytes(spec, "float32") + 3 * 2**30  # room for the small cache, not the 32k one
    assert kv_cache_bytes(spec, 1, 32768, "float32") > 3 * 2**30
    monkeypatch.setattr("infermeter.offload.fit.free_memory",
                        lambda device: (free, "available in host memory"))

    def load_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the memory check refused")
    monkeypatch.setattr("infermeter.engine.checkpoint.load.load_weights", load_weights)
    done = run_cli("offload", "--model", "llama-3.1-8b", "--device", "cpu", "--prefix-len", "16",
                   "--suffix-len", "16", "--traffic", "d2h", "--context", "32768")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and "does not fit" in lines[0]
    assert "context 32768" in lines[0] and "KV cache 8.1 GiB" in lines[0]
    assert "--context" in lines[0] and done.stdout == ""


def test_the_paged_staging_buffer_is_counted_on_the_device(monkeypatch):
    """A reload stages two layers' K and V on the device (its two slots; a layer is 8,192
    tokens of Llama-3.1-8B's K and V in bf16: 32 MiB), the whole prefix's and each paged block
    size's: free GPU memory with room for everything but one is refused, naming it; the
    prefill's logits are one row a sequence (bf16 and its float32 copy)."""
    from infermeter.offload.fit import check_sizes_fit
    from infermeter.specs.sizes import kv_bytes_per_token_layer

    spec, cuda = PRESETS["llama-3.1-8b"], torch.device("cuda")
    seen: list[dict[str, int]] = []
    monkeypatch.setattr("infermeter.offload.fit.check_fit",
                        lambda what, parts, *rest: seen.append(dict(parts)))
    monkeypatch.setattr("infermeter.offload.fit.free_memory", lambda d: (0, "free on the GPU"))
    monkeypatch.setattr("infermeter.offload.fit.host_available", lambda: 2**40)

    def device_parts(**blocks):
        seen.clear()
        request = OffloadRequest("llama-3.1-8b", prefix_lens=(8192,), suffix_lens=(128,),
                                 new_tokens=1, **blocks)
        check_sizes_fit(spec, request, cuda, "bf16", "bf16")
        return seen[0]  # the device's parts (the host's come second)

    plain, paged = device_parts(), device_parts(block_sizes=(16, 256))
    # the 8,320-token forward's MLP (3 bf16 rows of ffn_dim a token) + one logits row (bf16 + fp32)
    assert plain["prefill activations"] == (3 * 8320 * spec.ffn_dim * 2
                                            + spec.vocab_size * (2 + 4))
    staging = STAGE_SLOTS * 8192 * kv_bytes_per_token_layer(spec, "bf16")
    assert staging == 64 * 2**20 and STAGE_SLOTS == 2
    assert plain["reload staging"] == staging
    assert plain["prefill layer buffers"] == 2 * 8320 * spec.dim * 2  # in and out, bf16
    assert paged == {**plain, "paged reload staging, blocks of 16": staging,
                     "paged reload staging, blocks of 256": staging}
    monkeypatch.undo()
    monkeypatch.setattr("infermeter.offload.fit.host_available", lambda: 2**40)
    room = sum(plain.values()) + staging  # one block size's staging, not two
    monkeypatch.setattr("infermeter.offload.fit.free_memory",
                        lambda device: (room, "free on the GPU"))
    request = OffloadRequest("llama-3.1-8b", prefix_lens=(8192,), suffix_lens=(128,),
                             new_tokens=1, block_sizes=(16, 256))
    with pytest.raises(InfermeterError, match="paged reload staging, blocks of 256 64.0 MiB"):
        check_sizes_fit(spec, request, cuda, "bf16", "bf16")


def test_a_paged_copys_views_are_counted_in_host_memory(monkeypatch):
    """A paged reload keeps two views per block of K and of V, every layer (paged.py): in blocks
    of 1 a 32k prefix of Llama-3.1-8B is 2 x 2 x 32,768 x 32 views, about 4 GiB at VIEW_BYTES
    (a view's real size or more), which the host check counts with the rest."""
    from infermeter.offload.fit import VIEW_BYTES, check_sizes_fit
    from infermeter.offload.paged import PagedHostPrefix

    spec = PRESETS["llama-3.1-8b"]
    seen: list[dict[str, int]] = []
    monkeypatch.setattr("infermeter.offload.fit.check_fit",
                        lambda what, parts, *rest: seen.append(dict(parts)))
    request = OffloadRequest("llama-3.1-8b", prefix_lens=(32768,), suffix_lens=(128,),
                             new_tokens=1, block_sizes=(1, 256))
    check_sizes_fit(spec, request, torch.device("cpu"), "bf16", "bf16")
    host = seen[0]  # on the CPU host and device are one memory: one check holds every part
    assert host["paged copy views, blocks of 1"] == 2 * 2 * 32768 * 32 * VIEW_BYTES
    assert host["paged copy views, blocks of 256"] == 2 * 2 * 128 * 32 * VIEW_BYTES
    # the views a small paged copy really holds: two per block of K and of V, every layer
    model = build_model(DEBUG, device="cpu", seed=0)
    model.setup_cache(2, PREFIX + SUFFIX)
    paged = PagedHostPrefix(model, PREFIX, 7)
    held = sum(len(dsts) + len(srcs) for dsts, srcs in (layer.pieces for layer in paged.layers))
    assert held == 2 * 2 * 2 * 3 * DEBUG.n_layers  # B = 2, 3 blocks of 7 for 20 tokens


@pytest.mark.parametrize("field, value, says", [
    ("prefix_lens", (), "at least one length"), ("suffix_lens", (4, 0), "positive"),
    ("prefix_lens", (8, -1), "positive"), ("traffic", ("up",), "unknown direction"),
    ("decode_steps", 0, "at least 1"), ("block_sizes", (16, 0), "--block-size")])
def test_the_request_refuses_empty_or_non_positive_lengths(field, value, says):
    lengths = {"prefix_lens": (8,), "suffix_lens": (4,), field: value}
    with pytest.raises(InfermeterError, match=says):
        OffloadRequest("random:debug", **lengths)


# ---- decode under copy traffic -------------------------------------------------------------
def test_background_copies_move_the_bytes_and_stop():
    traffic = CopyTraffic(torch.device("cpu"), chunk_bytes=1 << 16)
    device_chunk, host_chunk = traffic.buffers["h2d"]
    host_chunk.copy_(torch.arange(1 << 16, dtype=torch.int64).to(torch.uint8))
    traffic.copy_once("h2d")
    assert torch.equal(device_chunk, host_chunk)
    device_chunk, host_chunk = traffic.buffers["d2h"]
    device_chunk.fill_(7)
    traffic.copy_once("d2h")
    assert torch.equal(host_chunk, device_chunk)
    with traffic.run_threads("both") as threads:
        while min(threads.moved.values()) == 0:
            time.sleep(0.001)
    assert not any(thread.is_alive() for thread in threads.threads)
    assert set(threads.moved) == {"d2h", "h2d"} and threads.gbps > 0


def test_decode_under_traffic_keeps_the_tokens(generator):
    from infermeter.engine.generator import GenerationConfig

    config = GenerationConfig(max_new_tokens=5)
    generator.prepare(2, 16, 5)
    state = generator.prefill(_tokens()[:, :16], config)
    entries, samples, notes = decode_under_traffic(
        generator, state, config, steps=4, directions=("d2h", "both"), repeats=2, warmup=1,
        traffic=CopyTraffic(torch.device("cpu"), chunk_bytes=1 << 16))
    assert [e["direction"] for e in entries] == ["d2h", "both"]
    assert all(e["same_tokens"] and e["method"] == "cpu thread" for e in entries)
    # alone, traffic, alone, traffic, alone: one more alone window than traffic windows
    assert set(samples) == {"d2h", "d2h alone", "both", "both alone"}
    assert all(len(samples[label]) == 2 and len(samples[f"{label} alone"]) == 3
               for label in ("d2h", "both"))
    assert all(e["copy_window_bytes"] > 0 and e["copy_gbps"] > 0 for e in entries)


# ---- the command end to end ----------------------------------------------------------------
def test_prefills_are_compiled_layers_on_a_gpu_only():
    from types import SimpleNamespace

    from infermeter.offload.case import prefill_kind

    def gen(device, compile_prefill=True, bucketed=False):
        return SimpleNamespace(device=torch.device(device), compile_prefill=compile_prefill,
                               bucketed_prefill=bucketed)
    assert prefill_kind(gen("cuda")) == "compiled layers"
    assert prefill_kind(gen("cpu")) == "eager"
    assert prefill_kind(gen("cuda", compile_prefill=False)) == "eager"
    assert prefill_kind(gen("cuda", bucketed=True)) == "eager"  # no wait between its layers
    # the layer graph compiles in the untimed check; one untimed run a timed item by default too
    assert OffloadRequest("random:debug", (8,), (4,)).warmup >= 1


def test_command_writes_an_offload_result_and_prints_a_table(tmp_path):
    out = tmp_path / "offload.jsonl"
    common = ("offload", "--model", "debug", "--device", "cpu", "--prefix-len", "24", "8",
              "--suffix-len", "4", "--repeats", "1", "--warmup", "0", "--new-tokens", "3",
              "--prefill-chunk", "16")
    done = run_cli(*common, "--traffic", "both", "--offloaded-decode", "--decode-steps", "3",
                   "--block-size", "16", "--json", "--output", str(out))
    assert done.returncode == 0, done.stderr
    printed = Result.from_dict(json.loads(done.stdout))
    [written] = read_results(out)
    assert printed.to_dict() == written.to_dict()
    assert written.kind == "offload" and written.metrics["same_tokens"] is True
    assert [c["prefix_len"] for c in written.metrics["cases"]] == [8, 24]
    assert {r["way"] for r in written.metrics["break_even"]} == {"serial", "layerwise"}
    assert written.config["host_memory"] == "cpu" and written.config["prefill_chunk"] == 16
    assert written.config["prefill"] == "eager" and written.config["staging_slots"] == 2
    assert written.config["paged_copy_issue"] == "one call a layer"
    [traffic] = written.metrics["traffic"]
    assert (traffic["direction"], traffic["context"], traffic["same_tokens"]) == ("both", 24, True)
    assert written.config["traffic"] == ["both"] and written.config["decode_steps"] == 3
    table = render_offload(written)
    assert "(b) layerwise" in table and "suffix 4, (a) serial:" in table
    assert "decode under copy traffic" in table
    streamed = written.metrics["offloaded_decode"]
    assert streamed["same_tokens"] is True and streamed["bytes_per_step"] > 0
    assert "offloaded decode" in table
    assert written.config["block_sizes"] == [16]
    assert [(r["block_size"], r["way"]) for r in written.metrics["paged_break_even"]] == [
        (16, "serial"), (16, "layerwise")]
    assert "suffix 4, blocks of 16 by dma, (a) serial:" in table
    shown = run_cli(*common)
    assert shown.returncode == 0 and "(c) recompute" in shown.stdout, shown.stderr


def test_report_shows_an_offload_result_and_still_renders(tmp_path):
    from infermeter.report.build import build_report, render

    request = OffloadRequest("random:debug", (8,), (4,), repeats=1, warmup=0, new_tokens=2)
    cases = [{"prefix_len": 8, "suffix_len": 4, "ttft_ms": {"serial": 1.0, "layerwise": 1.0,
                                                            "recompute": 2.0}}]
    result = Result("offload", DEBUG.to_dict(), {"device": "cpu"}, {}, {
        "cases": cases, "break_even": break_evens(cases, request.suffix_lens)})
    path = tmp_path / "offload.jsonl"
    path.write_text(result.to_json() + "\n")
    report = build_report([str(path)])
    assert f"{path}: offload Result, 'cpu · debug' in the offload tables" in report.notes
    assert report.columns == []
    markdown = render(report, "markdown")
    assert "Reference table" in markdown
    assert "| cpu · debug | 4 | 8 | 1.00 ms | 1.00 ms | 2.00 ms | - | - | - |" in markdown


# ---- on a GPU: the copy stream, pinned memory, the compiled layers -------------------------
def _cuda_generator(spec=DEBUG, **kwargs):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return Generator(build_model(spec, device="cuda", dtype=torch.float32, seed=3), **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", sorted(SPECS))
def test_on_cuda_every_way_gives_recomputes_tokens_through_the_compiled_layers(spec):
    """measure_case as the command runs it on a GPU: compiled layers for every prefill, (b) on
    a copy stream from pinned memory, with the paged copy too; same greedy tokens all ways."""
    from infermeter.offload.case import prefill_kind

    gen = _cuda_generator(SPECS[spec], compile_prefill=True)
    assert prefill_kind(gen) == "compiled layers"
    request = OffloadRequest("random:debug", (PREFIX,), (SUFFIX,), batch_size=2, new_tokens=5,
                             repeats=2, warmup=1, block_sizes=(7,), lookahead=1)
    case, raw, notes = measure_case(gen, request, PREFIX, SUFFIX)
    assert case["same_tokens"] and case["paged"][0]["same_tokens"], notes
    assert gen._compiled_block is not None  # the layer graph ran
    host = HostPrefix(gen.model, PREFIX)
    assert all(layer.k.is_pinned() and (layer.key_pos is None or layer.key_pos.is_pinned())
               for layer in host.layers)


@pytest.mark.gpu
@pytest.mark.parametrize("lookahead", [None, 1])
def test_on_cuda_a_gemma_like_reload_through_both_slots_gives_the_prefills_cache(lookahead):
    """On a GPU, where the DMAs run on a side stream and the placements on the compute stream:
    window layers (0, 2, 4) straight in, the full ones through the two staging slots in turn,
    the reload alone (whole) and (b) under a compiled-layer forward; the cache afterwards is
    the prefix's prefill's bit for bit, and (b)'s first token is recompute's."""
    spec = DEBUG.with_updates(name="debug-gemma-like", n_layers=6, sliding_window=12,
                              sliding_window_layers=(0, 2, 4))
    gen = _cuda_generator(spec, compile_prefill=True)
    compiled = GenerationConfig(max_new_tokens=1, compile=True)
    tokens = _tokens().cuda()
    gen.prepare(2, PREFIX + SUFFIX, 1)
    gen.prefill(tokens[:, :PREFIX], compiled)
    want = [(c.k.clone(), c.v.clone(), c.key_pos.clone()) for c in layer_caches(gen.model)]
    host = HostPrefix(gen.model, PREFIX)
    assert host.slot_of == [None, 0, None, 1, None, 0]
    gen.model.reset_cache()
    reload = LayerwiseReload(gen.model, host, lookahead)
    reload.whole()
    torch.cuda.synchronize()
    for (k, v, key_pos), cache in zip(want, layer_caches(gen.model)):
        assert torch.equal(cache.k, k) and torch.equal(cache.v, v)
        assert torch.equal(cache.key_pos, key_pos)
    gen.model.reset_cache()
    recomputed = gen.prefill(tokens, compiled).token
    gen.model.reset_cache()
    with reload:
        reload.start()
        got = gen.prefill(tokens[:, PREFIX:], compiled, start=PREFIX).token
    assert torch.equal(got, recomputed)


@pytest.mark.gpu
def test_on_cuda_the_layerwise_reload_gives_the_recomputed_logits():
    gen = _cuda_generator(compile_prefill=True)
    compiled = GenerationConfig(max_new_tokens=1, compile=True)
    tokens = _tokens().cuda()
    gen.prepare(2, PREFIX + SUFFIX, 1)
    gen.prefill(tokens[:, :PREFIX], compiled)
    host = HostPrefix(gen.model, PREFIX)
    gen.model.reset_cache()
    want = gen.prefill(tokens, compiled).token
    for lookahead in (None, 1):
        gen.model.reset_cache()
        with LayerwiseReload(gen.model, host, lookahead) as reload:
            reload.start()
            got = gen.prefill(tokens[:, PREFIX:], compiled, start=PREFIX).token
        assert torch.equal(got, want)
