"""A one-kernel all-reduce for a decode step's small activations: ranks push to each other's memory.

Why: at tensor parallelism 2 a Llama-2-13B decode step does 80 all-reduces of one token's
[1, 1, 5120] activations (10 KiB). Each is latency, not bandwidth: NCCL took ~10 us apiece in a
CUDA graph (0.82 ms, 13% of the step on 2 x H100), inductor's symmetric-memory one-shot kernel
~7 us (it copies the input into a symmetric buffer, then synchronises before and after the
reads). This kernel does one pass and one handshake (--tp-all-reduce triton):

  every rank owns a buffer that all ranks can write (torch symmetric memory over NVLink): a flag
  area, then one data region per call site (a layer's wo or w2: 2 * n_layers sites), each with a
  slot per rank. Program p of rank r, for elements [p * BLOCK, (p + 1) * BLOCK) of x:
    1. stores its slice of x into slot r of site s on every rank (remote stores over NVLink);
    2. bumps flag [s, p] on every other rank (release, system scope: after the stores);
    3. waits until its own flag [s, p] reads world - 1 and resets it to 0 (one compare-and-swap,
       acquire): every peer's slice has landed;
    4. sums the world slots in rank order in float32 and stores the result in x's dtype (the
       same order on every rank: the ranks keep bit-identical activations, as they must).

Why one handshake is enough (the one-shot kernel has a second, "everyone finished reading"): a
site is used once per forward pass and a forward has at least two sites, so before a rank writes
a site again it must pass a later site's handshake, which its peer reaches only after its kernel
for this site has finished reading. Flags are reset by their owner, so no count has to survive a
CUDA graph's replay.

Tensors larger than a slot (SLOT_BYTES: prefill's [B, T, dim]) stay with NCCL (parallel.py
decides by shape, static in a compiled step). A rank that dies leaves its peer spinning in step
3; the launcher then ends the whole group (launch.py), as with a stuck NCCL collective.

Works where Triton does: CUDA, with buffers from torch symmetric memory, or the CPU under
TRITON_INTERPRET=1 with shared-memory CPU tensors as the ranks' buffers (how the tests run it,
in two processes).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from infermeter.engine.kernels import pdl
from infermeter.engine.kernels.pdl import launch
from infermeter.engine.kernels.triton_support import triton
from infermeter.errors import InfermeterError
from infermeter.specs.peer_buffers import (  # noqa: F401 - the layout, re-exported
    BLOCK,
    FLAG_BYTES,
    MAX_PROGRAMS,
    SLOT_BYTES,
    buffer_bytes,
    flag_area_bytes,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ERROR_BYTES = 256  # of a rank's error text that the ranks' agreement carries (agree)


def enable_symm_mem(group_name: str) -> None:
    """torch's enable_symm_mem_for_group(group_name), without its FutureWarning.

    torch 2.11 deprecated the call ("no need to call this function anymore"), printing the
    warning once per rank on every `generate --tp` run, yet 2.11 and 2.13 still accept it and it
    is what registers the group's store for symmetric memory (inductor's one-shot all-reduce
    checks that registration), so it stays; only that one warning is silenced, nothing else."""
    import torch.distributed._symmetric_memory as symm_mem

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=".*enable_symm_mem_for_group.*")
        symm_mem.enable_symm_mem_for_group(group_name)


class PeerBufferUnavailable(InfermeterError):
    """Some rank could not allocate or map its symmetric-memory buffer (a driver or container
    without CUDA IPC / virtual memory management, or a full GPU). Every rank of the group raises
    it, with the same message: --tp-all-reduce auto then falls back to NCCL (generate/job.py);
    an explicit triton kind ends the run with it as one error line."""


def agree(group: Any, error: str | None, table: Tensor, stage: str) -> str | None:
    """A collective: None on every rank of `group` if no rank failed `stage`, else the same
    one-line message on every rank, naming the failing ranks and the first one's error text.
    error: this rank's error (None: it succeeded); table: [world, ERROR_BYTES] uint8 on the
    group's device, allocated before the work that may fail (a full GPU must still agree).

    Why: a rank that raised alone would leave its peers waiting in the next collective (the
    rendezvous, a barrier) until the timeout. One all-reduce (MAX) of the table, row r rank r's
    error text as bytes (zeros: no error), tells every rank whether any failed and what it said;
    one message on every rank is what lets the launcher print it once (launch.py merges
    identical errors)."""
    import torch.distributed as dist

    table.zero_()
    if error is not None:
        text = next((line for line in error.strip().splitlines() if line.strip()), "")
        raw = (text or "unknown error").encode()[:ERROR_BYTES]
        table[dist.get_rank(group), :len(raw)] = torch.frombuffer(bytearray(raw),
                                                                  dtype=torch.uint8)
    dist.all_reduce(table, op=dist.ReduceOp.MAX, group=group)
    rows = table.cpu()
    failed = [rank for rank, row in enumerate(rows) if row.any()]
    if not failed:
        return None
    first = bytes(rows[failed[0]].tolist()).rstrip(b"\0").decode(errors="replace")
    who = f"rank {failed[0]}" if len(failed) == 1 else f"ranks {', '.join(map(str, failed))}"
    return f"symmetric memory unavailable on {who} ({stage}): {first}"


if triton is not None:
    import triton.language as tl

    from infermeter.engine.kernels.exact_math import exact_mean

    @triton.jit
    def _address(table, dtype: tl.constexpr):
        """A buffer's address from a table of int64s as a pointer to dtype, 256-byte aligned
        (flag_area_bytes; symmetric memory is page aligned): said, so that Triton moves 16
        bytes per instruction instead of one element."""
        return tl.multiple_of(tl.load(table).to(tl.pointer_type(dtype)), 256)

    @triton.jit
    def _exchange_and_sum(x, offs, mask, flag, DATA_PTRS, FLAG_PTRS, rank, site_offset,
                          slot_elems, flag_offset, WORLD: tl.constexpr, BLOCK: tl.constexpr):
        """Steps 1-4 of the module docstring for one program: x [BLOCK] (this rank's values at
        offs) -> the float32 sum over the ranks. DATA_PTRS / FLAG_PTRS [WORLD] int64: every
        rank's data area and flag area, as addresses this process can use; site_offset: elements
        from a data area's start to this site's slot 0; flag: the program's flag in the site,
        which starts at flag_offset."""
        for r in tl.static_range(WORLD):  # 1. my slice into slot `rank` of every rank
            data = _address(DATA_PTRS + r, x.dtype)
            tl.store(data + site_offset + rank * slot_elems + offs, x, mask=mask)
        tl.debug_barrier()  # all of this program's stores come before its signals
        for r in tl.static_range(WORLD):  # 2. tell every peer
            if r != rank:
                flags = tl.load(FLAG_PTRS + r).to(tl.pointer_type(tl.int32))
                tl.atomic_add(flags + flag_offset + flag, 1, sem="release", scope="sys")
        mine = tl.load(FLAG_PTRS + rank).to(tl.pointer_type(tl.int32)) + flag_offset + flag
        seen = tl.atomic_cas(mine, WORLD - 1, 0, sem="acquire", scope="sys")
        while seen != WORLD - 1:  # 3. every peer's slice is here; the flag is reset
            seen = tl.atomic_cas(mine, WORLD - 1, 0, sem="acquire", scope="sys")
        data = _address(DATA_PTRS + rank, x.dtype)
        acc = tl.zeros([BLOCK], tl.float32)
        for r in tl.static_range(WORLD):  # 4. the sum, in rank order
            acc += tl.load(data + site_offset + r * slot_elems + offs, mask=mask,
                           volatile=True).to(tl.float32)
        return acc

    @triton.jit
    def _peer_all_reduce_kernel(X, OUT, DATA_PTRS, FLAG_PTRS, numel, rank, site_offset,
                                slot_elems, flag_offset, WORLD: tl.constexpr,
                                BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        # Program p sums elements [p * BLOCK, (p + 1) * BLOCK) of X through flag p of the site.
        if PDL:  # X is the previous kernel's output; the next kernel may start (pdl.py)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(X + offs, mask=mask)
        acc = _exchange_and_sum(x, offs, mask, pid, DATA_PTRS, FLAG_PTRS, rank, site_offset,
                                slot_elems, flag_offset, WORLD, BLOCK)
        tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _peer_add_norm_kernel(D, R, NORM_W, H, OUT, DATA_PTRS, FLAG_PTRS, dim, rank,
                              site_offset, slot_elems, flag_offset, EPS: tl.constexpr,
                              WORLD: tl.constexpr, BLOCK: tl.constexpr,
                              PDL: tl.constexpr = False):
        # One program per row of D [rows, dim] (this rank's partial sums, e.g. wo's output):
        # the all-reduce as above, then the residual add and the norm (add_norm_store).
        # PDL: D is the previous kernel's output; the next kernel (a GEMV) may start and
        # stream its first weight tiles while this one waits for the peers (pdl.py).
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < dim
        offs = row * dim + cols
        d = tl.load(D + offs, mask=mask)
        acc = _exchange_and_sum(d, offs, mask, row, DATA_PTRS, FLAG_PTRS, rank, site_offset,
                                slot_elems, flag_offset, WORLD, BLOCK)
        add_norm_store(acc, R, NORM_W, H, OUT, offs, cols, mask, dim, EPS)

    @triton.jit
    def add_norm_store(acc, R, NORM_W, H, OUT, offs, cols, mask, dim, EPS: tl.constexpr):
        """The all-reduce's float32 sum acc [BLOCK] of one row (elements offs) -> h = R + sum
        (the residual stream, rounded to its dtype as the model's add is) into H, and
        RMSNorm(h) * NORM_W into OUT, exactly as model.RMSNorm computes it (float32 mean of
        squares, rounded, times the weight)."""
        hf = add_residual(acc, R, H, offs, mask)
        inv_rms = tl.rsqrt(exact_mean(tl.sum(hf * hf, axis=0), dim) + EPS)  # torch's mean
        store_normed(hf, inv_rms, NORM_W, H, OUT, cols, offs, mask)

    @triton.jit
    def add_residual(acc, R, H, offs, mask):
        """h = R + (the all-reduce's float32 sum rounded to h's dtype), stored; as float32."""
        total = acc.to(H.dtype.element_ty).to(tl.float32)
        residual = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        h = (residual + total).to(H.dtype.element_ty)
        tl.store(H + offs, h, mask=mask)
        return h.to(tl.float32)

    @triton.jit
    def store_normed(hf, inv_rms, NORM_W, H, OUT, cols, offs, mask):
        """OUT = (h * inv_rms, rounded to h's dtype) * the norm weight at columns cols."""
        normed = (hf * inv_rms).to(H.dtype.element_ty).to(tl.float32)
        weight = tl.load(NORM_W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + offs, (normed * weight).to(OUT.dtype.element_ty), mask=mask)


class PeerAllReduce:
    """One rank's view of the group's buffers: `buffers[r]` is rank r's buffer (uint8, all the
    same size), as this process addresses it. Build it with for_group (CUDA) or from shared CPU
    tensors (tests)."""

    def __init__(self, rank: int, buffers: list[Tensor], n_sites: int) -> None:
        world = len(buffers)
        if any(b.is_cuda and b.data_ptr() % 256 for b in buffers):
            raise ValueError("the kernel assumes 256-byte aligned buffers")
        if any(b.numel() < buffer_bytes(n_sites, world) for b in buffers):
            raise ValueError(f"each buffer needs {buffer_bytes(n_sites, world)} bytes")
        self.rank, self.world, self.n_sites = rank, world, n_sites
        self.buffers = buffers  # kept: the kernels address them
        device = buffers[rank].device
        flags = [b.data_ptr() for b in buffers]
        self.flag_ptrs = torch.tensor(flags, dtype=torch.int64, device=device)
        data = [p + flag_area_bytes(n_sites) for p in flags]
        self.data_ptrs = torch.tensor(data, dtype=torch.int64, device=device)

    @classmethod
    def for_group(cls, group: Any, device: torch.device, n_sites: int) -> PeerAllReduce:
        """Allocate this rank's buffer in torch symmetric memory and map every peer's (a
        collective: every rank of `group` calls it). If any rank cannot, every rank raises the
        same PeerBufferUnavailable (agree), its own buffer dropped.

        Failures caught: the allocation's (agreed before the rendezvous, so that no rank enters
        it alone) and the rendezvous' (agreed after it: mapping a peer's memory, where missing
        IPC support shows, comes after the ranks have exchanged their handles). A rank failing
        inside the rendezvous before that exchange still leaves its peers there until the
        store's timeout (parallel.COLLECTIVE_TIMEOUT_S): torch gives no way to bound it."""
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        world = dist.get_world_size(group)
        size = buffer_bytes(n_sites, world)
        table = torch.zeros(world, ERROR_BYTES, dtype=torch.uint8, device=device)
        mine = handle = buffers = error = None
        try:
            enable_symm_mem(group.group_name)
            mine = symm_mem.empty(size, dtype=torch.uint8, device=device)
            mine.zero_()  # flags start at 0
        except Exception as err:  # whatever it is, the peers must hear of it (agree)
            error = f"{type(err).__name__}: {err}"
        failure = agree(group, error, table, f"allocating {size / 2**20:.1f} MiB")
        if failure is None:
            try:
                handle = symm_mem.rendezvous(mine, group.group_name)
                buffers = [mine if r == handle.rank else
                           handle.get_buffer(r, (size,), torch.uint8) for r in range(world)]
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
            failure = agree(group, error, table, "mapping the peers' buffers")
        if failure is not None:
            # Dropped now, not when the exception is: its traceback holds this frame.
            mine = handle = buffers = None
            raise PeerBufferUnavailable(failure)
        if device.type == "cuda":  # (the tests run this on CPU ranks, with fake buffers)
            torch.cuda.synchronize(device)
        dist.barrier(group)  # no peer signals before every flag area is zeroed
        return cls(handle.rank, buffers, n_sites)

    def site_layout(self, site: int, element_size: int) -> tuple[int, int, int]:
        """(site_offset, slot_elems, flag_offset): where call site `site` lives in the buffers,
        for elements of element_size bytes."""
        if not 0 <= site < self.n_sites:
            raise ValueError(f"site {site} outside 0..{self.n_sites - 1}")
        slot_elems = SLOT_BYTES // element_size
        return site * self.world * slot_elems, slot_elems, site * MAX_PROGRAMS

    def takes(self, x: Tensor) -> bool:
        """Whether x fits a slot (else the caller uses NCCL)."""
        return x.dtype in DTYPES and x.numel() * x.element_size() <= SLOT_BYTES

    def __call__(self, x: Tensor, site: int) -> Tensor:
        where = self.site_layout(site, x.element_size())
        if not self.takes(x):
            raise ValueError(f"{tuple(x.shape)} {x.dtype} does not fit a {SLOT_BYTES}-byte slot")
        x = x.contiguous()
        out = torch.empty_like(x)
        grid = (triton.cdiv(x.numel(), BLOCK),)
        launch(_peer_all_reduce_kernel, grid, pdl.enabled(),
               x, out, self.data_ptrs, self.flag_ptrs, x.numel(), self.rank, *where,
               WORLD=self.world, BLOCK=BLOCK, num_warps=4)
        return out

    def takes_rows(self, delta: Tensor, residual: Tensor) -> bool:
        """Whether add_norm can take this all-reduce: it fits a slot, one flag per row."""
        rows = delta.numel() // delta.shape[-1]
        fits = self.takes(delta) and rows <= MAX_PROGRAMS
        return fits and residual.shape == delta.shape and residual.dtype == delta.dtype

    def add_norm(self, delta: Tensor, residual: Tensor, weight: Tensor, eps: float,
                 site: int) -> tuple[Tensor, Tensor]:
        """(h, norm(h)) with h = residual + (delta summed over the ranks): the all-reduce, the
        residual add and the RMSNorm that follows it in one kernel. delta, residual [..., dim];
        weight [dim]."""
        where = self.site_layout(site, delta.element_size())
        if not self.takes_rows(delta, residual):
            raise ValueError(f"{tuple(delta.shape)} {delta.dtype} does not fit a slot")
        delta, residual = delta.contiguous(), residual.contiguous()
        dim = delta.shape[-1]
        h, out = add_norm_outputs(delta, weight)
        block = triton.next_power_of_2(dim)
        launch(_peer_add_norm_kernel, (delta.numel() // dim,), pdl.enabled(),
               delta, residual, weight, h, out, self.data_ptrs, self.flag_ptrs, dim, self.rank,
               *where, EPS=eps, WORLD=self.world, BLOCK=block,
               num_warps=max(4, min(16, block // 512)))
        return h, out


# The instances of this process, by index: an op's arguments must be tensors and numbers, and a
# captured CUDA graph keeps using an instance's buffers, so none is ever dropped.
_INSTANCES: list[PeerAllReduce] = []


def register(instance: PeerAllReduce) -> int:
    _INSTANCES.append(instance)
    return len(_INSTANCES) - 1


@torch.library.custom_op("infermeter::peer_all_reduce", mutates_args=())
def peer_all_reduce(x: Tensor, instance: int, site: int) -> Tensor:
    """The sum of x over the ranks of registered instance `instance`, through call site `site`.
    Opaque to torch.compile: inductor calls it as is, and a CUDA graph captures its kernel."""
    return _INSTANCES[instance](x, site)


@peer_all_reduce.register_fake
def _(x: Tensor, instance: int, site: int) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("infermeter::peer_all_reduce_add_norm", mutates_args=())
def peer_all_reduce_add_norm(delta: Tensor, residual: Tensor, weight: Tensor, eps: float,
                             instance: int, site: int) -> tuple[Tensor, Tensor]:
    """(h, RMSNorm(h) * weight), h = residual + delta summed over the ranks (see add_norm)."""
    return _INSTANCES[instance].add_norm(delta, residual, weight, eps, site)


def add_norm_outputs(delta: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Empty (h, norm(h)) as the add-and-norm kernels return them: h like delta (contiguous),
    the norm in delta's and the weight's promoted dtype (as model.RMSNorm's product)."""
    out_dtype = torch.promote_types(delta.dtype, weight.dtype)
    return (torch.empty_like(delta, memory_format=torch.contiguous_format),
            torch.empty(delta.shape, dtype=out_dtype, device=delta.device))


@peer_all_reduce_add_norm.register_fake
def _(delta: Tensor, residual: Tensor, weight: Tensor, eps: float, instance: int,
      site: int) -> tuple[Tensor, Tensor]:
    return add_norm_outputs(delta, weight)
