"""Timing one generation run from inside the loop, and summarising many runs.

The Generator calls a hook at "start" (before prefill), "prefill" (first token sampled) and after
every "decode" step (engine/generator.py); the hf mode calls the same hook from a logits processor.
StepRecorder is that hook: it takes one mark per call and nothing else.
- CudaClock: a mark is a CUDA event recorded on the current stream. Events are created before the
  run, recording one does not wait for the GPU, and they are read once after the run (the loop's
  own final sync): no sync per step, so timing does not change what is timed.
- HostClock: a mark is a host clock reading (perf_counter, or any callable: the tests drive it
  with a synthetic clock). Right for the CPU, where every op has finished when it returns.

From the marks of one run (N new tokens: start, prefill, N-1 decode steps):
  TTFT = prefill - start; TPOT_i = decode_i - decode_(i-1) (decode_0 = prefill);
  decode time = sum of TPOTs (prefill excluded); run time = TTFT + decode time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from infermeter.errors import InfermeterError
from infermeter.measure.timing import Stats

SLOW_STEP_RATIO = 2.0  # a TPOT p99 this many times the p50 means stalls (GC, recompiles, clocks)


class HostClock:
    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock

    def mark(self) -> float:
        return self.clock()

    def elapsed_ms(self, start: float, end: float) -> float:
        return (end - start) * 1e3

    def finish(self) -> None:
        pass


class CudaClock:
    """CUDA events on the current stream of `device`, made before the run (n_marks of them)."""

    def __init__(self, device: Any, n_marks: int) -> None:
        import torch

        self.device = device
        self.stream = torch.cuda.current_stream(device)
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(n_marks)]
        self.used = 0

    def mark(self) -> Any:
        import torch

        if self.used == len(self.events):  # more marks than planned: make one (host-only call)
            self.events.append(torch.cuda.Event(enable_timing=True))
        event = self.events[self.used]
        event.record(self.stream)
        self.used += 1
        return event

    def elapsed_ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end)

    def finish(self) -> None:
        if self.used:
            self.events[self.used - 1].synchronize()  # the last mark done => all done


def make_clock(device: Any, n_marks: int) -> HostClock | CudaClock:
    return CudaClock(device, n_marks) if device.type == "cuda" else HostClock()


@dataclass
class RunTiming:
    """One generate() call: batch B, prompt length T, its TTFT and each decode step's time."""

    batch_size: int
    prompt_len: int
    ttft_ms: float
    tpot_ms: list[float]
    new_tokens: int = 0  # tokens kept in the output (fewer than B x N when stopped at EOS)

    @property
    def decode_steps(self) -> int:
        return len(self.tpot_ms)

    @property
    def decode_ms(self) -> float:
        return sum(self.tpot_ms)

    @property
    def total_ms(self) -> float:
        return self.ttft_ms + self.decode_ms


@dataclass
class StepRecorder:
    """The generate() hook: one clock mark per event; timing() turns the marks into a RunTiming."""

    clock: Any
    marks: list[tuple[str, int, Any]] = field(default_factory=list)

    def __call__(self, event: str, step: int) -> None:
        self.marks.append((event, step, self.clock.mark()))

    def timing(self, batch_size: int, prompt_len: int, new_tokens: int = 0) -> RunTiming:
        self.clock.finish()
        events = [event for event, _, _ in self.marks]
        if events[:2] != ["start", "prefill"] or any(e != "decode" for e in events[2:]):
            raise InfermeterError(f"generation hook saw {events[:4]}...: expected start, "
                                  "prefill, then decode steps")
        points = [mark for _, _, mark in self.marks]
        elapsed = self.clock.elapsed_ms
        tpot = [elapsed(a, b) for a, b in zip(points[1:-1], points[2:])]
        return RunTiming(batch_size, prompt_len, elapsed(points[0], points[1]), tpot, new_tokens)


def tpot_summary(stats: Stats) -> dict[str, float | int]:
    """The Result's tpot_ms: {"p50", "p10", "p90", "p99", "mean", "cov", "n"}."""
    return {"p50": stats.median, "p10": stats.p10, "p90": stats.p90, "p99": stats.p99,
            "mean": stats.mean, "cov": stats.cov, "n": stats.n}


def _median(values: Sequence[float]) -> float | None:
    return Stats.of(values).median if values else None


def summarize(repeats: Sequence[Sequence[RunTiming]]) -> tuple[dict[str, Any],
                                                                 dict[str, Any], list[str]]:
    """Timing metrics, raw samples and warnings of `repeats` (each: the runs of one repeat, one
    per prompt group; a single batch is one run per repeat).

    Per repeat: decode tok/s = sum(B x steps) / sum(decode time); prefill tok/s = sum(B x T) /
    sum(TTFT); generation time = sum(run times). Each metric is the median over repeats.
    Noise is judged on TTFT and on the decode time of whole runs, not on the spread of single
    steps: an attention that reads only the filled part of the cache makes steps slower as the
    context grows within a run (at batch 32, Llama-2-7B's bytes per step grow by half from 80 to
    512 tokens), which is the workload, not noise. Stalls show as a p99 far above the p50.
    """
    if not repeats or not all(repeats):
        raise InfermeterError("no timed runs to summarise")
    ttft = [run.ttft_ms for rep in repeats for run in rep]
    tpot = [t for rep in repeats for run in rep for t in run.tpot_ms]
    decode_ms = [sum(run.decode_ms for run in rep) for rep in repeats]
    steps = [sum(run.batch_size * run.decode_steps for run in rep) for rep in repeats]
    prefill = [sum(run.batch_size * run.prompt_len for run in rep) for rep in repeats]
    ttft_sum = [sum(run.ttft_ms for run in rep) for rep in repeats]
    total_ms = [sum(run.total_ms for run in rep) for rep in repeats]
    tokens = sum(run.new_tokens for run in repeats[0])
    ttft_stats = Stats.of(ttft)
    decode_rate = [n / (ms * 1e-3) for n, ms in zip(steps, decode_ms) if ms > 0]
    generation_s = _median(total_ms) / 1e3  # type: ignore[operator]
    metrics: dict[str, Any] = {
        "ttft_ms": ttft_stats.median, "ttft_stats": ttft_stats.to_dict(),
        "tpot_ms": tpot_summary(Stats.of(tpot)) if tpot else None,
        "decode_tok_per_s": _median(decode_rate),
        "prefill_tok_per_s": _median([n / (ms * 1e-3) for n, ms in zip(prefill, ttft_sum)
                                      if ms > 0]),
        "total_tokens": tokens, "generation_time_s": generation_s,
        "token_generation_speed": tokens / generation_s if generation_s else None,
        "decode_steps": sum(run.decode_steps for run in repeats[0]),
        "decode_time_ms": _median(decode_ms)}
    samples = {"ttft_ms": ttft, "tpot_ms": tpot, "decode_ms": decode_ms,
               "generation_ms": total_ms}
    # Prompt groups of different lengths have different TTFTs: judge noise on whole repeats.
    many = any(len(rep) > 1 for rep in repeats)
    warnings = Stats.of(ttft_sum).warnings("TTFT of all groups") if many else \
        ttft_stats.warnings("TTFT")
    if tpot:
        warnings += Stats.of(decode_ms).warnings("decode time per run")
        p50, p99 = metrics["tpot_ms"]["p50"], metrics["tpot_ms"]["p99"]
        if p99 > SLOW_STEP_RATIO * p50:
            warnings.append(f"TPOT: slow steps, p99 {p99:.3g} ms is over {SLOW_STEP_RATIO:g}x "
                            f"the p50 {p50:.3g} ms")
    return metrics, samples, warnings
