"""What `infermeter offload` will hold, checked from sizes alone before anything is allocated:
each case's cache length against the model's context, weights + the largest case's cache and
activations on the device and the prefixes' host copies in host memory (one sum on the CPU,
where both are one memory), and the offloaded decode's own phase (two layer buffers, never the
whole cache), with whether its on-device comparison fits at all. The compiled prefill's
layer-replay buffers count where the job's Generator replays (replays_offload_prefill)."""

from __future__ import annotations

from typing import Any

from infermeter.measure.env import host_available
from infermeter.measure.fit import check_fit, free_memory
from infermeter.offload.request import OffloadRequest
from infermeter.specs.sizes import cache_length

# host memory one tensor view takes (its Python object and TensorImpl): about 600 bytes with
# torch 2.13 on x86-64, rounded up
VIEW_BYTES = 1024


def cache_len_for(spec: Any, request: OffloadRequest, prefix: int, suffix: int) -> int:
    """The case's cache length; one error line when prefix + suffix + checked tokens do not fit
    the model's context or the fixed --max-seq-len."""
    return cache_length(spec, prefix + suffix, request.new_tokens, request.max_seq_len,
                        f"prefix {prefix} + suffix {suffix} + {request.new_tokens} checked tokens")


def traffic_len_for(spec: Any, request: OffloadRequest) -> int:
    """The cache length the decode-under-traffic windows need: context + the window's steps."""
    context, steps = request.traffic_context, request.decode_steps + 1
    return cache_length(spec, context, steps, request.max_seq_len,
                        f"decode under copy traffic: context {context} + "
                        f"{request.decode_steps} decode steps + 1")


def replays_offload_prefill(spec: Any, device: Any, forward_len: int) -> bool:
    """Whether the offload job's Generator replays a prefill's layers (forwards of forward_len
    tokens) as CUDA graphs: layer_replays.replays_prefill_layers with that Generator's inputs,
    compiled through compile_prefill on a GPU and never bucketed (job.offload_generator,
    case.prefill_kind; the --traffic decode's prompt compiles on a GPU too), one rank, and
    MoE blocks on the engine's default expert kernel, which offload never changes (MOE_KERNEL:
    "auto" and "triton" group a long forward's tokens with no host sync, so an MoE prefill
    replays as a dense one; "torch"'s grouped loop over experts asks the host, so its MoE
    prefill replays nothing)."""
    from infermeter.engine.layer_replays import replays_prefill_layers
    from infermeter.engine.moe import MOE_KERNEL
    from infermeter.specs.expert_memory import takes_triton

    on_gpu = device.type == "cuda"
    return replays_prefill_layers(compiled=on_gpu, bucketed=False, compile_prefill=on_gpu,
                                  forward_len=forward_len, on_gpu=on_gpu, one_rank=True,
                                  without_sync=not spec.is_moe or takes_triton(MOE_KERNEL))


def prefill_replay_parts(spec: Any, request: OffloadRequest, device: Any,
                         dtype: str) -> dict[str, int]:
    """The two [B, T, dim] buffers the job's prefills replay their layers through
    (engine/layer_replays.py), kept while its Generator lives, so in every later phase too:
    T is the longest replayed forward, a case's (one --prefill-chunk, or prefix + suffix) or
    the --traffic decode's prompt (--context tokens, chunked alike). None where none replays."""
    from infermeter.specs.sizes import layer_replay_bytes

    longest = max(request.prefix_lens) + max(request.suffix_lens)
    prompts = [longest, request.traffic_context] if request.traffic else [longest]
    forwards = [min(request.prefill_chunk or prompt, prompt) for prompt in prompts]
    replayed = [n for n in forwards if replays_offload_prefill(spec, device, n)]
    if not replayed:
        return {}
    return {"prefill layer buffers": layer_replay_bytes(spec, request.batch_size, max(replayed),
                                                        dtype)}


def check_sizes_fit(spec: Any, request: OffloadRequest, device: Any, dtype: str,
                    kv_dtype: str) -> None:
    """Sizes only, before any allocation: weights + the largest case's cache + its activations on
    the device, the longest prefix's host copy in host memory (one sum on the CPU)."""
    from infermeter.offload.reload import STAGE_SLOTS
    from infermeter.specs.sizes import (
        kv_bytes_per_token_layer,
        kv_cache_bytes,
        prefill_activation_bytes,
        weight_bytes,
    )

    longest = max(request.prefix_lens) + max(request.suffix_lens)
    cache_len = cache_len_for(spec, request, max(request.prefix_lens), max(request.suffix_lens))
    forward = min(request.prefill_chunk or longest, longest)
    device_parts = {"weights": weight_bytes(spec, dtype),
                    "KV cache": kv_cache_bytes(spec, request.batch_size, cache_len, kv_dtype),
                    # the largest forward's MLP intermediates and one logits row a sequence
                    # (Transformer.forward's rows), as generate's fit check counts them
                    "prefill activations": prefill_activation_bytes(
                        spec, request.batch_size, forward, dtype),
                    **prefill_replay_parts(spec, request, device, dtype)}
    if spec.is_moe:  # the engine's default experts, which offload never changes
        from infermeter.engine.moe import MOE_KERNEL
        from infermeter.engine.prefill_buckets import prefill_forwards
        from infermeter.specs.expert_memory import expert_parts

        forwards = [real for real, _ in prefill_forwards(longest, request.prefill_chunk,
                                                         longest)]  # exact: real tokens
        device_parts.update(expert_parts(spec, request.batch_size, forwards, dtype, MOE_KERNEL))
    host_parts = {"prefix KV in host memory": kv_cache_bytes(
        spec, request.batch_size, max(request.prefix_lens), kv_dtype)}
    # the whole prefix's device staging slots (reload.HostPrefix): a layer's K and V each,
    # which a layer the prefix does not fill (the cache also holds the suffix) comes back through
    device_parts["reload staging"] = (STAGE_SLOTS * request.batch_size * max(request.prefix_lens)
                                      * kv_bytes_per_token_layer(spec, kv_dtype))
    for size in request.block_sizes:  # a paged copy rounds each sequence up to whole blocks
        blocks = -(-max(request.prefix_lens) // size)
        host_parts[f"paged prefix KV, blocks of {size}"] = kv_cache_bytes(
            spec, request.batch_size, blocks * size, kv_dtype)
        # its DMAs' views, made once (paged.py): a staging view and a pool block per block of
        # K and of V, every layer; at blocks of 1 over a long prefix they run to gigabytes
        if "dma" in request.paged_copies:
            host_parts[f"paged copy views, blocks of {size}"] = (
                2 * 2 * request.batch_size * blocks * spec.n_layers * VIEW_BYTES)
        # the mapped way's block ids, int64 on the device, made once per layer (paged.py); its
        # gathers read the pools in host memory through their mapping: no device copy of them
        if "mapped" in request.paged_copies:
            device_parts[f"paged block ids, blocks of {size}"] = (
                request.batch_size * blocks * spec.n_layers * 8)
        # its device staging slots (paged.py): a full-attention layer's blocks, K and V, each
        device_parts[f"paged reload staging, blocks of {size}"] = (
            STAGE_SLOTS * request.batch_size * blocks * size
            * kv_bytes_per_token_layer(spec, kv_dtype))
    if request.traffic or request.offloaded_decode:
        from infermeter.offload.traffic import CHUNK_BYTES

        chunk = CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
        if request.traffic:  # the decode under traffic holds a whole cache at the context
            traffic_cache = kv_cache_bytes(spec, request.batch_size,
                                           traffic_len_for(spec, request), kv_dtype)
            if traffic_cache > device_parts["KV cache"]:  # one cache at a time: the larger
                device_parts["KV cache"] = traffic_cache
        device_parts["copy traffic buffers"] = 2 * chunk
        host_parts["copy traffic host buffers"] = 2 * chunk
        if request.offloaded_decode:  # the prompt's KV in host memory
            host_parts["offloaded KV in host memory"] = kv_cache_bytes(
                spec, request.batch_size, request.traffic_context, kv_dtype)
    # the parts are complete: only now merged (on the CPU) into what each check sums
    if device.type == "cuda":
        checks = [(device_parts, *free_memory(device)),
                  (host_parts, host_available(), "available in host memory")]
    else:
        checks = [({**device_parts, **host_parts}, *free_memory(device))]
    what = (f"{spec.name} at batch {request.batch_size}, prefix {max(request.prefix_lens)}, "
            f"suffix {max(request.suffix_lens)}")
    levers = "--batch-size, --prefix-len or --suffix-len"
    if request.traffic or request.offloaded_decode:
        what += f", context {request.traffic_context}"
        levers = "--batch-size, --prefix-len, --suffix-len or --context"
    for parts, free, where in checks:
        check_fit(what, parts, free, where, f"use a smaller {levers}")
    if request.offloaded_decode:  # its own phase: the cases' cache is gone by then
        check_fit(f"offloaded decode of {spec.name} at batch {request.batch_size}, context "
                  f"{request.traffic_context}",
                  offloaded_fit_parts(spec, request, device, dtype, kv_dtype),
                  *free_memory(device), "use a smaller --batch-size, --context or "
                  "--prefill-chunk")


def offloaded_fit_parts(spec: Any, request: OffloadRequest, device: Any, dtype: str,
                        kv_dtype: str) -> dict[str, int]:
    """What the device holds during the offloaded decode (the weights, its streamed parts, the
    link probe's buffers); on the CPU, where host and device are one memory, the host cache
    and buffers too. Never the whole cache."""
    from infermeter.offload.traffic import CHUNK_BYTES
    from infermeter.specs.sizes import kv_cache_bytes, weight_bytes

    chunk = CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    parts = {"weights": weight_bytes(spec, dtype),
             **offloaded_decode_parts(spec, request, dtype, kv_dtype)[0],
             "copy traffic buffers": 2 * chunk,
             # the earlier prefills' layer-replay buffers, still held (its own prefill is eager)
             **prefill_replay_parts(spec, request, device, dtype)}
    if device.type != "cuda":
        parts["offloaded KV in host memory"] = kv_cache_bytes(
            spec, request.batch_size, request.traffic_context, kv_dtype)
        parts["copy traffic host buffers"] = 2 * chunk
    return parts


def offloaded_decode_parts(spec: Any, request: OffloadRequest, dtype: str, kv_dtype: str
                           ) -> tuple[dict[str, int], dict[str, int]]:
    """What the offloaded decode holds on the device, by part: streamed (streamed.py: two
    layer buffers of the whole cache length, the store of decoded tokens, the prompt's prefill
    activations) and, for the comparison, with the whole cache on the device."""
    from infermeter.specs.sizes import (
        kv_bytes_per_token_layer,
        kv_cache_bytes,
        prefill_activation_bytes,
    )

    batch, context = request.batch_size, request.traffic_context
    length = traffic_len_for(spec, request)
    forward = min(request.prefill_chunk or context, context)
    # eager prefill of `forward` tokens (the last row's logits only)
    activations = prefill_activation_bytes(spec, batch, forward, dtype)
    streamed = {"two KV layer buffers": 2 * batch * length * kv_bytes_per_token_layer(
                    spec, kv_dtype),
                "decoded-token store": kv_cache_bytes(spec, batch, length - context, kv_dtype),
                "prefill activations": activations}
    on_device = {"KV cache": kv_cache_bytes(spec, batch, length, kv_dtype),
                 "prefill activations": activations}
    return streamed, on_device


def on_device_refusal(spec: Any, request: OffloadRequest, device: Any, dtype: str,
                      kv_dtype: str) -> str | None:
    """Why the offloaded decode's comparison, the decode with the whole cache on the device,
    cannot run (its fit check's line), or None when it fits. Sizes only."""
    from infermeter.errors import InfermeterError
    from infermeter.specs.sizes import weight_bytes

    parts = {"weights": weight_bytes(spec, dtype),
             **offloaded_decode_parts(spec, request, dtype, kv_dtype)[1],
             **prefill_replay_parts(spec, request, device, dtype)}
    try:
        check_fit(f"the whole KV cache at context {request.traffic_context}", parts,
                  *free_memory(device), "only the offloaded decode is measured")
    except InfermeterError as refused:
        return str(refused)
    return None
