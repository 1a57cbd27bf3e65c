"""A split-KV decode attention kernel (Triton), for a one-token step over the static cache.

Why: in the compiled Llama-2-7B step on an H100 the "math" decode attention is four small
inductor kernels a layer (~12 us against ~3 us of cache bytes), and at batch 32 it reads all
512 slots of every sequence's cache whatever the position. This kernel is one launch per layer
plus one launch of a combine kernel:

  grid (B * H_kv, n_splits): each program takes one KV head of one sequence and one contiguous
  chunk of cache slots, and runs the online softmax (flash-decoding) over its chunk for the
  G query heads sharing that KV head: partial output acc [G, D], running max m [G], sum l [G].
  A full-attention layer's slot j holds position j (kv_cache.py), so a program stops at the
  current position: slots beyond it are never read. A ring (sliding-window) layer reads all of
  its slots and masks by the positions they hold, the same rule as LayerKVCache._visible.
  The combine weighs each split by exp(m_split - max m) (an empty split has m = -inf: weight 0);
  gpt-oss's sink logit joins the max and adds exp(sink - max) to the denominator only.
  It is a second Triton kernel (grid B * H_kv * G, one query head each), not torch code: the
  torch combine gave inductor pointwise work it can inline into the next matrix-vector
  reduction (wo), where every thread block would redo it (suspected, not traced, as the cause
  of the kernel's fixed batch-1 loss; see attention.py), and it costs two launches at least.

Numerics: scores and probabilities stay in float32 (the math path rounds q.k to the activation
dtype first), so results agree with it to rounding, not bitwise. Where the kernel computes one of
the math path's functions it is torch's on a GPU (exact_math.py): Gemma 2's cap is tanh(s / cap) *
cap with libdevice's tanhf and cap's float32 reciprocal (2 sigmoid(2x) - 1 lost digits to
cancellation near 0, ~1e-5 in a score capped at 50), and the combine divides once, exactly
(div.rn), as torch's softmax divides by its sum. The online softmax keeps Triton's exp
(ex2.approx of x log2(e), within a few float32 ulp where a weight counts): it runs on every
score in the loop, the 16-bit paths round the unnormalised weights to the dtype before the PV
product anyway, and the sums run in another order than the math path's, so libdevice's expf
would make nothing bitwise. The default in the compiled
step wherever Triton runs (attention.DECODE_ATTENTION says why); benchmarks/decode_tuning.py
measures it ("fused-triton").

A one-launch variant, the last split program of each row combining it (an atomic count), was
tried and removed on 2026-12-06: on an H100 it ran 3-8% slower than the two kernels at
SmolLM2-135M and Llama-3.2-1B (docs/engine.md, "Split-KV decode attention").
So was the combine folded into wo's kernel (removed on 2026-12-07 after losing on an H100
twice: docs/engine.md, "Fewer round trips a kernel"). The attention unsplit (n_splits 0,
UNSPLIT: grid B * H_kv, one program over a row's whole cache, normalised in place, no combine
kernel) is an A/B's setting, off: it lost below 1B on an H100 (docs/engine.md, "The attention
unsplit").

Works where Triton does: CUDA, or the CPU under TRITON_INTERPRET=1 (how the tests run it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from infermeter.engine.kernels import pdl
from infermeter.engine.kernels.exact_math import compiled_for_gpu, float32_reciprocal
from infermeter.engine.kernels.pdl import launch, launch_releasing
from infermeter.engine.kernels.settings import checked_way
from infermeter.engine.kernels.triton_support import head_size_fits, tl, triton, triton_runs_on

BLOCK_N = 64  # cache slots per inner iteration
# How the attention's two kernels launch where the step's others use PDL (pdl.enabled()):
# "both" with PDL (the default); "combine", the split kernel launched plainly, once the kernel
# before it has ended, yet letting the combine start early, the combine with PDL; "none",
# neither. Read when the step is traced; the default is the only setting, the others are an
# A/B's (benchmarks/step_kernels_ab.py --attention-pdl): on an H100 at SmolLM2-135M the split
# kernel, launched early, ended 2.4-5.3 us after the kernel it waits on, launched plainly a
# steady 3 us (docs/engine.md, "The split-KV attention's early launch (PDL)").
ATTENTION_PDL_WAYS = ("both", "combine", "none")
ATTENTION_PDL = "both"
# The split kernel's software-pipeline depth (Triton's num_stages) in the PDL launches; 0,
# Triton's own (the default). An A/B's (--split-stages). It reaches only programs that loop over
# blocks: one with a single block (ONE_BLOCK, batch 1 at short contexts) has no pipeline.
SPLIT_STAGES = 0
# How a step's attention runs where a row's whole cache fits one program (unsplit_fits): "off",
# in splits with a combine kernel after (the default); "on", unsplit: one program a (sequence,
# KV head) over every slot, loaded before the PDL wait as a one-block split's is, normalised in
# place, so a layer has one launch and one wait fewer. Why it may pay: at batch 1 the combine is a
# launch and a wait, not work (1.60 us a layer at Qwen2.5-0.5B on an H100, docs/engine.md); why
# it may not: one SM then loads the row's every key and value. On an H100 the fused step took
# 1.063x its time at SmolLM2-135M, 1.075x at Qwen2.5-0.5B and 0.992x at Llama-3.2-1B unsplit
# (docs/engine.md, "The attention unsplit"), so it is off: an A/B's setting, read when the
# step is traced (benchmarks/step_kernels_ab.py --unsplit).
UNSPLIT_WAYS = ("off", "on")
UNSPLIT = "off"
# Whether a one-block split program (ONE_BLOCK: a chunk of at most BLOCK_N slots) loads its
# block before the PDL wait ("on") or after it, as a program of several blocks does ("off").
# "auto", the default since 2026-12-07: before it in the fused step, after it in the split one.
# On an H100 (docs/engine.md, "The one-block attention's early load, by step"): in the fused
# step the late block took 1.120x the step's time at SmolLM2-135M and 1.029x at Llama-3.2-1B;
# in the split step 0.996x at Llama-2-7B, in both orders; at batch 8 (split) 1.003x, within
# the drift between rounds. Read when the step is traced; "on" and "off" are an A/B's
# (benchmarks/step_kernels_ab.py --early-block). Either way the program computes the same values.
EARLY_BLOCK_WAYS = ("auto", "on", "off")
EARLY_BLOCK = "auto"
# The most cache elements (slots x head size, each of keys and values) one unsplit program holds:
# 512 slots of a 64-wide head, 128 registers a thread of keys and values at UNSPLIT_WARPS (its
# sm_90 build: 255 registers a thread, 16 bytes spilled; at 16 warps 128 and 216 bytes).
UNSPLIT_ELEMENTS = 512 * 64
UNSPLIT_WARPS = 8


def kernel_usable(q: Tensor) -> bool:
    """This kernel can run for q: Triton runs there and the head size suits tl.arange (a power
    of two, at least 16)."""
    return triton_runs_on(q) and head_size_fits(q.shape[-1])


def split_count(programs: int, slots: int, device: torch.device) -> int:
    """How many chunks to cut each head's cache into: enough programs for ~4 per SM (the
    loads of 4 resident programs keep an SM's memory pipe busy), never chunks under BLOCK_N."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" else 132
    wanted = math.ceil(4 * sms / programs)
    return max(1, min(wanted, math.ceil(slots / BLOCK_N)))


def unsplit_fits(slots: int, head_dim: int) -> bool:
    """One program can hold a row's whole cache of `slots` slots (a power of two's block of
    them) of a head_dim-wide head: the unsplit kernel's bound."""
    return triton is not None and triton.next_power_of_2(slots) * head_dim <= UNSPLIT_ELEMENTS


def unsplits(q: Tensor, k_cache: Tensor) -> bool:
    """Whether a step's attention of q [B, H_kv, G, D] over k_cache [B, H_kv, S, D] runs
    unsplit (UNSPLIT on, and it fits)."""
    return checked_way(UNSPLIT, "UNSPLIT", UNSPLIT_WAYS) == "on" \
        and unsplit_fits(k_cache.shape[2], q.shape[-1])


if triton is not None:
    from infermeter.engine.kernels.exact_math import exact_tanh

    @triton.jit
    def _bounds(POS, start, chunk, slots, IS_RING: tl.constexpr):
        """The step's position and the end of the chunk from `start`: the cache's end, and for
        a full layer (slot j holds position j) nothing after the current position."""
        pos = tl.load(POS).to(tl.int32)  # loop bounds and masks in one integer type
        end = tl.minimum(start + chunk, slots)
        if not IS_RING:
            end = tl.minimum(end, pos + 1)
        return pos, end

    @triton.jit
    def _block(k_base, v_base, KEY_POS, n, inside, stride_ks, stride_vs, d):
        """Cache slots n [BLOCK]'s keys and values [BLOCK, D] and held positions [BLOCK],
        loaded together (a load written after the scores' reductions, a barrier, would wait a
        round trip of its own)."""
        k = tl.load(k_base + n[:, None] * stride_ks + d[None, :], mask=inside[:, None],
                    other=0.0)
        v = tl.load(v_base + n[:, None] * stride_vs + d[None, :], mask=inside[:, None],
                    other=0.0)
        return k, v, tl.load(KEY_POS + n, mask=inside, other=-1)

    @triton.jit
    def _online_step(q, k, v, held, inside, pos, window, m_i, l_i, acc,
                     SCALE: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                     SOFTCAP: tl.constexpr, INV_SOFTCAP: tl.constexpr,
                     LIBDEVICE: tl.constexpr):
        """One block of the online softmax: (m_i, l_i, acc) [G_PAD], [G_PAD], [G_PAD, D] after
        q [G_PAD, D] attends to the block's visible keys k and values v [BLOCK, D]."""
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * SCALE  # [G_PAD, BLOCK]
        if SOFTCAP > 0:  # Gemma 2: tanh(s / cap) * cap as torch computes it on CUDA: s
            # times cap's float32 reciprocal, libdevice's tanhf (exact_math.py)
            s = exact_tanh(s * INV_SOFTCAP, LIBDEVICE) * SOFTCAP
        seen = inside & (held >= 0) & (held <= pos)
        if HAS_WINDOW:
            seen = seen & (pos - held < window)
        s = tl.where(seen[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: no NaN
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def chunk_softmax(bh, start, Q, K, V, KEY_POS, POS,
                      stride_qb, stride_qh, stride_qg,
                      stride_kb, stride_kh, stride_ks,
                      stride_vb, stride_vh, stride_vs,
                      n_kv_heads, groups, slots, chunk, window,
                      SCALE: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                      BLOCK: tl.constexpr, IS_RING: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
                      INV_SOFTCAP: tl.constexpr, LIBDEVICE: tl.constexpr,
                      ONE_BLOCK: tl.constexpr, PDL: tl.constexpr, RELEASE: tl.constexpr,
                      EARLY_RELEASE: tl.constexpr = False):
        """Row bh (= sequence * H_kv + KV head)'s online softmax over the `chunk` slots from
        `start`: its running max m [G_PAD], sum l [G_PAD] and unnormalised output acc
        [G_PAD, D], float32. PDL: waits for the kernel before (which wrote q and this step's
        slot) and releases the next; RELEASE (launched plainly) releases it only.
        ONE_BLOCK (chunk <= BLOCK: a batch-1 step's usual case, one block a program): the block
        is loaded before the wait, with the position, and only the step's own slot is read
        again after it. Safe: the position is the step's input, set before its first kernel
        (the step before advanced it in place, held_step.py, in its own kernels, which ended
        before this replay began), and the other slots were written by earlier steps; under
        PDL, where the kernel before (norm + wqkv or the q/k norms' kernel) releases this one
        only after its own wait, every kernel but that one has ended once this one starts; where
        norm + wqkv releases it before (pdl.ATTENTION_RELEASE), kernels of the layer
        before may still run, but none of them writes the cache or the position, and the
        step's first kernels release only after their wait, so every earlier step has ended.
        So the block's bytes come while the kernel before still runs. EARLY_RELEASE (with
        PDL): the next kernel (the combine) may start before this one's wait
        (pdl.ATTENTION_RELEASE)."""
        b = bh // n_kv_heads
        h = bh % n_kv_heads
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        if ONE_BLOCK:
            pos, end = _bounds(POS, start, chunk, slots, IS_RING)
            n = start + tl.arange(0, BLOCK)
            inside = n < end
            k, v, held = _block(k_base, v_base, KEY_POS, n, inside, stride_ks, stride_vs, d)
        if PDL:  # q and this step's slot are the previous kernel's outputs (pdl.py)
            if EARLY_RELEASE:  # the combine reads only this kernel's outputs, after its wait
                tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
            if not EARLY_RELEASE:
                tl.extra.cuda.gdc_launch_dependents()
        elif RELEASE:  # launched plainly (the kernel before has ended): the next may start
            tl.extra.cuda.gdc_launch_dependents()
        q = tl.load(Q + b * stride_qb + h * stride_qh + g[:, None] * stride_qg + d[None, :],
                    mask=g[:, None] < groups, other=0.0)  # [G_PAD, D]
        if ONE_BLOCK:  # the step's own slot, just written: k and v again, and a ring's position
            slot = pos % slots if IS_RING else pos
            fresh = inside & (n == slot)  # [BLOCK]
            row = d * 0 + slot  # [D] (a scalar in a mask fails in the interpreter)
            here = (row >= start) & (row < start + BLOCK) & (row < slots)
            k = tl.where(fresh[:, None], tl.load(k_base + slot * stride_ks + d, mask=here,
                                                 other=0.0)[None, :], k)
            v = tl.where(fresh[:, None], tl.load(v_base + slot * stride_vs + d, mask=here,
                                                 other=0.0)[None, :], v)
            held = tl.where(fresh, tl.load(KEY_POS + n, mask=fresh, other=-1), held)
            m_i, l_i, acc = _online_step(q, k, v, held, inside, pos, window, m_i, l_i, acc,
                                         SCALE, HAS_WINDOW, PRECISION, SOFTCAP, INV_SOFTCAP,
                                         LIBDEVICE)
        else:
            pos, end = _bounds(POS, start, chunk, slots, IS_RING)
            for n0 in range(start, end, BLOCK):
                n = n0 + tl.arange(0, BLOCK)
                inside = n < end
                k, v, held = _block(k_base, v_base, KEY_POS, n, inside, stride_ks, stride_vs, d)
                m_i, l_i, acc = _online_step(q, k, v, held, inside, pos, window, m_i, l_i,
                                             acc, SCALE, HAS_WINDOW, PRECISION, SOFTCAP,
                                             INV_SOFTCAP, LIBDEVICE)
        return m_i, l_i, acc

    @triton.jit
    def _split_kv_kernel(Q, K, V, KEY_POS, POS, ACC, M, L,
                         stride_qb, stride_qh, stride_qg,
                         stride_kb, stride_kh, stride_ks,
                         stride_vb, stride_vh, stride_vs,
                         n_kv_heads, groups, slots, chunk, n_splits, window,
                         SCALE: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                         BLOCK: tl.constexpr, IS_RING: tl.constexpr, HAS_WINDOW: tl.constexpr,
                         PRECISION: tl.constexpr, SOFTCAP: tl.constexpr = 0.0,
                         INV_SOFTCAP: tl.constexpr = 0.0, LIBDEVICE: tl.constexpr = False,
                         ONE_BLOCK: tl.constexpr = False, PDL: tl.constexpr = False,
                         RELEASE: tl.constexpr = False, EARLY_RELEASE: tl.constexpr = False):
        """Split program_id(1) of row bh = program_id(0): chunk_softmax over its chunk,
        stored as its partial acc [G, D], m [G], l [G]."""
        bh, split = tl.program_id(0), tl.program_id(1)
        m_i, l_i, acc = chunk_softmax(
            bh, split * chunk, Q, K, V, KEY_POS, POS, stride_qb, stride_qh, stride_qg,
            stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
            n_kv_heads, groups, slots, chunk, window, SCALE, G_PAD, D, BLOCK, IS_RING,
            HAS_WINDOW, PRECISION, SOFTCAP, INV_SOFTCAP, LIBDEVICE, ONE_BLOCK, PDL, RELEASE,
            EARLY_RELEASE)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        row = bh * n_splits + split  # ACC [B*H_kv, n_splits, G, D], M/L [B*H_kv, n_splits, G]
        keep = g < groups
        tl.store(ACC + (row * groups + g[:, None]) * D + d[None, :], acc, mask=keep[:, None])
        tl.store(M + row * groups + g, m_i, mask=keep)
        tl.store(L + row * groups + g, l_i, mask=keep)

    @triton.jit
    def _unsplit_kernel(Q, K, V, KEY_POS, POS, OUT, SINKS,
                        stride_qb, stride_qh, stride_qg,
                        stride_kb, stride_kh, stride_ks,
                        stride_vb, stride_vh, stride_vs,
                        n_kv_heads, groups, slots, window,
                        SCALE: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                        BLOCK: tl.constexpr, IS_RING: tl.constexpr, HAS_WINDOW: tl.constexpr,
                        PRECISION: tl.constexpr, SOFTCAP: tl.constexpr = 0.0,
                        INV_SOFTCAP: tl.constexpr = 0.0, LIBDEVICE: tl.constexpr = False,
                        HAS_SINKS: tl.constexpr = False, PDL: tl.constexpr = False,
                        EARLY_RELEASE: tl.constexpr = False):
        """Row bh = program 0 (sequence * H_kv + KV head) over all its slots in one block
        (BLOCK >= slots, loaded before the PDL wait: chunk_softmax's ONE_BLOCK), normalised
        as the combine normalises one split: acc * exp(m - top) divided once by
        l * exp(m - top) (+ exp(sink - top)), top the larger of m and the sink; without sinks
        the weight is exp(0) = 1, so the output is the two kernels' at one split, to the bit.
        OUT [B, H_kv, G, D] in q's dtype."""
        bh = tl.program_id(0)
        m_i, l_i, acc = chunk_softmax(
            bh, 0, Q, K, V, KEY_POS, POS, stride_qb, stride_qh, stride_qg,
            stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
            n_kv_heads, groups, slots, slots, window, SCALE, G_PAD, D, BLOCK, IS_RING,
            HAS_WINDOW, PRECISION, SOFTCAP, INV_SOFTCAP, LIBDEVICE, True, PDL, False,
            EARLY_RELEASE)
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D)
        keep = g < groups
        # the combine's weights over one split: [1, G_PAD] and [G_PAD]
        weight, total = split_weights(m_i[None, :], l_i[None, :],
                                      SINKS + (bh % n_kv_heads) * groups + g, keep, HAS_SINKS)
        out = tl.math.div_rn(acc * tl.sum(weight, 0)[:, None], total[:, None])  # [G_PAD, D]
        tl.store(OUT + (bh * groups + g[:, None]) * D + d[None, :],
                 out.to(OUT.dtype.element_ty), mask=keep[:, None])

    @triton.jit
    def split_weights(m, l_sum, sink_at, ok, HAS_SINKS: tl.constexpr):
        """The combine's weights of the splits, exp(m - top) [S_PAD, C], and the denominator,
        their weighed sum of l [C] (1 where ok is off), for partial maxima m and sums l_sum
        [S_PAD, C] (an empty split: m = -inf, l = 0), top the largest m. HAS_SINKS (gpt-oss):
        each column's sink logit, loaded at sink_at [C], joins the max and adds its own term
        to the denominator only."""
        top = tl.where(ok, tl.max(m, 0), 0.0)  # [C]; a column off: no -inf - -inf
        if HAS_SINKS:
            sink = tl.load(sink_at, mask=ok, other=0.0).to(tl.float32)
            top = tl.maximum(top, sink)
        weight = tl.exp(m - top[None, :])  # an empty split (m = -inf) weighs 0
        total = tl.sum(l_sum * weight, 0)
        if HAS_SINKS:
            total = total + tl.exp(sink - top)
        return weight, tl.where(ok, total, 1.0)

    @triton.jit
    def _combine_kernel(ACC, M, L, OUT, SINKS, groups, n_splits, n_kv_heads,
                        S_PAD: tl.constexpr, D: tl.constexpr, HAS_SINKS: tl.constexpr = False,
                        PDL: tl.constexpr = False, EARLY_RELEASE: tl.constexpr = False):
        """One program a query head (sequence * H + head = row * groups + g): its splits'
        partials weighed by exp(m - max m) and summed, divided once by the weighed sum of l
        (div.rn, as torch's softmax divides by its sum). A head's m and l are loaded once,
        [S_PAD, 1] (a column per program, not per output element: on an H100 at batch 8 the
        per-element form's index arithmetic and loads made the kernel the step's slowest small
        one, docs/engine.md "Batch 8 and 32 at Llama-3.2-1B")."""
        if PDL:  # the splits are the previous kernel's outputs (pdl.py)
            if EARLY_RELEASE:  # wo's weights start while this waits (pdl.EARLY_RELEASE)
                tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
            if not EARLY_RELEASE:
                tl.extra.cuda.gdc_launch_dependents()
        head = tl.program_id(0)
        row = head // groups  # sequence * H_kv + KV head
        g = head % groups
        s = tl.arange(0, S_PAD)[:, None]  # [S_PAD, 1]
        d = tl.arange(0, D)
        column = tl.arange(0, 1)  # [1]: the head's single column of weights
        used = s < n_splits
        at = (row * n_splits + s) * groups + g  # [S_PAD, 1] offsets into M, L (ACC's rows)
        m = tl.load(M + at, mask=used, other=float("-inf"))
        l_sum = tl.load(L + at, mask=used, other=0.0)
        acc = tl.load(ACC + at * D + d[None, :], mask=used, other=0.0)  # [S_PAD, D]
        weight, total = split_weights(m, l_sum, SINKS + (row % n_kv_heads) * groups + g
                                      + column, column >= 0, HAS_SINKS)  # [S_PAD, 1], [1]
        out = tl.math.div_rn(tl.sum(acc * weight, 0), total)  # [D]
        tl.store(OUT + head * D + d, out.to(OUT.dtype.element_ty))


def _split_partials(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_pos: Tensor,
                    query_pos: Tensor, window: int, is_ring: bool, n_splits: int,
                    softcap: float, pdl: bool, early_split: bool = True,
                    split_stages: int = 0, early_block: bool = True,
                    split_release: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The split kernel's launch: its partials acc [B * H_kv, n_splits, G, D], m and l
    [B * H_kv, n_splits, G], all float32; a one-block program's block loaded before the PDL
    wait only with early_block (EARLY_BLOCK); split_release (with PDL): the combine released
    before the wait (pdl.ATTENTION_RELEASE)."""
    bsz, n_kv_heads, groups, head_dim = q.shape
    slots = k_cache.shape[2]
    chunk = math.ceil(slots / n_splits)
    rows = bsz * n_kv_heads
    acc = torch.empty(rows, n_splits, groups, head_dim, device=q.device, dtype=torch.float32)
    m = torch.empty(rows, n_splits, groups, device=q.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    strides = (*_strides(q, k_cache, v_cache), n_kv_heads, groups, slots, chunk, n_splits,
               window)
    split = {"BLOCK": BLOCK_N, "ONE_BLOCK": chunk <= BLOCK_N and early_block,
             "EARLY_RELEASE": pdl and early_split and split_release,
             **_softmax_constants(q, is_ring, window, softcap)}
    if split_stages:
        split["num_stages"] = split_stages
    if pdl and not early_split:  # ATTENTION_PDL "combine"
        launch_releasing(_split_kv_kernel, (rows, n_splits),
                         q, k_cache, v_cache, key_pos, query_pos, acc, m, l_sum, *strides, **split)
    else:
        launch(_split_kv_kernel, (rows, n_splits), pdl, q, k_cache, v_cache, key_pos, query_pos,
               acc, m, l_sum, *strides, RELEASE=False, **split)
    return acc, m, l_sum


def _unsplit_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_pos: Tensor,
                    query_pos: Tensor, window: int, is_ring: bool, softcap: float, pdl: bool,
                    sinks: Tensor | None = None, split_release: bool = False) -> Tensor:
    """The unsplit kernel's launch: one program a (sequence, KV head), the output [B, H_kv, G,
    D] in q's dtype. unsplit_fits(slots, head size) must hold. split_release: as
    _split_partials'."""
    bsz, n_kv_heads, groups, head_dim = q.shape
    slots = k_cache.shape[2]
    out = torch.empty(bsz, n_kv_heads, groups, head_dim, device=q.device, dtype=q.dtype)
    launch(_unsplit_kernel, (bsz * n_kv_heads,), pdl, q, k_cache, v_cache, key_pos, query_pos,
           out, out if sinks is None else sinks,  # a placeholder pointer where there are none
           *_strides(q, k_cache, v_cache), n_kv_heads, groups, slots, window,
           BLOCK=triton.next_power_of_2(slots), HAS_SINKS=sinks is not None,
           EARLY_RELEASE=pdl and split_release, num_warps=UNSPLIT_WARPS,
           **_softmax_constants(q, is_ring, window, softcap))
    return out


def _strides(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> tuple[int, ...]:
    """The split and unsplit kernels' stride arguments: q's, the keys' and the values' over
    their first three dims (a head's D values are contiguous)."""
    return (*q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3])


def _softmax_constants(q: Tensor, is_ring: bool, window: int, softcap: float) -> dict:
    """The constexprs the split and unsplit kernels share, for q [B, H_kv, G, D]."""
    groups, head_dim = q.shape[2:]
    # A constant, not a runtime float: inductor types a Python float argument as fp64,
    # which made the scores, and the loop-carried max, float64 (the first H100 run).
    return {"SCALE": head_dim ** -0.5, "G_PAD": max(16, triton.next_power_of_2(groups)),
            "D": head_dim, "IS_RING": is_ring, "HAS_WINDOW": window > 0,
            "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
            "SOFTCAP": float(softcap),
            "INV_SOFTCAP": float32_reciprocal(softcap) if softcap > 0 else 0.0,
            "LIBDEVICE": compiled_for_gpu(q)}


def _split_kv_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_pos: Tensor,
                     query_pos: Tensor, window: int, is_ring: bool, n_splits: int,
                     softcap: float, pdl: bool, sinks: Tensor | None = None,
                     early_split: bool = True, split_stages: int = 0,
                     early_block: bool = True, early_release: bool = False,
                     split_release: bool = False) -> Tensor:
    """n_splits 0: the unsplit kernel alone (no combine); early_release (with pdl): the
    combine releases the next kernel before its wait (pdl.EARLY_RELEASE); split_release (with
    pdl): the split (or unsplit) kernel does (pdl.ATTENTION_RELEASE)."""
    if n_splits == 0:
        return _unsplit_decode(q, k_cache, v_cache, key_pos, query_pos, window, is_ring,
                               softcap, pdl, sinks, split_release)
    bsz, n_kv_heads, groups, head_dim = q.shape
    acc, m, l_sum = _split_partials(q, k_cache, v_cache, key_pos, query_pos, window, is_ring,
                                    n_splits, softcap, pdl, early_split, split_stages,
                                    early_block, split_release)
    out = torch.empty(bsz, n_kv_heads, groups, head_dim, device=q.device, dtype=q.dtype)
    sink_arg = m if sinks is None else sinks  # a placeholder pointer where there are none
    launch(_combine_kernel, (bsz * n_kv_heads * groups,), pdl,
           acc, m, l_sum, out, sink_arg, groups, n_splits, n_kv_heads,
           S_PAD=triton.next_power_of_2(n_splits), D=head_dim, HAS_SINKS=sinks is not None,
           EARLY_RELEASE=pdl and early_release)
    return out


@torch.library.triton_op("infermeter::split_kv_decode", mutates_args=())
def split_kv_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_pos: Tensor,
                    query_pos: Tensor, window: int, is_ring: bool, n_splits: int,
                    softcap: float = 0.0, sinks: Tensor | None = None) -> Tensor:
    """q [B, H_kv, G, D] (one token's G query heads per KV head), k_cache/v_cache
    [B, H_kv, S, D], key_pos int64 [S], query_pos int64 [1]; window <= 0 means none;
    softcap > 0 caps the scaled scores at softcap * tanh(s / softcap) (Gemma 2), 0 none;
    sinks [H_kv * G] (gpt-oss: query head h * G + g's logit in every softmax's denominator,
    taken in float32) or None; n_splits 0: unsplit, one program a row over its whole cache and
    no combine kernel (unsplit_fits must hold). Returns [B, H_kv, G, D] in q's dtype."""
    return _split_kv_decode(q, k_cache, v_cache, key_pos, query_pos, window, is_ring,
                            n_splits, softcap, pdl=False, sinks=sinks)


@torch.library.custom_op("infermeter::split_kv_decode_pdl", mutates_args=())
def split_kv_decode_pdl(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_pos: Tensor,
                        query_pos: Tensor, window: int, is_ring: bool, n_splits: int,
                        softcap: float = 0.0, sinks: Tensor | None = None,
                        early_split: bool = True, split_stages: int = 0,
                        early_block: bool = True, early_release: bool = False,
                        split_release: bool = False) -> Tensor:
    """split_kv_decode, its two kernels launched with programmatic dependent launch (pdl.py);
    without early_split the split kernel is launched plainly and only releases the combine
    early (ATTENTION_PDL "combine"); split_stages > 0 sets its num_stages (SPLIT_STAGES);
    without early_block a one-block program loads its block after the wait (EARLY_BLOCK);
    with early_release the combine releases the next kernel before its wait (the fused step's,
    pdl.EARLY_RELEASE); with split_release the split kernel does (pdl.ATTENTION_RELEASE)."""
    return _split_kv_decode(q, k_cache, v_cache, key_pos, query_pos, window, is_ring,
                            n_splits, softcap, pdl=True, sinks=sinks, early_split=early_split,
                            split_stages=split_stages, early_block=early_block,
                            early_release=early_release, split_release=split_release)


@split_kv_decode_pdl.register_fake
def _(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_pos: Tensor, query_pos: Tensor,
      window: int, is_ring: bool, n_splits: int, softcap: float = 0.0,
      sinks: Tensor | None = None, early_split: bool = True, split_stages: int = 0,
      early_block: bool = True, early_release: bool = False,
      split_release: bool = False) -> Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def early_block_for(fused_step: bool) -> bool:
    """Whether a one-block split program loads its block before the PDL wait, in the fused step
    (fused_step) or the split one, as EARLY_BLOCK says."""
    way = checked_way(EARLY_BLOCK, "EARLY_BLOCK", EARLY_BLOCK_WAYS)
    return fused_step if way == "auto" else way == "on"


def _launch_way(fused_step: bool) -> tuple[bool, bool, bool]:
    """(PDL, the split kernel early, a one-block program's block before the wait) for the
    compiled step, fused or split, as pdl.enabled(), ATTENTION_PDL and EARLY_BLOCK say."""
    way = checked_way(ATTENTION_PDL, "ATTENTION_PDL", ATTENTION_PDL_WAYS)
    return pdl.enabled() and way != "none", way == "both", early_block_for(fused_step)


def decode_attention_kernel(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_pos: Tensor,
                            query_pos: Tensor, window: int, is_ring: bool,
                            n_splits: int, softcap: float = 0.0,
                            sinks: Tensor | None = None, fused_step: bool = False) -> Tensor:
    """split_kv_decode as the compiled step calls it: with PDL when pdl.enabled(), as
    ATTENTION_PDL, SPLIT_STAGES, EARLY_BLOCK (for the fused step or the split one: fused_step),
    UNSPLIT and, in the fused step, pdl.EARLY_RELEASE and pdl.ATTENTION_RELEASE say when the
    step is traced (unsplit: n_splits 0)."""
    with_pdl, early, early_block = _launch_way(fused_step)
    if unsplits(q, k_cache):
        n_splits = 0
    if with_pdl:
        return split_kv_decode_pdl(q, k_cache, v_cache, key_pos, query_pos, window, is_ring,
                                   n_splits, softcap, sinks, early, SPLIT_STAGES, early_block,
                                   fused_step and pdl.early_release(),
                                   fused_step and pdl.attention_release("split"))
    return split_kv_decode(q, k_cache, v_cache, key_pos, query_pos, window, is_ring, n_splits,
                           softcap, sinks)
