"""What torch's compiler did while a case warmed up: how many kernel configs it timed afresh and
how many compiled graphs it found in its cache.

Why a Result keeps this: the compiled step's Triton kernels are tuned by timing them
(inductor's coordinate descent, engine/generator.py), the picks go to the compiler's cache, and
the next process that finds a kernel there reloads its pick instead of timing it again. Two
processes of the same code may thus run different kernel configs, and the counts say which
kind of process a figure came from: one that tuned (tuning benchmarks > 0) or one that reloaded.

The counts are deltas of torch's own counters (torch._dynamo.utils.counters["inductor"]) over
the warm-up, so an earlier case of the process does not count in a later one's.
"""

from __future__ import annotations

import math
from typing import Any

# torch's counter -> the name a Result's metrics.compiler gives it
COUNTERS = {
    "coordesc_tuning_bench": "tuning_benchmarks",  # configs timed by coordinate descent
    "fxgraph_cache_hit": "graph_cache_hits",  # compiled graphs loaded from the cache
    "fxgraph_cache_miss": "graph_cache_misses",  # compiled afresh, then stored
    "fxgraph_cache_bypass": "graph_cache_bypasses",  # compiled afresh, not cacheable
}

# what a case that compiles nothing records (an eager one, which never imports the compiler)
NOTHING = dict.fromkeys(COUNTERS.values(), 0)


def compiler_counts() -> dict[str, int]:
    """torch's compiler counters now, by COUNTERS' names (0 where torch has not counted any).
    Imports the compiler: only for a case that compiles."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return {name: int(inductor.get(counter, 0)) for counter, name in COUNTERS.items()}


def compiler_metrics(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The Result's metrics.compiler: each count's growth from `before` to `after`."""
    return {name: after[name] - before[name] for name in COUNTERS.values()}


def graphs_built(compiler: Any) -> tuple[int, int]:
    """(graphs compiled afresh: cache misses and bypasses, graphs loaded from the cache) from a
    Result's metrics.compiler; a count missing or not a number (a Result from elsewhere, or
    from before the counts) counts 0. What generate's compiler line and the report's warm-up
    cell both say a process did."""
    def count(name: str) -> int:
        value = compiler.get(name) if isinstance(compiler, dict) else None
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return int(value) if number and math.isfinite(value) else 0

    return count("graph_cache_misses") + count("graph_cache_bypasses"), count("graph_cache_hits")
