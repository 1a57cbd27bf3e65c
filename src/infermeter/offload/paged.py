"""A prefix's KV cache kept in host memory in fixed-size blocks, as a paged server keeps it, and
reloaded block by block into the engine's cache.

PagedHostPrefix holds, per layer, a K pool and a V pool [n_blocks, H_kv, block, D] in host
memory (pinned on a GPU), n_blocks = B x ceil(n / block) with n = min(P, the layer's slots).
Sequence b's i-th block sits at the pool slot a seeded block table gives (a random permutation,
so one sequence's blocks are scattered through the pool as in a running server, and no two
neighbours can be merged into one copy). A block keeps its tokens in the engine's own
[H_kv, tokens, D] order, the last, partly filled block's at the start of each head's row.
A reload copies each block whole, K and V of every KV head in one DMA ([H_kv, block, D],
contiguous in the pool), into a device staging buffer [B, blocks, H_kv, block, D] in the
sequence's order, then moves the layer's slots into the cache [B, H_kv, S, D] with two
device-to-device copies (the whole blocks through a view, then the last, partly filled one):
the device's layout differs from a page's, as it would in any engine whose cache is not paged
the same way. The DMAs a reload issues grow as 1 / block size; the staging holds STAGE_SLOTS
layers, used in turn (`fetch_layer` the DMAs into slot index % STAGE_SLOTS: every layer is
staged; `place_layer` the device copies out of it, as reload.py's HostPrefix). A partly filled
last block moves whole, as a paged server moves it; nbytes counts the prefix's tokens only.

A second way to fetch (`copy` "mapped", PAGED_COPIES): per layer one gather kernel of K's
blocks and one of V's (torch.index_select on the copy stream, measure/mapped_host.kernel_copy)
reads the pool through its device mapping (mapped pinned memory, over the link) into the same
staging slot, in the same order, by the layer's block ids, kept on the device, made once. The
blocks are gathered as rows of 8-byte words where their size allows (as the mapped copy method
moves its rows). A DMA per 64 KiB block is bound by issuing it; the gather is one launch a
pool, but a kernel on the SMs, which in the layer-wise way competes with the suffix's forward.
The mapping is injectable (`map_host`): on the CPU a host tensor is its own mapping, so the CPU
runs the very gathers a GPU runs, from the pool itself. One PagedHostPrefix holds the pools and
staging for every way asked (`copies`); `using(copy)` gives the same prefix reloaded that way.

It offers what reload.py's HostPrefix offers (prefix_len, nbytes, fetch_layer, place_layer,
reload, slot_of), so the serial way and LayerwiseReload run over it unchanged.
"""

from __future__ import annotations

import copy as shallow
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from infermeter.engine.model import Transformer
from infermeter.errors import InfermeterError
from infermeter.measure.mapped_host import mapped_view
from infermeter.offload.reload import STAGE_SLOTS, LayerCopies, check_prefix_fits, layer_caches
from infermeter.offload.streams import (
    CURRENT,
    Copy,
    CopyStream,
    copy_piece,
    pinned_like,
    pins_for,
)


@dataclass
class PagedLayer:
    k: Tensor  # [n_blocks, H_kv, block, D] in host memory
    v: Tensor
    blocks: list[tuple[int, int, int, int]]  # (sequence, first slot, end slot, pool slot)
    key_pos: Tensor | None  # [S_layer] int64, a ring layer's only (pinned on a GPU too)
    slots: int  # n: the layer's slots the prefix fills
    # its DMAs, made once: (staging views, pool blocks), each [H_kv, block, D], K's then V's
    pieces: tuple[list[Tensor], list[Tensor]]
    # its gathers, made once (the mapped way): (staging rows [n, words], the pool's device
    # mapping [n_blocks, words], block ids [n] on the device), K's then V's; a row: one block's
    # [H_kv, block, D] seen as integer words
    gathers: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)


PAGED_COPIES = ("dma", "mapped")  # request.PAGED_COPIES: a DMA per block, a gather per pool
# host memory seen from the device: (a pool's bytes, uint8 [n], device) -> the same bytes as a
# tensor on the device; raises InfermeterError where there is none
MapHost = Callable[[Tensor, torch.device], Tensor]


def device_mapping(host: Tensor, device: torch.device) -> Tensor:
    """A pool's device mapping: on the CPU the pool itself (host memory is the CPU's own), on a
    GPU its mapped pinned memory (measure/mapped_host.mapped_view), or one error line."""
    if device.type == "cpu":
        return host
    view, why = mapped_view(host, device)
    if view is None:
        raise InfermeterError(f"--paged-copy mapped: mapped pinned memory unavailable: {why}; "
                              "use --paged-copy dma")
    return view


def word_dtype(nbytes: int) -> torch.dtype:
    """The widest integer word a row of `nbytes` divides into: the gather moves whole words."""
    return next(dtype for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2),
                                          (torch.uint8, 1)) if nbytes % size == 0)


class PagedHostPrefix(LayerCopies):
    """The KV cache of the first `prefix_len` positions of `model`'s cache, copied to host in
    blocks of `block_size` tokens."""

    def __init__(self, model: Transformer, prefix_len: int, block_size: int,
                 seed: int = 0, copies: tuple[str, ...] = ("dma",),
                 map_host: MapHost = device_mapping) -> None:
        caches = layer_caches(model)
        if block_size < 1:
            raise InfermeterError(f"--block-size must be at least 1 token, got {block_size}")
        unknown = [way for way in copies if way not in PAGED_COPIES]
        if unknown or not copies:
            raise InfermeterError(f"--paged-copy: unknown method {unknown[0]!r} (use "
                                  f"{', '.join(PAGED_COPIES)})" if unknown else
                                  "--paged-copy: give at least one method (dma, mapped)")
        self.copy, self.ways = copies[0], tuple(copies)
        check_prefix_fits(model, prefix_len)
        self.prefix_len, self.block_size = prefix_len, block_size
        pin = pins_for(caches[0].k.device)
        rng = torch.Generator().manual_seed(seed)
        self.layers: list[PagedLayer] = []
        first = caches[0].k
        most = max(math.ceil(min(prefix_len, cache.size) / block_size) for cache in caches)
        # [B, blocks, H_kv, block, D] on the device, K and V: one layer's blocks in order
        stage = (first.shape[0], most, first.shape[1], block_size, first.shape[3])
        # slot j's K and V at 2j and 2j + 1
        self.stage = tuple(torch.empty(stage, dtype=first.dtype, device=first.device)
                           for _ in range(2 * STAGE_SLOTS))
        self.slot_of: list[int | None] = [i % STAGE_SLOTS for i in range(len(caches))]
        for cache in caches:
            batch, heads, _, dim = cache.k.shape
            n = min(prefix_len, cache.size)
            per_seq = math.ceil(n / block_size)
            table = torch.randperm(batch * per_seq, generator=rng).view(batch, per_seq).tolist()
            shape = (batch * per_seq, heads, block_size, dim)
            k, v = (torch.empty(shape, dtype=cache.k.dtype, pin_memory=pin) for _ in range(2))
            blocks = [(b, i * block_size, min(n, (i + 1) * block_size), table[b][i])
                      for b in range(batch) for i in range(per_seq)]
            for b, start, end, slot in blocks:
                k[slot, :, :end - start].copy_(cache.k[b, :, start:end])
                v[slot, :, :end - start].copy_(cache.v[b, :, start:end])
            key_pos = pinned_like(cache.key_pos, pin) if cache.is_ring else None
            pieces: tuple[list[Tensor], list[Tensor]] = ([], [])
            staged = self._staging(len(self.layers))
            if "dma" in copies:
                for pool, staging in zip((k, v), staged):
                    for b, start, _, at in blocks:
                        pieces[0].append(staging[b, start // block_size])
                        pieces[1].append(pool[at])
            gathers = self._gathers((k, v), staged, table, map_host) \
                if "mapped" in copies else []
            self.layers.append(PagedLayer(k, v, blocks, key_pos, n, pieces, gathers))

    def _gathers(self, pools: tuple[Tensor, Tensor], staged: tuple[Tensor, Tensor],
                 table: list[list[int]], map_host: MapHost) -> list[tuple[Tensor, Tensor, Tensor]]:
        """A layer's gathers: per pool, its device mapping seen as rows of words
        [n_blocks, words], the block ids in the sequences' order [B x blocks] on the device, and
        the staging slot's rows they fill. Where the layer holds fewer blocks a sequence than
        the slot (a ring layer), the batch's rows are not one run: one gather per sequence."""
        device, (batch, per_seq), most = staged[0].device, (len(table), len(table[0])), \
            staged[0].shape[1]
        ids = torch.tensor(table, dtype=torch.int64).flatten().to(device)  # [B x per_seq]
        words = word_dtype(staged[0][0, 0].nbytes)
        runs = [(0, 0, batch * per_seq)] if per_seq == most else \
            [(b * most, b * per_seq, per_seq) for b in range(batch)]  # (first row, first id, n)
        out = []
        for pool, staging in zip(pools, staged):
            mapped = map_host(pool.view(-1).view(torch.uint8), device)
            rows = mapped.view(words).view(pool.shape[0], -1)  # [n_blocks, words]
            stage_rows = staging.view(-1).view(words).view(batch * most, -1)
            out += [(stage_rows[row:row + count], rows, ids[first:first + count])
                    for row, first, count in runs]
        return out

    def using(self, copy: str) -> PagedHostPrefix:
        """This host copy, its pools and staging shared, reloaded by `copy` (one of `ways`)."""
        if copy not in self.ways:
            raise InfermeterError(f"paged host copy made for {', '.join(self.ways)}: no "
                                  f"{copy!r} way")
        other = shallow.copy(self)
        other.copy = copy
        return other

    @property
    def nbytes(self) -> int:
        """Bytes one reload moves: the tokens the blocks hold, not the unfilled tails."""
        return sum(2 * (end - start) * layer.k[0, :, 0].numel() * layer.k.element_size()
                   for layer in self.layers for _, start, end, _ in layer.blocks)

    @property
    def copies(self) -> int:
        """Host-to-device copies one reload issues: dma, a block of K or of V, every KV head;
        mapped, a gather kernel of a layer's K or V blocks (one a sequence in a ring layer)."""
        if self.copy == "mapped":
            return sum(len(layer.gathers) for layer in self.layers)
        return sum(2 * len(layer.blocks) for layer in self.layers)

    def _pools(self, model: Transformer, index: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Layer `index`'s (host pool, cache, staging slot) for K, then for V."""
        cache, layer = layer_caches(model)[index], self.layers[index]
        k_stage, v_stage = self._staging(index)
        return [(layer.k, cache.k, k_stage), (layer.v, cache.v, v_stage)]

    def _staging(self, index: int) -> tuple[Tensor, Tensor]:
        """Layer `index`'s staging slot: its K and V buffers [B, blocks, H_kv, block, D]."""
        first = 2 * self.slot_of[index]
        return self.stage[first], self.stage[first + 1]

    def fetch_layer(self, model: Transformer, index: int,
                    copies: CopyStream = CURRENT) -> None:
        """Layer `index`'s copies on `copies` (default: the current stream, async from pinned
        memory) into its staging slot: dma, its DMAs issued from one call, each block of K and
        of V contiguous on both sides; mapped, its gathers (a kernel a pool, through the pool's
        mapping). Either way a ring layer's key_pos straight into the cache, one DMA."""
        layer = self.layers[index]
        if self.copy == "mapped":
            for staging, mapped, ids in layer.gathers:
                copies.gather(staging, mapped, ids)
        else:
            copies.copy_all(*layer.pieces)
        if layer.key_pos is not None:
            copies.copy(layer_caches(model)[index].key_pos, layer.key_pos)

    def place_layer(self, model: Transformer, index: int, copy: Copy = copy_piece) -> None:
        """Layer `index`'s staged slots into the cache (device to device), after its fetch."""
        block, n = self.block_size, self.layers[index].slots
        whole = n // block  # full blocks; a partly filled one after them when n % block
        for _, device, stage in self._pools(model, index):
            if whole:  # [B, H_kv, whole * block, D] seen as [B, whole, H_kv, block, D]
                slots = device[:, :, :whole * block].unflatten(2, (whole, block))
                copy(slots.transpose(1, 2), stage[:, :whole])
            if n > whole * block:  # [B, H_kv, n % block, D]
                copy(device[:, :, whole * block:n], stage[:, whole, :, :n - whole * block])
