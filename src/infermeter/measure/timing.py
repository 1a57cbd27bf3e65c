"""Timing and statistics shared by every benchmark.

Rules (docs/design.md, "Measuring"): warm up first and report warm-up apart; time GPU work with CUDA
events and synchronize once per sample; keep the raw samples; report median, p10, p90 and the
coefficient of variation, and flag a spread over 5%.

`Stats` is pure Python so its arithmetic is tested without a GPU. Timers take a `clock` so the
tests can drive them with synthetic clocks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

NOISY_COV = 0.05  # a result whose samples spread more than 5% (std / mean) gets a warning
MIN_SAMPLES = 5


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not sorted_values:
        raise ValueError("percentile of no samples")
    position = (len(sorted_values) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


@dataclass(frozen=True)
class Stats:
    """Summary of repeated samples of one quantity (unit chosen by the caller, e.g. ms)."""

    median: float
    p10: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float
    cov: float  # coefficient of variation: population std / mean
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        values = sorted(float(v) for v in samples)
        if not values:
            raise ValueError("Stats of no samples")
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        cov = math.sqrt(var) / mean if mean else 0.0
        return cls(percentile(values, 50), percentile(values, 10), percentile(values, 90),
                   percentile(values, 99), mean, values[0], values[-1], cov, len(values))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def warnings(self, what: str) -> list[str]:
        notes = []
        if self.cov > NOISY_COV:
            notes.append(f"{what}: noisy, cov {self.cov:.1%} > {NOISY_COV:.0%}")
        if self.n < MIN_SAMPLES:
            notes.append(f"{what}: only {self.n} samples")
        return notes


def time_host(fn: Callable[[], Any], repeats: int, warmup: int = 1,
              clock: Callable[[], float] = time.perf_counter) -> tuple[list[float], float]:
    """Wall-clock samples in ms of `fn()` (CPU work), and the warm-up time in ms."""
    start = clock()
    for _ in range(warmup):
        fn()
    warmup_ms = (clock() - start) * 1e3
    samples = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        samples.append((clock() - t0) * 1e3)
    return samples, warmup_ms


def time_cuda(fn: Callable[[], Any], repeats: int, warmup: int = 1,
              stream: Any = None) -> tuple[list[float], float]:
    """CUDA-event samples in ms of `fn()` on `stream`, and the warm-up time in ms.

    One synchronize per sample, after its end event, so queued work of one sample never
    overlaps the next sample's timing.
    """
    import torch

    stream = stream or torch.cuda.current_stream()
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    warmup_ms = (time.perf_counter() - t0) * 1e3
    samples = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return samples, warmup_ms


def timer_for(device: Any) -> Callable[..., tuple[list[float], float]]:
    """time_cuda on a GPU (CUDA events), time_host elsewhere (the host clock): the same
    arguments, the same (samples in ms, warm-up ms)."""
    return time_cuda if device.type == "cuda" else time_host
