"""The fused step's kernels pull a later product's weight into L2 while they run (issue 27's
small models: a step whose cost is its bytes).

Why: at batch 1 a small model's products are a few megabytes each, and a kernel of them streams
its weight well below the HBM's speed: it ramps up, drains, and its loads wait a DRAM round trip
each (135M's w2 + add: 1.8 MB in 2.8 us, a fifth of the copy bandwidth; docs/engine.md). Between
the products the HBM idles: attention, the launch gaps, the drains. So each fused kernel asks
the L2 to fetch a later product's first bytes (the product DISTANCE kernels on in the step's
chain wqkv, wo, w13, w2, the next layer's wqkv, ..., the output head last), and that kernel then
reads them from L2. The HBM's stream goes on across the chain's boundaries; the bytes read from
HBM stay the same (each weight once a step).

How: Hopper's bulk prefetch (PTX `cp.async.bulk.prefetch.L2.global [address], bytes`: a hint,
fire and forget, no completion to wait for; the address 16-byte aligned, the size a multiple of
16). Each program of the prefetching kernel issues, from one thread, its share of the bytes
(share_of: programs in id order take consecutive 16-byte-aligned slices, the last the rest), so
a kernel's programs together cover the range once. At most CAP bytes of a product: the first
ones, which the next kernel's first programs read first; more would push out of L2 what the
running kernel still reads (L2 is 50 MB on an H100 and an H200).

What stays the same: no value. A prefetch moves nothing the kernel computes with, so the step's
outputs are the same bits with it or without it. Under Triton's interpreter (the CPU tests) no
PTX runs and the kernels take no prefetch (AHEAD off); the tests check share_of there, the
instruction in each kernel's sm_90 build, and which weight each kernel of a step is given
(engine/model.py, Transformer.prefetch_plan).

DISTANCE is the step's setting (0: none, the default); benchmarks/step_kernels_ab.py --prefetch
times it. Off by default: on an H100 distance 2 gained 5% at 135M and lost 5-14% at 0.5B and 1B,
where the prefetches competed with the running kernels' own reads (docs/engine.md).
"""

from __future__ import annotations

from torch import Tensor

from infermeter.engine.kernels.triton_support import tl, triton

# How many kernels on in the chain a kernel prefetches for: 0 (none), 1 (the next product), 2.
DISTANCES = (0, 1, 2)
DISTANCE = 0
CAP = 16 * 2**20  # bytes of one product prefetched, at most: a third of an H100's L2
ALIGN = 16  # the bulk prefetch's alignment of address and size


def set_distance(distance: int) -> None:
    """The prefetch distance of the compiled steps traced from now on (DISTANCES)."""
    global DISTANCE
    if distance not in DISTANCES:
        raise ValueError(f"prefetch distance must be one of {DISTANCES}, not {distance}")
    DISTANCE = distance


def prefetchable(weight: Tensor) -> bool:
    """A weight the bulk prefetch can take: on a GPU and aligned()."""
    return weight.is_cuda and aligned(weight)


def aligned(weight: Tensor) -> bool:
    """Contiguous, and its first byte 16 bytes into its storage (a row block of a fused matrix
    is, at any width a multiple of 8 in 2-byte values); the storage itself starts aligned (the
    caching allocator's blocks do). Read from the offset, not the address: a traced op's body
    runs on fake tensors, which have no address."""
    return weight.is_contiguous() and weight.storage_offset() * weight.element_size() % ALIGN == 0


def ahead_bytes(weight: Tensor) -> int:
    """The bytes of `weight` a kernel prefetches: its first ones, at most CAP, a multiple of
    ALIGN."""
    return min(weight.numel() * weight.element_size(), CAP) // ALIGN * ALIGN


if triton is not None:

    @triton.jit
    def share_of(total, pid, programs):
        """Program pid's slice of `total` bytes among `programs` programs: (start, size), the
        slices consecutive in pid order, each a multiple of 16 bytes from a 16-byte-aligned
        start but the last, which takes what is left (size <= 0: nothing left for pid)."""
        share = tl.cdiv(tl.cdiv(total, programs), 16) * 16
        start = pid.to(tl.int64) * share
        size = tl.minimum(share, total - start)
        return start, size

    @triton.jit
    def prefetch_share(AHEAD, total, pid, programs):
        """Bulk-prefetch program pid's share (share_of) of the `total` bytes at AHEAD into L2,
        from thread 0 of the program. Returns an int32 0 for the caller to add to a value it
        uses: the asm is marked pure (inductor's analysis of a triton_op's kernel stops at an
        impure one), and a pure one whose result nobody used would be dropped."""
        start, size = share_of(total, pid, programs)
        size = tl.maximum(size, 0).to(tl.int32)
        at = AHEAD.to(tl.pointer_type(tl.int8)) + start
        return tl.inline_asm_elementwise(
            """{
            .reg .pred first, some;
            .reg .u32 thread;
            mov.u32 thread, %tid.x;
            setp.eq.u32 first, thread, 0;
            setp.gt.and.s32 some, $2, 0, first;
            @some cp.async.bulk.prefetch.L2.global [$1], $2;
            mov.u32 $0, 0;
            }""",
            "=r,l,r", [at, size], dtype=tl.int32, is_pure=True, pack=1)
