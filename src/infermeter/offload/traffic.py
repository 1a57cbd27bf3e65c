"""Decode under copy traffic: the TPOT of a running batch while background copies move bytes
between device and host memory at full speed, one way (d2h offload, h2d reload) or both, and the
copy bandwidth reached at the same time, per method (named as `infermeter copy` names them):

- dma: copy_ of a pinned host buffer on a side stream per direction, run by the copy engines;
- mapped: a gather kernel on the SMs that writes the pinned host buffer (d2h) or reads it (h2d)
  through its device mapping (measure/mapped_host.py, as copy's mapped method), no copy engine;
  it competes with the decode for SMs as well as for memory bandwidth.

Every copy run leaves a time mark per chunk (CopyMarks): a CUDA event after each chunk on a GPU,
the host clock after each chunk on the CPU. The copies' speed alone is the bytes of every
direction over their combined span (first start to last end), each sample at least ALONE_MS of
copying, over several samples. Under a decode window, only the bytes moved inside the window
count (a chunk straddling an edge counts for its share of time inside), over the time the copies
ran inside it. Alone and traffic windows alternate (alone, traffic, alone, ...) and each traffic
window is compared with the two alone windows around it, so a clock drifting during the run is
not read as slowdown.

On a GPU enough chunks are queued before the decode window starts to outlast it (sized from the
copies' own speed measured alone). On the CPU a thread per direction copies in a loop while the
decode runs (torch releases the GIL inside a copy), timed by the host clock: it shows the dma
pipeline, not a GPU's numbers; the mapped method needs a CUDA device and is refused there.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from infermeter.errors import InfermeterError
from infermeter.measure.mapped_host import kernel_copy, mapped_view
from infermeter.measure.timing import Stats
from infermeter.offload.windows import DecodeWindows

DIRECTIONS = ("d2h", "h2d", "both")
METHODS = ("dma", "mapped")  # request.TRAFFIC_METHODS; copy/cases.py's names
MAPPED_ROW_BYTES = 64 << 10  # one row of the mapped method's gather ([rows, 8192] int64 words)
CHUNK_BYTES = {"cuda": 64 << 20, "cpu": 8 << 20}  # one copy of background traffic
ALONE_CHUNKS = 8  # a first run's chunks per way, to size the samples of the copies alone
ALONE_MS = 100.0  # a sample of the copies alone copies at least this long (GPU)
ALONE_REPEATS = 5  # samples of the copies alone: their median is copy_alone_gbps
CPU_SAMPLE_S = 0.02  # one CPU sample of the copies alone (threads, host clock)
QUEUE_MARGIN = 1.5  # queued copy time / the decode window alone
NEEDS_CUDA = "the mapped method (an SM copy kernel over mapped pinned host memory) needs a " \
    "CUDA device"


def _ways(direction: str) -> tuple[str, ...]:
    if direction not in DIRECTIONS:
        raise InfermeterError(f"unknown copy direction {direction!r} (use "
                              f"{', '.join(DIRECTIONS)})")
    return ("d2h", "h2d") if direction == "both" else (direction,)


def mapped_refusal(device: torch.device) -> str | None:
    """Why the mapped method cannot run on `device` (None: it can), from a small pinned probe."""
    if device.type != "cuda":
        return NEEDS_CUDA
    view, why = mapped_view(torch.empty(4096, dtype=torch.int64, pin_memory=True), device)
    return None if view is not None else f"mapped pinned memory unavailable: {why}"


# ---- the accounting: pure arithmetic over time marks in ms, tested with made-up times
@dataclass(frozen=True)
class InWindow:
    """What the copies did inside one decode window: bytes moved there, over the time they ran
    there (the window's time unless they started after it or ended before it: the flags)."""

    bytes: float
    ms: float
    started_late: bool
    ended_early: bool

    @property
    def gbps(self) -> float:
        return self.bytes / self.ms / 1e6 if self.ms > 0 else 0.0

    def notes(self, label: str) -> list[str]:
        """Warnings: copies that did not cover the whole window (its figures are partly alone)."""
        return [f"{label}: the copies {what} the decode window did" for what, hit in (
            ("started after", self.started_late), ("ended before", self.ended_early)) if hit]


@dataclass(frozen=True)
class CopyMarks:
    """One run of back-to-back copies per way on one clock (ms): per way its marks [start, end of
    chunk 1, ..., end of chunk n], chunk i running from mark i-1 to mark i, each `chunk_bytes`."""

    ways: dict[str, list[float]]
    chunk_bytes: int

    @property
    def moved(self) -> int:
        """Bytes copied, every way: chunks x chunk size."""
        return sum((len(marks) - 1) * self.chunk_bytes for marks in self.ways.values())

    @property
    def first_ms(self) -> float:
        """The earliest way's start."""
        return min(m[0] for m in self.ways.values())

    @property
    def last_ms(self) -> float:
        """The latest way's end."""
        return max(m[-1] for m in self.ways.values())

    @property
    def span_ms(self) -> float:
        """First start to last end, over every way."""
        return self.last_ms - self.first_ms

    @property
    def span_gbps(self) -> float:
        """Every way's bytes over the combined span: one way finishing early lowers it, where
        adding each way's own rate would not."""
        span = self.span_ms
        return self.moved / span / 1e6 if span > 0 else 0.0

    def in_window(self, start: float, end: float) -> InWindow:
        """The bytes moved inside [start, end]: a chunk wholly inside counts whole, one
        straddling an edge for the share of its time inside (its bytes assumed to move at an
        even pace), one outside not at all."""
        moved = 0.0
        for marks in self.ways.values():
            for begin, done in zip(marks, marks[1:], strict=False):
                inside = min(done, end) - max(begin, start)
                if done > begin:
                    moved += self.chunk_bytes * max(inside, 0.0) / (done - begin)
                elif start <= done <= end:  # a chunk of no measurable time: where it ended
                    moved += self.chunk_bytes
        ran = max(min(self.last_ms, end) - max(self.first_ms, start), 0.0)
        return InWindow(moved, ran, started_late=any(m[0] > start for m in self.ways.values()),
                        ended_early=any(m[-1] < end for m in self.ways.values()))


def interleaved_slowdowns(alone: Sequence[float], under: Sequence[float]) -> list[float]:
    """Per traffic window i, its slowdown in % against the mean of the alone windows i and i + 1
    around it (alone, traffic, alone, traffic, ..., alone: one more alone window than traffic)."""
    if len(alone) != len(under) + 1:
        raise ValueError(f"{len(under)} traffic windows need {len(under) + 1} alone windows "
                         f"around them, not {len(alone)}")
    return [(took / ((before + after) / 2) - 1) * 100
            for took, before, after in zip(under, alone, alone[1:], strict=False)]


# ---- the copies
class CopyTraffic:
    """Per direction one device chunk and one host chunk (pinned on a GPU) to copy between; with
    `mapped`, the host chunks' device mappings too, as [rows, row words] int64 views."""

    def __init__(self, device: torch.device, chunk_bytes: int | None = None,
                 mapped: bool = False) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.chunk_bytes = chunk_bytes or CHUNK_BYTES["cuda" if self.cuda else "cpu"]
        self.buffers = {way: (torch.empty(self.chunk_bytes, dtype=torch.uint8, device=device),
                              torch.empty(self.chunk_bytes, dtype=torch.uint8,
                                          pin_memory=self.cuda))
                        for way in ("d2h", "h2d")}
        self.streams = {way: torch.cuda.Stream(device) for way in self.buffers} \
            if self.cuda else {}
        self.mapped: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if mapped and not self.cuda:
            raise InfermeterError(f"--traffic-method mapped: {NEEDS_CUDA}")
        if mapped:
            self._map()

    def _map(self) -> None:
        """Per way (device rows, mapped host rows), and the gather's row indices."""
        row_words = min(self.chunk_bytes, MAPPED_ROW_BYTES) // 8
        shape = (self.chunk_bytes // 8 // row_words, row_words)
        for way, (device_chunk, host_chunk) in self.buffers.items():
            view, why = mapped_view(host_chunk.view(torch.int64), self.device)
            if view is None:
                raise InfermeterError(f"--traffic-method mapped: mapped pinned memory "
                                      f"unavailable: {why}")
            self.mapped[way] = (device_chunk.view(torch.int64).view(shape), view.view(shape))
        self.rows = torch.arange(shape[0], device=self.device)

    def copy_once(self, way: str, method: str = "dma") -> None:
        device_chunk, host_chunk = self.buffers[way]
        if method == "mapped":
            device_rows, host_rows = self.mapped[way]
            dst, src = (host_rows, device_rows) if way == "d2h" else (device_rows, host_rows)
            kernel_copy(dst, src, self.rows)
        elif way == "d2h":
            host_chunk.copy_(device_chunk, non_blocking=self.cuda)
        else:
            device_chunk.copy_(host_chunk, non_blocking=self.cuda)

    # ---- GPU: a queue of copies on side streams, an event after each chunk
    def enqueue(self, direction: str, chunks: int, method: str = "dma") -> _Queued:
        """Queue `chunks` copies per way after the current stream's work."""
        current = torch.cuda.current_stream(self.device)
        origin = torch.cuda.Event(enable_timing=True)
        origin.record(current)  # every mark is read against it: all come after it
        events = {}
        for way in _ways(direction):
            stream = self.streams[way]
            stream.wait_stream(current)
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(chunks + 1)]
            with torch.cuda.stream(stream):
                marks[0].record(stream)
                for mark in marks[1:]:
                    self.copy_once(way, method)
                    mark.record(stream)
            events[way] = marks
        return _Queued(origin, events, self.chunk_bytes)

    # ---- CPU: a thread per way, copying until told to stop
    def run_threads(self, direction: str, method: str = "dma") -> _Threads:
        return _Threads(self, _ways(direction), method)


class _Queued:
    """Queued copies' events; read them (marks, at) once the device has synchronized."""

    def __init__(self, origin: Any, events: dict[str, list[Any]], chunk_bytes: int) -> None:
        self.origin, self.events, self.chunk_bytes = origin, events, chunk_bytes

    def at(self, event: Any) -> float:
        """`event`'s time in ms after the queue's origin."""
        return self.origin.elapsed_time(event)

    def marks(self) -> CopyMarks:
        return CopyMarks({way: [self.at(e) for e in marks] for way, marks in self.events.items()},
                         self.chunk_bytes)


class _Threads:
    """Entered: a thread per way copies back to back, marking the host clock (ms) after each
    chunk; entering returns once every way has finished a chunk, so the copies are running."""

    def __init__(self, traffic: CopyTraffic, ways: tuple[str, ...], method: str) -> None:
        self.traffic, self.method, self.stop_flag = traffic, method, threading.Event()
        self.times: dict[str, list[float]] = {way: [] for way in ways}
        self.running = {way: threading.Event() for way in ways}
        self.threads = [threading.Thread(target=self._loop, args=(way,), daemon=True)
                        for way in ways]

    def _loop(self, way: str) -> None:
        marks = self.times[way]
        marks.append(time.perf_counter() * 1e3)
        try:
            while not self.stop_flag.is_set():
                self.traffic.copy_once(way, self.method)
                marks.append(time.perf_counter() * 1e3)
                self.running[way].set()
        finally:  # a failed copy must not leave __enter__ waiting
            self.running[way].set()

    def __enter__(self) -> _Threads:
        for thread in self.threads:
            thread.start()
        for running in self.running.values():
            running.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        for thread in self.threads:
            thread.join()

    def marks(self) -> CopyMarks:
        return CopyMarks({way: list(marks) for way, marks in self.times.items()},
                         self.traffic.chunk_bytes)

    @property
    def moved(self) -> dict[str, int]:
        """Bytes copied per way."""
        return {way: (len(marks) - 1) * self.traffic.chunk_bytes
                for way, marks in self.times.items()}

    @property
    def gbps(self) -> float:
        return self.marks().span_gbps


def copy_alone(traffic: CopyTraffic, direction: str, method: str = "dma",
               repeats: int = ALONE_REPEATS, seconds: float = CPU_SAMPLE_S) -> list[float]:
    """The copies' speed with nothing else running: `repeats` samples in GB/s, each every way's
    bytes over their combined span. On a GPU a first run of ALONE_CHUNKS per way sizes the
    samples to ALONE_MS of copying at least; on the CPU each sample copies for `seconds`."""
    if not traffic.cuda:
        samples = []
        for _ in range(repeats):
            with traffic.run_threads(direction, method) as threads:
                time.sleep(seconds)
            samples.append(threads.gbps)
        return samples

    def run(chunks: int) -> float:
        torch.cuda.synchronize(traffic.device)
        queued = traffic.enqueue(direction, chunks, method)
        torch.cuda.synchronize(traffic.device)
        return queued.marks().span_gbps

    first = run(ALONE_CHUNKS)
    chunk_ms = _chunk_ms(traffic, direction, first)
    chunks = max(ALONE_CHUNKS, math.ceil(ALONE_MS / chunk_ms))
    return [run(chunks) for _ in range(repeats)]


def copy_alone_gbps(traffic: CopyTraffic, direction: str, seconds: float = CPU_SAMPLE_S,
                    method: str = "dma") -> float:
    """The copies' speed alone (GB/s, both ways together for "both"): copy_alone's median."""
    return Stats.of(copy_alone(traffic, direction, method, seconds=seconds)).median


def _chunk_ms(traffic: CopyTraffic, direction: str, gbps: float) -> float:
    """One chunk's time on one way, when all of `direction`'s ways together move `gbps`."""
    per_way = gbps / len(_ways(direction))
    return traffic.chunk_bytes / per_way / 1e6 if per_way > 0 else math.inf


def decode_under_traffic(generator: Any, state: Any, config: Any, steps: int,
                         directions: tuple[str, ...], repeats: int, warmup: int,
                         traffic: CopyTraffic, methods: tuple[str, ...] = ("dma",)
                         ) -> tuple[list[dict[str, Any]], dict, list[str]]:
    """TPOT of `steps` decode steps from `state` (its position rewound before every window, so
    the cache needs steps + 1 slots past it) under each direction's traffic by each method (the
    mapped one needs `traffic` made with mapped=True), in windows alternating with windows alone:
    per direction and method, `warmup` pairs first (not kept), then alone, traffic, alone, ...,
    traffic, alone (`repeats` traffic windows).

    Every window starts from the same token and position, so its tokens must equal the first
    window's alone (`same_tokens`: the copies did not touch the cache).
    Returns (one entry per direction and method, raw TPOT samples in ms per direction (dma) /
    "direction mapped" and the alone windows around them as "<that> alone", warnings).
    """
    if "mapped" in methods and not traffic.mapped:
        raise InfermeterError(f"--traffic-method mapped: {NEEDS_CUDA}" if not traffic.cuda
                              else "the mapped method needs CopyTraffic(..., mapped=True)")
    cuda = traffic.cuda
    windows_of = DecodeWindows(generator, state, config, steps)
    window, outputs = windows_of.run, windows_of.outputs

    for _ in range(max(warmup, 1 if cuda else 0)):  # a compiled step compiles and captures here
        window()
    window()
    reference = outputs[-1]

    def under(direction: str, method: str, solo: float, alone_ms: float
              ) -> tuple[float, InWindow]:
        """One window under traffic: (its time in ms, what the copies did inside it)."""
        if not cuda:
            with traffic.run_threads(direction, method) as threads:
                took = window()
            return took, threads.marks().in_window(*windows_of.span)
        chunks = max(2, math.ceil(QUEUE_MARGIN * alone_ms / _chunk_ms(traffic, direction, solo)))
        torch.cuda.synchronize(traffic.device)
        queued = traffic.enqueue(direction, chunks, method)
        took = window()
        torch.cuda.synchronize(traffic.device)
        begin, end = windows_of.span
        return took, queued.marks().in_window(queued.at(begin), queued.at(end))

    samples: dict[str, list[float]] = {}
    entries, notes = [], []
    for direction in directions:
        for method in methods:  # side by side per direction: dma, then the SM kernel
            label = direction if method == "dma" else f"{direction} {method}"
            solo = Stats.of(copy_alone(traffic, direction, method))
            alone, windows, rates, moved = [window()], [], [], []
            same = outputs[-1] == reference
            for index in range(warmup + repeats):
                took, inside = under(direction, method, solo.median, alone[-1])
                same = same and outputs[-1] == reference
                alone.append(window())
                same = same and outputs[-1] == reference
                if index < warmup:
                    alone = alone[-1:]
                    continue
                windows.append(took / steps)
                rates.append(inside.gbps)
                moved.append(inside.bytes)
                notes += inside.notes(f"decode under {label} copies")
            alone = [took / steps for took in alone]
            stats, alone_stats, copy_stats = Stats.of(windows), Stats.of(alone), Stats.of(rates)
            slowdowns = interleaved_slowdowns(alone, windows)
            samples[label], samples[f"{label} alone"] = windows, alone
            entries.append({"direction": direction,
                            "method": method if cuda else "cpu thread",
                            "tpot_ms": stats.median, "tpot_stats": stats.to_dict(),
                            "tpot_alone_ms": alone_stats.median,
                            "tpot_alone_stats": alone_stats.to_dict(),
                            "slowdown_pct": Stats.of(slowdowns).median,
                            "slowdowns_pct": slowdowns,
                            "copy_gbps": copy_stats.median,
                            "copy_stats": copy_stats.to_dict(),
                            "copy_window_bytes": Stats.of(moved).median,
                            "copy_alone_gbps": solo.median, "copy_alone_stats": solo.to_dict(),
                            "same_tokens": same})
            notes += stats.warnings(f"decode under {label} copies")
            notes += alone_stats.warnings(f"decode alone, between the {label} windows")
            notes += solo.warnings(f"{label} copies alone (GB/s)")
    return entries, samples, sorted(set(notes), key=notes.index)
