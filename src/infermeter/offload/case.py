"""One (prefix, suffix) case of `infermeter offload`: the prefix's KV cache made by a prefill and
kept in host memory (whole, and paged per --block-size), then the TTFT of each way timed after
an untimed check that every way generates recompute's greedy tokens (job.py has the order).

Every prefill of a case runs the same way (prefill_kind): on a GPU through the Generator's
per-layer compiled forward (compile_prefill, not bucketed: the model's Python loop over layers
stays, so the layer-wise reload still waits between layers; each layer's call a CUDA graph's
replay, engine/layer_replays.py), eager on the CPU. The untimed check
runs every way once first, so the layer graph compiles there (and in the timer's warm-up), never
in a timed run; the check's decode is eager (its tokens compare the ways, it is not timed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from infermeter.measure.timing import Stats
from infermeter.offload.divergence import describe, divergence
from infermeter.offload.request import WAYS, OffloadRequest

# Timed items per case: the three ways and the two parts of (a) alone.
TIMED = ("reload", "suffix_prefill", *WAYS)


def prefill_kind(generator: Any) -> str:
    """How a case's prefills run: "compiled layers" (a GPU and a Generator with compile_prefill,
    not bucketed) or "eager". A one-token forward runs eager either way (the Generator's)."""
    compiled = generator.device.type == "cuda" and generator.compile_prefill \
        and not generator.bucketed_prefill
    return "compiled layers" if compiled else "eager"


def reload_ways(generator: Any, host: Any, tail: Any, prefix: int, config: Any,
                lookahead: int | None) -> tuple[Callable[[], Any], Callable[[], Any],
                                                Callable[[], Any]]:
    """The reload of `host` (HostPrefix or PagedHostPrefix) alone, then (a) serial and (b)
    layer-wise, each followed by the suffix `tail` [B, S] prefilled at positions prefix.. and
    returning the Generator's DecodeState. The reload alone and (a)'s run (b)'s schedule with
    no forward between its waits (DMAs on the copy stream, placements on the compute stream),
    so the three move the prefix the same way."""
    from infermeter.offload.reload import LayerwiseReload

    model = generator.model
    layerwise = LayerwiseReload(model, host, lookahead)

    def serial() -> Any:
        layerwise.whole()
        return generator.prefill(tail, config, start=prefix)

    def overlapped() -> Any:
        with layerwise:
            layerwise.start()
            return generator.prefill(tail, config, start=prefix)

    return layerwise.whole, serial, overlapped


def greedy_tokens(generator: Any, first: Callable[[], Any], config: Any,
                  new_tokens: int) -> tuple[list[list[int]], Any]:
    """From a zeroed cache: `first` (a way to the first token), then greedy decode (eager: the
    tokens compare the ways, no decode is timed): the tokens [B][new] and the float32 logits
    each was chosen from [B, new, V] on the host (None where a forward's logits did not pass
    the model's forward hook, so that they would not line up with the tokens)."""
    import dataclasses

    import torch

    decode = dataclasses.replace(config, compile=False)
    seen: list[torch.Tensor] = []  # per forward: its last position's logits [B, V]

    def keep(module: Any, args: Any, out: Any) -> None:
        if out.shape[1]:  # a chunked prefill's earlier chunks return no logits rows
            seen.append(out[:, -1].float().cpu())

    handle = generator.model.register_forward_hook(keep)
    try:
        generator.model.reset_cache()
        state = first()
        del seen[:-1]  # a chunked prefill's earlier forwards: only its last one chose a token
        generated = [state.token]
        for _ in range(new_tokens - 1):
            generated.append(generator.decode_step(state, decode))
    finally:
        handle.remove()
    logits = torch.stack(seen, dim=1) if len(seen) == new_tokens else None
    return torch.stack(generated, dim=1).tolist(), logits


def paged_name(size: int, copy: str) -> str:
    """A paged reload's timed items' stem: `paged<N>` by DMA (as before there were two ways),
    `paged<N>_mapped` by the gather kernel."""
    return f"paged{size}" if copy == "dma" else f"paged{size}_{copy}"


def measure_case(generator: Any, request: OffloadRequest, prefix: int,
                 suffix: int) -> tuple[dict[str, Any], dict[str, list[float]], list[str]]:
    """One (prefix, suffix) case: (its metrics, raw samples in ms per timed item, warnings).
    With request.block_sizes, the same reloads from a paged host copy per block size and
    request.paged_copies way too (timed items `<stem>_reload`, `<stem>_serial`,
    `<stem>_layerwise`, the stem paged_name's)."""
    import torch

    from infermeter.engine.generator import GenerationConfig
    from infermeter.measure.timing import timer_for
    from infermeter.offload.paged import PagedHostPrefix
    from infermeter.offload.reload import HostPrefix

    model, device = generator.model, generator.device
    batch = request.batch_size
    config = GenerationConfig(max_new_tokens=request.new_tokens, greedy=True, seed=request.seed,
                              compile=prefill_kind(generator) == "compiled layers")
    generator.prepare(batch, prefix + suffix, request.new_tokens)
    rng = torch.Generator().manual_seed(request.seed + 7919 * prefix + suffix)
    tokens = torch.randint(model.spec.vocab_size, (batch, prefix + suffix), generator=rng)
    tokens = tokens.to(device)  # [B, P + S]
    head, tail = tokens[:, :prefix], tokens[:, prefix:]
    with torch.no_grad():
        generator.prefill(head, config)
        host = HostPrefix(model, prefix)
        pages = {size: PagedHostPrefix(model, prefix, size, request.seed,
                                       request.paged_copies)
                 for size in request.block_sizes}
    reload, serial, overlapped = reload_ways(generator, host, tail, prefix, config,
                                             request.lookahead)
    ways = {"serial": serial, "layerwise": overlapped,
            "recompute": lambda: generator.prefill(tokens, config)}
    runs = {"reload": reload,
            "suffix_prefill": lambda: generator.prefill(tail, config, start=prefix), **ways}
    for size, paged in pages.items():
        for copy in request.paged_copies:  # one host copy and staging, reloaded each way
            stem = paged_name(size, copy)
            paged_reload, paged_serial, paged_layerwise = reload_ways(
                generator, paged.using(copy), tail, prefix, config, request.lookahead)
            ways.update({f"{stem}_serial": paged_serial, f"{stem}_layerwise": paged_layerwise})
            runs.update({f"{stem}_reload": paged_reload, f"{stem}_serial": paged_serial,
                         f"{stem}_layerwise": paged_layerwise})

    # ---- untimed check: each way from a zeroed cache, then greedy decode
    checked = {way: greedy_tokens(generator, first, config, request.new_tokens)
               for way, first in ways.items()}
    outputs = {way: tokens for way, (tokens, _) in checked.items()}
    found = {way: divergence(*checked["recompute"], *checked[way]) for way in checked}
    differ = [way for way in checked if found[way] is not None]
    notes = [f"prefix {prefix}, suffix {suffix}: greedy tokens of {way} differ from "
             f"recompute's, {describe(found[way])}" for way in differ]

    # ---- timed
    timer = timer_for(device)
    raw, stats, warmup_ms = {}, {}, {}
    with torch.no_grad():
        generator.prepare(batch, prefix + suffix, request.new_tokens)
        host.reload(model)  # suffix_prefill alone expects the prefix in the cache
        for name in runs:
            raw[name], warmup_ms[name] = timer(runs[name], request.repeats, request.warmup)
            stats[name] = Stats.of(raw[name])
            notes += stats[name].warnings(f"prefix {prefix}, suffix {suffix}, {name}")
    median = {name: stats[name].median for name in runs}
    bound = max(median["reload"], median["suffix_prefill"])
    case = {"prefix_len": prefix, "suffix_len": suffix,
            "cache_len": model.max_seq_len, "reload_bytes": host.nbytes,
            "reload_gbps": host.nbytes / median["reload"] / 1e6 if median["reload"] else None,
            "ttft_ms": {way: median[way] for way in WAYS},
            "reload_ms": median["reload"], "suffix_prefill_ms": median["suffix_prefill"],
            "layerwise_over_bound": median["layerwise"] / bound if bound else None,
            "fastest": min(WAYS, key=lambda way: median[way]),
            "stats": {name: stats[name].to_dict() for name in TIMED},
            "warmup_ms": warmup_ms, "same_tokens": not set(differ) & set(WAYS),
            "divergence": {way: found[way] for way in differ},
            "output_token_ids": outputs["recompute"]}
    if pages:
        case["paged"] = [paged_entry(size, copy, paged.using(copy), median, stats, not {
            f"{paged_name(size, copy)}_{way}" for way in ("serial", "layerwise")} & set(differ))
            for size, paged in pages.items() for copy in request.paged_copies]
    return case, raw, notes


def paged_entry(size: int, copy: str, paged: Any, median: dict[str, float],
                stats: dict[str, Stats], same: bool) -> dict[str, Any]:
    """One block size and copy way's figures in a case: the paged reload alone, (a) and (b)
    from it. `copy`: "dma" or "mapped" (absent from older Results: dma, the only way then)."""
    names = {part: f"{paged_name(size, copy)}_{part}" for part in ("reload", "serial",
                                                                    "layerwise")}
    reload = median[names["reload"]]
    bound = max(reload, median["suffix_prefill"])
    return {"block_size": size, "copy": copy, "copies": paged.copies,
            "reload_bytes": paged.nbytes,
            "reload_ms": reload, "reload_gbps": paged.nbytes / reload / 1e6 if reload else None,
            "ttft_ms": {way: median[names[way]] for way in ("serial", "layerwise")},
            "layerwise_over_bound": median[names["layerwise"]] / bound if bound else None,
            "same_tokens": same,
            "stats": {part: stats[name].to_dict() for part, name in names.items()}}
