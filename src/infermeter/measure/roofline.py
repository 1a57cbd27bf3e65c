"""Roofline: what the hardware allows, measured on the same GPU in the same run, and how close a
generation run comes to it (MBU for decode, MFU for prefill; docs/design.md, "Metric definitions").

Arithmetic (pure Python on kvsize; no torch):
  bytes one decode step must read = weights read + KV read
    weights read: every parameter except the input-embedding table, of which a step gathers only
      B rows (with tied embeddings the output head reads the whole table anyway). MoE layers read
      the experts their B tokens route to: E x (1 - (1 - k/E)^B) distinct experts expected for k
      of E under uniform routing, which is the active set at batch 1 and tends to all experts as
      the batch grows. (Counting the whole embedding table would overstate Llama-2-7B's bytes by
      1% and Llama-3-8B's by 7%.)
    KV read: per layer and batch row, K and V of the tokens that layer attends to at that
      context, sliding-window layers at most `window`: sizes.kv_cache_bytes(spec, B, context).
      New K/V writes (one token) are left out.
  prefill FLOPs = 2 x (layer matmul params x B x T + head params x B) + attention
    matmul params: the parameters that multiply activations (attention and FFN projections,
      active experts and router for MoE, the output head); not the embedding lookup or norms.
      The head (output projection, vocab x dim) counts once per sequence: a prefill samples
      only the last prompt position, and the engine projects only that row to the vocabulary.
    attention: per layer and query head, QK^T and PV cost 2 x (d_qk + d_v) FLOPs per visible
      (query, key) pair; a causal prefill of T tokens has T(T+1)/2 pairs, a window W caps each
      query at W keys.
  MBU = (bytes per step / TPOT) / measured HBM bytes/s; MFU = (FLOPs / TTFT) / measured FLOP/s.
  prefill bytes = the weights read once (as a decode step of B x T tokens reads them) + the K/V
    written; TTFT floor = max(bytes / HBM bandwidth, FLOPs / matmul peak); a short prompt is
    memory-bound (prefill MBU = bytes / TTFT / bandwidth), a long one compute-bound (MFU), and
    the crossover is the shortest prompt where the FLOPs' time reaches the bytes'.
  tensor parallel (engine/parallel/sharding.py): per-rank bytes are the tp=1 bytes scaled like
  sizes.weight_bytes_per_rank and kv_cache_bytes(tp=...), compared with one GPU's bandwidth.

Measured peaks (measure_roofline):
  HBM: a device-to-device copy of 1 GiB (less when memory is short), counted as bytes read plus
    bytes written, median of the repeats.
  matmul: dense [8192, 8192] @ [8192, 8192] in bf16: 2 n^3 FLOPs per sample, median.
  On the CPU the same two run small (a 32 MiB host memcpy, a float32 512^3 matmul) so the whole
  pipeline runs anywhere; those figures say nothing about a GPU.
  Once a process on a GPU: the first measurement is kept and every later case of the process
  divides by it (`roofline_reused` in its metrics). Why: on an H100, a 1 GiB copy made after
  some 60 GB had been allocated and freed ran 14% slower than the same copy before, in the same
  process, while the decode steps timed there did not slow (the second case of each
  Qwen3-30B-A3B A/B in results/step-moe-fused-nvidia-h100-80gb-hbm3.jsonl and
  results/step-qk-heads-nvidia-h100-80gb-hbm3.jsonl measured 2,564 and 2,569 GB/s, the first
  2,983 and 2,986): where the buffers land moved the figure, not the GPU. Measured afresh per
  case, MBUs of one A/B had different denominators.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from infermeter.measure.timing import Stats, time_cuda, time_host
from infermeter.specs import sizes
from infermeter.specs.model import ModelSpec
from infermeter.units import dtype_bytes

GPU_COPY_BYTES = 1 << 30
GPU_MATMUL_N = 8192
CPU_COPY_BYTES = 32 << 20
CPU_MATMUL_N = 512


# ---- bytes per decode step -------------------------------------------------------------------
def expected_experts(spec: ModelSpec, batch_size: int) -> float:
    """Distinct routed experts B tokens use in one MoE layer (uniform routing): E(1-(1-k/E)^B)."""
    e, k = spec.n_experts, spec.n_active_experts
    return e * (1.0 - (1.0 - k / e) ** batch_size)


def decode_weight_params(spec: ModelSpec, batch_size: int,
                         experts: float | None = None) -> float:
    """Parameters one decode step of B tokens reads (a float: the MoE term is a mean).

    experts (MoE): the distinct routed experts a step touched per MoE layer, as counted in the
    steps (generate's count, averaged over steps and layers); None: the uniform-routing
    expectation, expected_experts."""
    params: float = sizes.param_count(spec, active=True)
    if spec.is_moe:
        moe_layers = sum(spec.is_moe_layer(i) for i in range(spec.n_layers))
        expert = 3 * spec.dim * spec.moe_ffn_dim
        touched = expected_experts(spec, batch_size) if experts is None else experts
        params += moe_layers * expert * (touched - spec.n_active_experts)
    if not spec.tie_embeddings:  # the lookup gathers B rows of the table, not all of it
        table = spec.vocab_size * spec.dim
        params += min(batch_size * spec.dim, table) - table
    return params


def decode_weight_bytes(spec: ModelSpec, dtype: str, batch_size: int, tp: int = 1,
                        experts: float | None = None) -> int:
    total = decode_weight_params(spec, batch_size, experts) * dtype_bytes(dtype)
    if tp > 1:  # the share one rank holds, as kvsize splits matrices and replicates norms
        total *= sizes.weight_bytes_per_rank(spec, dtype, tp) / sizes.weight_bytes(spec, dtype)
    return round(total)


def decode_kv_bytes(spec: ModelSpec, batch_size: int, context: int, kv_dtype: str,
                    tp: int = 1) -> int:
    """K and V one decode step reads with `context` tokens in the cache (window-capped)."""
    return sizes.kv_cache_bytes(spec, batch_size, context, kv_dtype, tp)


def decode_step_bytes(spec: ModelSpec, batch_size: int, context: int, dtype: str,
                      kv_dtype: str, tp: int = 1, experts: float | None = None) -> int:
    return (decode_weight_bytes(spec, dtype, batch_size, tp, experts)
            + decode_kv_bytes(spec, batch_size, context, kv_dtype, tp))


def mean_decode_step_bytes(spec: ModelSpec, batch_size: int, contexts: Iterable[int],
                           dtype: str, kv_dtype: str, tp: int = 1,
                           experts: float | None = None) -> float:
    """Average over decode steps whose contexts (KV tokens read) are `contexts`."""
    contexts = list(contexts)
    weights = decode_weight_bytes(spec, dtype, batch_size, tp, experts)
    kv = sum(decode_kv_bytes(spec, batch_size, c, kv_dtype, tp) for c in contexts)
    return weights + kv / len(contexts)


# ---- prefill FLOPs ---------------------------------------------------------------------------
def matmul_params(spec: ModelSpec) -> int:
    """Parameters that multiply activations for one token (active experts for MoE)."""
    norms = (spec.norms_per_layer * spec.n_layers + 1) * spec.dim
    embedding = 0 if spec.tie_embeddings else spec.vocab_size * spec.dim  # a lookup, no FLOPs
    return sizes.param_count(spec, active=True) - norms - embedding


def causal_pairs(n_tokens: int, window: int | None = None) -> int:
    """Visible (query, key) pairs in a causal prefill of n tokens: sum over t of min(t+1, W)."""
    if window is None or window >= n_tokens:
        return n_tokens * (n_tokens + 1) // 2
    return window * (window + 1) // 2 + (n_tokens - window) * window


def attention_flops(spec: ModelSpec, batch_size: int, prompt_len: int) -> int:
    d_qk = spec.qk_nope_head_dim + spec.qk_rope_head_dim if spec.is_mla else spec.head_dim
    d_v = spec.v_head_dim if spec.is_mla else spec.head_dim
    pairs = sum(causal_pairs(prompt_len, spec.layer_window(i)) for i in range(spec.n_layers))
    return 2 * (d_qk + d_v) * spec.n_heads * batch_size * pairs


def head_params(spec: ModelSpec) -> int:
    """The output projection's parameters (vocab x dim), part of matmul_params."""
    return spec.vocab_size * spec.dim


def prefill_flops(spec: ModelSpec, batch_size: int, prompt_len: int, tp: int = 1) -> int:
    """Model FLOPs of a prefill of B x T tokens (per rank when tp > 1: work splits evenly): the
    layers' products for every token, the output head for one row a sequence (the logits the
    first token is sampled from), and attention."""
    head = head_params(spec)
    dense = 2 * batch_size * ((matmul_params(spec) - head) * prompt_len + head)
    return (dense + attention_flops(spec, batch_size, prompt_len)) // tp


# ---- time to first token: the two regimes and where they cross -------------------------------
def prefill_bytes(spec: ModelSpec, batch_size: int, prompt_len: int, dtype: str, kv_dtype: str,
                  tp: int = 1) -> int:
    """Bytes a prefill of B x T tokens must move at least: every weight it uses read once (as a
    decode step of B x T tokens reads them: the embedding rows it gathers, an MoE layer's
    experts those tokens route to under uniform routing) and the K/V it writes."""
    return (decode_weight_bytes(spec, dtype, batch_size * prompt_len, tp)
            + sizes.kv_cache_bytes(spec, batch_size, prompt_len, kv_dtype, tp))


def prefill_floor_ms(spec: ModelSpec, batch_size: int, prompt_len: int, dtype: str,
                     kv_dtype: str, hbm_gbps: float, matmul_tflops: float,
                     tp: int = 1) -> tuple[float, float]:
    """(memory ms, compute ms) of a prefill: its bytes at the HBM bandwidth, its FLOPs at the
    matmul peak. The TTFT's roofline floor is the larger; the prefill is memory-bound (judge
    it by MBU) while the first is larger, compute-bound (MFU) after."""
    nbytes = prefill_bytes(spec, batch_size, prompt_len, dtype, kv_dtype, tp)
    flops = prefill_flops(spec, batch_size, prompt_len, tp)
    return nbytes / (hbm_gbps * 1e9) * 1e3, flops / (matmul_tflops * 1e12) * 1e3


def prefill_crossover_len(spec: ModelSpec, batch_size: int, dtype: str, kv_dtype: str,
                          hbm_gbps: float | None, matmul_tflops: float | None,
                          tp: int = 1) -> int | None:
    """The shortest prompt whose prefill of B prompts is compute-bound on this card (its FLOPs
    take at least as long at the matmul peak as its bytes at the HBM bandwidth); None without
    both peaks, or when no prompt within the model's context is. Compute grows faster than
    bytes with the prompt (the weights are read once), so the first such length is found by
    bisection."""
    if not hbm_gbps or not matmul_tflops:
        return None

    def compute_bound(length: int) -> bool:
        memory, compute = prefill_floor_ms(spec, batch_size, length, dtype, kv_dtype, hbm_gbps,
                                           matmul_tflops, tp)
        return compute >= memory

    low, high = 1, spec.max_seq_len
    if not compute_bound(high):
        return None
    while low < high:  # the first compute-bound length is in [low, high]
        mid = (low + high) // 2
        low, high = (low, mid) if compute_bound(mid) else (mid + 1, high)
    return low


TTFT_METRICS = ("prefill_bytes", "prefill_mbu_pct", "ttft_floor_ms", "ttft_over_floor",
                "prefill_bound", "prefill_crossover_len")


def ttft_roofline(spec: ModelSpec, shapes: list[tuple[int, int]], ttft_ms: float | None,
                  dtype: str, kv_dtype: str, hbm_gbps: float | None,
                  matmul_tflops: float | None, tp: int = 1) -> dict[str, Any]:
    """A run's TTFT against its roofline (generate's TTFT_METRICS): shapes are the (B, T) of
    its prompt groups, prefilled one after another within ttft_ms (their sum).
    prefill_bytes: what they must move; prefill_mbu_pct: those bytes / TTFT against the HBM
    bandwidth (the figure that judges a memory-bound prefill, as MFU judges a compute-bound
    one); ttft_floor_ms: the sum of each group's floor, max(bytes at the bandwidth, FLOPs at
    the matmul peak); ttft_over_floor: TTFT / floor; prefill_bound: "memory" or "compute"
    (which term sets the floor; "mixed" when groups differ); prefill_crossover_len: the
    shortest prompt that is compute-bound at the first group's batch."""
    nbytes = sum(prefill_bytes(spec, b, t, dtype, kv_dtype, tp) for b, t in shapes)
    out: dict[str, Any] = dict.fromkeys(TTFT_METRICS)
    out["prefill_bytes"] = nbytes
    out["prefill_mbu_pct"] = pct(achieved_gbps(nbytes, ttft_ms), hbm_gbps)
    if not hbm_gbps or not matmul_tflops or not shapes:
        return out
    floors = [prefill_floor_ms(spec, b, t, dtype, kv_dtype, hbm_gbps, matmul_tflops, tp)
              for b, t in shapes]
    bounds = {"memory" if memory > compute else "compute" for memory, compute in floors}
    floor = sum(max(pair) for pair in floors)
    out.update(ttft_floor_ms=floor, ttft_over_floor=ttft_ms / floor if ttft_ms else None,
               prefill_bound=bounds.pop() if len(bounds) == 1 else "mixed",
               prefill_crossover_len=prefill_crossover_len(spec, shapes[0][0], dtype, kv_dtype,
                                                           hbm_gbps, matmul_tflops, tp))
    return out


# ---- utilisation and plausibility ------------------------------------------------------------
def achieved_gbps(nbytes: float, ms: float | None) -> float | None:
    return None if not ms else nbytes / (ms * 1e-3) / 1e9


def pct(achieved: float | None, peak: float | None) -> float | None:
    return None if achieved is None or not peak else 100.0 * achieved / peak


def roofline_warnings(mbu_pct: float | None, mfu_pct: float | None) -> list[str]:
    """A figure above the measured roofline cannot be real: say it is a measurement error."""
    notes = []
    if mbu_pct is not None and mbu_pct > 100:
        notes.append(f"MBU {mbu_pct:.0f}% is above the HBM bandwidth measured in this run: a "
                     "measurement error (a decode step cannot read its bytes that fast)")
    if mfu_pct is not None and mfu_pct > 100:
        notes.append(f"MFU {mfu_pct:.0f}% is above the matmul FLOP/s measured in this run: a "
                     "measurement error (the prefill cannot compute that fast)")
    return notes


# ---- measured peaks --------------------------------------------------------------------------
@dataclass
class Roofline:
    device: str
    hbm_gbps: float | None = None
    matmul_tflops: float | None = None
    copy_bytes: int = 0
    matmul_n: int = 0
    matmul_dtype: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    reused: bool = False  # the process's first measurement on this GPU, kept (module docstring)

    def metrics(self) -> dict[str, Any]:
        return {"hbm_gbps_measured": self.hbm_gbps, "matmul_tflops_measured": self.matmul_tflops,
                "roofline_copy_bytes": self.copy_bytes, "roofline_matmul_n": self.matmul_n,
                "roofline_matmul_dtype": self.matmul_dtype, "roofline_reused": self.reused}


def _timer(device: Any) -> Any:
    return time_cuda if device.type == "cuda" else time_host


def measure_hbm_gbps(device: Any, nbytes: int, repeats: int = 10,
                     warmup: int = 3) -> tuple[float, list[float]]:
    """Device-to-device copy of nbytes: (bytes read + written) / median time, and samples."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    samples, _ = _timer(device)(lambda: dst.copy_(src), repeats, warmup)
    return 2 * nbytes / (Stats.of(samples).median * 1e-3) / 1e9, samples


def measure_matmul_tflops(device: Any, n: int, dtype: Any, repeats: int = 10,
                          warmup: int = 3) -> tuple[float, list[float]]:
    """[n, n] @ [n, n] into a preallocated output: 2 n^3 / median time, and samples."""
    import torch

    a = torch.randn(n, n, device=device).to(dtype)  # [n, n]
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)
    samples, _ = _timer(device)(lambda: torch.matmul(a, b, out=out), repeats, warmup)
    return 2 * n**3 / (Stats.of(samples).median * 1e-3) / 1e12, samples


# A GPU's first measurement in this process, by (device, repeats, copy bytes, matmul n)
_MEASURED: dict[tuple[str, int, int | None, int | None], Roofline] = {}


def measure_roofline(device: Any, repeats: int = 10, copy_bytes: int | None = None,
                     matmul_n: int | None = None) -> Roofline:
    """Both peaks on `device`; buffers are freed before returning. On a GPU, measured once a
    process for the same arguments: later calls get that measurement, marked reused."""
    import copy

    gpu = device.type == "cuda"
    key = (str(device), repeats, copy_bytes, matmul_n)
    if gpu and key in _MEASURED:
        kept = copy.deepcopy(_MEASURED[key])
        kept.reused = True
        return kept
    out = _measure_roofline(device, repeats, copy_bytes, matmul_n)
    if gpu:
        _MEASURED[key] = copy.deepcopy(out)
    return out


def _measure_roofline(device: Any, repeats: int, copy_bytes: int | None,
                      matmul_n: int | None) -> Roofline:
    import torch

    gpu = device.type == "cuda"
    nbytes = copy_bytes or (GPU_COPY_BYTES if gpu else CPU_COPY_BYTES)
    n = matmul_n or (GPU_MATMUL_N if gpu else CPU_MATMUL_N)
    dtype = torch.bfloat16 if gpu else torch.float32  # CPU bf16 matmuls are not a peak
    out = Roofline(str(device), copy_bytes=nbytes, matmul_n=n,
                   matmul_dtype=str(dtype).removeprefix("torch."))
    if gpu:
        free, _ = torch.cuda.mem_get_info(device)
        out.copy_bytes = nbytes = min(nbytes, free // 4)  # src + dst, with room to spare
    out.hbm_gbps, out.samples["hbm_copy_ms"] = measure_hbm_gbps(device, nbytes, repeats)
    out.matmul_tflops, out.samples["matmul_ms"] = measure_matmul_tflops(device, n, dtype,
                                                                        repeats)
    if gpu:
        torch.cuda.empty_cache()
    memory = "HBM copy" if gpu else "memory copy"  # the Result's key keeps its name
    for key, what in (("hbm_copy_ms", memory), ("matmul_ms", "matmul")):
        out.warnings += Stats.of(out.samples[key]).warnings(f"roofline {what}")
    return out
