"""copy --trace: a copy run under the profiler, its DMAs summarised into every Result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from infermeter.copy import job
from infermeter.measure.breakdown import summarize_trace
from infermeter.measure.trace import profile_to, trace_path


def traced_copy(request: Any, progress: Any, folder: str | Path, env: Any = None,
                before_case: Any = None) -> list:
    """copy --trace: the whole copy run under the profiler; the copies it saw (each DMA's size,
    time and GB/s) go into every Result's metrics["breakdown"]. `before_case`: as run_copy's."""
    path = trace_path(folder)
    with profile_to(path, {"kind": "copy"}):
        results = job.run_copy(request, progress, env=env, before_case=before_case)
    found = summarize_trace(path)
    for result in results:
        result.metrics["breakdown"] = {**found, "trace": str(path)}
    return results
