"""The ranks of a tensor-parallel run, as measurements see them: starting every timed thing
together, and every rank's numbers in one Result (gathered on all ranks, the slowest rank's as
the metrics).

Ranks run in step (each layer ends in an all-reduce), so their timings differ little; a user of
the whole group gets the slowest, and `metrics.per_rank` keeps each rank's own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from infermeter.engine.parallel.group import TensorParallel


def group_size() -> int:
    """Processes in this run's group: 1 alone, the tp degree under torchrun."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def ranks_meet(device: torch.device | None = None) -> None:
    """Under tensor parallelism (a group of 2+ ranks), wait until every rank is here; with a
    CUDA device, until its queued work is done too. What a measurement calls before each thing
    it times, so that every rank starts it together: generate's warm-up and timed runs (the
    collectives inside a run would align the ranks anyway, but a late rank's lag would count in
    the others' TTFT) and each copy case (the ranks share the host's links). Alone: nothing."""
    if group_size() > 1:
        dist.barrier()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)


def gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] when alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def slowest(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Rank 0's metrics with every time taken from the slowest rank and every rate from the
    lowest: `_ms`/`_s` numbers -> max, `tok_per_s`/`_gbps` numbers -> min, a Stats dict (with a
    median or p50) of times -> the dict of the rank with the largest median. Other values are
    rank 0's. Ranks run in step (every layer ends in an all-reduce), so these differ little;
    the slowest is what a user of the whole group gets."""
    out = dict(per_rank[0])
    for key, value in per_rank[0].items():
        values = [m.get(key) for m in per_rank]
        if isinstance(value, bool):
            continue
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            if key.endswith(("tok_per_s", "_gbps")):  # before "_s": tok_per_s ends in it
                out[key] = min(values)
            elif key.endswith(("_ms", "_s")):
                out[key] = max(values)
        elif all(isinstance(v, dict) and _middle(v) is not None for v in values):
            out[key] = max(values, key=_middle)
    return out


def _middle(stats: dict[str, Any]) -> float | None:
    value = stats.get("median", stats.get("p50"))
    return value if isinstance(value, (int, float)) else None


def gather_result(result: Any, parallel: TensorParallel | None) -> Any:
    """Collective: every rank's metrics into rank 0's Result (a results.Result).

    metrics become the slowest rank's (`slowest`) with `per_rank` listing each rank's own; the
    config records parallel; a rank whose tokens differ from rank 0's is named in warnings (greedy
    ranks see the same gathered logits, so they must agree).
    """
    result.config["tp"] = 1 if parallel is None else parallel.world
    if parallel is None:
        return result
    per_rank = gather_objects({"metrics": result.metrics, "tokens": result.output_token_ids})
    metrics = [entry["metrics"] for entry in per_rank]
    result.metrics = {**slowest(metrics), "per_rank": metrics}
    differ = [rank for rank, entry in enumerate(per_rank)
              if entry["tokens"] != per_rank[0]["tokens"]]
    if differ:
        result.warnings.append(f"ranks {differ} generated other tokens than rank 0")
    return result


def gather_rank_results(results: list[Any]) -> list[list[Any]]:
    """Collective: every rank's Results (results.Result), rank by rank ([rank 0's list, rank 1's
    list, ...]), on every rank. What a command makes of them is its own (copy: merge_ranks)."""
    from infermeter.measure.result import Result

    per_rank = gather_objects([result.to_dict() for result in results])
    return [[Result.from_dict(data) for data in dicts] for dicts in per_rank]
