"""What `infermeter copy` moves: the KV cache laid out three ways, described without torch.

A layout is a list of device buffers (shapes in KV-dtype elements) plus `Segment`s that say which
bytes of those buffers make up the cache and in which order they land in host memory. The host side
is always one flat buffer of exactly `kv_cache_bytes` bytes, so every layout and every method moves
the same bytes to the same host addresses, and verification compares like with like.

Layouts (per layer, B = batch, S = tokens the layer caches, H = KV heads, D = head_dim):

- "engine": K and V each [B, H, S, D], two tensors per layer, 2 x n_layers tensors in all. This
  mirrors `engine/kv_cache.py` (LayerKVCache.k / .v, S = min(seq_len, window) for sliding-window
  layers); a test checks the shapes against it. MLA models (DeepSeek-V3) keep, as DeepSeek's
  reference model does, a latent [B, S, kv_lora_rank] and a rotary key [B, S, qk_rope_head_dim].
- "contiguous": one buffer of the same bytes (the best case for a DMA engine).
- "paged": per layer one vLLM-style block pool [2, n_blocks, block_tokens, H, D] (K pool, V pool;
  MLA: [n_blocks, block_tokens, kv_lora_rank + qk_rope_head_dim]). Each sequence owns
  ceil(S / block_tokens) blocks whose slots come from a seeded random permutation (a block table),
  so one sequence's blocks are scattered through the pool as they are in a running server. Only
  the tokens a sequence holds are moved: the last block of a sequence moves its filled part only,
  so the bytes moved equal `kv_cache_bytes` exactly. A piece (one copy in the per-block method) is
  one block of K or of V: 16 tokens of Llama-2-7B fp16 = 16 x 32 x 128 x 2 B = 128 KiB.

Bytes per layout always equal `sizes.kv_cache_bytes(spec, batch, seq_len, kv_dtype)` (tp = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from infermeter.errors import InfermeterError
from infermeter.specs import sizes
from infermeter.specs.model import ModelSpec
from infermeter.units import dtype_bytes

LAYOUTS = ("engine", "contiguous", "paged")
HOSTS = ("seed", "pageable", "pinned")
DIRECTIONS = ("d2h", "h2d", "both")
METHODS = ("per-tensor", "staged", "streams", "mapped")
BLOCK_TABLE_SEED = 1234


@dataclass(frozen=True)
class Segment:
    """Rows of equal size taken from one buffer, copied in order to consecutive host bytes.

    Row r (0 <= r < n_rows) starts at byte `base + slot(r) * stride` of buffer `buffer`, where
    slot(r) = r, or, for a paged segment, the block table's entry: `table` names the layer whose
    table [n_seqs, blocks_per_seq] is used, `full` picks its first blocks_per_seq - 1 columns
    (or all of them when the last block is full) and `last` its last column.
    """

    buffer: int
    base: int
    row_bytes: int
    stride: int
    n_rows: int
    table: int | None = None
    last: bool = False

    @property
    def nbytes(self) -> int:
        return self.row_bytes * self.n_rows


@dataclass(frozen=True)
class BlockTable:
    """One layer's block table: n_seqs x blocks_per_seq slots, a permutation of range(slots)."""

    n_seqs: int
    blocks_per_seq: int
    seed: int

    @property
    def slots(self) -> int:
        return self.n_seqs * self.blocks_per_seq


@dataclass(frozen=True)
class LayoutPlan:
    layout: str
    block_tokens: int | None
    elem_bytes: int
    buffers: tuple[tuple[int, ...], ...]  # shapes in KV-dtype elements
    segments: tuple[Segment, ...]
    tables: tuple[BlockTable, ...] = ()

    @property
    def total_bytes(self) -> int:
        """Bytes moved: the cache, equal to sizes.kv_cache_bytes."""
        return sum(seg.nbytes for seg in self.segments)

    @property
    def allocated_bytes(self) -> int:
        """Bytes the device buffers take (a paged pool rounds each sequence up to whole blocks)."""
        return sum(math.prod(shape) for shape in self.buffers) * self.elem_bytes

    @property
    def n_pieces(self) -> int:
        """Copies the per-tensor method issues: one per tensor, per block, or one in all."""
        return sum(seg.n_rows for seg in self.segments)

    def word_bytes(self) -> int:
        """Widest element (8, 4, 2 or 1 bytes) that divides every offset and size: gathers and
        compares run on views of this width, since byte-wide kernels are several times slower."""
        sizes = [self.allocated_bytes]
        for seg in self.segments:
            sizes += [seg.base, seg.row_bytes, seg.stride]
        common = 0
        for size in sizes:
            common = math.gcd(common, size)
        return next(w for w in (8, 4, 2, 1) if common % w == 0)


def _components(spec: ModelSpec) -> list[int]:
    """Elements per token of each cached tensor of one layer: K and V, or MLA latent and key."""
    if spec.is_mla:
        return [spec.kv_lora_rank, spec.qk_rope_head_dim]
    return [spec.n_kv_heads * spec.head_dim] * 2


def engine_shapes(spec: ModelSpec, batch_size: int, seq_len: int) -> list[tuple[int, ...]]:
    """Per-layer cache tensors as the engine allocates them (engine/kv_cache.py), in the order
    of `Transformer.cache_tensors()`: [layer0.k, layer0.v, layer1.k, ...]."""
    shapes = []
    for layer in range(spec.n_layers):
        tokens = sizes.cached_tokens(spec, layer, seq_len)
        if spec.is_mla:
            shapes += [(batch_size, tokens, spec.kv_lora_rank),
                       (batch_size, tokens, spec.qk_rope_head_dim)]
        else:
            shapes += [(batch_size, spec.n_kv_heads, tokens, spec.head_dim)] * 2
    return shapes


def _engine(spec: ModelSpec, batch: int, seq_len: int, elem: int) -> LayoutPlan:
    shapes = engine_shapes(spec, batch, seq_len)
    segments = [Segment(i, 0, math.prod(s) * elem, math.prod(s) * elem, 1)
                for i, s in enumerate(shapes)]
    return LayoutPlan("engine", None, elem, tuple(shapes), tuple(segments))


def _contiguous(spec: ModelSpec, batch: int, seq_len: int, kv_dtype: str) -> LayoutPlan:
    total = sizes.kv_cache_bytes(spec, batch, seq_len, kv_dtype)
    elem = dtype_bytes(kv_dtype)
    return LayoutPlan("contiguous", None, elem, ((total // elem,),),
                      (Segment(0, 0, total, total, 1),))


def _paged(spec: ModelSpec, batch: int, seq_len: int, elem: int, block: int) -> LayoutPlan:
    comps = _components(spec)
    buffers, segments, tables = [], [], []
    for layer in range(spec.n_layers):
        tokens = sizes.cached_tokens(spec, layer, seq_len)
        per_seq = math.ceil(tokens / block)
        last_tokens = tokens - (per_seq - 1) * block  # 1..block tokens in the last block
        table = BlockTable(batch, per_seq, BLOCK_TABLE_SEED + layer)
        slots = table.slots
        if spec.is_mla:  # one pool, the latent and the rotary key side by side per token
            buffers.append((slots, block, sum(comps)))
            comp_bases, width = [0], sum(comps)
        else:
            buffers.append((2, slots, block, spec.n_kv_heads, spec.head_dim))
            width = comps[0]
            comp_bases = [c * slots * block * width * elem for c in range(2)]
        block_bytes = block * width * elem
        for base in comp_bases:
            full_cols = per_seq if last_tokens == block else per_seq - 1
            if full_cols:
                segments.append(Segment(layer, base, block_bytes, block_bytes,
                                        batch * full_cols, table=len(tables)))
            if last_tokens != block:
                segments.append(Segment(layer, base, last_tokens * width * elem, block_bytes,
                                        batch, table=len(tables), last=True))
        tables.append(table)
    return LayoutPlan("paged", block, elem, tuple(buffers), tuple(segments), tuple(tables))


def plan_layout(spec: ModelSpec, batch_size: int, seq_len: int, kv_dtype: str, layout: str,
                block_tokens: int | None = None) -> LayoutPlan:
    """The device buffers and segments of one layout; `block_tokens` is for "paged" only."""
    if batch_size <= 0 or seq_len <= 0:
        raise InfermeterError(f"batch size and seq_len must be positive, got {batch_size}, "
                              f"{seq_len}")
    elem = dtype_bytes(kv_dtype)
    if layout == "engine":
        return _engine(spec, batch_size, seq_len, elem)
    if layout == "contiguous":
        return _contiguous(spec, batch_size, seq_len, kv_dtype)
    if layout == "paged":
        if block_tokens is None or block_tokens <= 0:
            raise InfermeterError(f"block tokens must be positive, got {block_tokens}")
        return _paged(spec, batch_size, seq_len, elem, block_tokens)
    raise InfermeterError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")


# ---- the sweep: which (layout, host memory, direction, method) cases run -----------------------
MAX_PIECES = 140_000  # per-piece methods issue one copy call per piece; beyond this they take
#                       minutes (1-token blocks of a large batch), so those cases are skipped.


@dataclass(frozen=True)
class Case:
    layout: str
    block_tokens: int | None
    host_memory: str
    direction: str
    method: str

    @property
    def label(self) -> str:
        layout = self.layout + (f"/{self.block_tokens}" if self.block_tokens else "")
        return f"{layout} {self.host_memory} {self.direction} {self.method}"


def skip_reason(case: Case, n_pieces: int, device: str) -> str | None:
    """Why a case cannot or should not run, or None. Decided from the case alone (the mapped
    method's availability is only known on the GPU and is checked there)."""
    if case.host_memory == "seed":
        if case.method != "per-tensor":
            return "the seed way is one .cpu()/.cuda() per tensor: per-tensor only"
        if case.direction == "both":
            return "the seed way moves one direction at a time"
    if device == "cpu":
        if case.host_memory == "pinned":
            return "pinned memory needs CUDA"
        if case.method in ("streams", "mapped"):
            return f"{case.method} needs CUDA"
    if case.method == "mapped" and case.host_memory != "pinned":
        return "mapped copies need pinned host memory"
    if case.method in ("per-tensor", "streams") and n_pieces > MAX_PIECES:
        return f"{n_pieces:,} pieces > {MAX_PIECES:,}: one copy per piece would take minutes"
    return None


def layout_variants(layouts: tuple[str, ...], block_tokens: tuple[int, ...]
                    ) -> list[tuple[str, int | None]]:
    """(layout, block_tokens) pairs: one per paged block size, one for each other layout."""
    out: list[tuple[str, int | None]] = []
    for layout in layouts:
        if layout == "paged":
            out += [("paged", block) for block in block_tokens]
        else:
            out.append((layout, None))
    return out


def enumerate_cases(layouts: tuple[str, ...], hosts: tuple[str, ...],
                    directions: tuple[str, ...], methods: tuple[str, ...],
                    block_tokens: tuple[int, ...]) -> list[Case]:
    """Every combination, host memory outermost (host buffers are allocated once per kind)."""
    for name, allowed in (("layout", LAYOUTS), ("host", HOSTS), ("direction", DIRECTIONS),
                          ("method", METHODS)):
        values = {"layout": layouts, "host": hosts, "direction": directions,
                  "method": methods}[name]
        bad = [v for v in values if v not in allowed]
        if bad:
            raise InfermeterError(f"unknown {name} {bad[0]!r}; use one of {', '.join(allowed)}")
    bad_blocks = [b for b in block_tokens if b <= 0]
    if bad_blocks:
        raise InfermeterError(f"block tokens must be positive, got {bad_blocks[0]}")
    return [Case(layout, block, host, direction, method)
            for host in hosts
            for layout, block in layout_variants(layouts, block_tokens)
            for direction in directions
            for method in methods]
