"""Analytic sizes: KV-cache bytes, parameter counts, weight bytes, what fits in GPU memory.

Pure Python (no torch): these numbers must be available on a laptop with no GPU stack, and the
engine's allocated cache is checked against them byte for byte.

Definitions (docs/design.md):
  kv_bytes_per_token = 2 (K and V) x n_layers x n_kv_heads x head_dim x bytes(kv dtype)
  MLA (DeepSeek-V2/V3): n_layers x (kv_lora_rank + qk_rope_head_dim) x bytes  (one latent, no x2)
  a sliding-window layer holds at most `window` tokens per sequence, and so does a chunked
  layer (Llama 4) of `window`-token chunks: a token attends to at most its whole chunk.
  Tensor parallel: each rank holds ceil(n_kv_heads / tp) heads, so heads are replicated when
  tp > n_kv_heads; the MLA latent is shared by all heads and so is held whole by every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from infermeter.errors import InfermeterError
from infermeter.specs.model import ModelSpec
from infermeter.units import dtype_bytes, weight_bytes_of


def check_tp(spec: ModelSpec, tp: int) -> None:
    """Tensor parallelism splits query heads evenly and KV heads evenly or by replication."""
    if tp <= 0:
        raise InfermeterError(f"tensor-parallel degree must be positive, got {tp}")
    if spec.n_heads % tp:
        raise InfermeterError(
            f"tp={tp} does not divide {spec.name}'s {spec.n_heads} attention heads")
    if spec.n_kv_heads % tp and tp % spec.n_kv_heads:
        raise InfermeterError(
            f"tp={tp} neither divides nor is a multiple of {spec.name}'s "
            f"{spec.n_kv_heads} KV heads")


def kv_heads_per_rank(spec: ModelSpec, tp: int = 1) -> int:
    check_tp(spec, tp)
    return math.ceil(spec.n_kv_heads / tp)


def kv_bytes_per_token_layer(spec: ModelSpec, kv_dtype: str, tp: int = 1) -> int:
    """Bytes one token adds to one layer's cache on one rank (K and V together)."""
    if spec.is_mla:
        check_tp(spec, tp)
        return (spec.kv_lora_rank + spec.qk_rope_head_dim) * dtype_bytes(kv_dtype)
    return 2 * kv_heads_per_rank(spec, tp) * spec.head_dim * dtype_bytes(kv_dtype)


def kv_bytes_per_token(spec: ModelSpec, kv_dtype: str, tp: int = 1) -> int:
    """Bytes one token adds to the whole cache (before any window cap), one rank at tp > 1."""
    return spec.n_layers * kv_bytes_per_token_layer(spec, kv_dtype, tp)


def cached_tokens(spec: ModelSpec, layer: int, seq_len: int) -> int:
    """Tokens of one sequence that layer `layer` keeps: all of them, or its window."""
    window = spec.layer_window(layer)
    return seq_len if window is None else min(seq_len, window)


def kv_cache_bytes(spec: ModelSpec, batch_size: int, seq_len: int, kv_dtype: str,
                   tp: int = 1) -> int:
    """Whole KV cache for `batch_size` sequences of `seq_len` tokens (one rank when tp > 1)."""
    _check_positive(batch_size=batch_size, seq_len=seq_len)
    per_layer = kv_bytes_per_token_layer(spec, kv_dtype, tp)
    tokens = sum(cached_tokens(spec, layer, seq_len) for layer in range(spec.n_layers))
    return batch_size * tokens * per_layer


def prefill_activation_bytes(spec: ModelSpec, batch_size: int, prompt_len: int,
                             dtype: str, every_row: bool = False) -> int:
    """The largest prefill forward's activations: the engine projects one row a sequence to
    the vocabulary (Transformer.forward's rows); every_row: all T rows, as transformers may."""
    tokens = batch_size * prompt_len
    rows = tokens if every_row else batch_size
    logits = rows * spec.vocab_size * (dtype_bytes(dtype) + 4)  # [B, rows, V] and its .float()
    ffn = 3 * tokens * spec.ffn_dim * dtype_bytes(dtype)  # w1 x, w3 x, their product
    return logits + ffn


def layer_replay_bytes(spec: ModelSpec, batch_size: int, tokens: int, dtype: str) -> int:
    """The exact compiled prefill's layer replays on a GPU (engine/layer_replays.py): two
    [B, T, dim] activation buffers, kept while the Generator lives."""
    return 2 * batch_size * tokens * spec.dim * dtype_bytes(dtype)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise InfermeterError(f"{name} must be positive, got {value}")


# ---- parameters ------------------------------------------------------------------------------
def _attention_params(spec: ModelSpec) -> int:
    d = spec.dim
    if spec.is_mla:
        q_head = spec.qk_nope_head_dim + spec.qk_rope_head_dim
        if spec.q_lora_rank:  # q = W_qb(norm(W_qa x))
            q = d * spec.q_lora_rank + spec.q_lora_rank + spec.q_lora_rank * spec.n_heads * q_head
        else:
            q = d * spec.n_heads * q_head
        kv_a = d * (spec.kv_lora_rank + spec.qk_rope_head_dim) + spec.kv_lora_rank  # + its norm
        kv_b = spec.kv_lora_rank * spec.n_heads * (spec.qk_nope_head_dim + spec.v_head_dim)
        out = spec.n_heads * spec.v_head_dim * d
        return q + kv_a + kv_b + out
    q_out = spec.n_heads * spec.head_dim
    kv_out = spec.n_kv_heads * spec.head_dim
    weights = d * q_out + 2 * d * kv_out + q_out * d
    bias = (q_out + 2 * kv_out if spec.qkv_bias else 0) + (d if spec.o_bias else 0)
    sinks = spec.n_heads if spec.attn_sinks else 0  # one logit per query head [n_heads]
    return weights + bias + sinks


def _expert_matrix_params(spec: ModelSpec, layer: int, active: bool) -> int:
    """The weight matrices of layer `layer`'s experts, routed (all, or the k a token uses)
    and shared: three dim x moe_ffn each (gpt-oss's gate_up [dim, 2 ffn] is two of them)."""
    if not spec.is_moe_layer(layer):
        return 0
    routed = spec.n_active_experts if active else spec.n_experts
    return (routed + spec.n_shared_experts) * 3 * spec.dim * spec.moe_ffn_dim


def _router_params(spec: ModelSpec) -> int:
    """One MoE layer's router: [n_experts, dim], + a bias of n_experts (gpt-oss)."""
    return spec.n_experts * (spec.dim + (1 if spec.moe_bias else 0))


def _ffn_params(spec: ModelSpec, layer: int, active: bool) -> int:
    """SwiGLU: three dim x ffn matrices per (expert) FFN, plus the MoE router; gpt-oss adds
    each expert's biases (gate and up: 2 x moe_ffn, down: dim)."""
    if not spec.is_moe_layer(layer):
        return 3 * spec.dim * spec.ffn_dim
    routed = spec.n_active_experts if active else spec.n_experts
    biases = (routed + spec.n_shared_experts) * (2 * spec.moe_ffn_dim + spec.dim) \
        if spec.moe_bias else 0
    return _expert_matrix_params(spec, layer, active) + biases + _router_params(spec)


def expert_matrix_params(spec: ModelSpec, active: bool = False) -> int:
    """Parameters in the experts' weight matrices over all layers (what
    ModelSpec.expert_weight_dtype applies to); 0 for a dense model."""
    return sum(_expert_matrix_params(spec, i, active) for i in range(spec.n_layers))


def _layer_norm_params(spec: ModelSpec) -> int:
    """One layer's norm weights: norms_per_layer of dim, + q and k norms of head_dim (Qwen3)."""
    return spec.norms_per_layer * spec.dim + (2 * spec.head_dim if spec.qk_norm else 0)


def param_count(spec: ModelSpec, active: bool = False) -> int:
    """Parameters of the model; `active=True` counts only the experts one token uses (MoE)."""
    if spec.vocab_size is None:
        raise InfermeterError(f"model {spec.name}: the vocabulary size is unknown ({spec.source} "
                              "does not say it), so are its weight bytes")
    per_layer_norms = _layer_norm_params(spec)
    layers = sum(_attention_params(spec) + _ffn_params(spec, i, active) + per_layer_norms
                 for i in range(spec.n_layers))
    embeddings = spec.vocab_size * spec.dim * (1 if spec.tie_embeddings else 2)
    return layers + embeddings + spec.dim  # + final norm


def weight_bytes(spec: ModelSpec, dtype: str, active: bool = False,
                 expert_dtype: str | None = None) -> int:
    """Weights in `dtype`; with `expert_dtype`, the experts' weight matrices in that instead
    (gpt-oss as published: bf16 with mxfp4 experts)."""
    if expert_dtype is None:
        return weight_bytes_of(param_count(spec, active), dtype)
    experts = expert_matrix_params(spec, active)
    return (weight_bytes_of(param_count(spec, active) - experts, dtype)
            + weight_bytes_of(experts, expert_dtype))


def weight_bytes_per_rank(spec: ModelSpec, dtype: str, tp: int = 1,
                          expert_dtype: str | None = None) -> int:
    """Weights one rank holds: matrices split tp ways, norms and MoE routers replicated.

    KV projections are replicated with their heads when tp > n_kv_heads, so a rank holds
    ceil(n_kv_heads / tp) heads' worth of wk and wv (and their biases). gpt-oss's output-
    projection bias [dim] and experts' down bias [E, dim] are held whole by every rank (rank 0
    adds them, parallel/sharding.py). With `expert_dtype`, the experts' matrices (split tp ways
    like the rest) are in that dtype.
    """
    check_tp(spec, tp)
    if tp == 1:
        return weight_bytes(spec, dtype, expert_dtype=expert_dtype)
    norms = _layer_norm_params(spec) * spec.n_layers + spec.dim
    # MoE routers [E, dim] are replicated too (every rank routes its tokens alike)
    moe_layers = sum(spec.is_moe_layer(i) for i in range(spec.n_layers))
    routers = moe_layers * _router_params(spec)
    whole_biases = spec.n_layers * spec.dim * spec.o_bias + \
        moe_layers * (spec.n_experts + spec.n_shared_experts) * spec.dim * spec.moe_bias
    total = param_count(spec) - norms - routers - whole_biases
    extra_kv = 0
    if not spec.is_mla and tp > spec.n_kv_heads:
        kv_params = 2 * (spec.dim + spec.qkv_bias) * spec.n_kv_heads * spec.head_dim
        extra_kv = spec.n_layers * kv_params * (tp // spec.n_kv_heads - 1) // tp
    replicated = extra_kv + norms + routers + whole_biases
    if expert_dtype is None:
        return weight_bytes_of(math.ceil(total / tp) + replicated, dtype)
    experts = expert_matrix_params(spec)
    return (weight_bytes_of(math.ceil((total - experts) / tp) + replicated, dtype)
            + weight_bytes_of(math.ceil(experts / tp), expert_dtype))


# ---- what fits -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fit:
    """KV budget on one GPU after weights and an activation reserve."""

    gpu_memory_bytes: int
    weight_bytes_per_rank: int
    reserve_bytes: int
    kv_budget_bytes: int  # may be negative: the weights alone do not fit


def kv_budget(spec: ModelSpec, dtype: str, tp: int, gpu_memory: int, reserve: int,
              expert_dtype: str | None = None) -> Fit:
    weights = weight_bytes_per_rank(spec, dtype, tp, expert_dtype)
    return Fit(gpu_memory, weights, reserve, gpu_memory - weights - reserve)


def max_batch(spec: ModelSpec, seq_len: int, kv_dtype: str, tp: int, budget: int) -> int:
    """Largest batch of `seq_len`-token sequences whose cache fits `budget` bytes (0 if none)."""
    if budget <= 0:
        return 0
    return budget // kv_cache_bytes(spec, 1, seq_len, kv_dtype, tp)


def max_seq_len(spec: ModelSpec, batch_size: int, kv_dtype: str, tp: int, budget: int) -> int:
    """Longest context (up to the model's max positions) that fits for `batch_size` sequences.

    Found by bisection because sliding-window layers make cache size non-linear in length.
    """
    if budget <= 0 or kv_cache_bytes(spec, batch_size, 1, kv_dtype, tp) > budget:
        return 0
    lo, hi = 1, spec.max_seq_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if kv_cache_bytes(spec, batch_size, mid, kv_dtype, tp) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


CACHE_ROUND = 256  # an automatic cache length's multiple: nearby lengths share a cache and graph


def cache_length(spec: ModelSpec, prompt_len: int, new_tokens: int, fixed: int | None,
                 asked: str | None = None) -> int:
    """The KV cache, in tokens a sequence, for prompt + new tokens: `fixed` if given, else the
    need rounded up to CACHE_ROUND (capped at the model's context). What the Generator
    allocates, what generate's cases, the dry run and offload size; one line of error if it
    cannot fit, saying what was asked in the caller's words (`asked`) or as prompt + new."""
    need, limit = prompt_len + new_tokens, fixed or spec.max_seq_len
    if need > limit:
        what = f"the KV cache of {limit} tokens" if fixed else \
            f"model {spec.name}'s context of {limit} tokens"
        asked = asked or f"prompt of {prompt_len} tokens + {new_tokens} new tokens"
        raise InfermeterError(f"{asked} = {need} tokens does not fit in {what}")
    if fixed and fixed > spec.max_seq_len:
        raise InfermeterError(f"cache length {fixed} is longer than model {spec.name}'s context "
                              f"of {spec.max_seq_len} tokens")
    return fixed or min(-(-need // CACHE_ROUND) * CACHE_ROUND, limit)
