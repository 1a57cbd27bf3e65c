"""`infermeter generate --dry-run`: what each tensor-parallel rank would hold, allocating nothing.

Pure Python (kvsize's arithmetic): it runs on a laptop for a machine it has never seen, e.g.
Llama-2-70B at tp 4 and 8 on 80 GB and 141 GB cards. Every rank of a tensor-parallel run holds the
same amounts (parallel.py splits every matrix evenly and replicates KV heads when tp > KV heads):
  weights  = sizes.weight_bytes_per_rank(spec, dtype, tp)
  KV cache = sizes.kv_cache_bytes(spec, batch, cache length, kv dtype, tp)  (what the engine
             allocates, byte for byte)
  prefill  = the largest prefill activations: the logits [B, T, V] in the model dtype and in
             float32, whole on every rank (parallel.py all-gathers them), and the FFN's three
             [B, T, ffn/tp] tensors
  all-reduce buffer = the Triton all-reduce's symmetric memory (specs/peer_buffers.py: 2 x
             layers x tp x 256 KiB + flags, 40 MiB for 13B at tp 2), at tp >= 2 with
             --tp-all-reduce auto (what it picks on one host's GPUs) or triton*; 0 otherwise
  headroom = GPU memory - all of the above: what is left for the CUDA context, NCCL's buffers,
             compiled graphs and allocator slack (a few GiB).
The cache length is --max-seq-len, else what the Generator would pick: prompt + new tokens
rounded up to 256 (text prompts are not tokenized here: their length counts as 0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from infermeter.specs import sizes
from infermeter.specs.model import ModelSpec
from infermeter.specs.peer_buffers import model_buffer_bytes, uses_peer_buffer
from infermeter.textable import render_table
from infermeter.units import canonical_dtype, dtype_bytes, format_bytes


@dataclass(frozen=True)
class RankPlan:
    model: str
    tp: int
    query_heads_per_rank: int
    kv_heads_per_rank: int
    batch_size: int
    prompt_len: int
    cache_len: int
    dtype: str
    kv_dtype: str
    weight_bytes_per_rank: int
    kv_cache_bytes_per_rank: int
    prefill_activation_bytes_per_rank: int
    all_reduce_buffer_bytes_per_rank: int
    gpu_memory_bytes: int | None
    headroom_bytes: int | None  # negative: does not fit

    def to_dict(self) -> dict[str, object]:
        return {"kind": "plan", **asdict(self)}


def rank_plan(spec: ModelSpec, tp: int, batch_size: int, prompt_len: int, cache_len: int,
              dtype: str, kv_dtype: str, gpu_memory: int | None,
              all_reduce: str = "auto") -> RankPlan:
    dtype, kv_dtype = canonical_dtype(dtype), canonical_dtype(kv_dtype)
    weights = sizes.weight_bytes_per_rank(spec, dtype, tp)
    cache = sizes.kv_cache_bytes(spec, batch_size, cache_len, kv_dtype, tp)
    tokens = batch_size * prompt_len
    prefill = (tokens * spec.vocab_size * (dtype_bytes(dtype) + 4)
               + 3 * tokens * (spec.ffn_dim // tp) * dtype_bytes(dtype))
    peer = model_buffer_bytes(spec.n_layers, tp) if uses_peer_buffer(tp, all_reduce) else 0
    headroom = None if gpu_memory is None else gpu_memory - weights - cache - prefill - peer
    return RankPlan(spec.name, tp, spec.n_heads // tp, sizes.kv_heads_per_rank(spec, tp),
                    batch_size, prompt_len, cache_len, dtype, kv_dtype, weights, cache, prefill,
                    peer, gpu_memory, headroom)


def render_rank_plan(plan: RankPlan) -> str:
    def size(n: int | None) -> str:
        return "-" if n is None else f"{n:,} ({format_bytes(n)})"

    if plan.headroom_bytes is None:
        verdict = "give --gpu-memory (e.g. 80GiB) to see the headroom"
    elif plan.headroom_bytes < 0:
        verdict = f"does NOT fit: {format_bytes(-plan.headroom_bytes)} short on every rank"
    else:
        verdict = "fits (the CUDA context and NCCL's buffers come out of the headroom)"
    rows = [["query heads / KV heads", f"{plan.query_heads_per_rank} / {plan.kv_heads_per_rank}"],
            ["weights", size(plan.weight_bytes_per_rank)],
            [f"KV cache ({plan.batch_size} x {plan.cache_len} tokens, {plan.kv_dtype})",
             size(plan.kv_cache_bytes_per_rank)],
            [f"prefill activations ({plan.batch_size} x {plan.prompt_len} tokens)",
             size(plan.prefill_activation_bytes_per_rank)],
            ["all-reduce buffer (Triton kernels' symmetric memory)",
             size(plan.all_reduce_buffer_bytes_per_rank)],
            ["GPU memory", size(plan.gpu_memory_bytes)],
            ["headroom", size(plan.headroom_bytes)]]
    title = (f"{plan.model}, {plan.dtype} weights, tp {plan.tp}: each of the {plan.tp} ranks "
             "holds (nothing allocated)")
    return f"{title}\n{render_table(['per rank', 'bytes'], rows)}\n{verdict}"
