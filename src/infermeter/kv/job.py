"""`infermeter kv`: turn a sizing request into Results (one per batch x seq_len case) and a table.

The arithmetic lives in specs/sizes.py; this file decides what a user sees: which numbers go into
the Result, which warnings, and how the terminal table reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infermeter.errors import InfermeterError
from infermeter.measure.result import Result
from infermeter.specs import sizes
from infermeter.specs.gguf_meta import facts_for
from infermeter.specs.loaders import text_model_note
from infermeter.specs.model import ModelSpec
from infermeter.textable import render_table
from infermeter.units import canonical_dtype, dtype_bytes, format_bytes, format_count, parse_size

WEIGHT_METRICS = ("param_count", "param_count_active", "weight_bytes", "weight_bytes_active",
                  "weight_bytes_per_rank")


@dataclass(frozen=True)
class KvRequest:
    spec: ModelSpec
    batch_sizes: tuple[int, ...]
    seq_lens: tuple[int, ...]
    kv_dtype: str
    dtype: str  # weights
    tp: int = 1
    expert_dtype: str | None = None  # the experts' weight matrices, where not `dtype` (gpt-oss
    # as published: mxfp4)
    gpu_memory: int | None = None
    gpu_memory_source: str | None = None  # "--gpu-memory" or the GPU's name (from NVML)
    reserve: str = "10%"
    check_engine: bool = False  # also size the cache with the engine's own allocation code

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "seq_lens"):
            for value in getattr(self, name):
                if value <= 0:
                    raise InfermeterError(f"--{name[:-1].replace('_', '-')} must be positive, "
                                          f"got {value}")
        sizes.check_tp(self.spec, self.tp)
        dtype_bytes(self.kv_dtype)  # an element dtype: a KV cache cannot be mxfp4
        canonical_dtype(self.dtype)
        if self.expert_dtype is not None:
            canonical_dtype(self.expert_dtype)
            if not self.spec.is_moe:  # else the header names experts the model does not have
                raise InfermeterError(f"--expert-dtype applies to the experts of a MoE model; "
                                      f"{self.spec.name} has none")
        self.reserve_bytes()  # a bad --reserve fails without --gpu-memory too, not on a GPU only

    def reserve_bytes(self) -> int:
        """Activation reserve: a percent of GPU memory ('10%') or a size ('4GiB')."""
        text = self.reserve.strip()
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                raise InfermeterError(f"cannot read reserve {self.reserve!r}") from None
            if not 0 <= percent < 100:
                raise InfermeterError(f"reserve {self.reserve!r} must be at least 0% and below "
                                      "100%")
            return int((self.gpu_memory or 0) * percent / 100)
        return parse_size(text)


def _config(req: KvRequest, batch: int, seq_len: int) -> dict[str, Any]:
    return {"batch_size": batch, "seq_len": seq_len, "kv_dtype": canonical_dtype(req.kv_dtype),
            "dtype": canonical_dtype(req.dtype),
            "expert_dtype": req.expert_dtype and canonical_dtype(req.expert_dtype),
            "tp": req.tp, "gpu_memory": req.gpu_memory,
            "gpu_memory_source": req.gpu_memory_source, "activation_reserve": req.reserve}


def _weights_known(req: KvRequest) -> bool:
    return req.spec.vocab_size is not None


def _fit_metrics(req: KvRequest, batch: int, seq_len: int, per_rank: int) -> dict[str, Any]:
    if req.gpu_memory is None or not _weights_known(req):  # the budget is memory - weights
        return {}
    fit = sizes.kv_budget(req.spec, req.dtype, req.tp, req.gpu_memory, req.reserve_bytes(),
                          req.expert_dtype)
    budget = fit.kv_budget_bytes
    per_token = sizes.kv_bytes_per_token(req.spec, req.kv_dtype, req.tp)
    return {
        "gpu_memory_bytes": req.gpu_memory,
        "activation_reserve_bytes": fit.reserve_bytes,
        "kv_budget_bytes": budget,
        "fits": budget >= per_rank,
        "max_batch_size": sizes.max_batch(req.spec, seq_len, req.kv_dtype, req.tp, budget),
        "max_seq_len": sizes.max_seq_len(req.spec, batch, req.kv_dtype, req.tp, budget),
        "max_cached_tokens": max(budget, 0) // per_token,
    }


def _warnings(req: KvRequest, seq_len: int, metrics: dict[str, Any]) -> list[str]:
    notes = []
    if not _weights_known(req):
        notes.append(f"the vocabulary size is unknown ({req.spec.source} does not say it and no "
                     "tokenizer.model or checkpoint shard was found beside it or one folder up): "
                     "weight bytes unknown; the KV cache does not depend on the vocabulary")
        if req.gpu_memory is not None:
            notes.append("no KV budget: it is the GPU memory less the weights, which are unknown")
    if (text_only := text_model_note(req.spec)) is not None:
        notes.append(text_only)
    if seq_len > req.spec.max_seq_len:
        notes.append(f"seq_len {seq_len} exceeds {req.spec.name}'s "
                     f"{req.spec.max_seq_len} positions")
    if metrics.get("kv_budget_bytes", 1) <= 0:
        notes.append("the weights and the reserve alone exceed the GPU memory")
    elif metrics.get("fits") is False:
        notes.append(f"the cache ({format_bytes(metrics['kv_cache_bytes_per_rank'])} per rank) "
                     f"exceeds the KV budget ({format_bytes(metrics['kv_budget_bytes'])})")
    if req.tp > req.spec.n_kv_heads and not req.spec.is_mla:
        notes.append(f"tp={req.tp} > {req.spec.n_kv_heads} KV heads: each KV head is replicated "
                     f"on {req.tp // req.spec.n_kv_heads} ranks")
    return notes


def _engine_check(req: KvRequest, batch: int, seq_len: int, metrics: dict[str, Any]) -> list[str]:
    """Add `kv_cache_bytes_allocated` (the engine's allocation, tp=1); a warning if it differs."""
    from infermeter.kv.cache_check import allocated_cache_bytes

    allocated = allocated_cache_bytes(req.spec, batch, seq_len, req.kv_dtype)
    metrics["kv_cache_bytes_allocated"] = allocated
    if allocated != metrics["kv_cache_bytes"]:
        return [f"the engine allocates {allocated:,} bytes, not the computed "
                f"{metrics['kv_cache_bytes']:,}"]
    return []


def kv_results(req: KvRequest, env: dict[str, Any]) -> list[Result]:
    spec = req.spec
    weights: dict[str, Any] = dict.fromkeys(WEIGHT_METRICS)  # null: unknown vocabulary size
    if _weights_known(req):
        weights = {
            "param_count": sizes.param_count(spec),
            "param_count_active": sizes.param_count(spec, active=True),
            "weight_bytes": sizes.weight_bytes(spec, req.dtype, expert_dtype=req.expert_dtype),
            "weight_bytes_active": sizes.weight_bytes(spec, req.dtype, active=True,
                                                      expert_dtype=req.expert_dtype),
            "weight_bytes_per_rank": sizes.weight_bytes_per_rank(spec, req.dtype, req.tp,
                                                                 req.expert_dtype),
        }
    facts = facts_for(spec)  # a GGUF file: its quant type and the weights' bytes as stored
    if facts is not None:
        weights["weight_bytes_file"] = facts.weight_bytes
    results = []
    for batch in req.batch_sizes:
        for seq_len in req.seq_lens:
            metrics: dict[str, Any] = {
                "kv_bytes_per_token": sizes.kv_bytes_per_token(spec, req.kv_dtype),
                "kv_bytes_per_token_per_rank":
                    sizes.kv_bytes_per_token(spec, req.kv_dtype, req.tp),
                "kv_cache_bytes": sizes.kv_cache_bytes(spec, batch, seq_len, req.kv_dtype),
                "kv_cache_bytes_per_rank":
                    sizes.kv_cache_bytes(spec, batch, seq_len, req.kv_dtype, req.tp),
                **weights,
            }
            metrics.update(_fit_metrics(req, batch, seq_len, metrics["kv_cache_bytes_per_rank"]))
            notes = _warnings(req, seq_len, metrics)
            if req.check_engine:
                notes += _engine_check(req, batch, seq_len, metrics)
            config = {**_config(req, batch, seq_len),
                      "weight_format": facts.weight_format if facts else None}
            results.append(Result("kv", spec.to_dict(), config, env, metrics, warnings=notes))
    return results


def window_line(spec: ModelSpec) -> str | None:
    """Why KV/token x tokens is more than the cache: a sliding window (or Llama 4's attention
    chunk) caps what layers hold."""
    if not spec.sliding_window_layers:
        return None
    window = spec.sliding_window
    if spec.window_kind == "chunked":
        n = len(spec.sliding_window_layers)
        where, rest = ("every layer", "") if n == spec.n_layers else \
            (f"{n} of {spec.n_layers} layers", ", the others every token")
        return (f"chunked attention on {where}: a token attends within its {window}-token "
                f"chunk, so those hold at most {window} tokens a sequence{rest}")
    if len(spec.sliding_window_layers) == spec.n_layers:
        return (f"sliding window {window} tokens on every layer: the cache holds at most "
                f"{window} tokens a sequence")
    return (f"sliding window {window} tokens on {len(spec.sliding_window_layers)} of "
            f"{spec.n_layers} layers: those hold at most {window} tokens a sequence, the others "
            "every token")


def render_kv(req: KvRequest, results: list[Result]) -> str:
    """The terminal view: a header on the model and budget, then one row per case."""
    spec, first = req.spec, results[0].metrics
    fit = req.gpu_memory is not None and _weights_known(req)
    if not _weights_known(req):
        weights = "weights unknown (vocabulary size unknown)"
    else:
        experts = f", experts {canonical_dtype(req.expert_dtype)}" if req.expert_dtype else ""
        weights = (f"weights {format_bytes(first['weight_bytes'])} "
                   f"({format_count(first['param_count'])} params, {canonical_dtype(req.dtype)}"
                   f"{experts})")
    if spec.is_moe and _weights_known(req):
        weights += f", active {format_bytes(first['weight_bytes_active'])}"
    if "weight_bytes_file" in first:
        weights += (f"; {format_bytes(first['weight_bytes_file'])} in the file "
                    f"({results[0].config['weight_format']})")
    if spec.is_mla:
        shape = f"MLA latent {spec.kv_lora_rank} + rope key {spec.qk_rope_head_dim}"
    else:
        shape = f"{spec.n_kv_heads} KV heads x {spec.head_dim} head_dim"
    lines = [f"{spec.name}: {spec.n_layers} layers, {shape}, KV {canonical_dtype(req.kv_dtype)}, "
             f"tp={req.tp}; " + weights]
    if (window := window_line(spec)) is not None:
        lines.append(window)
    if fit:
        lines.append(
            f"GPU memory {format_bytes(req.gpu_memory)} ({req.gpu_memory_source}) - weights "
            f"{format_bytes(first['weight_bytes_per_rank'])} per rank - reserve "
            f"{format_bytes(first['activation_reserve_bytes'])} ({req.reserve}) = KV budget "
            f"{format_bytes(max(first['kv_budget_bytes'], 0))}")
    header = ["batch", "seq_len", "KV/token", "KV cache", "bytes"]
    if req.check_engine:
        header.append("engine allocates")
    if req.tp > 1:
        header += ["per rank", "bytes/rank"]
    if fit:
        header += ["fits", "max batch@seq", "max seq@batch"]
    rows = []
    for result in results:
        m, c = result.metrics, result.config
        row = [c["batch_size"], c["seq_len"], format_bytes(m["kv_bytes_per_token"]),
               format_bytes(m["kv_cache_bytes"]), f"{m['kv_cache_bytes']:,}"]
        if req.check_engine:
            row.append(f"{m['kv_cache_bytes_allocated']:,}")
        if req.tp > 1:
            row += [format_bytes(m["kv_cache_bytes_per_rank"]), f"{m['kv_cache_bytes_per_rank']:,}"]
        if fit:
            longest = m["max_seq_len"]
            capped = longest == spec.max_seq_len
            row += ["yes" if m["fits"] else "NO", m["max_batch_size"],
                    f"{longest} (model max)" if capped else longest]
        rows.append(row)
    lines.append(render_table(header, rows))
    for result in results:
        lines.extend(f"warning: {note}" for note in result.warnings)
    return "\n".join(dict.fromkeys(lines))  # drop repeated warnings, keep order
