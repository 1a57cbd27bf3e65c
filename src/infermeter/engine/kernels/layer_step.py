"""A layer's batch-1 decode step in one launch (the "layer" step kernels, model.py).

Why: a small model's step is hundreds of kernels of a few microseconds, and each kernel boundary
costs a launch and a drain however few bytes the kernel reads (docs/engine.md, "The fused
step"). Here the fused step's five kernels of a layer (norm + wqkv + RoPE + cache write, the
split-KV attention with its combine, wo + residual, norm + w13 + SwiGLU, w2 + residual) are
stages of one launch, each program's stage given by the ticket it draws as it starts
(stage_sync.take_ticket), in this order:

  stage   programs                      waits for              then counts
  qkv     chunks of n_q + 2 n_kv rows   nothing (x is the      its stage's count
                                        previous launch's)
  attend  H_kv x n_splits               every qkv program      its row's count; the row's last
                                                               program combines the row and
                                                               counts the rows combined
  wo      chunks of dim rows            the H_kv rows          its stage's count
  w13     chunks of ffn rows            every wo program       its stage's count
  w2      chunks of dim rows            every w13 program      its stage's count; the last
                                                               sets the ticket and counts to 0

A GEMV stage's program runs a chunk of its row blocks (BLOCK_N rows each, the fused step's
tiles), one after another (stage_chunks). On a GPU a chunk is one block unless
PROGRAMS_PER_SM asks for fewer, longer programs: cut to one program an SM, the launch ran
slower still (docs/engine.md). An MoE layer runs the first three stages alone (its experts run
apart, after the launch): its last wo program resets. Each GEMV stage's program loads its first
weight tile before it waits (as under PDL), so the next stage's weights stream in while the
stage before finishes.
stage_sync.py says why the waits cannot deadlock and how the stores are published.

The stages are the fused step's own code (fused_step.norm_qkv_rope_rows, fused_gemv_rows,
decode_attention.split_partials and combine_head) at the fused step's tiles, so a step gives the
fused step's bits wherever the sums' order is the same: always under Triton's interpreter
(tests/test_layer_step.py); on a GPU one num_warps serves every stage (the largest the stages'
tiles ask, at most MAX_WARPS), which may change a reduction's order against the fused kernels'
own.

What takes it (TransformerBlock.takes_layer_kernel): a layer that runs the fused step's
attention side with RoPE and the cache write in wqkv's kernel and Triton's split-KV decode
attention, without Gemma's norms, query scale or soft cap, or gpt-oss's sinks; the FFN too
where the layer is dense. The counts are stage_sync.kept_counts' int32 zeros, one block per
(device, size): every launch that uses them returns them to 0 before it ends, and launches on
the step's stream run one after another.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from infermeter.engine.kernels.decode_attention import BLOCK_N as ATTENTION_BLOCK
from infermeter.engine.kernels.exact_math import compiled_for_gpu
from infermeter.engine.kernels.fused_step import fused_tiles_for
from infermeter.engine.kernels.gemv import gpu_name
from infermeter.engine.kernels.stage_sync import LINE, kept_counts
from infermeter.engine.kernels.triton_support import tl, triton

STAGE_COUNTS = 5  # counts after the ticket: qkv, attend (rows combined), wo, w13, w2
# The most warps a launch takes. A program holds the registers of its hungriest stage; built
# for sm_90 as launched (tests/sm90_build.py), at 8 warps and one pipeline stage every checked
# preset's layer and model launches fit two programs an SM (docs/engine.md says which spill);
# at 16 (1B's w2 tile asks for them) the 1B model launch spills 76 bytes
# (docs/engine.md, "What one launch costs in registers").
MAX_WARPS = 8
# On a GPU, the programs an SM a GEMV stage is cut down to (stage_chunks), or None: a program
# a row block. None since an H100's run of one program an SM (8 warps walking a chunk of
# blocks; fewer bytes in flight an SM) was 1.3x to 1.4x the layer launch's TPOT before
# (docs/engine.md); kept for an A/B of 2, 4, ...
PROGRAMS_PER_SM: int | None = None
# The programs a GEMV stage is cut into off a GPU (stage_chunks): few, so that Triton's
# interpreter runs the chunk loops (3: the tests' stages end in a short chunk); None: none
INTERPRETER_PROGRAMS: int | None = 3

if triton is not None:
    from infermeter.engine.kernels.decode_attention import combine_head, split_partials
    from infermeter.engine.kernels.fused_step import fused_gemv_rows, norm_qkv_rope_rows
    from infermeter.engine.kernels.stage_sync import (
        count_done,
        reset_counts,
        take_ticket,
        wait_count,
    )

    @triton.jit
    def gemv_chunk(chunk, CHUNK: tl.constexpr, X, NORM_W, W, RES, OUT, n_out, n_cols, stride_w,
                   up_row, WAIT, wait_for, EPS: tl.constexpr, HAS_NORM: tl.constexpr,
                   SWIGLU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, LIBDEVICE: tl.constexpr):
        """A GEMV stage's program `chunk`: its CHUNK row blocks of fused_gemv_rows, one after
        another (the last chunk may hold fewer); the first waits for the int32 at WAIT to reach
        wait_for after loading its first weight tile, the rest need not."""
        first = chunk * CHUNK
        fused_gemv_rows(first, X, NORM_W, W, RES, OUT, n_out, n_cols, stride_w, up_row, WAIT,
                        wait_for, EPS, HAS_NORM, False, SWIGLU, HAS_RESIDUAL, BLOCK_N, BLOCK_K,
                        LIBDEVICE, False, False, True)
        if CHUNK > 1:  # no loop at all in a program of one block (a GPU's default)
            for block in range(first + 1, first + CHUNK):
                if block < tl.cdiv(n_out, BLOCK_N):
                    fused_gemv_rows(block, X, NORM_W, W, RES, OUT, n_out, n_cols, stride_w,
                                    up_row, WAIT, 0, EPS, HAS_NORM, False, SWIGLU, HAS_RESIDUAL,
                                    BLOCK_N, BLOCK_K, LIBDEVICE, False, False, False)

    @triton.jit
    def layer_stages(
            pid, X, ATTN_NORM_W, WQKV, BIAS, COS, SIN, POS, Q, K_CACHE, V_CACHE, KEY_POS,
            Q_NORM_W, K_NORM_W, ACC, M, L, ATTN, WO, H, FFN_NORM_W, W13, ACT, W2, OUT, COUNT,
            WAIT, wait_for, dim, ffn, n_q, n_kv, stride_wqkv, stride_wo, stride_w13, stride_w2,
            stride_ch, stride_cs, slots, n_kv_heads, groups, chunk, n_splits, window,
            end_qkv, end_attend, end_wo, end_w13, end_w2,
            EPS: tl.constexpr, FFN_EPS: tl.constexpr, QK_EPS: tl.constexpr,
            HAS_BIAS: tl.constexpr, QK_NORM: tl.constexpr, IS_RING: tl.constexpr,
            HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, G_PAD: tl.constexpr,
            S_PAD: tl.constexpr, SCALE: tl.constexpr, PRECISION: tl.constexpr,
            ATTENTION_BLOCK: tl.constexpr, UNCONTRACTED: tl.constexpr,
            LIBDEVICE: tl.constexpr,
            BN_QKV: tl.constexpr, BK_QKV: tl.constexpr, BN_WO: tl.constexpr,
            BK_WO: tl.constexpr, BN_W13: tl.constexpr, BK_W13: tl.constexpr,
            BN_W2: tl.constexpr, BK_W2: tl.constexpr, CH_QKV: tl.constexpr,
            CH_WO: tl.constexpr, CH_W13: tl.constexpr, CH_W2: tl.constexpr,
            STAGES: tl.constexpr, LINE: tl.constexpr, FFN: tl.constexpr,
            HAS_WAIT: tl.constexpr):
        """Program pid's stage of one layer's step (the module docstring's table), pid its
        place among the layer's programs. COUNT [(1 + STAGES + H_kv) x LINE] int32: a slot
        (the ticket's, in this launch), each stage's count, each attention row's count, a line
        apart (stage_sync.py). HAS_WAIT: the qkv stage first waits for the int32 at WAIT to
        reach wait_for (the layer before's last count, in the model step). Returns 1 for the
        program that counted the layer's last stage whole (w2's last; wo's without the FFN),
        else 0: the caller's to reset the counts."""
        last = 0
        if pid < end_qkv:  # CH_QKV blocks of BN_QKV rows; the first waits where one must
            first = pid * CH_QKV
            norm_qkv_rope_rows(first, X, ATTN_NORM_W, WQKV, BIAS, COS, SIN, POS, Q, K_CACHE,
                               V_CACHE, KEY_POS, Q_NORM_W, K_NORM_W, n_q, n_kv, dim,
                               stride_wqkv, stride_ch, stride_cs, slots, EPS, False, HAS_BIAS,
                               IS_RING, HEAD_DIM, BN_QKV, BK_QKV, UNCONTRACTED, QK_NORM,
                               False, QK_EPS, False, WAIT, wait_for, HAS_WAIT)
            if CH_QKV > 1:  # no loop at all in a program of one block (a GPU's default)
                for block in range(first + 1, first + CH_QKV):
                    if block < tl.cdiv(n_q + 2 * n_kv, BN_QKV):
                        norm_qkv_rope_rows(block, X, ATTN_NORM_W, WQKV, BIAS, COS, SIN, POS, Q,
                                           K_CACHE, V_CACHE, KEY_POS, Q_NORM_W, K_NORM_W, n_q,
                                           n_kv, dim, stride_wqkv, stride_ch, stride_cs, slots,
                                           EPS, False, HAS_BIAS, IS_RING, HEAD_DIM, BN_QKV,
                                           BK_QKV, UNCONTRACTED, QK_NORM, False, QK_EPS, False,
                                           WAIT, wait_for, False)
            count_done(COUNT + LINE)
        elif pid < end_attend:
            part = pid - end_qkv
            row = part // n_splits  # the KV head (batch 1)
            wait_count(COUNT + LINE, end_qkv)  # q and this step's k, v
            # q [1, H_kv, G, D], the cache [1, H_kv, S, D] (unit feature stride)
            split_partials(row, part % n_splits, Q, K_CACHE, V_CACHE, KEY_POS, POS, ACC, M, L,
                           n_q, groups * HEAD_DIM, HEAD_DIM, 0, stride_ch, stride_cs,
                           0, stride_ch, stride_cs, n_kv_heads, groups, slots, chunk,
                           n_splits, window, SCALE, G_PAD, HEAD_DIM, ATTENTION_BLOCK,
                           IS_RING, HAS_WINDOW, PRECISION, 0.0, 0.0, LIBDEVICE)
            row_count = COUNT + (1 + STAGES + row) * LINE
            if count_done(row_count) == n_splits - 1:
                for g in range(groups):  # the row's last program: decode_attention's combine
                    combine_head(ACC, M, L, ATTN, M, row, g, groups, n_splits, n_kv_heads,
                                 S_PAD, HEAD_DIM, False, ".cg")
                tl.atomic_xchg(row_count, 0, sem="relaxed", scope="gpu")
                count_done(COUNT + 2 * LINE)
        elif pid < end_wo:  # h = x + wo(attention)
            gemv_chunk(pid - end_attend, CH_WO, ATTN, ATTN, WO, X, H, dim, n_q, stride_wo, dim,
                       COUNT + 2 * LINE, n_kv_heads, 0.0, False, False, True, BN_WO, BK_WO,
                       LIBDEVICE)
            done = count_done(COUNT + 3 * LINE)
            if not FFN:  # the attention side alone (an MoE layer): wo is the last stage
                if done == end_wo - end_attend - 1:
                    last = 1
        elif pid < end_w13:  # silu(gate) * up of ffn_norm(h)
            gemv_chunk(pid - end_wo, CH_W13, H, FFN_NORM_W, W13, H, ACT, ffn, dim, stride_w13,
                       ffn, COUNT + 3 * LINE, end_wo - end_attend, FFN_EPS, True, True, False,
                       BN_W13, BK_W13, LIBDEVICE)
            count_done(COUNT + 4 * LINE)
        else:  # out = h + w2(act)
            gemv_chunk(pid - end_w13, CH_W2, ACT, ACT, W2, H, OUT, dim, ffn, stride_w2, dim,
                       COUNT + 4 * LINE, end_w13 - end_wo, 0.0, False, False, True, BN_W2,
                       BK_W2, LIBDEVICE)
            if count_done(COUNT + 5 * LINE) == end_w2 - end_w13 - 1:
                last = 1
        return last

    @triton.jit
    def _layer_kernel(
            X, ATTN_NORM_W, WQKV, BIAS, COS, SIN, POS, Q, K_CACHE, V_CACHE, KEY_POS,
            Q_NORM_W, K_NORM_W, ACC, M, L, ATTN, WO, H, FFN_NORM_W, W13, ACT, W2, OUT, COUNT,
            dim, ffn, n_q, n_kv, stride_wqkv, stride_wo, stride_w13, stride_w2,
            stride_ch, stride_cs, slots, n_kv_heads, groups, chunk, n_splits, window,
            end_qkv, end_attend, end_wo, end_w13, end_w2,
            EPS: tl.constexpr, FFN_EPS: tl.constexpr, QK_EPS: tl.constexpr,
            HAS_BIAS: tl.constexpr, QK_NORM: tl.constexpr, IS_RING: tl.constexpr,
            HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, G_PAD: tl.constexpr,
            S_PAD: tl.constexpr, SCALE: tl.constexpr, PRECISION: tl.constexpr,
            ATTENTION_BLOCK: tl.constexpr, UNCONTRACTED: tl.constexpr,
            LIBDEVICE: tl.constexpr,
            BN_QKV: tl.constexpr, BK_QKV: tl.constexpr, BN_WO: tl.constexpr,
            BK_WO: tl.constexpr, BN_W13: tl.constexpr, BK_W13: tl.constexpr,
            BN_W2: tl.constexpr, BK_W2: tl.constexpr, CH_QKV: tl.constexpr,
            CH_WO: tl.constexpr, CH_W13: tl.constexpr, CH_W2: tl.constexpr,
            STAGES: tl.constexpr, LINE: tl.constexpr, FFN: tl.constexpr):
        # COUNT [(1 + STAGES + H_kv) x LINE] int32: the ticket, then layer_stages' counts
        pid = take_ticket(COUNT)  # this program's place, in program order of the stages
        last = layer_stages(
            pid, X, ATTN_NORM_W, WQKV, BIAS, COS, SIN, POS, Q, K_CACHE, V_CACHE, KEY_POS,
            Q_NORM_W, K_NORM_W, ACC, M, L, ATTN, WO, H, FFN_NORM_W, W13, ACT, W2, OUT, COUNT,
            COUNT, 0, dim, ffn, n_q, n_kv, stride_wqkv, stride_wo, stride_w13, stride_w2,
            stride_ch, stride_cs, slots, n_kv_heads, groups, chunk, n_splits, window,
            end_qkv, end_attend, end_wo, end_w13, end_w2, EPS, FFN_EPS, QK_EPS, HAS_BIAS,
            QK_NORM, IS_RING, HAS_WINDOW, HEAD_DIM, G_PAD, S_PAD, SCALE, PRECISION,
            ATTENTION_BLOCK, UNCONTRACTED, LIBDEVICE, BN_QKV, BK_QKV, BN_WO, BK_WO, BN_W13,
            BK_W13, BN_W2, BK_W2, CH_QKV, CH_WO, CH_W13, CH_W2, STAGES, LINE, FFN, False)
        if last:
            reset_counts(COUNT, 1 + STAGES, LINE)  # the rows': back at 0 already


def stage_tiles(dim: int, n_q: int, ffn: int, head_dim: int, qk_norm: bool,
                gpu: str) -> dict[str, tuple[int, int, int]]:
    """Each GEMV stage's (BLOCK_N, BLOCK_K, num_warps): the fused step's kernel's own, so
    that each row's sums run in the same order as there (ffn 0, no FFN stages: wo's tiles
    stand in for theirs, which nothing runs)."""
    wo = fused_tiles_for("gemv_add", n_q, gpu)
    if ffn == 0:
        return {"qkv": fused_tiles_for("norm_qkv_rope", dim, gpu, head_dim, qk_norm),
                "wo": wo, "w13": wo, "w2": wo}
    return {"qkv": fused_tiles_for("norm_qkv_rope", dim, gpu, head_dim, qk_norm), "wo": wo,
            "w13": fused_tiles_for("gemv_swiglu", dim, gpu),
            "w2": fused_tiles_for("gemv_add", ffn, gpu)}


def launch_shape(tiles: dict[str, tuple[int, int, int]]) -> tuple[int, int]:
    """(num_warps, num_stages) of the launch: the most warps a stage's tile asks for, at most
    MAX_WARPS, and one pipeline stage: with two, the chunk loop around the GEMV's own made
    135M's build spill 44 bytes, and the fused GEMV timed 1, 2 and 4 stages within 0.4% of each
    other (gemv.NUM_STAGES)."""
    return min(MAX_WARPS, max(t[2] for t in tiles.values())), 1


def stage_rows(n_rows_qkv: int, dim: int, ffn: int) -> dict[str, int]:
    """Each GEMV stage's output rows (ffn 0: no FFN stages)."""
    return {"qkv": n_rows_qkv, "wo": dim, "w13": ffn, "w2": dim if ffn else 0}


def stage_chunks(rows: dict[str, int], tiles: dict[str, tuple[int, int, int]],
                 programs: int | None) -> dict[str, int]:
    """Each GEMV stage's row blocks a program: as few as leave the stage at most `programs`
    programs (None: one). Why chunks at all: every program of the launch draws a ticket,
    counts itself and polls a count, atomics on a few shared addresses, and the fused step's
    tiles give a stage hundreds to thousands of programs of 1 to 4 rows (Llama-3.2-1B: 6,464
    a layer). Measured, fewer programs cost more than the atomics they saved (PROGRAMS_PER_SM)."""
    if programs is None:
        return dict.fromkeys(rows, 1)
    return {name: max(1, math.ceil(math.ceil(rows[name] / tiles[name][0]) / programs))
            for name in rows}


def layer_programs(n_kv_heads: int, n_splits: int, rows: dict[str, int],
                   tiles: dict[str, tuple[int, int, int]],
                   chunks: dict[str, int]) -> tuple[int, int, int, int, int]:
    """The ticket ends of the five stages (qkv, attend, wo, w13, w2), the last the grid: a
    GEMV stage's programs are its row blocks (stage_rows over each tile's BLOCK_N) in chunks
    (stage_chunks); the attention's one a KV head and split."""
    def programs(name: str) -> int:
        return math.ceil(math.ceil(rows[name] / tiles[name][0]) / chunks[name])

    ends, end = [], 0
    for count in (programs("qkv"), n_kv_heads * n_splits, programs("wo"), programs("w13"),
                  programs("w2")):
        end += count
        ends.append(end)
    return tuple(ends)


def launch_plan(n_rows_qkv: int, dim: int, n_q: int, ffn: int, head_dim: int, qk_norm: bool,
                n_kv_heads: int, n_splits: int,
                device: torch.device) -> tuple[dict, dict, tuple[int, ...]]:
    """(tiles, chunks, ticket ends) of a layer's launch on `device`: on a GPU a program a
    row block, or PROGRAMS_PER_SM an SM; off a GPU, INTERPRETER_PROGRAMS a stage (Triton's
    interpreter runs the chunk loops)."""
    tiles = stage_tiles(dim, n_q, ffn, head_dim, qk_norm, gpu_name(device))
    rows = stage_rows(n_rows_qkv, dim, ffn)
    if device.type != "cuda":
        programs = INTERPRETER_PROGRAMS
    elif PROGRAMS_PER_SM is None:
        programs = None
    else:
        programs = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    chunks = stage_chunks(rows, tiles, programs)
    return tiles, chunks, layer_programs(n_kv_heads, n_splits, rows, tiles, chunks)


def stage_constexprs(x: Tensor, head_dim: int, groups: int, n_splits: int,
                     tiles: dict[str, tuple[int, int, int]],
                     chunks: dict[str, int]) -> dict[str, object]:
    """The constexprs layer_stages takes from the launch's plan and x [1, dim] (the layer and
    model launches' alike): the attention's paddings, scale and precision, each GEMV stage's
    tile and chunk, the count layout."""
    return dict(
        G_PAD=max(16, triton.next_power_of_2(groups)), S_PAD=triton.next_power_of_2(n_splits),
        SCALE=head_dim ** -0.5, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        ATTENTION_BLOCK=ATTENTION_BLOCK, UNCONTRACTED=compiled_for_gpu(x),
        LIBDEVICE=compiled_for_gpu(x),
        BN_QKV=tiles["qkv"][0], BK_QKV=tiles["qkv"][1], BN_WO=tiles["wo"][0],
        BK_WO=tiles["wo"][1], BN_W13=tiles["w13"][0], BK_W13=tiles["w13"][1],
        BN_W2=tiles["w2"][0], BK_W2=tiles["w2"][1], CH_QKV=chunks["qkv"], CH_WO=chunks["wo"],
        CH_W13=chunks["w13"], CH_W2=chunks["w2"], STAGES=STAGE_COUNTS, LINE=LINE)


def _layer_step(x: Tensor, attention_norm: Tensor, wqkv: Tensor, bias: Tensor | None,
                cos: Tensor, sin: Tensor, input_pos: Tensor, k_cache: Tensor, v_cache: Tensor,
                key_pos: Tensor, q_norm: Tensor | None, k_norm: Tensor | None, wo: Tensor,
                ffn_norm: Tensor | None, w13: Tensor | None, w2: Tensor | None, n_q: int,
                eps: float, ffn_eps: float, qk_eps: float, is_ring: bool, window: int,
                n_splits: int) -> Tensor:
    """x [1, dim] -> the layer's output [1, dim]; k and v written into the cache at input_pos
    (a ring's key_pos too). wqkv [n_q + 2 n_kv, dim], wo [dim, n_q], w13 [2 ffn, dim],
    w2 [dim, ffn]; the cache [1, H_kv, S, D]. Without the FFN's weights (an MoE layer, whose
    experts run apart) the launch ends after wo: -> h = x + wo(attention) [1, dim]."""
    dim = x.shape[-1]
    has_ffn = ffn_norm is not None and w13 is not None and w2 is not None
    ffn = w13.shape[0] // 2 if has_ffn else 0
    if v_cache.stride() != k_cache.stride():  # the attention stage reads both with k's strides
        raise ValueError("layer_step: the K and V caches must share their layout")
    n_kv_heads, slots, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    groups = n_q // (n_kv_heads * head_dim)
    qk_norm = q_norm is not None and k_norm is not None
    tiles, chunks, ends = launch_plan(wqkv.shape[0], dim, n_q, ffn, head_dim, qk_norm,
                                      n_kv_heads, n_splits, x.device)
    rows = n_kv_heads  # batch 1: one attention row a KV head
    acc = torch.empty(rows, n_splits, groups, head_dim, device=x.device, dtype=torch.float32)
    m = torch.empty(rows, n_splits, groups, device=x.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    q, attention = (torch.empty(1, n_q, dtype=x.dtype, device=x.device) for _ in range(2))
    h, out = torch.empty_like(x), torch.empty_like(x)
    act = torch.empty(1, ffn, dtype=x.dtype, device=x.device) if has_ffn else x
    counts = kept_counts(x.device, (1 + STAGE_COUNTS + rows) * LINE)
    warps, stages = launch_shape(tiles)
    _layer_kernel[(ends[-1],)](
        x, attention_norm, wqkv, x if bias is None else bias, cos, sin, input_pos, q, k_cache,
        v_cache, key_pos, q_norm if qk_norm else x, k_norm if qk_norm else x, acc, m, l_sum,
        attention, wo, h, ffn_norm if has_ffn else x, w13 if has_ffn else wo, act,
        w2 if has_ffn else wo, out, counts,
        dim, ffn, n_q, (wqkv.shape[0] - n_q) // 2, wqkv.stride(0), wo.stride(0),
        w13.stride(0) if has_ffn else 0, w2.stride(0) if has_ffn else 0, k_cache.stride(1),
        k_cache.stride(2), slots, n_kv_heads, groups, math.ceil(slots / n_splits), n_splits,
        window, *ends,
        EPS=eps, FFN_EPS=ffn_eps, QK_EPS=qk_eps if qk_norm else 0.0, HAS_BIAS=bias is not None,
        QK_NORM=qk_norm, IS_RING=is_ring, HAS_WINDOW=window > 0, HEAD_DIM=head_dim,
        **stage_constexprs(x, head_dim, groups, n_splits, tiles, chunks),
        FFN=has_ffn, num_warps=warps, num_stages=stages)
    return out if has_ffn else h


@torch.library.custom_op("infermeter::layer_step", mutates_args=("k_cache", "v_cache",
                                                                  "key_pos"))
def layer_step(x: Tensor, attention_norm: Tensor, wqkv: Tensor, bias: Tensor | None,
               cos: Tensor, sin: Tensor, input_pos: Tensor, k_cache: Tensor, v_cache: Tensor,
               key_pos: Tensor, q_norm: Tensor | None, k_norm: Tensor | None, wo: Tensor,
               ffn_norm: Tensor | None, w13: Tensor | None, w2: Tensor | None, n_q: int,
               eps: float, ffn_eps: float, qk_eps: float, is_ring: bool, window: int,
               n_splits: int) -> Tensor:
    """The layer's batch-1 step in one launch (module docstring); without the FFN's weights,
    its attention side only. An opaque custom op: its body
    reads stage_sync's kept counts (kept_counts), a real tensor that inductor's fake-tensor
    trace of a triton_op's body could not take."""
    return _layer_step(x, attention_norm, wqkv, bias, cos, sin, input_pos, k_cache, v_cache,
                       key_pos, q_norm, k_norm, wo, ffn_norm, w13, w2, n_q, eps, ffn_eps,
                       qk_eps, is_ring, window, n_splits)


@layer_step.register_fake
def _(x: Tensor, attention_norm: Tensor, wqkv: Tensor, bias: Tensor | None, cos: Tensor,
      sin: Tensor, input_pos: Tensor, k_cache: Tensor, v_cache: Tensor, key_pos: Tensor,
      q_norm: Tensor | None, k_norm: Tensor | None, wo: Tensor, ffn_norm: Tensor | None,
      w13: Tensor | None, w2: Tensor | None, n_q: int, eps: float, ffn_eps: float,
      qk_eps: float, is_ring: bool, window: int, n_splits: int) -> Tensor:
    return torch.empty_like(x)
