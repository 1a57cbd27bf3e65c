"""Tensor parallelism: every rank's copy Results as one Result per (batch, seq_len).

Each rank ran the same request on its own KV shard, the ranks meeting at a barrier before every
case (copy/group.py), so a case's copies overlapped on all ranks. The merged Result has the
shape of generate's gather_result: the slowest rank's figures as the metrics, every rank's own
in `per_rank`, and config.tp = the number of ranks.

Each row of metrics.cases is the slowest rank's row (largest moving_time_ms: its time, stats,
gbps and link_pct; bytes are one rank's shard) plus
    per_rank           [{rank, bytes, bytes_moved, moving_time_ms, gbps, link_pct}, ...]
    ranks, slowest_rank  how many ranks ran the case, and which was slowest
    total_bytes_moved  every rank's bytes_moved summed
    total_gbps         total_bytes_moved / the slowest rank's moving_time_ms (GB = 1e9 B): what
                       the group moves per second when every rank moves its shard at once; at
                       most the sum of the ranks' gbps (equal when every rank takes the same time)
samples[label] are the slowest rank's samples of that case; targets, diagnosis and
offload_ms/reload_ms are recomputed from the merged rows; link_peak_gbps is the lowest rank's,
link and the rest rank 0's; metrics.per_rank keeps each rank's own metrics; a warning that only
some ranks gave is prefixed with their ranks.
"""

from __future__ import annotations

from typing import Any

from infermeter.copy.cases import Case
from infermeter.copy.diagnosis import diagnose, targets
from infermeter.copy.job import CopyRequest, offload_figures
from infermeter.measure.result import Result

CASE_KEY = ("layout", "block_tokens", "host_memory", "direction", "method")
RANK_FIELDS = ("bytes", "bytes_moved", "moving_time_ms", "gbps", "link_pct")


def merge_ranks(req: CopyRequest, per_rank: list[list[Result]]) -> list[Result]:
    """per_rank[r]: rank r's Results, one per (batch, seq_len), in the same order on every rank
    -> one merged Result per (batch, seq_len) (this module's docstring)."""
    return [_merge(req, list(results)) for results in zip(*per_rank, strict=True)]


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


def _merge(req: CopyRequest, results: list[Result]) -> Result:
    world, first = len(results), results[0]
    cases, samples, notes = _merged_cases(results)
    metrics = {k: v for k, v in first.metrics.items()
               if k not in ("offload_method", "reload_method")}  # recomputed below, if found
    peaks = [r.metrics.get("link_peak_gbps") for r in results]
    lines, _ = diagnose(cases, first.metrics["link"])  # its warnings: already each rank's own
    metrics.update(
        cases=cases, skipped=_merged_skipped(results),
        link_peak_gbps=min((p for p in peaks if p is not None), default=None),
        **offload_figures(req, first.config["seq_len"], cases), targets=targets(cases),
        diagnosis=lines, per_rank=[r.metrics for r in results])
    config = {k: v for k, v in first.config.items() if k != "rank"} | {"tp": world}
    return Result("copy", first.model, config, first.env, metrics, samples=samples,
                  warnings=_merged_warnings(results) + notes)


def _merged_cases(results: list[Result]) -> tuple[list[dict], dict[str, Any], list[str]]:
    """(rows, samples, notes): per case, the slowest rank's row with the per-rank figures and
    the totals; that rank's samples; a note for a case some ranks skipped."""
    by_case: dict[tuple, dict[int, dict[str, Any]]] = {}
    for rank, result in enumerate(results):
        for row in result.metrics["cases"]:
            by_case.setdefault(tuple(row[k] for k in CASE_KEY), {})[rank] = row
    cases, samples, notes = [], {}, []
    for key, by_rank in by_case.items():
        slow = max(by_rank, key=lambda rank: by_rank[rank]["moving_time_ms"])
        moved = sum(row["bytes_moved"] for row in by_rank.values())
        time_ms = by_rank[slow]["moving_time_ms"]
        cases.append({**by_rank[slow], "ranks": len(by_rank), "slowest_rank": slow,
                      "per_rank": [{"rank": rank, **{k: row.get(k) for k in RANK_FIELDS}}
                                   for rank, row in sorted(by_rank.items())],
                      "total_bytes_moved": moved,
                      "total_gbps": moved / time_ms / 1e6 if time_ms > 0 else None})
        label = Case(*key).label
        if label in results[slow].samples:
            samples[label] = results[slow].samples[label]
        if len(by_rank) < len(results):
            notes.append(f"{label}: ran on rank {_ranks(sorted(by_rank))} only (skipped on the "
                         "others); its total counts those")
    return cases, samples, notes


def _merged_skipped(results: list[Result]) -> list[dict[str, Any]]:
    """Every rank's skipped cases once each, with on_ranks where not every rank skipped it."""
    fields = (*CASE_KEY, "reason")
    ranks_of: dict[tuple, list[int]] = {}
    for rank, result in enumerate(results):
        for entry in result.metrics["skipped"]:
            ranks_of.setdefault(tuple(entry[k] for k in fields), []).append(rank)
    return [{**dict(zip(fields, key)), **({"on_ranks": ranks} if len(ranks) < len(results)
                                          else {})}
            for key, ranks in ranks_of.items()]


def _merged_warnings(results: list[Result]) -> list[str]:
    """Every rank's warnings once each, prefixed with the ranks that gave it unless all did."""
    given: dict[str, list[int]] = {}
    for rank, result in enumerate(results):
        for warning in dict.fromkeys(result.warnings):
            given.setdefault(warning, []).append(rank)
    return [w if len(ranks) == len(results) else f"rank {_ranks(ranks)}: {w}"
            for w, ranks in given.items()]
