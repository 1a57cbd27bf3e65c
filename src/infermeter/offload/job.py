"""`infermeter offload`: TTFT of a request whose prefix KV cache sits in host memory, reloaded
(serial or layer by layer under the suffix's forward) against recomputed, and the break-even.

Per case (prefix P, suffix S, batch B), on one model and the engine's own cache:
- the prefix's KV is made once by a prefill of P tokens and copied to host (HostPrefix: pinned
  on a GPU, a second CPU buffer on the CPU), and with --block-size once more per block size in
  fixed-size blocks scattered through a pool (paged.py), reloaded block by block;
- untimed check: each way runs once from a zeroed cache and generates `new_tokens` greedy
  tokens; the three must agree (recorded; a disagreement is a warning, not an error: fp16 ties
  can flip an argmax);
- timed, warm-up apart (CUDA events on a GPU, the host clock on the CPU): reload alone, suffix
  prefill alone (the cache already holding the prefix), (a) serial reload + suffix prefill,
  (b) layer-wise reload overlapped with the suffix prefill, (c) a prefill of P + S tokens with
  the Generator; per block size the paged reload alone, (a) and (b) from it. TTFT ends when
  the first token is sampled. One case is case.py's measure_case.
- every prefill runs the same way: the Generator's per-layer compiled forward on a GPU
  (compile_prefill, the layers still called from Python, so (b) waits between them), eager on
  the CPU; the Result's config.prefill says which.
Everything the user can get wrong (lengths, memory) is checked before the weights are loaded
(fit.py).
"""

from __future__ import annotations

from typing import Any

from infermeter.engine.devices import torch_device
from infermeter.measure.result import Result
from infermeter.measure.timing import Stats
from infermeter.offload.breakeven import break_even
from infermeter.offload.case import measure_case, prefill_kind
from infermeter.offload.fit import (
    cache_len_for,
    check_sizes_fit,
    on_device_refusal,
    traffic_len_for,
)
from infermeter.offload.reload import STAGE_SLOTS
from infermeter.offload.request import OffloadRequest

TRACED_STEPS = 4  # --trace: the offloaded decode's steps profiled, after the timed windows


def run_offload(request: OffloadRequest, env: dict[str, Any]) -> Result:
    """Check, load, measure every (suffix, prefix) case; one `offload` Result."""
    from infermeter.engine.checkpoint.load import load_weights, spec_for
    from infermeter.engine.dtypes import run_dtypes
    from infermeter.specs.model import check_engine_arch

    device = torch_device(request.device)
    dtype, kv_dtype = run_dtypes(device, request.dtype, request.kv_dtype)
    spec = spec_for(request.source)[0]
    check_engine_arch(spec)
    for suffix in request.suffix_lens:
        for prefix in request.prefix_lens:
            cache_len_for(spec, request, prefix, suffix)
    if request.traffic or request.offloaded_decode:
        traffic_len_for(spec, request)
    check_sizes_fit(spec, request, device, dtype, kv_dtype)
    refusal = on_device_refusal(spec, request, device, dtype, kv_dtype) \
        if request.offloaded_decode else None
    methods, warnings = traffic_methods_for(request, device)
    check_paged_copies(request, device)
    model = load_weights(request.source, device, dtype, seed=request.seed)
    generator = offload_generator(model, request, device, kv_dtype)
    cases, samples = [], {}
    for suffix in request.suffix_lens:
        for prefix in request.prefix_lens:
            case, raw, notes = measure_case(generator, request, prefix, suffix)
            cases.append(case)
            samples[f"prefix{prefix}_suffix{suffix}"] = raw
            warnings += notes
    traffic = []
    if request.traffic:
        traffic, samples["traffic"], notes = measure_traffic(generator, request, methods)
        warnings += notes
    if request.offloaded_decode:
        streamed, samples["offloaded_decode"], notes = measure_offloaded_decode(
            generator, request, refusal)
        warnings += notes
    if device.type == "cpu":
        warnings.append("on the CPU every copy is synchronous: the layer-wise reload runs the "
                        "same schedule as on a GPU but cannot overlap")
    decodes = bool(request.traffic) or request.offloaded_decode
    config = {"source": request.source, "device": str(device), "dtype": dtype,
              "kv_dtype": kv_dtype, "batch_size": request.batch_size,
              "prefix_lens": list(request.prefix_lens), "suffix_lens": list(request.suffix_lens),
              "new_tokens": request.new_tokens, "prefill_chunk": request.prefill_chunk,
              "max_seq_len": request.max_seq_len, "lookahead": request.lookahead,
              "block_sizes": list(request.block_sizes),
              "repeats": request.repeats, "warmup": request.warmup, "seed": request.seed,
              "host_memory": "pinned" if device.type == "cuda" else "cpu",
              # the staging slots a staged layer comes back through, placed on the compute
              # stream (reload.py); absent from older Results: one buffer, on the copy stream
              "staging_slots": STAGE_SLOTS,
              # how a paged reload issues its block DMAs (paged.py); older: one Python call each
              "paged_copy_issue": "one call a layer",
              # the ways a paged reload copied, each entry's `copy`; older Results: dma only
              "paged_copies": list(request.paged_copies) if request.block_sizes else [],
              "prefill": prefill_kind(generator),
              "timer": "cuda events" if device.type == "cuda" else "host clock",
              "weights": "random" if request.source.startswith("random:") else "checkpoint",
              "traffic": list(request.traffic), "traffic_methods": list(methods),
              "offloaded_decode": request.offloaded_decode,
              "context": request.traffic_context if decodes else None,
              "decode_steps": request.decode_steps if decodes else None}
    metrics = {"cases": cases, "break_even": break_evens(cases, request.suffix_lens),
               "same_tokens": all(case["same_tokens"] and all(
                   paged["same_tokens"] for paged in case.get("paged", ())) for case in cases)}
    if request.block_sizes:
        metrics["paged_break_even"] = paged_break_evens(cases, request.suffix_lens,
                                                        request.block_sizes,
                                                        request.paged_copies)
    if request.traffic:
        metrics["traffic"] = traffic
    if request.offloaded_decode:
        metrics["offloaded_decode"] = streamed
    return Result("offload", spec.to_dict(), config, env, metrics, samples, warnings)


def offload_generator(model: Any, request: OffloadRequest, device: Any, kv_dtype: str) -> Any:
    """The job's Generator: every prefill through the per-layer compiled forward on a GPU
    (case.py's prefill_kind), never bucketed; fit.replays_offload_prefill assumes these inputs."""
    from infermeter.engine.generator import Generator

    return Generator(model, max_seq_len=request.max_seq_len, kv_dtype=kv_dtype,
                     prefill_chunk=request.prefill_chunk,
                     compile_prefill=device.type == "cuda", bucketed_prefill=False)


def break_evens(cases: list[dict[str, Any]], suffix_lens: tuple[int, ...]) -> list[dict]:
    """Per suffix length and reload way: the prefix length from which it beats recompute."""
    out = []
    for suffix in suffix_lens:
        rows = [c for c in cases if c["suffix_len"] == suffix]
        for way in ("serial", "layerwise"):
            found = break_even([(c["prefix_len"], c["ttft_ms"][way], c["ttft_ms"]["recompute"])
                                for c in rows])
            out.append({"suffix_len": suffix, "way": way, **found.to_dict()})
    return out


def paged_break_evens(cases: list[dict[str, Any]], suffix_lens: tuple[int, ...],
                      block_sizes: tuple[int, ...], copies: tuple[str, ...] = ("dma",)
                      ) -> list[dict]:
    """Per suffix length, block size, copy way (an entry without `copy`: dma) and reload way:
    the prefix length from which reloading the paged host copy beats recompute."""
    out = []
    for suffix in suffix_lens:
        rows = [c for c in cases if c["suffix_len"] == suffix]
        for size in block_sizes:
            for copy in copies:
                paged = [(c, next(e for e in c["paged"] if e["block_size"] == size
                                  and e.get("copy", "dma") == copy)) for c in rows]
                for way in ("serial", "layerwise"):
                    found = break_even([(c["prefix_len"], e["ttft_ms"][way],
                                         c["ttft_ms"]["recompute"]) for c, e in paged])
                    out.append({"suffix_len": suffix, "block_size": size, "copy": copy,
                                "way": way, **found.to_dict()})
    return out


def check_paged_copies(request: OffloadRequest, device: Any) -> None:
    """--paged-copy mapped on a GPU without mapped pinned memory: one error line, before the
    weights load (traffic.mapped_refusal's probe). On the CPU it runs: host memory is the CPU's
    own mapping, so the gathers read the pools themselves (paged.device_mapping)."""
    from infermeter.errors import InfermeterError
    from infermeter.offload.traffic import mapped_refusal

    if "mapped" not in request.paged_copies or device.type == "cpu":
        return
    why = mapped_refusal(device)
    if why:
        raise InfermeterError(f"--paged-copy mapped: {why}; use --paged-copy dma")


def traffic_methods_for(request: OffloadRequest, device: Any) -> tuple[tuple[str, ...],
                                                                       list[str]]:
    """The --traffic copies' methods, and a warning for a default one left out (the mapped SM
    kernel without a GPU or a mapping); an explicit one that cannot run is one error line,
    before the weights load. Default: dma and mapped on a GPU, dma on the CPU."""
    from infermeter.errors import InfermeterError
    from infermeter.offload.traffic import mapped_refusal

    if not request.traffic:
        return (), []
    asked = request.traffic_methods
    why = mapped_refusal(device) if "mapped" in (asked or ("mapped",)) else None
    if asked and why:
        raise InfermeterError(f"--traffic-method mapped: {why}; use --traffic-method dma")
    if asked:
        return asked, []
    if why:
        return ("dma",), [f"decode under copy traffic: the mapped method (SM copy kernel) was "
                          f"not measured: {why}"]
    return ("dma", "mapped"), []


def measure_traffic(generator: Any, request: OffloadRequest, methods: tuple[str, ...] = ("dma",)
                    ) -> tuple[list[dict[str, Any]], dict[str, list[float]], list[str]]:
    """Decode TPOT of a batch at `context` tokens alone and under each --traffic direction, by
    each method (compiled decode on a GPU, eager on the CPU, as `generate` runs by default)."""
    import torch

    from infermeter.engine.generator import GenerationConfig
    from infermeter.offload.traffic import CopyTraffic, decode_under_traffic

    model, device = generator.model, generator.device
    context, steps = request.traffic_context, request.decode_steps
    config = GenerationConfig(max_new_tokens=steps + 1, greedy=True, seed=request.seed,
                              compile=device.type == "cuda")
    generator.prepare(request.batch_size, context, steps + 1)
    rng = torch.Generator().manual_seed(request.seed + 104729)
    tokens = torch.randint(model.spec.vocab_size, (request.batch_size, context), generator=rng)
    with torch.no_grad():
        state = generator.prefill(tokens.to(device), config)
        entries, samples, notes = decode_under_traffic(
            generator, state, config, steps, request.traffic, request.repeats, request.warmup,
            CopyTraffic(device, mapped="mapped" in methods), methods)
    for entry in entries:
        entry.update(context=context, batch_size=request.batch_size)
        if not entry["same_tokens"]:
            notes.append(f"decode under {entry['direction']} copies ({entry['method']}): tokens "
                         "differ from the decode alone")
    return entries, samples, notes


def measure_offloaded_decode(generator: Any, request: OffloadRequest,
                             refusal: str | None = None
                             ) -> tuple[dict[str, Any], dict[str, list[float]], list[str]]:
    """Decode with the prompt's KV cache in host memory, streamed in layer by layer every step
    (streamed.py) from a device cache of two layer buffers that the prompt's prefill wrote back
    through (streamed_prefill.py), against the link's bound: batch x h2d GB/s (measured alone,
    same run) / bytes streamed a step; and against the same eager decode with the whole cache on
    the device, unless `refusal` says why that does not fit (then a warning, and no figure)."""
    import torch

    from infermeter.engine.dtypes import torch_dtype
    from infermeter.engine.generator import GenerationConfig
    from infermeter.measure.timing import timer_for
    from infermeter.measure.trace import profile_to, trace_path
    from infermeter.offload.streamed import StreamedDecode
    from infermeter.offload.streamed_prefill import StreamedPrefill, layer_buffers
    from infermeter.offload.traffic import CopyTraffic, copy_alone_gbps
    from infermeter.offload.windows import DecodeWindows

    model, device = generator.model, generator.device
    context, steps = request.traffic_context, request.decode_steps
    # eager both ways: the streaming hooks wait on events between layers, which a compiled,
    # CUDA-graph-replayed step could not do
    config = GenerationConfig(max_new_tokens=steps + 1, greedy=True, seed=request.seed)
    rng = torch.Generator().manual_seed(request.seed + 1299709)
    tokens = torch.randint(model.spec.vocab_size, (request.batch_size, context),
                           generator=rng).to(device)
    samples: dict[str, list[float]] = {}
    reference = None
    with torch.no_grad():
        if refusal is None:
            generator.prepare(request.batch_size, context, steps + 1)
            state = generator.prefill(tokens, config)
            windows = DecodeWindows(generator, state, config, steps)
            for _ in range(request.warmup):
                windows.run()
            samples["on_device"] = [windows.run() / steps for _ in range(request.repeats)]
            reference = windows.outputs[-1]
        # Generator.prepare's cache dtype
        cache_dtype = model.tok_embeddings.weight.dtype if generator.kv_dtype is None \
            else torch_dtype(generator.kv_dtype)
        model.drop_cache()  # the whole cache goes before the buffers come
        try:
            layer_buffers(model, request.batch_size, context, steps + 1, generator.max_seq_len,
                          cache_dtype, device)
            with StreamedPrefill(model, context) as prefill:
                state = generator.prefill(tokens, config)
            windows = DecodeWindows(generator, state, config, steps)
            # made now: a window starts where the state is when it is made, and the timed
            # windows leave it steps on (the cache holds steps + 1 past the context, no more)
            traced = DecodeWindows(generator, state, config, min(TRACED_STEPS, steps))
            with StreamedDecode(model, prefill.host) as streamed:
                for _ in range(request.warmup):
                    windows.run(streamed.step_at)
                samples["streamed"] = [windows.run(streamed.step_at) / steps
                                       for _ in range(request.repeats)]
                per_step = streamed.bytes_per_step
                samples["copies_alone"] = timer_for(device)(
                    streamed.copies_alone, request.repeats, max(request.warmup, 1))[0]
                if request.trace:  # a short window from the timed ones' start, after them
                    with profile_to(trace_path(request.trace), {"offloaded_decode": True}):
                        traced.run(streamed.step_at)
        finally:
            model.drop_cache()
        streamed_out = windows.outputs
        same = None if reference is None else all(out == reference for out in streamed_out)
        link = copy_alone_gbps(CopyTraffic(device), "h2d")
    stats = {name: Stats.of(values) for name, values in samples.items()}
    tpot = stats["streamed"].median
    copies = stats["copies_alone"].median
    on_device = stats["on_device"].median if "on_device" in stats else None
    bound = request.batch_size * link * 1e9 / per_step if per_step else None
    tok_per_s = request.batch_size * 1e3 / tpot
    notes = [*stats["streamed"].warnings("offloaded decode")]
    if refusal is None:
        notes += stats["on_device"].warnings("decode on the device")
    else:
        notes.append(f"offloaded decode: no decode with the KV cache on the device to compare "
                     f"with, it does not fit: {refusal}")
    if same is False:
        notes.append("offloaded decode: tokens differ from the decode with the cache on the "
                     "device")
    metrics = {"context": context, "batch_size": request.batch_size, "decode_steps": steps,
               "tpot_ms": tpot, "tpot_stats": stats["streamed"].to_dict(),
               "tok_per_s": tok_per_s, "on_device_tpot_ms": on_device,
               "on_device_tok_per_s": None if on_device is None
               else request.batch_size * 1e3 / on_device,
               "bytes_per_step": per_step, "link_gbps": link, "bound_tok_per_s": bound,
               "pct_of_bound": 100 * tok_per_s / bound if bound else None,
               # a step's copies with no forward, same pieces and buffers: what the layout
               # and host memory cost against the link (copies_gbps), and what the overlap with
               # the forward costs against them (pct_of_copies)
               "copies_alone_ms": copies, "copies_alone_stats": stats["copies_alone"].to_dict(),
               "copies_gbps": per_step / copies / 1e6 if copies else None,
               "pct_of_copies": 100 * copies / tpot if tpot else None,
               "trace": str(trace_path(request.trace)) if request.trace else None,
               "same_tokens": same}
    return metrics, samples, notes
