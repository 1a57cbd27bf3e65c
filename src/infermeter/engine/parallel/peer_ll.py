"""The fused all-reduce + residual add + RMSNorm with data and flag in one 8-byte word (LL).

Why: peer_all_reduce.py's kernel pays, per call, a system-scope release (a fence that waits
until its stores to the peer are acknowledged over NVLink), the flag's own trip, and the
acquire; in the traced 13B tp 2 step on 2 x H200 that kernel takes 5.6 us a call, 80 calls a
step (0.45 of the step's 4.1 ms with PDL). NCCL's low-latency protocol (LL) needs no fence:
each 8-byte store carries 4 bytes of data and a 4-byte flag, and an aligned 8-byte store is
seen whole or not at all, so a reader that sees this call's flag in a word has that word's
data (--tp-all-reduce triton-ll).

Each word: bits 0-31 data (two 16-bit values, or one float32), bits 32-63 the tag
epoch * MAX_PROGRAMS + row. The epoch counts the calls at a site and row: every rank keeps its
own count in its flag area (peer_buffers.py's layout: one int32 per site and row), starts at 0
and adds 1 per call; ranks call the same sites in the same order, so they agree with no
exchange, and a CUDA graph's replay advances it on the GPU. Every word a slot still holds from
an earlier call carries another tag: an earlier epoch of the same row, or another row (a row's
words start at row * words-per-row, so a call with more or wider rows, e.g. a prefill before
the decode steps, can leave words of one row where another row reads later: the row in the tag
keeps them apart; the first tests caught exactly that). Program `row` of rank r (one program
per row of D):
  1. packs its row of D with the epoch and stores the words into slot r of the site on every
     peer (remote stores over NVLink; no store to itself: its own values stay in registers);
  2. reads slot p of its own buffer for each peer p until every word carries the epoch;
  3. sums the ranks' values in rank order in float32 (bit-identical on every rank), then the
     residual add and the norm exactly as add_norm_store does.
Reuse is safe by the argument in peer_all_reduce.py: a rank writes a site again only after
passing a later site's exchange, which its peer reaches only after finishing this one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from infermeter.engine.kernels import pdl
from infermeter.engine.kernels.pdl import launch
from infermeter.engine.kernels.triton_support import triton
from infermeter.spec.peer_buffers import MAX_PROGRAMS, SLOT_BYTES

WORD_BYTES = 8


def values_per_word(dtype: torch.dtype) -> int:
    """2 for 16-bit values, 1 for float32: 4 data bytes a word."""
    return 4 // torch.empty((), dtype=dtype).element_size()


def ll_fits(rows: int, dim: int, dtype: torch.dtype) -> bool:
    """Whether `rows` rows of `dim` values fit a slot as words (twice the bytes)."""
    pack = values_per_word(dtype)
    return 0 < rows <= MAX_PROGRAMS and dim % pack == 0 \
        and rows * (dim // pack) * WORD_BYTES <= SLOT_BYTES


if triton is not None:
    import triton.language as tl

    from infermeter.engine.parallel.peer_all_reduce import _address, add_residual, store_normed

    @triton.jit
    def _bits(x, PACK: tl.constexpr):
        """A value's bit pattern as uint32 (16-bit values in the low half)."""
        if PACK == 2:
            return x.to(tl.uint16, bitcast=True).to(tl.uint32)
        else:
            return x.to(tl.uint32, bitcast=True)

    @triton.jit
    def _unpack(words, shift: tl.constexpr, dtype: tl.constexpr, PACK: tl.constexpr):
        """float32 of the value at bit `shift` of each word (shift 0 or 16)."""
        if PACK == 2:
            bits = ((words >> shift) & 0xFFFF).to(tl.uint16)
        else:
            bits = (words & 0xFFFFFFFF).to(tl.uint32)
        return bits.to(dtype, bitcast=True).to(tl.float32)

    @triton.jit
    def _ll_add_norm_kernel(D, R, NORM_W, H, OUT, DATA_PTRS, FLAG_PTRS, dim, rank,
                            site_offset, slot_words, flag_offset, EPS: tl.constexpr,
                            WORLD: tl.constexpr, BLOCK: tl.constexpr, PACK: tl.constexpr,
                            ROWS: tl.constexpr, PDL: tl.constexpr = False):
        # BLOCK: words of a row, padded to a power of two; site_offset, slot_words in words
        row = tl.program_id(0)
        if PDL:  # D is the previous kernel's output; the next kernel may start (pdl.py)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        n_words = dim // PACK
        w = tl.arange(0, BLOCK)
        mask = w < n_words
        first = w * PACK  # the column of each word's first value
        counter = tl.load(FLAG_PTRS + rank).to(tl.pointer_type(tl.int32)) + flag_offset + row
        epoch = tl.load(counter) + 1
        tag = epoch.to(tl.uint32) * ROWS + row  # ROWS: MAX_PROGRAMS (wraps after 2^25 calls)
        lo = tl.load(D + row * dim + first, mask=mask, other=0.0)
        payload = _bits(lo, PACK)
        hi = lo
        if PACK == 2:
            hi = tl.load(D + row * dim + first + 1, mask=mask, other=0.0)
            payload = payload | (_bits(hi, PACK) << 16)
        word = payload.to(tl.uint64) | (tag.to(tl.uint64) << 32)
        at = site_offset + row * n_words + w  # the row's words in slot 0 of the site
        for r in tl.static_range(WORLD):  # 1. into slot `rank` of every peer
            if r != rank:
                tl.store(_address(DATA_PTRS + r, tl.uint64) + at + rank * slot_words, word,
                         mask=mask)
        mine = _address(DATA_PTRS + rank, tl.uint64) + at
        acc_lo = tl.zeros([BLOCK], tl.float32)
        acc_hi = tl.zeros([BLOCK], tl.float32)
        for r in tl.static_range(WORLD):  # 2. + 3. each rank's values, in rank order
            if r == rank:
                got_lo = lo.to(tl.float32)
                got_hi = hi.to(tl.float32)
            else:
                words = tl.load(mine + r * slot_words, mask=mask, other=word, volatile=True)
                while tl.sum(((words >> 32).to(tl.uint32) != tag).to(tl.int32)) > 0:
                    words = tl.load(mine + r * slot_words, mask=mask, other=word, volatile=True)
                got_lo = _unpack(words, 0, D.dtype.element_ty, PACK)
                got_hi = _unpack(words, 16, D.dtype.element_ty, PACK)
            acc_lo += got_lo
            acc_hi += got_hi
        tl.store(counter, epoch)
        offs = row * dim + first
        h_lo = add_residual(acc_lo, R, H, offs, mask)
        square_sum = tl.sum(h_lo * h_lo, axis=0)
        h_hi = h_lo
        if PACK == 2:
            h_hi = add_residual(acc_hi, R, H, offs + 1, mask)
            square_sum += tl.sum(h_hi * h_hi, axis=0)
        inv_rms = tl.rsqrt(square_sum / dim + EPS)
        store_normed(h_lo, inv_rms, NORM_W, H, OUT, first, offs, mask)
        if PACK == 2:
            store_normed(h_hi, inv_rms, NORM_W, H, OUT, first + 1, offs + 1, mask)


def ll_add_norm(peer: object, delta: Tensor, residual: Tensor, weight: Tensor, eps: float,
                site: int) -> tuple[Tensor, Tensor]:
    """(h, RMSNorm(h) * weight), h = residual + delta summed over the ranks, by the LL
    exchange through `peer`'s buffers (a peer_all_reduce.PeerAllReduce made with ll=True).
    delta, residual [..., dim]; weight [dim]."""
    from infermeter.engine.parallel.peer_all_reduce import add_norm_outputs

    delta, residual = delta.contiguous(), residual.contiguous()
    dim = delta.shape[-1]
    rows = delta.numel() // dim
    if not ll_fits(rows, dim, delta.dtype):
        raise ValueError(f"{tuple(delta.shape)} {delta.dtype} does not fit a slot as LL words")
    site_offset, slot_words, flag_offset = peer.site_layout(site, WORD_BYTES)
    pack = values_per_word(delta.dtype)
    block = triton.next_power_of_2(dim // pack)
    h, out = add_norm_outputs(delta, weight)
    launch(_ll_add_norm_kernel, (rows,), pdl.enabled(),
           delta, residual, weight, h, out, peer.data_ptrs, peer.flag_ptrs, dim, peer.rank,
           site_offset, slot_words, flag_offset, EPS=eps, WORLD=peer.world, BLOCK=block,
           PACK=pack, ROWS=MAX_PROGRAMS, num_warps=max(4, min(16, block // 256)))
    return h, out
