"""The q/k norms, RoPE and the cache write of a fused step's layer with per-head q/k norms
(Qwen3, Gemma 3), in a kernel of their own after norm + wqkv (QK_NORM_KERNELS 2).

Why: those norms need a head's whole products before RoPE. In wqkv's own kernel
(fused_step._norm_qkv_rope_kernel with QK_NORM) a program must then read a whole head's weight
rows, one program a head: 40 programs of 0.5 MiB at Qwen3-30B-A3B on a GPU of 132 SMs, and its
fused step took 6.16 ms against split's 3.81 on an H100 (docs/engine.md). Here wqkv's product
runs as the plain norm + GEMV kernel over its whole grid of row blocks (fused_step.norm_gemv),
and this kernel, one small program a head, reads that product (a few hundred bytes a head):
  _qk_norm_rope_kernel  grid (heads of q, k and v,): a program loads its head's even and odd
                        features and runs fused_step.rope_and_store, the wqkv kernel's own
                        QK_NORM epilogue (the q/k norm, RoPE, the stores of q and of k and v
                        into the cache): from the same product, the same bits (the two ways'
                        products part only in their float32 sum order: other tiles).
PDL (pdl.py): all it reads but two small norm weights is the product the kernel before wrote,
so the PDL twin waits first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from infermeter.engine.kernels import pdl
from infermeter.engine.kernels.exact_math import compiled_for_gpu
from infermeter.engine.kernels.pdl import launch
from infermeter.engine.kernels.triton_support import triton

# How a fused step runs a layer's norm + wqkv where the layer has per-head q/k norms (Qwen3,
# Gemma 3; Attention.forward): 2, norm_gemv's product over the GEMV's whole grid of row blocks,
# then _qk_norm_rope_kernel, one small program a head, for the q/k norms, RoPE and the cache
# write; 1, all of it in _norm_qkv_rope_kernel, where one program reads a whole head's weight
# rows (module docstring). A wqkv bias keeps 1.
QK_NORM_KERNELS = 2

if triton is not None:
    import triton.language as tl

    from infermeter.engine.kernels.fused_step import rope_and_store, rope_inputs

    @triton.jit
    def _qk_norm_rope_kernel(QKV, COS, SIN, POS, Q_OUT, K_CACHE, V_CACHE, KEY_POS, Q_NORM_W,
                             K_NORM_W, n_q, n_kv, stride_ch, stride_cs, cache_size,
                             IS_RING: tl.constexpr, HEAD_DIM: tl.constexpr,
                             UNCONTRACTED: tl.constexpr, QK_GEMMA: tl.constexpr,
                             QK_EPS: tl.constexpr, PDL: tl.constexpr = False):
        """After norm_gemv's wqkv product QKV [n_q + 2 n_kv] (rounded to the dtype), program pid
        takes one head of q, k or v: the q/k norm and RoPE of norm_qkv_rope_rows's QK_NORM
        epilogue, to the bit, and the stores (q to Q_OUT, k and v to the cache)."""
        pid = tl.program_id(0)
        if PDL:  # QKV is the kernel before's output; nothing here is worth reading before it
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        rows = pid * HEAD_DIM + 2 * tl.arange(0, HEAD_DIM // 2)  # the head's even features
        row_ok = rows < n_q + 2 * n_kv  # always: one program a head
        a = tl.load(QKV + rows, mask=row_ok, other=0.0).to(tl.float32)
        b = tl.load(QKV + rows + 1, mask=row_ok, other=0.0).to(tl.float32)
        cos, sin, pos = rope_inputs(COS, SIN, POS, rows, row_ok, HEAD_DIM)
        rope_and_store(pid, a, b, rows, row_ok, cos, sin, pos, Q_OUT, K_CACHE, V_CACHE,
                       KEY_POS, Q_NORM_W, K_NORM_W, n_q, n_kv, stride_ch, stride_cs,
                       cache_size, IS_RING, HEAD_DIM, UNCONTRACTED, True, QK_GEMMA, QK_EPS)


def _qk_norm_rope(qkv: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, k_cache: Tensor,
                  v_cache: Tensor, key_pos: Tensor, q_norm_weight: Tensor,
                  k_norm_weight: Tensor, n_q: int, is_ring: bool, qk_eps: float,
                  qk_gemma: bool, *, pdl: bool) -> Tensor:
    """qkv [1, n_q + 2 n_kv] (wqkv's product), cos/sin [1, D / 2] float32 at input_pos [1],
    the cache as _norm_qkv_rope's, q_norm_weight/k_norm_weight [D] (D a power of two) -> q
    [1, n_q] normed and roped, k normed, roped and written, v written: one program a head."""
    head_dim = k_cache.shape[-1]
    q = torch.empty(1, n_q, dtype=qkv.dtype, device=qkv.device)
    launch(_qk_norm_rope_kernel, (qkv.shape[-1] // head_dim,), pdl,
           qkv, cos, sin, input_pos, q, k_cache, v_cache, key_pos, q_norm_weight, k_norm_weight,
           n_q, (qkv.shape[-1] - n_q) // 2, k_cache.stride(1), k_cache.stride(2),
           k_cache.shape[2], IS_RING=is_ring, HEAD_DIM=head_dim,
           UNCONTRACTED=compiled_for_gpu(qkv), QK_GEMMA=qk_gemma, QK_EPS=qk_eps, num_warps=1)
    return q


_CACHE_ARGS = ("k_cache", "v_cache", "key_pos")


@torch.library.triton_op("infermeter::qk_norm_rope", mutates_args=_CACHE_ARGS)
def qk_norm_rope(qkv: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, k_cache: Tensor,
                 v_cache: Tensor, key_pos: Tensor, q_norm_weight: Tensor, k_norm_weight: Tensor,
                 n_q: int, is_ring: bool, qk_eps: float, qk_gemma: bool) -> Tensor:
    """The per-head q/k norms (Qwen3, Gemma 3), RoPE on q and k and the cache write of k and v
    at input_pos, after norm_gemv's wqkv product qkv -> the roped q [1, n_q]."""
    return _qk_norm_rope(qkv, cos, sin, input_pos, k_cache, v_cache, key_pos, q_norm_weight,
                         k_norm_weight, n_q, is_ring, qk_eps, qk_gemma, pdl=False)


@torch.library.custom_op("infermeter::qk_norm_rope_pdl", mutates_args=_CACHE_ARGS)
def qk_norm_rope_pdl(qkv: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor,
                     k_cache: Tensor, v_cache: Tensor, key_pos: Tensor, q_norm_weight: Tensor,
                     k_norm_weight: Tensor, n_q: int, is_ring: bool, qk_eps: float,
                     qk_gemma: bool) -> Tensor:
    return _qk_norm_rope(qkv, cos, sin, input_pos, k_cache, v_cache, key_pos, q_norm_weight,
                         k_norm_weight, n_q, is_ring, qk_eps, qk_gemma, pdl=True)


@qk_norm_rope_pdl.register_fake
def _(qkv: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, k_cache: Tensor,
      v_cache: Tensor, key_pos: Tensor, q_norm_weight: Tensor, k_norm_weight: Tensor, n_q: int,
      is_ring: bool, qk_eps: float, qk_gemma: bool) -> Tensor:
    return qkv.new_empty(1, n_q)


# As the compiled step calls it: with PDL when pdl.enabled().

def qk_norm_rope_cache(qkv: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor,
                       k_cache: Tensor, v_cache: Tensor, key_pos: Tensor, q_norm_weight: Tensor,
                       k_norm_weight: Tensor, n_q: int, is_ring: bool, qk_eps: float,
                       qk_gemma: bool) -> Tensor:
    op = qk_norm_rope_pdl if pdl.enabled() else qk_norm_rope
    return op(qkv, cos, sin, input_pos, k_cache, v_cache, key_pos, q_norm_weight, k_norm_weight,
              n_q, is_ring, qk_eps, qk_gemma)
