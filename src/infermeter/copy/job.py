"""`infermeter copy`: how fast a model's KV cache moves between GPU and host memory, and why.

Public API:
    CopyRequest(spec, batch_sizes, seq_lens, kv_dtype, layouts, hosts, directions, methods,
                block_tokens, repeats, warmup, device)
    plan_rows(request)        -> what would be moved (no torch needed): one row per layout
    run_copy(request, progress=None, env=None, before_case=None)
                              -> one `copy` Result per (batch, seq_len)
    gpu_available()           -> whether torch sees a CUDA GPU

The pieces: copy_cases (layouts, cases), copy_chunks (chunk planning), copy_methods (movers),
copy_host (host buffers, mapping), copy_bench (timing), copy_verify, copy_run (allocation and
the case loop), link (NVML peak, NUMA), copy_diagnosis, copy_report; copy_ranks (tensor
parallelism: every rank's Results as one, each case per rank and in total). Metric definitions
are in docs/design.md and docs/copy.md.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from infermeter.copy.cases import (
    DIRECTIONS,
    HOSTS,
    LAYOUTS,
    MAX_PIECES,
    METHODS,
    Case,
    LayoutPlan,
    enumerate_cases,
    layout_variants,
    plan_layout,
    skip_reason,
)
from infermeter.copy.chunks import LARGEST_CHUNK
from infermeter.copy.diagnosis import best, diagnose, targets
from infermeter.errors import InfermeterError
from infermeter.measure.env import host_available
from infermeter.measure.result import Result
from infermeter.specs import sizes
from infermeter.specs.model import ModelSpec
from infermeter.units import canonical_dtype, format_bytes


@dataclass(frozen=True)
class CopyRequest:
    spec: ModelSpec
    batch_sizes: tuple[int, ...] = (1,)
    seq_lens: tuple[int, ...] = (512,)
    kv_dtype: str = "float16"
    layouts: tuple[str, ...] = LAYOUTS
    hosts: tuple[str, ...] = HOSTS
    directions: tuple[str, ...] = DIRECTIONS
    methods: tuple[str, ...] = METHODS
    block_tokens: tuple[int, ...] = (16,)
    repeats: int = 10
    warmup: int = 2
    device: str = "cuda"

    def __post_init__(self) -> None:
        canonical_dtype(self.kv_dtype)
        for name in ("batch_sizes", "seq_lens"):
            if any(v <= 0 for v in getattr(self, name)):
                raise InfermeterError(f"--{name[:-1].replace('_', '-')} must be positive")
        if self.repeats <= 0 or self.warmup < 0:
            raise InfermeterError("--repeats must be positive and --warmup not negative")
        if self.device not in ("cuda", "cpu"):
            raise InfermeterError(f"--device must be cuda or cpu, got {self.device!r}")
        self.cases()  # validates layouts, hosts, directions, methods, block tokens

    def cases(self) -> list[Case]:
        return enumerate_cases(self.layouts, self.hosts, self.directions, self.methods,
                               self.block_tokens)

    def plans(self, batch: int, seq_len: int) -> dict[tuple[str, int | None], LayoutPlan]:
        return {(layout, block): plan_layout(self.spec, batch, seq_len, self.kv_dtype, layout,
                                             block)
                for layout, block in layout_variants(self.layouts, self.block_tokens)}

    def config(self, batch: int, seq_len: int) -> dict[str, Any]:
        return {"batch_size": batch, "seq_len": seq_len, "kv_dtype": canonical_dtype(
                    self.kv_dtype), "tp": 1, "layouts": list(self.layouts),
                "host_memory": list(self.hosts), "directions": list(self.directions),
                "methods": list(self.methods), "block_tokens": list(self.block_tokens),
                "repeats": self.repeats, "warmup": self.warmup, "device": self.device,
                "max_pieces": MAX_PIECES}


def plan_rows(req: CopyRequest) -> list[dict[str, Any]]:
    rows = []
    for batch, seq_len in itertools.product(req.batch_sizes, req.seq_lens):
        for (layout, block), plan in req.plans(batch, seq_len).items():
            rows.append({"model": req.spec.name, "batch_size": batch, "seq_len": seq_len,
                         "layout": f"paged/{block}" if block else layout,
                         "pieces": plan.n_pieces, "bytes": plan.total_bytes,
                         "allocated_bytes": plan.allocated_bytes})
    return rows


def gpu_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def check_memory(req: CopyRequest, plans: dict[Any, LayoutPlan], device: Any) -> None:
    """Refuse, before allocating anything, a cache that cannot fit twice (source and
    destination sides) in free GPU memory or in available host memory."""
    import torch

    dirs = set(req.directions)
    copies = int(bool(dirs & {"d2h", "both"})) + int(bool(dirs & {"h2d", "both"}))
    total = next(iter(plans.values())).total_bytes
    largest = max(plan.allocated_bytes for plan in plans.values())
    scratch = 2 * 3 * LARGEST_CHUNK + 2 * 64 * 2**20 + 256 * 2**20  # staging, compare, fill
    need_dev = copies * largest + scratch
    need_host = copies * total + (total if "seed" in req.hosts else 0)
    what = f"{req.spec.name}'s cache at this batch and length ({format_bytes(total)})"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need_dev > free:
            raise InfermeterError(
                f"{what} needs {format_bytes(need_dev)} of GPU memory for {copies} copies plus "
                f"staging, but only {format_bytes(free)} is free; use a smaller --batch-size or "
                f"--seq-len, or one --direction")
    else:
        need_host += need_dev
    # Under tensor parallelism every rank of this host allocates its host side at once.
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    host = host_available()
    if host is not None and ranks_here * need_host > host:
        each = f" for each of this host's {ranks_here} ranks" if ranks_here > 1 else ""
        raise InfermeterError(
            f"{what} needs {format_bytes(need_host)} of host memory{each}, but only "
            f"{format_bytes(host)} is available; use a smaller --batch-size or --seq-len")


def offload_figures(req: CopyRequest, seq_len: int, cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Time to move one sequence of seq_len tokens out and back, at the best pinned
    engine-layout GB/s of this run (an estimate: a smaller copy runs a little slower)."""
    nbytes = sizes.kv_cache_bytes(req.spec, 1, seq_len, req.kv_dtype)
    out: dict[str, Any] = {"offload_tokens": seq_len, "offload_bytes": nbytes,
                           "offload_ms": None, "reload_ms": None}
    for key, direction in (("offload_ms", "d2h"), ("reload_ms", "h2d")):
        top = (best(cases, layout="engine", host_memory="pinned", direction=direction)
               or best(cases, host_memory="pinned", direction=direction)
               or best(cases, direction=direction))
        if top:
            out[key] = nbytes / (top["gbps"] * 1e6)
            out[f"{key[:-3]}_method"] = f"{top['layout']} {top['host_memory']} {top['method']}"
    return out


def _result(req: CopyRequest, batch: int, seq_len: int, run: Any, link: Any,
            env: dict[str, Any]) -> Result:
    lines, notes = diagnose(run.cases, link.to_dict())
    metrics = {"cases": run.cases, "skipped": run.skipped,
               "kv_cache_bytes": sizes.kv_cache_bytes(req.spec, batch, seq_len, req.kv_dtype),
               "link_peak_gbps": link.peak_gbps, "link": link.to_dict(),
               "link_description": link.describe(), "numa_node": link.numa_node,
               "host_numa_nodes": link.host_numa_nodes, **offload_figures(req, seq_len, run.cases),
               "targets": targets(run.cases), "diagnosis": lines}
    warnings = list(dict.fromkeys(run.warnings + notes + link.notes))
    return Result("copy", req.spec.to_dict(), req.config(batch, seq_len), env, metrics,
                  samples=run.samples, warnings=warnings)


def run_copy(req: CopyRequest, progress: Callable[[str], None] | None = None,
             env: dict[str, Any] | None = None,
             before_case: Callable[[str], None] | None = None) -> list[Result]:
    """Measure every case of `req`, one Result per (batch, seq_len). `progress(label)` is called
    after each case; `before_case(label)` before each case that can run, once its buffers are
    allocated (under tensor parallelism a barrier, so every rank moves that case's shard at the
    same time)."""
    import torch

    from infermeter.copy.harness import CopyRunner
    from infermeter.measure.env import capture_env
    from infermeter.measure.link import LinkInfo, link_info, torch_bus_id

    if req.device == "cuda" and not torch.cuda.is_available():
        raise InfermeterError("no CUDA GPU found (use --device cpu for a host-memcpy run)")
    if req.device == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        link = link_info(torch_bus_id(device.index))
    else:
        device = torch.device("cpu")
        link = LinkInfo(notes=["--device cpu: host-to-host memcpy, no link to compare with"])
    env = env if env is not None else capture_env()
    results = []
    for batch, seq_len in itertools.product(req.batch_sizes, req.seq_lens):
        plans = req.plans(batch, seq_len)
        check_memory(req, plans, device)
        runner = CopyRunner(device, req.kv_dtype, req.repeats, req.warmup, link, progress,
                            before_case)
        run = runner.run(req.cases(), plans)
        results.append(_result(req, batch, seq_len, run, link, env))
    return results


def n_cases(req: CopyRequest) -> int:
    """Every (batch, seq_len, layout, host, direction, method) combination, skipped ones too."""
    variants = len(layout_variants(req.layouts, req.block_tokens))
    return (len(req.batch_sizes) * len(req.seq_lens) * variants * len(req.hosts)
            * len(req.directions) * len(req.methods))


def n_runnable(req: CopyRequest, device: str = "cuda") -> int:
    """Combinations that would be timed on `device` (the mapped method may still be found
    unavailable when it runs)."""
    count = 0
    for batch, seq_len in itertools.product(req.batch_sizes, req.seq_lens):
        plans = req.plans(batch, seq_len)
        count += sum(skip_reason(case, plans[(case.layout, case.block_tokens)].n_pieces,
                                 device) is None for case in req.cases())
    return count


def skip_reasons(req: CopyRequest, device: str) -> list[str]:
    """Why cases are skipped on `device`, each reason once, in case order."""
    reasons: dict[str, None] = {}
    for batch, seq_len in itertools.product(req.batch_sizes, req.seq_lens):
        plans = req.plans(batch, seq_len)
        for case in req.cases():
            reason = skip_reason(case, plans[(case.layout, case.block_tokens)].n_pieces, device)
            if reason:
                reasons[reason] = None
    return list(reasons)


__all__ = [
    "n_runnable",
    "skip_reasons",
    "DIRECTIONS",
    "HOSTS",
    "LAYOUTS",
    "METHODS",
    "CopyRequest",
    "gpu_available",
    "n_cases",
    "plan_rows",
    "run_copy",
]
