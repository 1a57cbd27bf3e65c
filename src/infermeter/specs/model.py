"""ModelSpec: everything sizing and the engine need to know about a model's shape.

A spec comes from a preset (`specs/presets.py`), a Meta `params.json` or a Hugging Face
`config.json` (`specs/loaders.py`); `resolve_model` takes whatever the user typed after `--model`.
Pure Python: no torch import, so `infermeter kv` runs anywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from infermeter.errors import InfermeterError

# Architectures the engine can run; the others are for sizing only.
ENGINE_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "mixtral",
                "qwen3_moe", "gpt_oss")
# What the engine lacks to run each sizing-only architecture (SIZING_ARCHS not in
# ENGINE_ARCHS): the refusal names it; an architecture missing here gets a generic line.
ENGINE_MISSING = {
    "phi3": "a loader for its fused qkv_proj and gate_up_proj weights",
    "deepseek_v3": "multi-head latent attention (a compressed KV latent, a decoupled RoPE key), "
                   "shared experts and a grouped sigmoid router",
    "llama4_text": "chunked attention, NoPE layers, a sigmoid router and a shared expert",
}
# Architectures built Gemma's way: (1 + w) norms, norms after attention and FFN as well as
# before, GeGLU (tanh gelu), embeddings scaled by sqrt(dim).
GEMMA_ARCHS = ("gemma2", "gemma3_text")
# Architectures whose shapes we understand well enough to size (KV bytes, weight bytes).
SIZING_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "gemma2",
                "gemma3_text", "phi3", "deepseek_v3", "gpt_oss", "llama4_text")
# What the windowed layers do: "sliding", a token attends to the `window` tokens before it;
# "chunked" (Llama 4), to the tokens of its own `window`-token chunk. Either way such a layer
# caches at most `window` tokens a sequence, which is all sizing needs.
WINDOW_KINDS = ("sliding", "chunked")


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are stretched for long context.

    kind: "linear" (positions divided by factor), "llama3" (Llama 3.1 wavelength-dependent
    scaling), "yarn" (DeepSeek-V3; sizing only), "dynamic" (NTK; sizing only).
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    extra: tuple[tuple[str, Any], ...] = ()  # other published fields (yarn betas, mscale)


@dataclass(frozen=True)
class ModelSpec:
    """The shape of one decoder-only transformer.

    head_dim is stored, never re-derived: Gemma-2 (256 with dim 3584 / 16 heads = 224) and
    Llama-3.2-1B/3B show that dim / n_heads is not always the head size.
    """

    name: str
    arch: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    # None: unknown (a Meta params.json says -1 and no tokenizer or shard tells): the KV cache
    # can be sized, the weights cannot, and the engine cannot build the model.
    vocab_size: int | None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    # RMSNorm over each head's head_dim features of q and of k, before RoPE (Qwen3): one weight
    # of head_dim per layer for q and one for k, shared by all heads.
    qk_norm: bool = False
    # Gemma 3: the RoPE base of the sliding-window layers (unscaled; rope_theta and
    # rope_scaling are the global layers'), None: every layer uses rope_theta.
    rope_local_theta: float | None = None
    # Attention scores are scaled by query_pre_attn_scalar ** -0.5 (Gemma) instead of
    # head_dim ** -0.5 where set; logits become cap * tanh(logits / cap) where a cap is set.
    query_pre_attn_scalar: float | None = None
    final_logit_softcap: float | None = None
    # Gemma 2: attention scores (after the scale, before mask and softmax) become
    # cap * tanh(scores / cap) where set.
    attn_logit_softcap: float | None = None
    # Sliding-window attention: window length in tokens and the layers that use it;
    # window_kind "chunked": the window is Llama 4's attention chunk (WINDOW_KINDS).
    sliding_window: int | None = None
    sliding_window_layers: tuple[int, ...] = ()
    window_kind: str = "sliding"
    # gpt-oss: a bias on the attention output projection too (qkv_bias covers q, k and v), one
    # learned sink logit per query head and layer, and biases on the router and the experts.
    o_bias: bool = False
    attn_sinks: bool = False
    moe_bias: bool = False
    # gpt-oss's experts: gate.clamp(max=limit), up.clamp(-limit, limit), then
    # (up + 1) * gate * sigmoid(alpha * gate); None: plain SwiGLU.
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None
    # Mixture of experts: routed experts, routed experts used per token, always-on shared
    # experts, the FFN size of one expert, and leading layers that stay dense (DeepSeek-V3: 3).
    n_experts: int = 0
    n_active_experts: int = 0
    n_shared_experts: int = 0
    moe_ffn_dim: int = 0
    n_dense_layers: int = 0
    # Further layers with a dense FFN of ffn_dim (Qwen3-MoE's mlp_only_layers and the layers
    # decoder_sparse_step skips); renormalise the k routing weights to sum 1 (Mixtral always,
    # Qwen3-MoE where norm_topk_prob).
    moe_dense_layers: tuple[int, ...] = ()
    norm_topk_prob: bool = True
    # Multi-head latent attention (DeepSeek-V2/V3): the cache holds one compressed latent of
    # kv_lora_rank plus the shared rotary key of qk_rope_head_dim per token and layer.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    norms_per_layer: int = 2  # Gemma-2 has 4 (pre/post attention and FFN)
    torch_dtype: str = "bfloat16"  # config.json's torch_dtype: what the model computes and
    # caches in (the KV cache's default dtype)
    weight_dtype: str | None = None  # what its published weight files hold, where that is not
    # torch_dtype (DeepSeek-V3: FP8 with bf16 compute)
    expert_weight_dtype: str | None = None  # what the published files hold for the experts'
    # weight matrices (routed and shared; not the router, nor biases), where that is not the
    # published dtype of the rest (gpt-oss: mxfp4 experts, all else bf16)
    source: str = field(default="preset", compare=False)

    def __post_init__(self) -> None:
        for name in ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                     "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if name == "vocab_size" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InfermeterError(f"model {self.name}: {name} must be a positive integer, "
                                      f"got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise InfermeterError(f"model {self.name}: n_heads={self.n_heads} is not a multiple "
                                  f"of n_kv_heads={self.n_kv_heads}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise InfermeterError(f"model {self.name}: sliding_window must be positive")
        bad = [i for i in self.sliding_window_layers if not 0 <= i < self.n_layers]
        if bad:
            raise InfermeterError(f"model {self.name}: sliding-window layers {bad} out of range")
        if self.sliding_window_layers and self.sliding_window is None:
            raise InfermeterError(f"model {self.name}: sliding-window layers without a window")
        if self.window_kind not in WINDOW_KINDS:
            raise InfermeterError(f"model {self.name}: window_kind must be one of "
                                  f"{', '.join(WINDOW_KINDS)}, got {self.window_kind!r}")
        if self.n_experts and not 0 < self.n_active_experts <= self.n_experts:
            raise InfermeterError(f"model {self.name}: active experts must be in 1..n_experts")

    # ---- derived facts -------------------------------------------------------------------
    @property
    def post_norms(self) -> bool:
        """Norms after attention and the FFN too (Gemma): the residual add follows a norm, so
        an all-reduce cannot be fused with the add and the next layer's norm."""
        return self.arch in GEMMA_ARCHS

    @property
    def sdpa_cannot_attend(self) -> bool:
        """A soft cap on the attention logits (Gemma 2) or attention sinks (gpt-oss): SDPA can
        take neither, so the engine attends through matrix products holding float32 scores, or
        flex attention (engine/attention.py)."""
        return self.attn_logit_softcap is not None or self.attn_sinks

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer`'s FFN is routed experts (else a dense FFN of ffn_dim)."""
        return self.is_moe and layer >= self.n_dense_layers and layer not in self.moe_dense_layers

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def published_dtype(self) -> str:
        """The weights' dtype as published: `kv`'s default weight dtype."""
        return self.weight_dtype or self.torch_dtype

    def window_summary(self) -> str | None:
        """'4096 tokens, every layer', '4096 tokens, 21 of 42 layers' or, chunked, 'chunks of
        8192 tokens, 36 of 48 layers'; None: no window."""
        if not self.sliding_window_layers:
            return None
        n = len(self.sliding_window_layers)
        layers = "every layer" if n == self.n_layers else f"{n} of {self.n_layers} layers"
        chunks = "chunks of " if self.window_kind == "chunked" else ""
        return f"{chunks}{self.sliding_window} tokens, {layers}"

    def layer_window(self, layer: int) -> int | None:
        """The most tokens layer `layer` attends to (and caches): its sliding window or its
        attention chunk; None for full attention."""
        return self.sliding_window if layer in self.sliding_window_layers else None

    def with_updates(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description for a Result's `model` field."""
        out = dataclasses.asdict(self)
        if self.rope_scaling is not None:
            scaling = dataclasses.asdict(self.rope_scaling)
            scaling["extra"] = dict(self.rope_scaling.extra)
            out["rope_scaling"] = scaling
        out["sliding_window_layers"] = list(self.sliding_window_layers)
        out["moe_dense_layers"] = list(self.moe_dense_layers)
        return out


def all_layers(n_layers: int) -> tuple[int, ...]:
    return tuple(range(n_layers))


def check_engine_arch(spec: ModelSpec, vocab: bool = True) -> None:
    """The engine runs ENGINE_ARCHS (Llama 2/3, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3's text
    model, Mixtral, Qwen3-MoE, gpt-oss); anything else is one line naming what the engine
    lacks to run it (ENGINE_MISSING) and what it runs.
    vocab=False: only the KV cache is built (kv --check-engine), which needs no vocabulary."""
    if spec.arch not in ENGINE_ARCHS:
        missing = ENGINE_MISSING.get(spec.arch, "a way to build this architecture's layers")
        raise InfermeterError(
            f"model {spec.name}: architecture {spec.arch!r} can be sized but not run by the "
            f"engine, which lacks {missing} (it runs: {', '.join(ENGINE_ARCHS)})"
        )
    if vocab and spec.vocab_size is None:
        raise InfermeterError(f"model {spec.name}: the vocabulary size is unknown ({spec.source} "
                              "does not say it): put the checkpoint's tokenizer.model beside it "
                              "or one folder up")
