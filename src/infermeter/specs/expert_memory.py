"""What an MoE model's experts hold besides the weights while a case runs, by the experts' kind
(engine/moe.py's MOE_KERNELS): generate's fit check (generate/memory.py) and offload's
(offload/fit.py) count the same parts. Arithmetic on the spec only: no torch."""

from __future__ import annotations

from infermeter.specs.model import ModelSpec
from infermeter.units import dtype_bytes


def gathered_expert_bytes(spec: ModelSpec, batch_size: int, dtype: str) -> int:
    """An MoE decode step of B tokens with B x k <= E experts (engine/moe.py's gathered way)
    copies out each token's k experts' w1, w3 and w2 (one layer at a time)."""
    return batch_size * spec.n_active_experts * 3 * spec.dim * spec.moe_ffn_dim * \
        dtype_bytes(dtype)


def gathers_with_torch(moe_kernel: str, rows: int) -> bool:
    """Whether a forward of `rows` rows that gathers (rows x k <= E) takes torch's way, which
    copies the experts out: "torch" always, "auto" past one row (engine/moe.uses_triton, spelled
    out here so the fit check needs no torch; a test keeps the two equal), "triton" never."""
    return moe_kernel == "torch" or (moe_kernel == "auto" and rows > 1)


def expert_parts(spec: ModelSpec, batch_size: int, forwards: list[int], dtype: str,
                 moe_kernel: str, tp: int = 1, hf: bool = False) -> dict[str, int]:
    """An MoE model's expert intermediates a case holds at most (one layer at a time): torch's
    gathered copy of the chosen experts, for a decode step of the batch's rows and a prefill
    forward of batch x its tokens (`forwards`), wherever those rows gather (N x k <= E) and
    the kind takes torch's there (hf ignores --moe-kernel: torch's way, decode only); the
    grouped Triton kernels' [pairs, moe_ffn] SwiGLU output and [pairs, dim] down products for
    the longest forward past E / k rows (kernels/expert_gemm.py; the pair ids: int64, small)."""
    parts = {}
    rows = [batch_size] if hf else [batch_size] + [batch_size * n for n in forwards]
    gathering = [n for n in rows if n * spec.n_active_experts <= spec.n_experts
                 and (hf or gathers_with_torch(moe_kernel, n))]
    if gathering:
        parts["gathered expert weights"] = gathered_expert_bytes(spec, max(gathering),
                                                                 dtype) // tp
    pairs = batch_size * max(forwards, default=0) * spec.n_active_experts
    if moe_kernel in ("triton", "auto") and not hf and pairs > spec.n_experts:
        parts["grouped expert activations"] = pairs * (
            -(-spec.moe_ffn_dim // tp) + spec.dim) * dtype_bytes(dtype)
    return parts
