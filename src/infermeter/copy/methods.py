"""The copy implementations: a layout on the device, and the ways to move it to and from host.

Every method moves the same bytes between a `DeviceLayout` and one flat host buffer (the order is
the layout plan's: segment by segment, row by row). All work is done on views of a "word" dtype
(int64 where sizes allow): a byte-wide gather kernel is several times slower than an 8-byte one.

Methods (`Mover`s; `enqueue(start)` queues the copy on the mover's own streams behind the event
`start`, and `streams` lists the streams the caller must wait for):

- per-tensor: one `copy_(non_blocking=True)` per tensor or paged block, in order, on one stream.
  What a straightforward offload does; each copy costs the copy engine a few microseconds.
- streams: the same copies dealt round-robin to 4 streams, so the copy engines can overlap one
  copy's set-up with another's transfer.
- staged: gather the pieces into a device staging buffer (HBM runs ~50x faster than PCIe, so this
  costs little) and move it with one large DMA per chunk. Chunks ramp 2 -> 64 MiB -> 2 MiB
  (copy_chunks.py) through a ring of 3 staging buffers: the gather of chunk i+1 (kernel stream)
  overlaps the DMA of chunk i; events keep a buffer from being reused before its DMA (d2h) or its
  scatter (h2d) is done. Host-to-device is the mirror: DMA in, then scatter. Chunk DMAs alternate
  between 2 streams: with one, an H200's host-to-device rate came out bimodal from run to run
  (53.0 or 54.9 GB/s), with two it stayed at 54.6-54.9 GB/s (contiguous: 55.3).
- mapped: no DMA at all. Pinned host memory is mapped into the GPU's address space (UVA), so the
  gather kernel writes straight into host memory over the link (d2h), or the scatter kernel reads
  from it (h2d). Needs the buffer's device pointer: asked from the CUDA runtime through CuPy, or
  through ctypes from the libcudart that PyTorch loaded; without either it is skipped.

On `--device cpu` the "device" is host memory too: every method becomes memcpy, run in order.
"""

from __future__ import annotations

import contextlib

import torch

from infermeter.copy.cases import LayoutPlan, Segment
from infermeter.copy.chunks import Chunk, Op

WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
N_STREAMS = 4
N_STAGING = 3
DMA_STREAMS = 2


def as_words(t: torch.Tensor, word: int) -> torch.Tensor:
    """A flat view of a contiguous tensor as `word`-byte integers (no copy)."""
    if not t.is_contiguous():
        raise ValueError("word views need contiguous tensors")
    return t.reshape(-1).view(torch.uint8).view(WORD_DTYPES[word])


def engine_cache_tensors(plan: LayoutPlan, device: torch.device,
                         dtype: torch.dtype) -> list[torch.Tensor] | None:
    """The engine layout allocated by the engine's own cache class, [layer0.k, layer0.v, ...].

    Each [B, H, S, D] pair comes from engine/kv_cache.LayerKVCache with S already capped at the
    layer's window, so the benchmark moves exactly the tensors a running engine holds. None for
    MLA shapes, which the engine does not run (the planned shapes are used then).
    """
    if any(len(shape) != 4 for shape in plan.buffers):
        return None
    from infermeter.engine.kv_cache import LayerKVCache

    tensors = []
    for batch, heads, tokens, head_dim in plan.buffers[::2]:
        cache = LayerKVCache(batch, tokens, heads, head_dim, None, dtype, device)
        tensors += [cache.k, cache.v]
    return tensors


class DeviceLayout:
    """A layout plan's buffers allocated on `device` (in the KV dtype), viewed as words.

    `view(i)` is segment i as a 2-D strided word view [slots, row_words]; `rows(i)` is the
    device int64 tensor of the slots its rows come from (paged block table), or None for 0..n-1.
    """

    def __init__(self, plan: LayoutPlan, device: torch.device, dtype: torch.dtype) -> None:
        self.plan, self.device, self.word = plan, device, plan.word_bytes()
        engine = engine_cache_tensors(plan, device, dtype) if plan.layout == "engine" else None
        self.tensors = engine or [torch.empty(shape, dtype=dtype, device=device)
                                  for shape in plan.buffers]
        self.words = [as_words(t, self.word) for t in self.tensors]
        tables = []
        for table in plan.tables:  # seeded on the CPU so every device gets the same tables
            gen = torch.Generator().manual_seed(table.seed)
            perm = torch.randperm(table.slots, generator=gen)
            tables.append(perm.view(table.n_seqs, table.blocks_per_seq))
        self._rows = [self._segment_rows(seg, tables) for seg in plan.segments]
        self._rows_dev = [None if r is None else r.to(device) for r in self._rows]
        self._views = [self._segment_view(seg, tables) for seg in plan.segments]

    @staticmethod
    def _segment_rows(seg: Segment, tables: list[torch.Tensor]) -> torch.Tensor | None:
        if seg.table is None:
            return None
        table = tables[seg.table]  # [n_seqs, blocks_per_seq]
        if seg.last:
            return table[:, -1].contiguous()
        return table[:, : seg.n_rows // table.shape[0]].reshape(-1).contiguous()

    def _segment_view(self, seg: Segment, tables: list[torch.Tensor]) -> torch.Tensor:
        words = self.words[seg.buffer]
        slots = seg.n_rows if seg.table is None else tables[seg.table].numel()
        w = self.word
        return words.as_strided((slots, seg.row_bytes // w), (seg.stride // w, 1),
                                words.storage_offset() + seg.base // w)

    def fill_random(self, seed: int) -> None:
        """A seeded random byte pattern over every buffer (unused paged slots too)."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        step = 256 * 2**20  # bounded scratch memory for the random bytes
        for t in self.tensors:
            raw = t.view(-1).view(torch.uint8)
            for start in range(0, raw.numel(), step):
                part = raw[start: start + step]
                part.copy_(torch.randint(0, 256, part.shape, dtype=torch.uint8,
                                         device=self.device, generator=gen))

    def slot_list(self, index: int) -> list[int] | None:
        rows = self._rows[index]
        return None if rows is None else rows.tolist()

    def op_rows(self, op: Op) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(segment view restricted to the op's byte range, device slot indices or None)."""
        b0, b1 = op.byte_start // self.word, op.byte_end // self.word
        view = self._views[op.segment][:, b0:b1]
        rows = self._rows_dev[op.segment]
        if rows is None:
            return view[op.row_start:op.row_end], None
        return view, rows[op.row_start:op.row_end]

    def gather(self, op: Op, out: torch.Tensor, whole: torch.Tensor | None = None) -> None:
        """Layout -> `out` (a contiguous word tensor of op.nbytes): a copy or an index_select.
        whole: arange(op's rows) on the device, to copy contiguous rows by a kernel too (mapped
        host memory: a plain copy_ is a cudaMemcpyAsync, which may run on a copy engine)."""
        view, rows = self.op_rows(op)
        out = out.view(op.row_end - op.row_start, -1)
        rows = whole if rows is None else rows
        if rows is None:
            out.copy_(view)
        else:
            torch.index_select(view, 0, rows, out=out)

    def scatter(self, op: Op, src: torch.Tensor, whole: torch.Tensor | None = None) -> None:
        """`src` (contiguous words) -> layout: the inverse of `gather` (whole: as there)."""
        view, rows = self.op_rows(op)
        src = src.view(op.row_end - op.row_start, -1)
        rows = whole if rows is None else rows
        if rows is None:
            view.copy_(src)
        else:
            view.index_copy_(0, rows, src)

    def piece_views(self) -> list[torch.Tensor]:
        """One 1-D word view per piece (tensor or paged block), in host order."""
        views = []
        for index, seg in enumerate(self.plan.segments):
            slots = self.slot_list(index) or range(seg.n_rows)
            seg_view = self._views[index]
            views += [seg_view[slot] for slot in slots]
        return views


def _stream_context(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _new_streams(device: torch.device, n: int) -> list[torch.cuda.Stream | None]:
    if device.type != "cuda":
        return [None]
    return [torch.cuda.Stream(device=device) for _ in range(n)]


class PerPiece:
    """per-tensor (one stream) and streams (round-robin over N_STREAMS): one copy per piece."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 n_streams: int = 1) -> None:
        self.streams = _new_streams(device, n_streams)
        n = len(self.streams)
        # Pieces dealt round-robin, so neighbouring pieces run on different streams.
        self.groups = [pairs[i::n] for i in range(n)]

    def enqueue(self, start: torch.cuda.Event | None) -> None:
        for stream, group in zip(self.streams, self.groups):
            if start is not None and stream is not None:
                stream.wait_event(start)
            with _stream_context(stream):
                for src, dst in group:
                    dst.copy_(src, non_blocking=True)


class Staged:
    """Gather into staging chunks + one DMA per chunk, pipelined over two streams (see top)."""

    def __init__(self, layout: DeviceLayout, host: torch.Tensor, chunks: list[Chunk],
                 direction: str, dma_streams: int = DMA_STREAMS) -> None:
        self.layout, self.host, self.chunks, self.direction = layout, host, chunks, direction
        word, device = layout.word, layout.device
        size = max(chunk.nbytes for chunk in chunks) // word
        n_buf = min(N_STAGING, len(chunks))
        self.staging = [torch.empty(size, dtype=WORD_DTYPES[word], device=device)
                        for _ in range(n_buf)]
        # streams[0] runs the gather/scatter kernels; chunk i's DMA goes to DMA stream i % n, so
        # with n = 2 one chunk's DMA set-up overlaps the tail of the previous one.
        self.streams = _new_streams(device, 1 + dma_streams)
        cuda = device.type == "cuda"
        self.ready = [torch.cuda.Event() if cuda else None for _ in range(n_buf)]
        self.free = [torch.cuda.Event() if cuda else None for _ in range(n_buf)]

    def _kernels(self, chunk: Chunk, buf: torch.Tensor) -> None:
        word, base = self.layout.word, chunk.host_offset
        for op in chunk.ops:
            part = buf[(op.host_offset - base) // word:][: op.nbytes // word]
            if self.direction == "d2h":
                self.layout.gather(op, part)
            else:
                self.layout.scatter(op, part)

    def enqueue(self, start: torch.cuda.Event | None) -> None:
        kernels, dmas = self.streams[0], self.streams[1:] or [None]
        if start is not None and kernels is not None:
            for stream in self.streams:
                stream.wait_event(start)
        word, n_buf = self.layout.word, len(self.staging)
        for i, chunk in enumerate(self.chunks):
            b, dma = i % n_buf, dmas[i % len(dmas)]
            buf = self.staging[b][: chunk.nbytes // word]
            host = self.host[chunk.host_offset // word:][: chunk.nbytes // word]
            first, second = (kernels, dma) if self.direction == "d2h" else (dma, kernels)
            with _stream_context(first):
                if i >= n_buf and first is not None:
                    first.wait_event(self.free[b])  # the last user of buffer b is done
                if self.direction == "d2h":
                    self._kernels(chunk, buf)
                else:
                    buf.copy_(host, non_blocking=True)
                if first is not None:
                    self.ready[b].record(first)
            with _stream_context(second):
                if second is not None:
                    second.wait_event(self.ready[b])
                if self.direction == "d2h":
                    host.copy_(buf, non_blocking=True)
                else:
                    self._kernels(chunk, buf)
                if second is not None:
                    self.free[b].record(second)


class Mapped:
    """Gather kernels that write into (d2h) or scatter kernels that read from (h2d) pinned host
    memory through its device mapping: one kernel per segment op, one stream, no DMA. Contiguous
    rows are indexed too (an arange per op, made before timing): a plain copy_ there would be a
    cudaMemcpyAsync, which the driver may hand to a copy engine, i.e. DMA again."""

    def __init__(self, layout: DeviceLayout, mapped_host: torch.Tensor, chunks: list[Chunk],
                 direction: str) -> None:
        self.layout, self.host, self.direction = layout, mapped_host, direction
        self.ops = [op for chunk in chunks for op in chunk.ops]
        self.streams = _new_streams(layout.device, 1)
        self.whole = [torch.arange(op.row_end - op.row_start, device=layout.device)
                      for op in self.ops]

    def enqueue(self, start: torch.cuda.Event | None) -> None:
        stream, word = self.streams[0], self.layout.word
        if start is not None and stream is not None:
            stream.wait_event(start)
        with _stream_context(stream):
            for op, whole in zip(self.ops, self.whole):
                part = self.host[op.host_offset // word:][: op.nbytes // word]
                if self.direction == "d2h":
                    self.layout.gather(op, part, whole)
                else:
                    self.layout.scatter(op, part, whole)


def piece_pairs(layout: DeviceLayout, host: torch.Tensor, direction: str
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(source, destination) view pairs, one per piece, for the per-piece methods."""
    pairs, offset = [], 0
    for view in layout.piece_views():
        host_view = host[offset: offset + view.numel()]
        offset += view.numel()
        pairs.append((view, host_view) if direction == "d2h" else (host_view, view))
    return pairs


def chunk_pairs(layout: DeviceLayout, host: torch.Tensor, chunks: list[Chunk], direction: str
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs from byte-range ops of single-row segments (the contiguous buffer cut in parts)."""
    pairs, word = [], layout.word
    for chunk in chunks:
        for op in chunk.ops:
            view, _ = layout.op_rows(op)
            dev = view.reshape(-1)
            host_view = host[op.host_offset // word:][: op.nbytes // word]
            pairs.append((dev, host_view) if direction == "d2h" else (host_view, dev))
    return pairs
