"""Which kernels an MoE model's experts take, by the experts' kind (engine/moe.py's
MOE_KERNELS), and what they hold besides the weights while a case runs: the engine's rule
(uses_triton) and what generate's fit check (generate/memory.py) and offload's (offload/fit.py)
count from it. Arithmetic on the spec only: no torch, so the fit checks and the report read the
rule the engine runs."""

from __future__ import annotations

from infermeter.specs.model import ModelSpec
from infermeter.units import dtype_bytes


def gathered_expert_bytes(spec: ModelSpec, batch_size: int, dtype: str) -> int:
    """An MoE decode step of B tokens with B x k <= E experts (engine/moe.py's gathered way)
    copies out each token's k experts' w1, w3 and w2 (one layer at a time)."""
    return batch_size * spec.n_active_experts * 3 * spec.dim * spec.moe_ffn_dim * \
        dtype_bytes(dtype)


def takes_triton(kind: str) -> bool:
    """Whether experts kind `kind` takes Triton's kernels at all where Triton runs ("triton",
    "auto"): each such kind takes them past E / k rows (grouped, no host sync)."""
    return kind in ("triton", "auto")


def uses_triton(kind: str, n_tokens: int, top_k: int, n_experts: int,
                tuned: bool = False) -> bool:
    """Whether a forward of n_tokens with experts kind `kind` takes the Triton kernels where
    Triton runs: "triton" always, "auto" at one token (gathered), at a count the GPU has
    measured tiles for (`tuned`: engine/kernels/expert_gemv.EXPERT_TOKEN_TILES, gathered) and
    past E / k tokens (grouped), "torch" never; elsewhere torch's way (a gather of N x k <= E
    rows copies the chosen experts out). The fit checks and the report know no GPU and pass
    no `tuned`: where it holds they count torch's gathered copy, more than runs."""
    return takes_triton(kind) and (kind == "triton" or n_tokens == 1 or tuned
                                   or n_tokens * top_k > n_experts)


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
    k, experts = spec.n_active_experts, spec.n_experts
    gathering = [n for n in rows if n * k <= experts
                 and (hf or not uses_triton(moe_kernel, n, k, experts))]
    if gathering:
        parts["gathered expert weights"] = gathered_expert_bytes(spec, max(gathering),
                                                                 dtype) // tp
    pairs = batch_size * max(forwards, default=0) * k
    if takes_triton(moe_kernel) and not hf and pairs > experts:
        parts["grouped expert activations"] = pairs * (
            -(-spec.moe_ffn_dim // tp) + spec.dim) * dtype_bytes(dtype)
    return parts
