"""Decode under copy traffic: the TPOT of a running batch while background copies move bytes
between device and host memory at full speed, one way (d2h offload, h2d reload) or both, and the
copy bandwidth reached at the same time, per method (named as `infermeter copy` names them):

- dma: copy_ of a pinned host buffer on a side stream per direction, run by the copy engines;
- mapped: a gather kernel on the SMs that writes the pinned host buffer (d2h) or reads it (h2d)
  through its device mapping (measure/mapped_host.py, as copy's mapped method), no copy engine;
  it competes with the decode for SMs as well as for memory bandwidth.

On a GPU enough chunks are queued before the decode window starts to outlast it (sized from the
copies' own speed measured alone), CUDA events time the window and each direction's copies. On
the CPU a thread per direction copies in a loop while the decode runs (torch releases the GIL
inside a copy), timed by the host clock: it shows the dma pipeline, not a GPU's numbers; the
mapped method needs a CUDA device and is refused there.
"""

from __future__ import annotations

import math
import threading
import time
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
ALONE_CHUNKS = 8  # copies timed alone, to size the queue that outlasts a decode window
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

    # ---- GPU: a queue of copies on side streams, timed by events
    def enqueue(self, direction: str, chunks: int, method: str = "dma"
                ) -> list[tuple[Any, Any, int]]:
        """Queue `chunks` copies per way after the current stream's work: (start, end, bytes)."""
        out = []
        for way in _ways(direction):
            stream = self.streams[way]
            stream.wait_stream(torch.cuda.current_stream(self.device))
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            with torch.cuda.stream(stream):
                start.record(stream)
                for _ in range(chunks):
                    self.copy_once(way, method)
                end.record(stream)
            out.append((start, end, chunks * self.chunk_bytes))
        return out

    # ---- CPU: a thread per way, copying until told to stop
    def run_threads(self, direction: str, method: str = "dma") -> _Threads:
        return _Threads(self, _ways(direction), method)


class _Threads:
    def __init__(self, traffic: CopyTraffic, ways: tuple[str, ...], method: str) -> None:
        self.traffic, self.method, self.stop_flag = traffic, method, threading.Event()
        self.moved = dict.fromkeys(ways, 0)
        self.threads = [threading.Thread(target=self._loop, args=(way,), daemon=True)
                        for way in ways]
        self.started = self.ended = 0.0

    def _loop(self, way: str) -> None:
        while not self.stop_flag.is_set():
            self.traffic.copy_once(way, self.method)
            self.moved[way] += self.traffic.chunk_bytes

    def __enter__(self) -> _Threads:
        self.started = time.perf_counter()
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_flag.set()
        for thread in self.threads:
            thread.join()
        self.ended = time.perf_counter()

    @property
    def gbps(self) -> float:
        seconds = self.ended - self.started
        return sum(self.moved.values()) / seconds / 1e9 if seconds > 0 else 0.0


def copy_alone_gbps(traffic: CopyTraffic, direction: str, seconds: float = 0.05,
                    method: str = "dma") -> float:
    """The copies' speed with nothing else running (GB/s, both ways summed for "both")."""
    if traffic.cuda:
        torch.cuda.synchronize(traffic.device)
        marks = traffic.enqueue(direction, ALONE_CHUNKS, method)
        torch.cuda.synchronize(traffic.device)
        return sum(size / start.elapsed_time(end) / 1e6 for start, end, size in marks)
    with traffic.run_threads(direction, method) as threads:
        time.sleep(seconds)
    return threads.gbps


def decode_under_traffic(generator: Any, state: Any, config: Any, steps: int,
                         directions: tuple[str, ...], repeats: int, warmup: int,
                         traffic: CopyTraffic, methods: tuple[str, ...] = ("dma",)
                         ) -> tuple[list[dict[str, Any]], dict, list[str]]:
    """TPOT of `steps` decode steps from `state` (its position rewound before every window, so
    the cache needs steps + 1 slots past it) alone and under each direction's traffic, by each
    method (the mapped one needs `traffic` made with mapped=True).

    Every window starts from the same token and position, so its tokens must equal the windows'
    alone (`same_tokens`: the copies did not touch the cache).
    Returns (one entry per direction and method, raw TPOT samples in ms per "alone" / direction
    (dma) / "direction mapped", warnings).
    """
    if "mapped" in methods and not traffic.mapped:
        raise InfermeterError(f"--traffic-method mapped: {NEEDS_CUDA}" if not traffic.cuda
                              else "the mapped method needs CopyTraffic(..., mapped=True)")
    cuda = traffic.cuda
    device = generator.device
    windows_of = DecodeWindows(generator, state, config, steps)
    window, outputs = windows_of.run, windows_of.outputs

    for _ in range(max(warmup, 1 if cuda else 0)):  # a compiled step compiles and captures here
        window()
    alone = [window() for _ in range(repeats)]
    reference = outputs[-1]
    alone_ms = Stats.of(alone).median
    samples: dict[str, list[float]] = {"alone": [s / steps for s in alone]}
    entries, notes = [], []
    for direction in directions:
        for method in methods:  # side by side per direction: dma, then the SM kernel
            label = direction if method == "dma" else f"{direction} {method}"
            solo = copy_alone_gbps(traffic, direction, method=method)
            windows, rates = [], []
            outputs.clear()
            for index in range(warmup + repeats):
                if cuda:
                    chunk_ms = traffic.chunk_bytes / (solo / len(_ways(direction))) / 1e6
                    chunks = max(2, math.ceil(QUEUE_MARGIN * alone_ms / chunk_ms))
                    torch.cuda.synchronize(device)
                    marks = traffic.enqueue(direction, chunks, method)
                    took = window()
                    torch.cuda.synchronize(device)
                    rate = sum(size / s.elapsed_time(e) / 1e6 for s, e, size in marks)
                    if any(s.elapsed_time(e) < took for s, e, _ in marks):
                        notes.append(f"{label}: the copies ended before the decode window did")
                else:
                    with traffic.run_threads(direction, method) as threads:
                        took = window()
                    rate = threads.gbps
                if index >= warmup:
                    windows.append(took / steps)
                    rates.append(rate)
            stats = Stats.of(windows)
            tpot_alone = Stats.of(samples["alone"]).median
            samples[label] = windows
            entries.append({"direction": direction,
                            "method": method if cuda else "cpu thread",
                            "tpot_ms": stats.median, "tpot_stats": stats.to_dict(),
                            "tpot_alone_ms": tpot_alone,
                            "slowdown_pct": (stats.median / tpot_alone - 1) * 100,
                            "copy_gbps": Stats.of(rates).median, "copy_alone_gbps": solo,
                            "same_tokens": all(out == reference for out in outputs)})
            notes += stats.warnings(f"decode under {label} copies")
    return entries, samples, sorted(set(notes), key=notes.index)
