"""Row-parallel products that push as they go (--tp-all-reduce triton-push).

Why: at tensor parallelism 2 each of a decode step's 80 all-reduces (Llama-2-13B) follows a
row-parallel GEMV (wo, w2) that produced this rank's partial sums. peer_all_reduce.py's fused
kernel starts when the GEMV has ended and then spends most of its ~5.3 us on the round trip
over NVLink: its stores into the peer's memory, the release, the peer's flag. Here the GEMV
itself stores each program's rows into every peer's slot as soon as they are computed, while
its other programs are still streaming weights; the kernel after it only signals, waits, sums,
adds and norms:

  _gemv_push_kernel      grid (ceil(N / BLOCK_N),), gemv_kernel.py's tiles: program p computes
                         rows [p * BLOCK_N, (p + 1) * BLOCK_N) of x @ W^T (row_dots), rounds
                         them to x's dtype, stores them into OUT (this rank's partial) and into
                         slot `rank` of the site on every peer. No signal: a release per
                         program (system scope, so it waits for its NVLink stores to land)
                         made 13B's tp 2 w2 GEMV 33 us instead of 21 on 2 x H200 (session 8).
  _peer_wait_add_norm_kernel
                         one program (one row: batch-1 decode): bumps the site's flag on every
                         peer (release, system scope), waits until its own flag reads world - 1
                         and resets it (one compare-and-swap, acquire), sums the world partials
                         in rank order (its own from OUT, the peers' from its slots) in float32,
                         then the residual add and the RMSNorm (peer_all_reduce.add_norm_store).

Why the signal may come from the next kernel: a kernel's memory operations, the GEMV's stores
into the peers included, are complete before the next kernel of the stream starts, and a
release is cumulative (it orders everything that happened before it, the previous kernel's
stores included); the peer's acquire of the flag then makes them visible to it. The same
pattern as writing a symmetric buffer with any kernel and then calling symmetric memory's
barrier. The buffers, sites, flags and the one-handshake argument are peer_all_reduce.py's
(this is its protocol with step 1 moved into the GEMV), so a site can be used either way from
one step to the next (eager steps and prefill go the other way), and the sum has the same order
and roundings as peer_all_reduce_add_norm's.

Measured (13B bf16 tp 2, 2 x H200, session 8, one run): 4.41 ms a step against --tp-all-reduce
triton's 4.38. The waiting kernel took 4.6 us instead of the fused all-reduce's 5.5, but wo's and
w2's GEMVs 0.7 and 2.1 us longer (their ends wait for the NVLink stores): an option, not the
default.
"""

from __future__ import annotations

import torch
from torch import Tensor

from infermeter.engine.kernels.gemv import NUM_STAGES, gpu_name, tiles_for
from infermeter.engine.kernels.triton_support import triton
from infermeter.engine.parallel.peer_all_reduce import (
    _INSTANCES,
    SLOT_BYTES,
    PeerAllReduce,
    add_norm_outputs,
)

if triton is not None:
    import triton.language as tl

    from infermeter.engine.kernels.gemv import row_dots
    from infermeter.engine.parallel.peer_all_reduce import _address, add_norm_store

    @triton.jit
    def _gemv_push_kernel(X, W, OUT, DATA_PTRS, FLAG_PTRS, n_rows, n_cols, stride_w, rank,
                          site_offset, slot_elems, WORLD: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        out = row_dots(X, W, rows, row_ok, n_cols, stride_w, BLOCK_N, BLOCK_K)
        out = out.to(OUT.dtype.element_ty)  # [BLOCK_N]: this rank's partial sums
        tl.store(OUT + rows, out, mask=row_ok)
        for r in tl.static_range(WORLD):  # into slot `rank` of every peer
            if r != rank:
                data = _address(DATA_PTRS + r, out.dtype)
                tl.store(data + site_offset + rank * slot_elems + rows, out, mask=row_ok)

    @triton.jit
    def _peer_wait_add_norm_kernel(D, R, NORM_W, H, OUT, DATA_PTRS, FLAG_PTRS, dim, rank,
                                   site_offset, slot_elems, flag, EPS: tl.constexpr,
                                   WORLD: tl.constexpr, BLOCK: tl.constexpr):
        cols = tl.arange(0, BLOCK)
        mask = cols < dim
        for r in tl.static_range(WORLD):  # my GEMV's stores have landed: tell every peer
            if r != rank:
                flags = tl.load(FLAG_PTRS + r).to(tl.pointer_type(tl.int32))
                tl.atomic_add(flags + flag, 1, sem="release", scope="sys")
        mine = tl.load(FLAG_PTRS + rank).to(tl.pointer_type(tl.int32)) + flag
        seen = tl.atomic_cas(mine, WORLD - 1, 0, sem="acquire", scope="sys")
        while seen != WORLD - 1:  # every peer's partial is here; the flag is reset
            seen = tl.atomic_cas(mine, WORLD - 1, 0, sem="acquire", scope="sys")
        data = _address(DATA_PTRS + rank, D.dtype.element_ty)
        acc = tl.zeros([BLOCK], tl.float32)
        for r in tl.static_range(WORLD):  # the sum, in rank order
            if r == rank:
                part = tl.load(D + cols, mask=mask).to(tl.float32)
            else:
                part = tl.load(data + site_offset + r * slot_elems + cols, mask=mask,
                               volatile=True).to(tl.float32)
            acc += part
        add_norm_store(acc, R, NORM_W, H, OUT, cols, cols, mask, dim, EPS)


def gemv_push(peer: PeerAllReduce, x: Tensor, weight: Tensor, site: int) -> Tensor:
    """x [1, K] @ weight[N, K]^T -> this rank's partial sums [1, N] (x's dtype), also stored
    into slot peer.rank of `site` on every peer, which wait_add_norm (the next kernel on this
    stream) announces to them and sums."""
    n_rows, n_cols = weight.shape
    if x.dtype != weight.dtype or x.numel() != n_cols:
        raise ValueError(f"gemv_push takes one row of {n_cols} {weight.dtype}, got "
                         f"{tuple(x.shape)} {x.dtype}")
    site_offset, slot_elems, _ = peer.site_layout(site, x.element_size())
    if n_rows * x.element_size() > SLOT_BYTES:
        raise ValueError(f"{n_rows} outputs do not fit a slot")
    x, weight = x.contiguous(), weight if weight.stride(-1) == 1 else weight.contiguous()
    out = torch.empty(1, n_rows, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = tiles_for(n_cols, gpu_name(weight.device))
    torch.library.wrap_triton(_gemv_push_kernel)[(triton.cdiv(n_rows, block_n),)](
        x, weight, out, peer.data_ptrs, peer.flag_ptrs, n_rows, n_cols, weight.stride(0),
        peer.rank, site_offset, slot_elems, WORLD=peer.world, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=warps, num_stages=NUM_STAGES)
    return out


def wait_add_norm(peer: PeerAllReduce, partial: Tensor, residual: Tensor, weight: Tensor,
                  eps: float, site: int) -> tuple[Tensor, Tensor]:
    """(h, RMSNorm(h) * weight), h = residual + the sum over the ranks of the partials their
    gemv_push stored at `site`; partial is this rank's (gemv_push's output, the kernel just
    before on this stream). partial, residual [..., dim] hold one row."""
    dim = partial.shape[-1]
    if partial.numel() != dim or residual.shape != partial.shape \
            or residual.dtype != partial.dtype:
        raise ValueError(f"wait_add_norm takes one row: {tuple(partial.shape)} "
                         f"{partial.dtype}, residual {tuple(residual.shape)} {residual.dtype}")
    site_offset, slot_elems, flag = peer.site_layout(site, partial.element_size())
    partial, residual = partial.contiguous(), residual.contiguous()
    h, out = add_norm_outputs(partial, weight)
    block = triton.next_power_of_2(dim)
    torch.library.wrap_triton(_peer_wait_add_norm_kernel)[(1,)](
        partial, residual, weight, h, out, peer.data_ptrs, peer.flag_ptrs, dim, peer.rank,
        site_offset, slot_elems, flag, EPS=eps,
        WORLD=peer.world, BLOCK=block, num_warps=max(4, min(16, block // 512)))
    return h, out


@torch.library.custom_op("infermeter::peer_gemv_push", mutates_args=())
def peer_gemv_push(x: Tensor, weight: Tensor, instance: int, site: int) -> Tensor:
    """gemv_push through registered instance `instance` (peer_all_reduce.register). Opaque to
    torch.compile: its stores into the peers are a side effect inductor must not see through;
    the partial it returns orders it before peer_wait_add_norm."""
    return gemv_push(_INSTANCES[instance], x, weight, site)


@peer_gemv_push.register_fake
def _(x: Tensor, weight: Tensor, instance: int, site: int) -> Tensor:
    return torch.empty(1, weight.shape[0], dtype=x.dtype, device=x.device)


@torch.library.custom_op("infermeter::peer_wait_add_norm", mutates_args=())
def peer_wait_add_norm(partial: Tensor, residual: Tensor, weight: Tensor, eps: float,
                       instance: int, site: int) -> tuple[Tensor, Tensor]:
    """wait_add_norm through registered instance `instance`."""
    return wait_add_norm(_INSTANCES[instance], partial, residual, weight, eps, site)


@peer_wait_add_norm.register_fake
def _(partial: Tensor, residual: Tensor, weight: Tensor, eps: float, instance: int,
      site: int) -> tuple[Tensor, Tensor]:
    return add_norm_outputs(partial, weight)
