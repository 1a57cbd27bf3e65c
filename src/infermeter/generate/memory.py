"""Memory of a generation run: will a case fit (asked before anything is allocated), what it
used (torch peaks and NVML's per-process figure), and what running out of memory looks like.

The fit check adds what is certain to be allocated: the weights (sizes.weight_bytes_per_rank),
the KV cache of the case (sizes.kv_cache_bytes at its cache length) and the prefill's largest
activations (the logits of one row a sequence, of every prompt position in the hf mode, in the
model dtype and in float32, and the FFN's three [B, T, ffn] tensors), every prompt as an int64
tensor, and, in host memory, the prompt and output ids the run keeps in Python lists (8 bytes an
id at least), and for an MoE model decoding B x k <= E routed pairs a step through the torch
kernel, the experts' weights the gathered way copies out (one layer's; --moe-kernel triton reads
them in the stacked weights by id, no copy), and with the Triton experts past E / k pairs, one
layer's grouped intermediates ([pairs, moe_ffn] and [pairs, dim]), and the two [B, T, dim]
buffers of an exact prefill that replays its layers (by the Generator's own rule,
engine/layer_replays.replays_prefill_layers: with --compile-prefill, on a GPU, one rank, a model
whose prefill has no host sync).
It reads sizes only, so a huge batch is refused before its prompts exist (cases.Rows). The hf
mode adds its copies of wq and wk (HF orders their rows for rotate_half RoPE, so they cannot
share our tensors) and of an MoE layer's gate and up experts (one tensor in transformers 5); its
static cache replaces ours, which is released first. Free memory is
torch.cuda.mem_get_info on a GPU and MemAvailable on the host.
Anything else (CUDA-graph pools, allocator slack, attention workspaces) is not estimated: a case
that still runs out of memory is caught and recorded as such (is_oom).
"""

from __future__ import annotations

import gc
import os
from typing import Any

from infermeter.engine.chunk_attention import CHUNK_ATTENTION, chunk_attention_for, flex_runs
from infermeter.engine.kernels.triton_support import triton_runs_on_device
from infermeter.engine.layer_replays import replays_prefill_layers
from infermeter.engine.prefill_buckets import prefill_chunk_for, prefill_forwards
from infermeter.measure.env import host_available
from infermeter.measure.fit import check_fit, free_memory
from infermeter.specs import sizes
from infermeter.specs.expert_memory import expert_parts, takes_triton
from infermeter.specs.model import ModelSpec
from infermeter.specs.peer_buffers import model_buffer_bytes, uses_peer_buffer
from infermeter.units import dtype_bytes

ADVICE = "use a smaller --batch-size, --prompt-len, --context or --max-seq-len"


def hf_extra_bytes(spec: ModelSpec, dtype: str) -> int:
    """The permuted wq and wk (weights and biases) the hf mode holds beside the engine's, and an
    MoE layer's experts' w1 and w3 concatenated into transformers 5's gate_up_proj."""
    rows = (spec.n_heads + spec.n_kv_heads) * spec.head_dim
    per_layer = rows * (spec.dim + (1 if spec.qkv_bias else 0))
    moe_layers = sum(spec.is_moe_layer(i) for i in range(spec.n_layers))
    gate_up = moe_layers * spec.n_experts * 2 * spec.moe_ffn_dim * spec.dim
    return (spec.n_layers * per_layer + gate_up) * dtype_bytes(dtype)


def capped_score_elements(spec: ModelSpec, prompt_len: int, cache_len: int, mode: str,
                          prefill_chunk: int | None = None, prefill: str = "exact",
                          flex_chunks: bool = False) -> int:
    """The largest T x keys of a capped model's prefill forwards (per sequence and head), as
    self_attention.py's Attention attends: a full layer over the cache's first start + T slots
    where the forward's start is known (every eager forward; a compiled one only from position
    0: a later compiled chunk, or a one-token forward, reads the whole cache), a ring layer
    (window W shorter than the cache) over its W slots and the T new tokens. prefill: the one
    that runs (case_memory's "exact" for an MoE model whose experts cannot bucket it).
    flex_chunks: a later compiled chunk takes flex over full layers (chunk_attention.py), which
    holds no scores."""
    if mode == "compiled" and prefill == "bucketed":
        forwards = prefill_forwards(prompt_len, prefill_chunk, cache_len)
    else:
        step = min(prefill_chunk or prompt_len, prompt_len)
        forwards = [(n, n) for n in (min(step, prompt_len - offset)
                                     for offset in range(0, prompt_len, step))]
    windows = [w for i in range(spec.n_layers)
               if (w := spec.layer_window(i)) is not None and w < cache_len]
    full = len(windows) < spec.n_layers
    most, start = 0, 0
    for real, length in forwards:
        cut = (mode == "eager" or start == 0) and length > 1 and start + length <= cache_len
        # a sink model's full layers attend on flex where the start is known, and any capped
        # or sink model's later compiled chunks with flex_chunks (no scores held)
        on_flex = (spec.attn_sinks and cut) or (flex_chunks and mode == "compiled" and start > 0)
        keys = ([start + length if cut else cache_len] if full and not on_flex else []) + \
            ([max(windows) + length] if windows else [])
        most = max(most, length * max(keys, default=0))
        start += real
    return most


def case_memory(spec: ModelSpec, batch_size: int, prompt_len: int, cache_len: int, dtype: str,
                kv_dtype: str, mode: str, tp: int = 1, all_reduce: str = "nccl",
                prefill_chunk: int | None = None, prefill: str = "exact",
                moe_kernel: str = "auto", flex_chunks: bool = False,
                compile_prefill: bool = False, on_gpu: bool = True) -> dict[str, int]:
    """What a case needs, by part (bytes, per rank under tensor parallelism; all_reduce: the
    --tp-all-reduce kind, whose Triton kernels hold a symmetric-memory buffer; prefill_chunk:
    the longest prefill forward, which bounds the prefill's activations; prefill: the compiled
    mode's, whose "bucketed" forwards are padded to their buckets; moe_kernel: the experts'
    kind that will run, moe.MOE_KERNELS (the engine's default "auto"): torch's gathered path
    copies the experts out (specs/expert_memory.expert_parts);
    flex_chunks: later compiled chunks attend through flex, capped_score_elements;
    compile_prefill, on_gpu: --compile-prefill and a CUDA device, which with the rest decide
    whether the exact prefill keeps its layer replays' buffers, by the Generator's rule)."""
    # an MoE model's prefill is bucketed only through the grouped Triton kernels (no host sync;
    # the torch grouped path's loop over experts asks the host)
    grouped_kernels = takes_triton(moe_kernel)
    bucketed = mode == "compiled" and prefill == "bucketed" and \
        (not spec.is_moe or grouped_kernels)
    # each prefill forward's length: its bucket where bucketed, else its real tokens
    chunks = prefill_forwards(prompt_len, prefill_chunk, cache_len)
    forwards = [n for _, n in chunks] if bucketed else [real for real, _ in chunks]
    forward = max(forwards)
    parts = {"weights": sizes.weight_bytes_per_rank(spec, dtype, tp),
             "KV cache": sizes.kv_cache_bytes(spec, batch_size, cache_len, kv_dtype, tp),
             "prefill activations": sizes.prefill_activation_bytes(
                 spec, batch_size, forward, dtype, every_row=mode.startswith("hf")) // tp}
    if replays_prefill_layers(compiled=mode == "compiled", bucketed=bucketed,
                              compile_prefill=compile_prefill, forward_len=forward,
                              on_gpu=on_gpu, one_rank=tp == 1,
                              without_sync=not spec.is_moe or grouped_kernels):
        parts["prefill layer buffers"] = sizes.layer_replay_bytes(spec, batch_size, forward,
                                                                  dtype)
    if spec.sdpa_cannot_attend and not mode.startswith("hf"):
        # SDPA cannot soft-cap (Gemma 2) nor take sinks (gpt-oss): a layer's prefill holds its
        # float32 scores [B, heads, T, keys] and their softmax (engine/attention.py); gpt-oss's
        # only where flex does not take its full layers (capped_score_elements)
        heads = -(-spec.n_heads // tp)
        scores = capped_score_elements(spec, prompt_len, cache_len, mode, prefill_chunk,
                                       "bucketed" if bucketed else "exact", flex_chunks)
        what = "capped" if spec.attn_logit_softcap is not None else "sink"
        parts[f"{what} attention scores"] = 2 * batch_size * heads * scores * 4
    if mode.startswith("hf"):
        parts["hf weight copies"] = hf_extra_bytes(spec, dtype) // tp
    if spec.is_moe:
        parts.update(expert_parts(spec, batch_size, forwards, dtype, moe_kernel, tp,
                                  hf=mode.startswith("hf")))
    if uses_peer_buffer(tp, all_reduce):
        parts["all-reduce buffer"] = model_buffer_bytes(spec.n_layers, tp)
    return parts


# ---- what a run used -------------------------------------------------------------------------
def reset_peaks(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def process_gpu_memory(device: Any) -> int | None:
    """This process's memory on the GPU as NVML sees it (CUDA context included), or None when
    NVML is missing or does not list our pid (a container's own pid namespace)."""
    from infermeter.measure.link import torch_bus_id
    from infermeter.measure.nvml import device_handle, opened_nvml

    with opened_nvml() as pynvml:
        if pynvml is None:
            return None
        try:
            handle = device_handle(pynvml, torch_bus_id(device.index or 0), device.index or 0)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                    return int(proc.usedGpuMemory)
            return None
        except pynvml.NVMLError:
            return None


def memory_metrics(device: Any) -> dict[str, int | None]:
    """Peaks since reset_peaks (torch allocator), NVML's process figure, device-wide use."""
    out: dict[str, int | None] = {"peak_allocated_bytes": None, "peak_reserved_bytes": None,
                                  "process_gpu_memory_bytes": None, "gpu_memory_used_bytes": None}
    if device.type != "cuda":
        return out
    import torch

    free, total = torch.cuda.mem_get_info(device)
    out.update(peak_allocated_bytes=int(torch.cuda.max_memory_allocated(device)),
               peak_reserved_bytes=int(torch.cuda.max_memory_reserved(device)),
               process_gpu_memory_bytes=process_gpu_memory(device),
               gpu_memory_used_bytes=int(total - free))
    return out


# ---- running out -----------------------------------------------------------------------------
def is_oom(err: BaseException) -> bool:
    """torch's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    import torch

    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


def collect(device: Any, compiled: bool = True) -> None:
    """Give a finished case's memory back (also after an out-of-memory error): its compiled
    graphs (dynamo's caches hold them and their CUDA-graph pools), its runner, its cache.
    compiled=False: nothing went through dynamo, whose import alone costs about a second."""
    import torch

    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# A Python list holds a pointer (8 bytes) per id, the id's int object besides (ids above 256):
# 8 bytes a token is the least the prompts and the kept outputs take in host memory.
HOST_BYTES_PER_ID = 8


def check_cases_fit(spec: ModelSpec, cases: list[Any], dtype: str, kv_dtype: str, device: Any,
                    tp: int = 1, all_reduce: str = "nccl", outputs_per_row: int = 0,
                    prefill_chunk: int | None = None, prefill: str = "exact",
                    moe_kernel: str = "auto", chunk_attention: str = CHUNK_ATTENTION,
                    compile_backend: str = "inductor", compile_prefill: bool = False) -> None:
    """Before any allocation, from the cases' sizes alone (no prompt is made here): every case's
    weights + cache + activations (+ the Triton all-reduce's buffer) + its prompts as int64
    tensors against free device memory, and its token ids in host lists (the prompts and
    outputs_per_row = repeats x new tokens ids a row) against host memory (on the CPU, one sum
    against the one memory). moe_kernel: --moe-kernel; "triton" and "auto" run only where
    Triton does
    (moe.takes_expert_kernel), elsewhere the torch path and its copy run. prefill_chunk:
    --prefill-chunk as given; a case runs prefill_chunk_for its mode (compiled: a default).
    chunk_attention, compile_backend: what the Generator resolves later chunks' attention from
    (chunk_attention.chunk_attention_for). compile_prefill: --compile-prefill (with the device,
    whether the exact prefill replays its layers, case_memory)."""
    if takes_triton(moe_kernel) and not triton_runs_on_device(device):
        moe_kernel = "torch"
    flex_chunks = chunk_attention_for(
        chunk_attention, flex_runs(device, compile_backend, prefill == "bucketed")) == "flex"
    free, where = free_memory(device)
    host_free = host_available() if device.type != "cpu" else None
    for case in cases:
        p = case.prompt_set
        parts = case_memory(spec, case.largest_group, p.length_range[1], case.cache_len, dtype,
                            kv_dtype, case.mode, tp, all_reduce,
                            prefill_chunk_for(case.mode, prefill_chunk), prefill, moe_kernel,
                            flex_chunks, compile_prefill, device.type == "cuda")
        parts["prompt ids"] = p.prompt_tokens * 8  # every group's [b, T] int64, made up front
        host = {"token ids in host lists": HOST_BYTES_PER_ID * (
            p.prompt_tokens + p.batch_size * outputs_per_row)}
        what = f"{spec.name} at {case.label} with a {case.cache_len}-token cache"
        if device.type == "cpu":
            check_fit(what, {**parts, **host}, free, where, ADVICE)
        else:
            check_fit(what, parts, free, where, ADVICE)
            check_fit(what, host, host_free, "available in host memory", ADVICE)
