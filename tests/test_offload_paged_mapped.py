"""`infermeter offload --paged-copy mapped` on the CPU: a paged reload whose blocks come back by
one gather a layer's K or V pool (paged.py) instead of a DMA per block. On the CPU a host pool is
its own mapping, so these run the gathers a GPU runs, from the pools themselves (or from an
injected mapping). Same greedy tokens as dma and recompute, staging equal to dma's bit for bit,
the layer-wise schedule on a fake clock, the Result, table and fit check; one error line for a
method that is not one or a mapping that is not there. No speed is asserted."""

from __future__ import annotations

import json

import pytest
import torch

from infermeter.engine.generator import Generator
from infermeter.engine.model import build_model
from infermeter.errors import InfermeterError
from infermeter.measure.result import Result, read_results
from infermeter.offload.case import measure_case
from infermeter.offload.paged import PagedHostPrefix, device_mapping
from infermeter.offload.reload import STAGE_SLOTS, LayerwiseReload, layer_caches
from infermeter.offload.request import OffloadRequest
from infermeter.offload.table import render_offload
from infermeter.specs.presets import PRESETS
from tests.cli_in_process import run_cli
from tests.test_offload import ONE, PREFIX, SPECS, SUFFIX, FakeClock, _tokens

DEBUG = PRESETS["debug"]
BLOCKS = (1, 16, PREFIX + 12)  # a token a block, vLLM's default, one block longer than the prefix


@pytest.fixture(scope="module", params=sorted(SPECS))
def generator(request):
    return Generator(build_model(SPECS[request.param], device="cpu", seed=3), prefill_chunk=None)


def _prefilled(generator) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The prefix's prefill in the cache; its K, V and key_pos per layer."""
    generator.prepare(2, PREFIX + SUFFIX, 1)
    generator.prefill(_tokens()[:, :PREFIX], ONE)
    return [(c.k.clone(), c.v.clone(), c.key_pos.clone()) for c in layer_caches(generator.model)]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes: the pools' unfilled tails are uninitialised, maybe NaN patterns."""
    return t.contiguous().view(torch.uint8)


# ---- same tokens, same bytes ---------------------------------------------------------------
@pytest.mark.parametrize("block", BLOCKS)
def test_mapped_gives_the_greedy_tokens_of_dma_and_recompute(generator, block):
    """Serial and layer-wise, from one host copy reloaded both ways (GQA, and a ring layer
    whose window holds fewer blocks than the staging slot)."""
    request = OffloadRequest("random:debug", (PREFIX,), (SUFFIX,), batch_size=2, new_tokens=4,
                             repeats=1, warmup=0, block_sizes=(block,),
                             paged_copies=("mapped", "dma"))
    assert request.paged_copies == ("dma", "mapped")
    case, raw, notes = measure_case(generator, request, PREFIX, SUFFIX)
    assert [(e["block_size"], e["copy"]) for e in case["paged"]] == [(block, "dma"),
                                                                     (block, "mapped")]
    assert all(entry["same_tokens"] for entry in case["paged"]) and case["same_tokens"]
    assert [note for note in notes if "differ" in note] == []
    assert {f"paged{block}_mapped_{part}" for part in ("reload", "serial", "layerwise")} <= set(raw)
    dma, mapped = case["paged"]
    assert mapped["reload_bytes"] == dma["reload_bytes"] == case["reload_bytes"]
    most = -(-PREFIX // block)  # the staging slot's blocks a sequence
    fewer = sum(-(-min(PREFIX, c.size) // block) < most for c in layer_caches(generator.model))
    rest = len(generator.model.layers) - fewer
    # a gather per pool a layer; a ring layer holding fewer blocks than the slot: one a sequence
    assert mapped["copies"] == 2 * rest + 2 * 2 * fewer
    assert mapped["copies"] < dma["copies"]


@pytest.mark.parametrize("block", BLOCKS)
def test_the_mapped_staging_is_dmas_bit_for_bit_and_the_cache_the_prefills(generator, block):
    """Layer by layer, each staging slot filled with a marker first: what the gathers leave in
    it (the rows they fill and the ones they do not) is what the DMAs leave, byte for byte; the
    placements after them give the prefix's prefill's cache."""
    _check_staging(generator, block)


# one KV head of 6 bfloat16 values: a block of 1 or 3 tokens is 12 or 36 bytes, no whole number
# of 8-byte words, so the gathers move it in smaller words; a ring layer too
ODD = DEBUG.with_updates(name="debug-odd-rows", n_heads=2, n_kv_heads=1, head_dim=6,
                         sliding_window=5, sliding_window_layers=(0,))


@pytest.mark.parametrize("block", [1, 3])
def test_blocks_of_no_whole_number_of_8_byte_words_are_gathered_bit_for_bit(block):
    model = build_model(ODD, device="cpu", dtype=torch.bfloat16, seed=3)
    _check_staging(Generator(model, prefill_chunk=None), block)


def _check_staging(generator, block):
    model = generator.model
    want = _prefilled(generator)
    paged = PagedHostPrefix(model, PREFIX, block, seed=1, copies=("dma", "mapped"))
    dma, mapped = paged.using("dma"), paged.using("mapped")
    model.reset_cache()
    for index in range(len(model.layers)):
        staged = []
        for way in (dma, mapped):
            for buffer in paged.stage:
                buffer.view(torch.uint8).fill_(0xA5)
            way.fetch_layer(model, index)
            staged.append([_bytes(t).clone() for t in paged._staging(index)])
        for got, ref in zip(*staged):
            assert torch.equal(got, ref)
        mapped.place_layer(model, index)
    for (k, v, key_pos), cache in zip(want, layer_caches(model)):
        assert torch.equal(cache.k, k) and torch.equal(cache.v, v)
        assert torch.equal(cache.key_pos, key_pos)


def test_a_way_whose_tokens_part_is_marked_alone(generator, monkeypatch):
    """A mapping that reads zeros (a broken gather) parts the mapped way's tokens from
    recompute's: its entry says so and names where, the dma entry of the same blocks stays
    the same, and so does the case's own verdict on (a), (b) and (c)."""
    import functools

    from infermeter.offload import paged as paged_module

    def zeros(host: torch.Tensor, device: torch.device) -> torch.Tensor:
        return torch.zeros_like(host)

    monkeypatch.setattr(paged_module, "PagedHostPrefix",
                        functools.partial(PagedHostPrefix, map_host=zeros))
    request = OffloadRequest("random:debug", (PREFIX,), (SUFFIX,), batch_size=2, new_tokens=4,
                             repeats=1, warmup=0, block_sizes=(16,),
                             paged_copies=("dma", "mapped"))
    case, _, notes = measure_case(generator, request, PREFIX, SUFFIX)
    assert {e["copy"]: e["same_tokens"] for e in case["paged"]} == {"dma": True,
                                                                     "mapped": False}
    assert case["same_tokens"] is True
    assert set(case["divergence"]) == {"paged16_mapped_serial", "paged16_mapped_layerwise"}
    assert any("paged16_mapped" in note for note in notes)


def test_the_gathers_read_the_injected_mapping_by_block_ids_made_once(generator):
    """The gathers' sources are what the injected mapping returned (one per pool, K and V of
    every layer), seen as rows of words, a block a row; their ids are the block table's, in the
    sequences' order; the pools themselves are never read by them."""
    model = generator.model
    _prefilled(generator)
    returned: list[torch.Tensor] = []

    def mapping(host: torch.Tensor, device: torch.device) -> torch.Tensor:
        assert host.dtype == torch.uint8 and host.dim() == 1 and device.type == "cpu"
        returned.append(host.clone())  # a second buffer standing for the device's view
        return returned[-1]

    paged = PagedHostPrefix(model, PREFIX, 7, seed=1, copies=("mapped",), map_host=mapping)
    assert paged.copy == "mapped" and len(returned) == 2 * len(model.layers)
    mapped = {t.data_ptr() for t in returned}
    for layer in paged.layers:
        assert layer.pieces == ([], [])  # no DMA views where dma is not asked for
        ids = torch.cat([i for _, _, i in layer.gathers[:len(layer.gathers) // 2]])
        assert ids.tolist() == [slot for *_, slot in layer.blocks]
        for staging, source, _ in layer.gathers:
            assert source.data_ptr() in mapped
            assert source.shape[0] == layer.k.shape[0]
            assert source[0].nbytes == layer.k[0].nbytes == staging[0].nbytes
    assert all(c.k[:, :, :min(PREFIX, c.size)].any() for c in layer_caches(model))
    for t in returned:  # the gathers read these: zero them and the reload brings back zeros
        t.zero_()
    paged.reload(model)  # over the prefill's cache, whose slots are not zeros
    assert all(not c.k[:, :, :min(PREFIX, c.size)].any() for c in layer_caches(model))


# ---- the layer-wise schedule ---------------------------------------------------------------
class GatherClock(FakeClock):
    """The fake clock, recording per gather (the layer being fetched, when it starts)."""

    def __init__(self, copy_ms: float) -> None:
        super().__init__(copy_ms)
        self.fetching = -1
        self.gathers: list[tuple[int, float]] = []

    def gather(self, dst, src, rows) -> None:
        self.gathers.append((self.fetching, self.copy_end))
        super().gather(dst, src, rows)


@pytest.mark.parametrize("lookahead", [None, 1])
def test_on_a_fake_clock_no_gather_lands_in_a_slot_before_its_last_placement(lookahead):
    """Six layers, two staging slots, gathers on the copy stream (1 ms each), placements on the
    compute stream (3 ms, longer than a layer's gathers, so a gather issued too early would
    start before a placement ends): a layer's gathers are issued after, and start after the end of,
    the placement of the layer that used its slot last; every layer waits for its own; the
    cache ends as the prefix's prefill left it."""
    gen = Generator(build_model(DEBUG.with_updates(n_layers=6), device="cpu", seed=3),
                    prefill_chunk=None)
    model = gen.model
    want = _prefilled(gen)
    paged = PagedHostPrefix(model, PREFIX, 16, copies=("mapped",))
    clock, events, placed = GatherClock(1.0), [], {}
    fetch, place = paged.fetch_layer, paged.place_layer

    def fetch_layer(model, index, copies):
        clock.fetching = index
        events.append(("fetch", index))
        fetch(model, index, copies)

    def place_layer(model, index, copy=None):
        events.append(("place", index))
        place(model, index)
        clock.compute += 3.0
        placed[index] = clock.compute

    paged.fetch_layer, paged.place_layer = fetch_layer, place_layer
    model.reset_cache()
    trace: list[tuple[str, int]] = []
    LayerwiseReload(model, paged, lookahead, trace=trace, stream=clock).whole()
    assert [i for i, _ in clock.gathers] == [i for i in range(6) for _ in range(2)]
    for i in range(STAGE_SLOTS, 6):
        last = i - STAGE_SLOTS  # the layer that used the slot before
        assert events.index(("place", last)) < events.index(("fetch", i))
        assert min(start for j, start in clock.gathers if j == i) >= placed[last]
    assert [i for what, i in trace if what == "wait"] == list(range(6))
    for (k, v, _), cache in zip(want, layer_caches(model)):
        assert torch.equal(cache.k, k) and torch.equal(cache.v, v)


# ---- the Result, the table, the fit check, bad input ---------------------------------------
def test_the_command_runs_mapped_on_the_cpu_and_the_result_and_table_carry_it(tmp_path):
    """On the CPU host memory is its own mapping: --paged-copy mapped runs there, the same
    gathers, and says so in the Result (paged_copies, each entry's copy) and the table."""
    out = tmp_path / "offload.jsonl"
    done = run_cli("offload", "--model", "debug", "--device", "cpu", "--prefix-len", "24", "8",
                   "--suffix-len", "4", "--repeats", "1", "--warmup", "0", "--new-tokens", "3",
                   "--block-size", "16", "--paged-copy", "mapped", "dma", "--json",
                   "--output", str(out))
    assert done.returncode == 0, done.stderr
    [written] = read_results(out)
    assert Result.from_dict(json.loads(done.stdout)).to_dict() == written.to_dict()
    assert written.config["paged_copies"] == ["dma", "mapped"]
    assert written.metrics["same_tokens"] is True
    for case in written.metrics["cases"]:
        assert [(e["block_size"], e["copy"]) for e in case["paged"]] == [(16, "dma"),
                                                                         (16, "mapped")]
    assert [(r["copy"], r["way"]) for r in written.metrics["paged_break_even"]] == [
        ("dma", "serial"), ("dma", "layerwise"), ("mapped", "serial"), ("mapped", "layerwise")]
    table = render_offload(written)
    assert "suffix 4, blocks of 16 by mapped, (b) layerwise:" in table
    rows = [line.split() for line in table.splitlines() if line.split()[:2] == ["16", "mapped"]]
    assert [row[3] for row in rows] == ["8", "24"]  # prefix lengths, one row each


def test_without_paged_copy_a_paged_reload_is_dma():
    request = OffloadRequest("random:debug", (8,), (4,), block_sizes=(16,))
    assert request.paged_copies == ("dma",)


@pytest.mark.parametrize("args, says", [
    (["--block-size", "16", "--paged-copy", "sideways"], "invalid choice: 'sideways'"),
    (["--paged-copy", "mapped"], "--paged-copy: give --block-size too"),
])
def test_bad_paged_copy_is_one_error_line(args, says):
    done = run_cli("offload", "--model", "debug", "--device", "cpu", "--prefix-len", "8", *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and says in lines[0], done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("build, says", [
    (lambda: OffloadRequest("random:debug", (8,), (4,), block_sizes=(16,),
                            paged_copies=("dma", "pio")), "--paged-copy: unknown method 'pio'"),
    (lambda: OffloadRequest("random:debug", (8,), (4,), paged_copies=("mapped",)),
     "--paged-copy: give --block-size too"),
])
def test_a_scripts_bad_paged_copy_is_one_error_line(build, says):
    with pytest.raises(InfermeterError, match=says) as err:
        build()
    assert "\n" not in str(err.value)


def test_a_gpu_without_a_mapping_is_refused_in_one_line(monkeypatch):
    """On a GPU where mapped pinned memory is unavailable: before the weights load (the job's
    probe), and where a pool's own mapping fails (device_mapping: here an unpinned host tensor,
    which mapped_view refuses before asking CUDA anything)."""
    from infermeter.offload.job import check_paged_copies

    monkeypatch.setattr("infermeter.offload.traffic.mapped_refusal",
                        lambda device: "mapped pinned memory unavailable: no UVA")
    request = OffloadRequest("random:debug", (8,), (4,), block_sizes=(16,),
                             paged_copies=("mapped",))
    with pytest.raises(InfermeterError, match="--paged-copy mapped: mapped pinned memory "
                       "unavailable: no UVA; use --paged-copy dma") as err:
        check_paged_copies(request, torch.device("cuda"))
    assert "\n" not in str(err.value)
    check_paged_copies(request, torch.device("cpu"))  # the CPU runs it: nothing to probe
    with pytest.raises(InfermeterError, match="--paged-copy mapped: mapped pinned memory "
                       "unavailable: needs pinned host memory") as err:
        device_mapping(torch.zeros(64, dtype=torch.uint8), torch.device("cuda"))
    assert "\n" not in str(err.value)


def test_the_fit_check_counts_the_block_ids_and_only_the_dma_ways_views(monkeypatch):
    """Mapped: the block ids on the device (int64, a block of every sequence, every layer), no
    device copy of the pools, and no DMA views in host memory unless dma runs too; the ids a
    small paged copy really holds are that count."""
    from infermeter.offload.fit import check_sizes_fit

    spec = PRESETS["llama-3.1-8b"]
    seen: list[dict[str, int]] = []
    monkeypatch.setattr("infermeter.offload.fit.check_fit",
                        lambda what, parts, *rest: seen.append(dict(parts)))
    monkeypatch.setattr("infermeter.offload.fit.free_memory", lambda d: (0, "free on the GPU"))
    monkeypatch.setattr("infermeter.offload.fit.host_available", lambda: 2**40)

    def parts(*copies):
        seen.clear()
        request = OffloadRequest("llama-3.1-8b", prefix_lens=(8192,), suffix_lens=(128,),
                                 new_tokens=1, block_sizes=(16,), paged_copies=copies)
        check_sizes_fit(spec, request, torch.device("cuda"), "bf16", "bf16")
        return seen[0], seen[1]  # the device's, the host's

    (dma_device, dma_host), (mapped_device, mapped_host) = parts("dma"), parts("mapped")
    ids = 8192 // 16 * spec.n_layers * 8
    assert mapped_device == {**dma_device, "paged block ids, blocks of 16": ids}
    assert "paged copy views, blocks of 16" in dma_host
    assert mapped_host == {k: v for k, v in dma_host.items() if "copy views" not in k}
    both_device, both_host = parts("dma", "mapped")
    assert both_device == mapped_device and both_host == dma_host
    model = build_model(DEBUG, device="cpu", seed=0)
    model.setup_cache(2, PREFIX + SUFFIX)
    paged = PagedHostPrefix(model, PREFIX, 7, copies=("mapped",))
    held = {i.data_ptr(): i.nbytes for layer in paged.layers for _, _, i in layer.gathers}
    assert sum(held.values()) == 2 * -(-PREFIX // 7) * DEBUG.n_layers * 8


# ---- on a GPU: the mapped pools and the copy stream ----------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("block", [1, 16])
def test_on_cuda_the_mapped_staging_is_dmas_bit_for_bit(block):
    """On a GPU the gathers read pinned pools through their device mapping on the copy
    stream (CudaCopyStream.gather), the DMAs copy them by copy engine: the staging ends the same
    byte for byte, every layer, and the reload gives the prefix's prefill's cache."""
    from infermeter.offload.streams import CudaCopyStream

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = Generator(build_model(SPECS["window"], device="cuda", dtype=torch.bfloat16, seed=3),
                    prefill_chunk=None)
    model = gen.model
    gen.prepare(2, PREFIX + SUFFIX, 1)
    gen.prefill(_tokens()[:, :PREFIX].cuda(), ONE)
    want = [(c.k.clone(), c.v.clone()) for c in layer_caches(model)]
    paged = PagedHostPrefix(model, PREFIX, block, seed=1, copies=("dma", "mapped"))
    assert all(layer.k.is_pinned() for layer in paged.layers)
    assert all(src.is_cuda for layer in paged.layers for _, src, _ in layer.gathers)
    stream = CudaCopyStream(torch.device("cuda"))
    for index in range(len(model.layers)):
        staged = []
        for way in (paged.using("dma"), paged.using("mapped")):
            for buffer in paged.stage:
                buffer.view(torch.uint8).fill_(0xA5)
            stream.follow_compute()
            way.fetch_layer(model, index, stream)
            stream.wait(stream.mark())
            staged.append([_bytes(t).clone() for t in paged._staging(index)])
        for got, ref in zip(*staged):
            assert torch.equal(got, ref)
    model.reset_cache()
    LayerwiseReload(model, paged.using("mapped")).whole()
    torch.cuda.synchronize()
    for (k, v), cache in zip(want, layer_caches(model)):
        assert torch.equal(cache.k, k) and torch.equal(cache.v, v)
