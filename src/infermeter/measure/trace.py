"""--trace DIR: torch.profiler traces (Chrome/Perfetto JSON, one per rank) and their breakdown.

Nothing here runs unless --trace is given, and a capture runs apart from the timed runs (after
them), so tracing never changes a measured number.
- generate: after warm-up and the timed repeats, one more prefill of the case's first prompt
  group, a few untraced decode steps (the profiler's own start-up would land in the first), then
  TRACE_STEPS decode steps, each inside an `im/decode_step` range. In eager mode nvtx.py's layer
  ranges name every projection; in compiled mode they are not installed (the hooks would be
  traced into the graph) and breakdown.py falls back to kernel names.
- copy: the whole run under the profiler, each case inside an `im/copy <case>` range.
The trace file gets an "infermeter" key (model, mode, weight bytes per projection per step; with
the roofline, the run's measured HBM GB/s and the traced steps' bytes) so `infermeter trace FILE`
can compute matmul GB/s and the bytes-bound step time later without the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from infermeter.measure import nvtx

TRACE_STEPS = 5  # decode steps recorded: enough for a median, small enough for Perfetto
SETTLE_STEPS = 2  # untraced steps after prefill, before the capture starts


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def make_trace_dir(folder: str | Path) -> Path:
    """Create --trace's folder; a path that cannot be one is a user error (one line), found
    before anything is measured when the commands call this first."""
    from infermeter.errors import InfermeterError

    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InfermeterError(f"--trace {folder}: cannot create the folder ({err})") from None
    return Path(folder)


def check_trace_dir(folder: str | Path) -> None:
    """--trace's folder can be made (or is one), asked before anything is measured; it is made
    only when the first trace is written (profile_to), so a run stopped by a later check leaves
    no empty folder behind."""
    import os

    from infermeter.errors import InfermeterError

    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise InfermeterError(f"--trace {folder}: a file, not a folder")
    made = next(p for p in (path, *path.absolute().parents) if p.exists())  # the nearest made
    if not made.is_dir():
        raise InfermeterError(f"--trace {folder}: cannot create the folder ({made} is a file)")
    if not os.access(made, os.W_OK | os.X_OK):
        raise InfermeterError(f"--trace {folder}: cannot create the folder ({made} is not "
                              "writable)")


def trace_path(folder: str | Path, case_index: int = 0, n_cases: int = 1) -> Path:
    """trace-rank0.json; with several cases trace-case2-rank0.json etc."""
    case = f"case{case_index + 1}-" if n_cases > 1 else ""
    return Path(folder) / f"trace-{case}rank{rank()}.json"


@contextmanager
def profile_to(path: Path, meta: dict[str, Any] | None = None) -> Iterator[None]:
    """Profile the block (CPU, + CUDA when available) and write its Chrome trace to `path`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    make_trace_dir(path.parent)
    nvtx.set_profiling(True)
    try:
        with profile(activities=activities, record_shapes=True) as prof:
            yield
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the last kernels belong in the trace
    finally:
        nvtx.set_profiling(False)
    tmp = path.with_name(path.name + ".tmp")
    prof.export_chrome_trace(str(tmp))
    data = json.loads(tmp.read_text())
    data["infermeter"] = meta or {}
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # never a half-written trace under the final name


def weight_bytes(model: Any) -> dict[str, int]:
    """Bytes of weight one decode step reads per projection (this rank's shards under tp)."""
    out: dict[str, int] = {}
    for name, module in model.named_modules():
        label = nvtx.MODULE_LABELS.get(name.rsplit(".", 1)[-1])
        weight = getattr(module, "weight", None)
        # an MoE layer's stacked experts [E, ...]: not read whole by a step (the routing picks),
        # and not inside a labelled range, so their time is "matmul (unattributed)"
        if label in ("qkv", "o", "gate_up", "down", "lm_head") and weight is not None \
                and weight.dim() == 2:
            out[label] = out.get(label, 0) + weight.nbytes
    return out


def traced_contexts(prompt_len: int, max_new_tokens: int) -> range:
    """The KV tokens each traced decode step reads (the first decode step after a prompt of T
    reads T + 1, as the roofline counts); empty when no step is traced."""
    steps = max(0, min(TRACE_STEPS, max_new_tokens - 1 - SETTLE_STEPS))
    first = prompt_len + SETTLE_STEPS + 1
    return range(first, first + steps)


def capture_decode(runner: Any, tokens: Any, path: Path, mode: str,
                   bound: dict[str, float] | None = None) -> dict[str, Any] | None:
    """Trace a few decode steps of the engine runner on `tokens` [B, T]; the breakdown, or None
    when there are too few new tokens for a step to trace. bound: {"hbm_gbps", "bytes_per_step"}
    (the run's measured bandwidth, the traced steps' mean bytes), kept in the trace's metadata
    for the bytes-bound step time (gaps.py)."""
    from infermeter.measure.breakdown import summarize_trace

    generator, config = runner.generator, runner.config
    steps = len(traced_contexts(int(tokens.shape[1]), config.max_new_tokens))
    if steps < 1:
        return None
    model = generator.model
    generator.prepare(*tokens.shape, config.max_new_tokens)
    handles = nvtx.install_layer_ranges(model) if mode == "eager" else []
    meta = {"model": model.spec.name, "mode": mode, "batch_size": int(tokens.shape[0]),
            "prompt_len": int(tokens.shape[1]), "weight_bytes": weight_bytes(model),
            # what the breakdown needs to split a compiled step into layers and to find the
            # expert products by kernel name (breakdown.py, gaps.py)
            "n_layers": model.spec.n_layers, "moe": model.spec.is_moe, **(bound or {})}
    try:
        state = generator.prefill(tokens, config)
        for _ in range(SETTLE_STEPS):
            generator.decode_step(state, config)
        with profile_to(path, meta):
            for _ in range(steps):
                # No sync per step: the host runs ahead as in a timed run, so the gaps are the
                # real ones. Kernels are placed in a step by their launch (breakdown.py).
                with nvtx.traced("decode_step"):
                    generator.decode_step(state, config)
    finally:
        nvtx.remove_ranges(handles)
    return summarize_trace(path)
