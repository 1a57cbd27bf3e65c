"""The experts' activation inside the Triton expert kernels (expert_gemv.py's gathered,
expert_gemm.py's grouped), at MoEFeedForward's eager rounding points: each gate/up product
rounded to the dtype, plus its expert's bias rounded (gpt-oss), then SwiGLU, or gpt-oss's
clamped SwiGLU (gate.clamp(max=limit), up.clamp(-limit, limit), (up + 1) * gate *
sigmoid(gate * alpha)) with every torch op's rounding; exact_math.py's silu and sigmoid.
"""

from __future__ import annotations

from infermeter.engine.kernels.triton_support import triton

if triton is not None:
    import triton.language as tl

    from infermeter.engine.kernels.exact_math import exact_sigmoid, exact_silu

    @triton.jit
    def expert_activation(gate, up, B1, B3, expert, stride_b1, stride_b3, rows, row_ok, limit,
                          alpha, dtype: tl.constexpr, HAS_BIAS: tl.constexpr,
                          CLAMPED: tl.constexpr, LIBDEVICE: tl.constexpr):
        """gate, up [M, BLOCK_N] float32 sums of one expert's rows `rows` -> the activation
        [M, BLOCK_N] in float32, its last product not yet rounded (the caller stores it in
        dtype). B1 / B3: the biases [E, ffn] (row strides stride_b1 / stride_b3)."""
        gate = gate.to(dtype).to(tl.float32)  # the product, rounded (Linear's output)
        up = up.to(dtype).to(tl.float32)
        if HAS_BIAS:  # the expert's biases [BLOCK_N], each sum rounded (eager's `+ bias`)
            bias_gate = tl.load(B1 + expert * stride_b1 + rows, mask=row_ok, other=0.0)
            bias_up = tl.load(B3 + expert * stride_b3 + rows, mask=row_ok, other=0.0)
            gate = (gate + bias_gate.to(tl.float32)[None, :]).to(dtype).to(tl.float32)
            up = (up + bias_up.to(tl.float32)[None, :]).to(dtype).to(tl.float32)
        if CLAMPED:  # MoEFeedForward.activation's clamped SwiGLU, each op's rounding
            gate = tl.minimum(gate, limit).to(dtype).to(tl.float32)
            up = tl.minimum(tl.maximum(up, -limit), limit).to(dtype).to(tl.float32)
            scaled = (gate * alpha).to(dtype).to(tl.float32)
            sig = exact_sigmoid(scaled, LIBDEVICE).to(dtype).to(tl.float32)
            glu = (gate * sig).to(dtype).to(tl.float32)
            act = (up + 1.0).to(dtype).to(tl.float32) * glu
        else:
            silu = exact_silu(gate, LIBDEVICE).to(dtype).to(tl.float32)  # F.silu's, rounded
            act = silu * up
        return act
