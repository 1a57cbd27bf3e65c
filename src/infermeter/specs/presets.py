"""Presets: the published shapes of the models people run.

Every number is copied from the model's published config.json (Hugging Face hub) or Meta's
params.json; tests/test_presets.py checks each preset's parameter count against the size its
authors published, within 1%.

Weight dtypes: `kv` sizes a preset's weights in the dtype they are published in (torch_dtype, or
weight_dtype where the files hold another): Llama 2 in fp16, the torch_dtype of Meta's -hf
repositories and the seed's setting (Meta's own consolidated.*.pth hold bf16; same size);
DeepSeek-V3 in FP8 (its files: e4m3 with a float32 scale per 128 x 128 block, computing in bf16,
so its KV cache stays bf16); gpt-oss in bf16 with its experts' matrices in mxfp4
(expert_weight_dtype: 4.25 bits a weight); the others in bf16 as their config.json says.
"""

from __future__ import annotations

from infermeter.specs.model import ModelSpec, RopeScaling, all_layers

# Llama 3.1 / 3.2 long-context RoPE scaling (config.json "rope_scaling", rope_type "llama3").
_LLAMA31_ROPE = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
_LLAMA32_ROPE = RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)


def _llama2(name: str, n_layers: int, dim: int, n_heads: int, n_kv: int, ffn: int) -> ModelSpec:
    return ModelSpec(name, "llama", n_layers, dim, n_heads, n_kv, dim // n_heads, ffn, 32000,
                     norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096, torch_dtype="float16")


def _llama3(name: str, n_layers: int, dim: int, n_heads: int, ffn: int,
            rope: RopeScaling | None = None, head_dim: int = 128, tie: bool = False) -> ModelSpec:
    return ModelSpec(name, "llama", n_layers, dim, n_heads, 8, head_dim, ffn, 128256,
                     norm_eps=1e-5, rope_theta=500000.0, rope_scaling=rope,
                     max_seq_len=131072 if rope else 8192, tie_embeddings=tie)


def _qwen25(name: str, n_layers: int, dim: int, n_heads: int, n_kv: int, ffn: int, vocab: int,
            eps: float, tie: bool = False) -> ModelSpec:
    return ModelSpec(name, "qwen2", n_layers, dim, n_heads, n_kv, dim // n_heads, ffn, vocab,
                     norm_eps=eps, rope_theta=1000000.0, max_seq_len=32768, tie_embeddings=tie,
                     qkv_bias=True)


def _qwen3(name: str, n_layers: int, dim: int, n_heads: int, ffn: int,
           tie: bool = False) -> ModelSpec:
    return ModelSpec(name, "qwen3", n_layers, dim, n_heads, 8, 128, ffn, 151936, norm_eps=1e-6,
                     rope_theta=1000000.0, max_seq_len=40960, tie_embeddings=tie, qk_norm=True)


def _gemma2(name: str, n_layers: int, dim: int, n_heads: int, n_kv: int, head_dim: int, ffn: int,
            query_scalar: float) -> ModelSpec:
    """Gemma 2: a 4096 window on every other layer (layers 0, 2, 4, ... as transformers' Gemma2
    does), one RoPE base, attention logits capped at 50 and final logits at 30, tied
    embeddings, 4 norms a layer, no q/k norms. Their config.json says float32; the weights
    ship as bf16."""
    return ModelSpec(name, "gemma2", n_layers, dim, n_heads, n_kv, head_dim, ffn, 256000,
                     norm_eps=1e-6, rope_theta=10000.0, max_seq_len=8192, tie_embeddings=True,
                     sliding_window=4096, sliding_window_layers=tuple(range(0, n_layers, 2)),
                     norms_per_layer=4, query_pre_attn_scalar=query_scalar,
                     final_logit_softcap=30.0, attn_logit_softcap=50.0)


def _gemma3(name: str, n_layers: int, dim: int, n_heads: int, n_kv: int, head_dim: int, ffn: int,
            vocab: int, window: int, long_context: bool, query_scalar: float) -> ModelSpec:
    """Gemma 3's text model: layers 5, 11, 17, ... global (RoPE base 1M, linear x8 from 4B up),
    the others a sliding window (RoPE base 10k); q/k norms, 4 norms a layer, tied embeddings."""
    return ModelSpec(name, "gemma3_text", n_layers, dim, n_heads, n_kv, head_dim, ffn, vocab,
                     norm_eps=1e-6, rope_theta=1000000.0,
                     rope_scaling=RopeScaling("linear", 8.0, original_max_position=131072)
                     if long_context else None,
                     max_seq_len=131072 if long_context else 32768, tie_embeddings=True,
                     qk_norm=True, sliding_window=window,
                     sliding_window_layers=tuple(i for i in range(n_layers) if (i + 1) % 6),
                     norms_per_layer=4, rope_local_theta=10000.0,
                     query_pre_attn_scalar=query_scalar)


def _gpt_oss(name: str, n_layers: int, n_experts: int) -> ModelSpec:
    """gpt-oss: 64 query heads of 64 over a 2880-wide residual, 8 KV heads, 4 of n_experts
    experts of 2880 a token, YaRN RoPE x32 from 4096 positions, untied embeddings."""
    return ModelSpec(name, "gpt_oss", n_layers, 2880, 64, 8, 64, 2880, 201088, norm_eps=1e-5,
                     rope_theta=150000.0,
                     rope_scaling=RopeScaling("yarn", 32.0, original_max_position=4096,
                                              extra=(("beta_fast", 32.0), ("beta_slow", 1.0),
                                                     ("truncate", False))),
                     max_seq_len=131072, qkv_bias=True, o_bias=True, attn_sinks=True,
                     sliding_window=128, sliding_window_layers=tuple(range(0, n_layers, 2)),
                     n_experts=n_experts, n_active_experts=4, moe_ffn_dim=2880, moe_bias=True,
                     swiglu_alpha=1.702, swiglu_limit=7.0, expert_weight_dtype="mxfp4")


_PRESET_LIST = [
    # meta-llama/Llama-2-{7b,13b,70b}-hf
    _llama2("llama-2-7b", 32, 4096, 32, 32, 11008),
    _llama2("llama-2-13b", 40, 5120, 40, 40, 13824),
    _llama2("llama-2-70b", 80, 8192, 64, 8, 28672),
    # meta-llama/Meta-Llama-3-{8B,70B}, Llama-3.1-{8B,70B,405B}, Llama-3.2-{1B,3B}
    _llama3("llama-3-8b", 32, 4096, 32, 14336),
    _llama3("llama-3-70b", 80, 8192, 64, 28672),
    _llama3("llama-3.1-8b", 32, 4096, 32, 14336, _LLAMA31_ROPE),
    _llama3("llama-3.1-70b", 80, 8192, 64, 28672, _LLAMA31_ROPE),
    _llama3("llama-3.1-405b", 126, 16384, 128, 53248, _LLAMA31_ROPE),
    _llama3("llama-3.2-1b", 16, 2048, 32, 8192, _LLAMA32_ROPE, head_dim=64, tie=True),
    _llama3("llama-3.2-3b", 28, 3072, 24, 8192, _LLAMA32_ROPE, head_dim=128, tie=True),
    # HuggingFaceTB/SmolLM2-135M (and -Instruct): Llama's layers, 9 heads of 64 over 3 KV
    # heads, tied embeddings; config.json says bfloat16
    ModelSpec("smollm2-135m", "llama", 30, 576, 9, 3, 64, 1536, 49152, norm_eps=1e-5,
              rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    # mistralai/Mistral-7B-v0.1: every layer attends to a 4096-token window.
    ModelSpec("mistral-7b", "mistral", 32, 4096, 32, 8, 128, 14336, 32000, norm_eps=1e-5,
              rope_theta=10000.0, max_seq_len=32768, sliding_window=4096,
              sliding_window_layers=all_layers(32)),
    # mistralai/Mixtral-8x7B-v0.1: 8 experts, 2 per token; full attention (sliding_window null).
    ModelSpec("mixtral-8x7b", "mixtral", 32, 4096, 32, 8, 128, 14336, 32000, norm_eps=1e-5,
              rope_theta=1000000.0, max_seq_len=32768, n_experts=8, n_active_experts=2,
              moe_ffn_dim=14336),
    # Qwen/Qwen2.5-{0.5B,7B,72B}: qkv bias; use_sliding_window is false.
    _qwen25("qwen2.5-0.5b", 24, 896, 14, 2, 4864, 151936, 1e-6, tie=True),
    _qwen25("qwen2.5-7b", 28, 3584, 28, 4, 18944, 152064, 1e-6),
    _qwen25("qwen2.5-72b", 80, 8192, 64, 8, 29568, 152064, 1e-5),
    # Qwen/Qwen3-{0.6B,8B,32B}: q/k norms, head_dim 128 whatever the width (0.6B: 16 x 128 =
    # 2048 query features from 1024), no qkv bias; use_sliding_window is false.
    _qwen3("qwen3-0.6b", 28, 1024, 16, 3072, tie=True),
    _qwen3("qwen3-8b", 36, 4096, 32, 12288),
    _qwen3("qwen3-32b", 64, 5120, 64, 25600),
    # Qwen/Qwen3-30B-A3B: Qwen3's attention (q/k norms, 4 KV heads) and 128 experts of 768 in
    # every layer, 8 per token with their weights renormalised (norm_topk_prob true).
    ModelSpec("qwen3-30b-a3b", "qwen3_moe", 48, 2048, 32, 4, 128, 6144, 151936, norm_eps=1e-6,
              rope_theta=1000000.0, max_seq_len=40960, qk_norm=True, n_experts=128,
              n_active_experts=8, moe_ffn_dim=768, norm_topk_prob=True),
    # google/gemma-2-{2b,9b,27b}: head_dim 256 (not 3584/16) or 128 (27B), which scales
    # queries by 144 = 4608 / 32; the others by 256.
    _gemma2("gemma-2-2b", 26, 2304, 8, 4, 256, 9216, 256.0),
    _gemma2("gemma-2-9b", 42, 3584, 16, 8, 256, 14336, 256.0),
    _gemma2("gemma-2-27b", 46, 4608, 32, 16, 128, 36864, 144.0),
    # google/gemma-3-1b-pt and the text_config of google/gemma-3-{4b,12b,27b}-pt (their vision
    # tower is not counted). 27B scales queries by 168 = 5376 / 32, not head_dim 128.
    _gemma3("gemma-3-1b", 26, 1152, 4, 1, 256, 6912, 262144, 512, False, 256.0),
    _gemma3("gemma-3-4b", 34, 2560, 8, 4, 256, 10240, 262208, 1024, True, 256.0),
    _gemma3("gemma-3-12b", 48, 3840, 16, 8, 256, 15360, 262208, 1024, True, 256.0),
    _gemma3("gemma-3-27b", 62, 5376, 32, 16, 128, 21504, 262208, 1024, True, 168.0),
    # microsoft/Phi-3-mini-4k-instruct: its config.json sets sliding_window 2047 on all layers.
    ModelSpec("phi-3-mini", "phi3", 32, 3072, 32, 32, 96, 8192, 32064, norm_eps=1e-5,
              rope_theta=10000.0, max_seq_len=4096, sliding_window=2047,
              sliding_window_layers=all_layers(32)),
    # deepseek-ai/DeepSeek-V3: MLA (latent 512 + rope key 64), 256 routed experts (8 active)
    # + 1 shared, first 3 layers dense. The multi-token-prediction layer is not counted.
    # Published in FP8 (quantization_config quant_method fp8), computing in bf16.
    ModelSpec("deepseek-v3", "deepseek_v3", 61, 7168, 128, 128, 192, 18432, 129280,
              norm_eps=1e-6, rope_theta=10000.0, max_seq_len=163840,
              rope_scaling=RopeScaling("yarn", 40.0, original_max_position=4096,
                                       extra=(("beta_fast", 32), ("beta_slow", 1),
                                              ("mscale", 1.0), ("mscale_all_dim", 1.0))),
              n_experts=256, n_active_experts=8, n_shared_experts=1, moe_ffn_dim=2048,
              n_dense_layers=3, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
              qk_rope_head_dim=64, v_head_dim=128, weight_dtype="float8"),
    # openai/gpt-oss-{20b,120b}, sizing only: a 128-token window on layers 0, 2, 4, ...
    # (layer_types), biases on q/k/v/o, the router and the experts, a sink per head; published
    # with the experts' matrices in mxfp4 (quantization_config), all else bf16.
    _gpt_oss("gpt-oss-20b", 24, 32),
    _gpt_oss("gpt-oss-120b", 36, 128),
    # The text_config of meta-llama/Llama-4-Scout-17B-16E (its vision encoder is not counted),
    # sizing only: 16 experts of 8192 (1 a token) + 1 shared in every layer
    # (interleave_moe_layer_step 1, so intermediate_size_mlp 16384 is used by none); the RoPE
    # layers attend within 8192-token chunks, every 4th layer (3, 7, ..., 47: no_rope_layers)
    # is a global NoPE layer; its q/k norms have no weights; router scores are sigmoids, not
    # renormalised. max_position_embeddings is the base model's (the -Instruct one says 10M).
    ModelSpec("llama-4-scout", "llama4_text", 48, 5120, 40, 8, 128, 16384, 202048,
              norm_eps=1e-5, rope_theta=500000.0,
              rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), max_seq_len=262144,
              sliding_window=8192, window_kind="chunked",
              sliding_window_layers=tuple(i for i in range(48) if (i + 1) % 4),
              n_experts=16, n_active_experts=1, n_shared_experts=1, moe_ffn_dim=8192,
              norm_topk_prob=False),
    # A tiny Llama for CPU tests and demos: GQA (4 query heads share 2 KV heads), runs in ms.
    ModelSpec("debug", "llama", 2, 64, 4, 2, 16, 176, 256, norm_eps=1e-5, rope_theta=10000.0,
              max_seq_len=256, torch_dtype="float32"),
]

PRESETS: dict[str, ModelSpec] = {spec.name: spec for spec in _PRESET_LIST}

# Sizes the authors published (total parameters; MoE: total and active). Used by the tests and
# shown by `infermeter presets` next to our own count.
PUBLISHED_PARAMS: dict[str, float | tuple[float, float]] = {
    "llama-2-7b": 6.74e9,
    "llama-2-13b": 13.02e9,
    "llama-2-70b": 68.98e9,
    "llama-3-8b": 8.03e9,
    "llama-3-70b": 70.55e9,
    "llama-3.1-8b": 8.03e9,
    "llama-3.1-70b": 70.55e9,
    "llama-3.1-405b": 405.85e9,
    "llama-3.2-1b": 1.23e9,
    "llama-3.2-3b": 3.21e9,
    "smollm2-135m": 135e6,
    "mistral-7b": 7.24e9,
    "mixtral-8x7b": (46.7e9, 12.9e9),
    "qwen2.5-0.5b": 0.494e9,
    "qwen2.5-7b": 7.61e9,
    "qwen2.5-72b": 72.7e9,
    "qwen3-0.6b": 0.6e9,
    "qwen3-8b": 8.2e9,
    "qwen3-32b": 32.8e9,
    "qwen3-30b-a3b": (30.5e9, 3.3e9),
    # Gemma 2 report (Gemma Team, 2024), table 1: embedding + non-embedding parameters.
    "gemma-2-2b": 2.61e9,
    "gemma-2-9b": 9.24e9,
    "gemma-2-27b": 27.2e9,
    # Gemma 3 technical report, table 1: embedding + non-embedding parameters (text only).
    "gemma-3-1b": 302e6 + 698e6,
    "gemma-3-4b": 675e6 + 3209e6,
    "gemma-3-12b": 1012e6 + 10759e6,
    "gemma-3-27b": 1416e6 + 25600e6,
    "phi-3-mini": 3.82e9,
    "deepseek-v3": (671e9, 37e9),
    # gpt-oss model card (OpenAI, 2025), table 1. Its active counts leave out the input
    # embedding (a lookup), which param_count(active=True) includes.
    "gpt-oss-20b": (20.91e9, 3.61e9),
    "gpt-oss-120b": (116.83e9, 5.13e9),
    # Llama 4 Scout's text model: the language_model.* tensors of Meta's checkpoint, that is its
    # 108,641,793,536 parameters (the Hub's safetensors count; the card's "109B total" rounds
    # it) less 871,932,416 in vision_model.* and multi_modal_projector.* (from the published
    # vision_config: 34 ViT layers of 1408, the adapter and the projector). Active: the card's
    # "17B activated", two digits.
    "llama-4-scout": (108_641_793_536 - 871_932_416, 17e9),
}

DEFAULT_MODEL = "llama-2-7b"
