"""A dense model's batch-1 decode step, every layer, in one launch (the "model" step kernels,
model.py).

Why: the one-launch layer step (layer_step.py) still ends a launch per layer, and each end costs
a drain of the GPU and a launch however few bytes the layer reads: at SmolLM2-135M's 30 layers
of 9 MB, a step is mostly those boundaries. Here the layers follow each other inside one
launch: program t (its ticket, stage_sync.take_ticket) runs stage t % P of layer t // P, P a
layer's programs (layer_step.launch_plan), and layer l's qkv stage waits, after loading its
first weight tiles, for layer l - 1's w2 stage to have counted all its programs. So layer l's
weights start streaming in while layer l - 1 finishes, with no launch between them.

Each program runs layer_step.layer_stages, the layer launch's own code, on its layer's tensors,
whose addresses it reads from a table (int64 [rows, layers], stage_sync.kept_addresses: one
row per weight or cache, a column a layer): the layers' tensors are the model's own, wherever
they lie, so nothing is copied or stacked. Every layer has the same shapes, strides and dtypes
(the caller checks), so one set of constexprs serves them all, and a step gives the layer
launch's bits layer after layer (tests/test_model_step.py, under Triton's interpreter).

Buffers between stages (q, the attention's partials, h, the FFN's activation) are shared by the
layers: layer l's qkv waits for layer l - 1's last stage, which waited for every stage before it,
so nothing of layer l - 1 still reads them. The residual stream is ACTS [layers - 1, dim]: layer
l writes row l and reads row l - 1; layer 0 reads x, the last layer writes OUT. The counts
(stage_sync.kept_counts) are a layer_step block per layer; layer 0's first slot is the launch's
ticket. The program that counts the last layer's w2 whole resets every layer's counts: every
wait of the launch has been passed by then (each program waits before it counts).

What takes it (Transformer.takes_model_kernel): every layer a dense one that takes the layer
launch, with a cache that is not a ring (no sliding window) and no per-layer RoPE base, all
alike. It runs only in the recorded step (step_choice.check_model_kernels): its address table
is made on the step's first, eager run, which inductor's trees may skip when they record anew.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from infermeter.engine.kernels.layer_step import (
    STAGE_COUNTS,
    launch_plan,
    launch_shape,
    stage_constexprs,
)
from infermeter.engine.kernels.stage_sync import LINE, kept_addresses, kept_counts
from infermeter.engine.kernels.triton_support import tl, triton

# The table's rows: each layer's tensors whose address it reads (bias and the q/k norms only
# where the model has them; a missing one's row holds 0, never read)
ROWS = ("attention_norm", "wqkv", "bias", "q_norm", "k_norm", "wo", "ffn_norm", "w13", "w2",
        "k_cache", "v_cache")

if triton is not None:
    from infermeter.engine.kernels.layer_step import layer_stages
    from infermeter.engine.kernels.stage_sync import reset_counts, take_ticket

    @triton.jit
    def _address(TABLE, row: tl.constexpr, n_layers, layer, TYPED, ALIGNED: tl.constexpr):
        """Layer `layer`'s tensor of table row `row`, as a pointer of TYPED's element type.
        ALIGNED: every address of the table is a multiple of 16, said to the compiler, which
        otherwise knows nothing of a loaded pointer and reads through it 2 bytes a load (a
        kernel argument's alignment it learns from the launch)."""
        address = tl.load(TABLE + row * n_layers + layer).to(
            tl.pointer_type(TYPED.dtype.element_ty))
        if ALIGNED:
            address = tl.multiple_of(address, 16)
        return address

    @triton.jit
    def _model_kernel(
            X, ACTS, OUT, TABLE, n_layers, block, ATTN_NORM_W, WQKV, BIAS, COS, SIN, POS, Q,
            K_CACHE, V_CACHE, KEY_POS, Q_NORM_W, K_NORM_W, ACC, M, L, ATTN, WO, H,
            FFN_NORM_W, W13, ACT, W2, COUNT,
            dim, ffn, n_q, n_kv, stride_wqkv, stride_wo, stride_w13, stride_w2,
            stride_ch, stride_cs, slots, n_kv_heads, groups, chunk, n_splits,
            end_qkv, end_attend, end_wo, end_w13, end_w2,
            EPS: tl.constexpr, FFN_EPS: tl.constexpr, QK_EPS: tl.constexpr,
            HAS_BIAS: tl.constexpr, QK_NORM: tl.constexpr, HEAD_DIM: tl.constexpr,
            G_PAD: tl.constexpr, S_PAD: tl.constexpr, SCALE: tl.constexpr,
            PRECISION: tl.constexpr, ATTENTION_BLOCK: tl.constexpr,
            UNCONTRACTED: tl.constexpr, LIBDEVICE: tl.constexpr,
            BN_QKV: tl.constexpr, BK_QKV: tl.constexpr, BN_WO: tl.constexpr,
            BK_WO: tl.constexpr, BN_W13: tl.constexpr, BK_W13: tl.constexpr,
            BN_W2: tl.constexpr, BK_W2: tl.constexpr, CH_QKV: tl.constexpr,
            CH_WO: tl.constexpr, CH_W13: tl.constexpr, CH_W2: tl.constexpr,
            STAGES: tl.constexpr, LINE: tl.constexpr, ALIGNED: tl.constexpr):
        # COUNT [layers x block] int32, block = (1 + STAGES + H_kv) x LINE: a layer's counts
        # as layer_stages reads them; layer 0's first slot is the ticket
        ticket = take_ticket(COUNT)
        layer = ticket // end_w2
        counts = COUNT + layer * block
        x = ACTS + (layer - 1) * dim  # [dim]: the layer before's output
        if layer == 0:
            x = X
        out = ACTS + layer * dim
        if layer == n_layers - 1:
            out = OUT
        # layer 0 waits for nothing: a count of its own that is at 0 and is waited for at 0
        wait = COUNT + (layer - 1) * block + 5 * LINE
        wait_for = end_w2 - end_w13
        if layer == 0:
            wait = COUNT + 5 * LINE
            wait_for = 0
        # this layer's tensors (ROWS' order in the table)
        norm_w, wqkv, bias, q_norm_w, k_norm_w, wo, ffn_norm_w, w13, w2, k_cache, v_cache = (
            _address(TABLE, 0, n_layers, layer, ATTN_NORM_W, ALIGNED),
            _address(TABLE, 1, n_layers, layer, WQKV, ALIGNED),
            _address(TABLE, 2, n_layers, layer, BIAS, ALIGNED),
            _address(TABLE, 3, n_layers, layer, Q_NORM_W, ALIGNED),
            _address(TABLE, 4, n_layers, layer, K_NORM_W, ALIGNED),
            _address(TABLE, 5, n_layers, layer, WO, ALIGNED),
            _address(TABLE, 6, n_layers, layer, FFN_NORM_W, ALIGNED),
            _address(TABLE, 7, n_layers, layer, W13, ALIGNED),
            _address(TABLE, 8, n_layers, layer, W2, ALIGNED),
            _address(TABLE, 9, n_layers, layer, K_CACHE, ALIGNED),
            _address(TABLE, 10, n_layers, layer, V_CACHE, ALIGNED))
        last = layer_stages(
            ticket - layer * end_w2, x, norm_w, wqkv, bias, COS, SIN, POS, Q, k_cache, v_cache,
            KEY_POS, q_norm_w, k_norm_w, ACC, M, L, ATTN, wo, H, ffn_norm_w, w13, ACT, w2, out,
            counts, wait, wait_for,
            dim, ffn, n_q, n_kv, stride_wqkv, stride_wo, stride_w13, stride_w2, stride_ch,
            stride_cs, slots, n_kv_heads, groups, chunk, n_splits, 0, end_qkv, end_attend,
            end_wo, end_w13, end_w2, EPS, FFN_EPS, QK_EPS, HAS_BIAS, QK_NORM, False, False,
            HEAD_DIM, G_PAD, S_PAD, SCALE, PRECISION, ATTENTION_BLOCK, UNCONTRACTED, LIBDEVICE,
            BN_QKV, BK_QKV, BN_WO, BK_WO, BN_W13, BK_W13, BN_W2, BK_W2, CH_QKV, CH_WO, CH_W13,
            CH_W2, STAGES, LINE, True, True)
        if layer == n_layers - 1:
            if last == 1:  # every program of the launch has counted
                for index in range(n_layers):
                    reset_counts(COUNT + index * block, 1 + STAGES, LINE)  # rows: at 0 already


def _model_step(x: Tensor, attention_norms: list[Tensor], wqkvs: list[Tensor],
                biases: list[Tensor], cos: Tensor, sin: Tensor, input_pos: Tensor,
                k_caches: list[Tensor], v_caches: list[Tensor], key_pos: Tensor,
                q_norms: list[Tensor], k_norms: list[Tensor], wos: list[Tensor],
                ffn_norms: list[Tensor], w13s: list[Tensor], w2s: list[Tensor], n_q: int,
                eps: float, ffn_eps: float, qk_eps: float, n_splits: int) -> Tensor:
    """x [1, dim] -> the last layer's output [1, dim]; each layer's k and v written into its
    cache at input_pos. Per layer (lists of one tensor a layer, every layer alike): wqkv
    [n_q + 2 n_kv, dim], wo [dim, n_q], w13 [2 ffn, dim], w2 [dim, ffn], the cache
    [1, H_kv, S, D] (not a ring); biases, q_norms and k_norms empty where the model has none."""
    dim, layers = x.shape[-1], len(wqkvs)
    ffn = w13s[0].shape[0] // 2
    k_cache = k_caches[0]
    n_kv_heads, slots, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    groups = n_q // (n_kv_heads * head_dim)
    qk_norm, has_bias = bool(q_norms), bool(biases)
    tiles, chunks, ends = launch_plan(wqkvs[0].shape[0], dim, n_q, ffn, head_dim, qk_norm,
                                      n_kv_heads, n_splits, x.device)
    columns = {"attention_norm": attention_norms, "wqkv": wqkvs, "bias": biases,
               "q_norm": q_norms, "k_norm": k_norms, "wo": wos, "ffn_norm": ffn_norms,
               "w13": w13s, "w2": w2s, "k_cache": k_caches, "v_cache": v_caches}
    # a row the model lacks holds 0, never read: a tensor's address there (x's changes from
    # step to step) would ask for a new table at the CUDA graph's capture
    addresses = tuple(columns[row][layer].data_ptr() if columns[row] else 0
                      for row in ROWS for layer in range(layers))
    table = kept_addresses(x.device, addresses)
    acc = torch.empty(n_kv_heads, n_splits, groups, head_dim, device=x.device,
                      dtype=torch.float32)
    m = torch.empty(n_kv_heads, n_splits, groups, device=x.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    q, attention = (torch.empty(1, n_q, dtype=x.dtype, device=x.device) for _ in range(2))
    h = torch.empty_like(x)
    act = torch.empty(1, ffn, dtype=x.dtype, device=x.device)
    acts = torch.empty(max(1, layers - 1), dim, dtype=x.dtype, device=x.device)
    out = torch.empty_like(x)
    block = (1 + STAGE_COUNTS + n_kv_heads) * LINE
    counts = kept_counts(x.device, layers * block)
    warps, stages = launch_shape(tiles)
    _model_kernel[(layers * ends[-1],)](
        x, acts, out, table, layers, block, attention_norms[0], wqkvs[0],
        biases[0] if has_bias else x, cos, sin, input_pos, q, k_cache, v_caches[0], key_pos,
        q_norms[0] if qk_norm else x, k_norms[0] if qk_norm else x, acc, m, l_sum, attention,
        wos[0], h, ffn_norms[0], w13s[0], act, w2s[0], counts,
        dim, ffn, n_q, (wqkvs[0].shape[0] - n_q) // 2, wqkvs[0].stride(0), wos[0].stride(0),
        w13s[0].stride(0), w2s[0].stride(0), k_cache.stride(1), k_cache.stride(2), slots,
        n_kv_heads, groups, math.ceil(slots / n_splits), n_splits, *ends,
        EPS=eps, FFN_EPS=ffn_eps, QK_EPS=qk_eps if qk_norm else 0.0, HAS_BIAS=has_bias,
        QK_NORM=qk_norm, HEAD_DIM=head_dim,
        **stage_constexprs(x, head_dim, groups, n_splits, tiles, chunks),
        ALIGNED=all(address % 16 == 0 for address in addresses),
        num_warps=warps, num_stages=stages)
    return out


@torch.library.custom_op("infermeter::model_step", mutates_args=("k_caches", "v_caches"))
def model_step(x: Tensor, attention_norms: list[Tensor], wqkvs: list[Tensor],
               biases: list[Tensor], cos: Tensor, sin: Tensor, input_pos: Tensor,
               k_caches: list[Tensor], v_caches: list[Tensor], key_pos: Tensor,
               q_norms: list[Tensor], k_norms: list[Tensor], wos: list[Tensor],
               ffn_norms: list[Tensor], w13s: list[Tensor], w2s: list[Tensor], n_q: int,
               eps: float, ffn_eps: float, qk_eps: float, n_splits: int) -> Tensor:
    """Every layer's batch-1 step in one launch (module docstring). An opaque custom op, as
    layer_step's: its body reads kept counts and an address table, real tensors that a
    fake-tensor trace could not take."""
    return _model_step(x, attention_norms, wqkvs, biases, cos, sin, input_pos, k_caches,
                       v_caches, key_pos, q_norms, k_norms, wos, ffn_norms, w13s, w2s, n_q,
                       eps, ffn_eps, qk_eps, n_splits)


@model_step.register_fake
def _(x: Tensor, attention_norms: list[Tensor], wqkvs: list[Tensor], biases: list[Tensor],
      cos: Tensor, sin: Tensor, input_pos: Tensor, k_caches: list[Tensor],
      v_caches: list[Tensor], key_pos: Tensor, q_norms: list[Tensor], k_norms: list[Tensor],
      wos: list[Tensor], ffn_norms: list[Tensor], w13s: list[Tensor], w2s: list[Tensor],
      n_q: int, eps: float, ffn_eps: float, qk_eps: float, n_splits: int) -> Tensor:
    return torch.empty_like(x)
