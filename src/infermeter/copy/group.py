"""`infermeter copy` on one rank or on every rank of a tensor-parallel group: each rank moves
its own shard of the KV cache (its KV heads), every rank starting each case together (they
share the host's links and memory; a total over ranks means something only for copies that
overlap), and rank 0 gets one merged Result per (batch, seq_len) (ranks.py)."""

from __future__ import annotations

from typing import Any

from infermeter.copy import job
from infermeter.copy.job import CopyRequest
from infermeter.copy.trace import traced_copy
from infermeter.measure.result import Result
from infermeter.specs.model import ModelSpec


def join_group(spec: ModelSpec, device: str, tp: int | None) -> tuple[ModelSpec, Any]:
    """Under torchrun: join the process group; the spec becomes this rank's shard of the model
    (its KV heads). Returns (spec, the rank's TensorParallel)."""
    from infermeter.engine.parallel.group import init_distributed
    from infermeter.engine.parallel.sharding import rank_spec

    parallel = init_distributed(device, tp)
    return rank_spec(spec, parallel.world), parallel


def copy_on_ranks(request: CopyRequest, progress: Any, trace_dir: str | None,
                  parallel: Any) -> list[Result] | None:
    """Every case timed (under the profiler with trace_dir); with a group, the ranks meet before
    each case and rank 0 returns the merged Results, the other ranks None."""
    from infermeter.copy.ranks import merge_ranks
    from infermeter.measure.ranks import gather_rank_results, ranks_meet

    before_case = (lambda label: ranks_meet()) if parallel else None
    results = traced_copy(request, progress, trace_dir, before_case=before_case) if trace_dir \
        else job.run_copy(request, progress, before_case=before_case)
    if not parallel:
        return results
    per_rank = gather_rank_results(results)  # collective: every rank takes part
    return merge_ranks(request, per_rank) if parallel.rank == 0 else None
