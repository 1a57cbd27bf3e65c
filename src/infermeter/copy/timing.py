"""Timing one copy case, nvbandwidth-style, and checking what arrived.

A GPU sample (pinned host memory):
    main stream:  [spin kernel, hold_ms] -> start event -> ... wait for the movers -> end event
    mover streams:              wait(start) -> the copies, queued while the spin kernel ran
The spin kernel (`torch.cuda._sleep`, calibrated in SM cycles per ms) holds the stream until the
host has queued every copy, so the time between the events is the transfer alone, not Python's or
the driver's enqueue overhead. The hold is 1.5 x the warm enqueue time + 0.2 ms; samples whose
enqueue outlasted the hold are counted and reported (their time includes host gaps).

Pageable host memory gets no hold: cudaMemcpyAsync with pageable memory returns only after the
driver has staged the data through its own pinned buffer, so the host blocks in every copy and
holding the stream would only add the hold to the time. Its samples are plain CUDA-event times.

The seed way (`.cpu()` / `.cuda()` of every tensor, allocation included) is timed with the host
clock around the calls plus a synchronize, since that is what it costs its caller.

On `--device cpu` every sample is host-clock time of memcpy-style copies between host buffers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from infermeter.measure.timing import Stats, time_host

HOLD_FACTOR, HOLD_MARGIN_MS, HOLD_MAX_MS = 1.5, 0.2, 5000.0


class Spin:
    """Holds the current stream for a given time with a calibrated spin kernel."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cycles_per_ms = self._calibrate()

    def _calibrate(self, cycles: int = 2_000_000) -> float:
        torch.cuda._sleep(cycles)  # first launch loads the kernel
        torch.cuda.synchronize(self.device)
        times = []
        for _ in range(3):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return cycles / max(sorted(times)[1], 1e-3)

    def hold(self, ms: float) -> None:
        torch.cuda._sleep(max(1, int(ms * self.cycles_per_ms)))


@dataclass
class Timing:
    samples_ms: list[float]
    warmup_ms: float
    mode: str  # "cuda-events+hold", "cuda-events", "host-clock"
    hold_ms: float = 0.0
    enqueue_ms: list[float] = field(default_factory=list)
    late_samples: int = 0

    def info(self) -> dict[str, Any]:
        enqueue = Stats.of(self.enqueue_ms).median if self.enqueue_ms else None
        return {"timing": self.mode, "warmup_ms": self.warmup_ms, "hold_ms": self.hold_ms,
                "enqueue_ms": enqueue, "late_samples": self.late_samples}


def _gpu_sample(movers: list[Any], spin: Spin | None, hold_ms: float) -> tuple[float, float]:
    """(event time in ms, host enqueue time in ms) of one run of all `movers` together."""
    main = torch.cuda.current_stream()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    if spin is not None and hold_ms > 0:
        spin.hold(hold_ms)
    start.record(main)
    t0 = time.perf_counter()
    for mover in movers:
        mover.enqueue(start)
    enqueue_ms = (time.perf_counter() - t0) * 1e3
    for mover in movers:
        for stream in mover.streams:
            main.wait_stream(stream)
    end.record(main)
    end.synchronize()
    return start.elapsed_time(end), enqueue_ms


def run_once(movers: list[Any], spin: Spin | None, hold_ms: float) -> None:
    """One more run exactly as timed (for verification), on a GPU or a CPU."""
    if movers and movers[0].streams[0] is not None:
        _gpu_sample(movers, spin, hold_ms)
    else:
        for mover in movers:
            mover.enqueue(None)


def time_movers(movers: list[Any], repeats: int, warmup: int, spin: Spin | None) -> Timing:
    """Time `movers` run together: CUDA events (+ hold when `spin`), or the host clock on CPU."""
    if movers[0].streams[0] is None:  # --device cpu: synchronous memcpy
        samples, warm = time_host(lambda: [m.enqueue(None) for m in movers], repeats,
                                  max(warmup, 1))
        return Timing(samples, warm, "host-clock")
    t0 = time.perf_counter()
    enqueue = 0.0
    for _ in range(max(warmup, 1)):
        _, enqueue = _gpu_sample(movers, None, 0.0)  # the last, warm, enqueue time counts
    warm = (time.perf_counter() - t0) * 1e3
    hold = min(HOLD_FACTOR * enqueue + HOLD_MARGIN_MS, HOLD_MAX_MS) if spin else 0.0
    timing = Timing([], warm, "cuda-events+hold" if spin else "cuda-events", hold)
    for _ in range(repeats):
        ms, enqueue_ms = _gpu_sample(movers, spin, hold)
        timing.samples_ms.append(ms)
        timing.enqueue_ms.append(enqueue_ms)
        timing.late_samples += bool(spin) and enqueue_ms > hold
    return timing


def time_seed(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> Timing:
    """Host-clock time of the seed way; `fn` allocates and copies, then we synchronize."""
    def call() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    samples, warm = time_host(call, repeats, max(warmup, 1))
    return Timing(samples, warm, "host-clock")


def case_metrics(nbytes: int, directions: int, timing: Timing,
                 peak_gbps: float | None) -> dict[str, Any]:
    """Moving time and GB/s (GB = 1e9 bytes) of one case. For "both", `bytes_moved` counts both
    directions, `gbps` is their aggregate and `link_pct` is against both directions' peaks."""
    stats = Stats.of(timing.samples_ms)
    moved = nbytes * directions
    gbps = moved / stats.median / 1e6
    peak = peak_gbps * directions if peak_gbps else None
    return {"bytes": nbytes, "bytes_moved": moved, "moving_time_ms": stats.median,
            "gbps": gbps, "gbps_p10": moved / stats.p90 / 1e6,
            "gbps_p90": moved / stats.p10 / 1e6,
            "link_pct": 100 * gbps / peak if peak else None,
            "stats": stats.to_dict(), **timing.info()}
