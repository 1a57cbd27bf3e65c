"""Build a ModelSpec from what users have on disk: Meta params.json or HF config.json.

`resolve_model(text)` is what `--model` calls: a preset name, a checkpoint folder, or a JSON file.
Files are only ever parsed as JSON; nothing from a model folder is executed.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from infermeter.errors import InfermeterError
from infermeter.specs.checked import checked_int, checked_layer_count, checked_number
from infermeter.specs.gguf_meta import is_gguf, spec_from_gguf
from infermeter.specs.model import SIZING_ARCHS, ModelSpec, RopeScaling, all_layers
from infermeter.specs.presets import PRESETS
from infermeter.units import canonical_dtype


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InfermeterError(f"{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise InfermeterError(f"{path}: not valid JSON ({err})") from None
    except UnicodeDecodeError as err:
        raise InfermeterError(f"{path}: not UTF-8 text, so not a JSON file ({err})") from None
    except OSError as err:
        raise InfermeterError(f"{path}: cannot read ({err.strerror})") from None
    if not isinstance(data, dict):
        raise InfermeterError(f"{path}: expected a JSON object")
    return data


_REQUIRED = object()  # a field without a default: missing is an error


def _field(cfg: dict[str, Any], key: str, path: Path, default: Any, prefix: str) -> Any:
    value = cfg.get(key)
    if value is None:  # absent or null: the default, if the field has one
        if default is _REQUIRED:
            raise InfermeterError(f"{path}: missing field '{prefix}{key}'")
        return default
    return value


def _int(cfg: dict[str, Any], key: str, path: Path, default: Any = _REQUIRED,
         minimum: int = 1, prefix: str = "") -> int:
    """An integer field, at least `minimum` (1: a positive count or size)."""
    return checked_int(_field(cfg, key, path, default, prefix), f"{path}: field '{prefix}{key}'",
                       minimum)


def _float(cfg: dict[str, Any], key: str, path: Path, default: Any = _REQUIRED,
           prefix: str = "") -> float:
    """A positive, finite number (norm epsilons, RoPE bases and factors)."""
    return checked_number(_field(cfg, key, path, default, prefix),
                          f"{path}: field '{prefix}{key}'")


def _bool(cfg: dict[str, Any], key: str, path: Path, default: bool = False) -> bool:
    value = _field(cfg, key, path, default, "")
    if not isinstance(value, bool):
        raise InfermeterError(f"{path}: field '{key}' must be true or false, got {value!r}")
    return value


def _object(cfg: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = _field(cfg, key, path, {}, "")
    if not isinstance(value, dict):
        raise InfermeterError(f"{path}: field '{key}' must be a JSON object, got {value!r}")
    return value


def _layers(cfg: dict[str, Any], key: str, path: Path) -> int:
    return checked_layer_count(_field(cfg, key, path, _REQUIRED, ""), f"{path}: field '{key}'")


def _head_dim(cfg: dict[str, Any], path: Path, dim: int, n_heads: int, dim_key: str,
              heads_key: str) -> int:
    """head_dim as given, else dim / heads, which must then divide exactly."""
    if cfg.get("head_dim") is not None:
        return _int(cfg, "head_dim", path)
    if dim % n_heads:
        raise InfermeterError(f"{path}: field '{dim_key}' {dim} is not a multiple of "
                              f"'{heads_key}' {n_heads} and there is no 'head_dim' field: the "
                              "head size is unknown; add the model's head_dim")
    return dim // n_heads


def _kv_heads(cfg: dict[str, Any], path: Path, key: str, n_heads: int, heads_key: str) -> int:
    n_kv_heads = _int(cfg, key, path, default=n_heads)
    if n_heads % n_kv_heads:
        raise InfermeterError(f"{path}: field '{heads_key}' {n_heads} is not a multiple of "
                              f"'{key}' {n_kv_heads}")
    return n_kv_heads


def _dtype(cfg: dict[str, Any], path: Path) -> str:
    key = "torch_dtype" if cfg.get("torch_dtype") is not None else "dtype"
    value = _field(cfg, key, path, "bfloat16", "")
    if isinstance(value, str):
        try:
            return canonical_dtype(value)
        except InfermeterError:
            pass
    raise InfermeterError(f"{path}: field '{key}' is {value!r}; infermeter sizes fp32, fp16, "
                          "bf16, fp8 and int8")


def _weight_dtype(cfg: dict[str, Any], path: Path, dtype: str) -> str | None:
    """The published files' dtype where quantization_config says they differ from torch_dtype
    (DeepSeek-V3: quant_method fp8); None otherwise."""
    quant = _object(cfg, "quantization_config", path)
    method = quant.get("quant_method")
    return "float8" if method == "fp8" and dtype != "float8" else None


def _spec(path: Path, **fields: Any) -> ModelSpec:
    """The ModelSpec; a check it makes across fields fails naming the file."""
    try:
        return ModelSpec(**fields)
    except InfermeterError as err:
        raise InfermeterError(f"{path}: {err}") from None


# ---- Meta params.json ------------------------------------------------------------------------
def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """FeedForward hidden size exactly as Meta's llama/model.py computes it."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def spec_from_meta_params(path: Path, vocab_size: int | None = None) -> ModelSpec:
    """params.json of a Meta checkpoint (Llama 2 / 3 / 3.1 / 3.2).

    Llama 2's params.json says vocab_size -1 (the reference code took it from the tokenizer); the
    caller passes the real size (from the checkpoint or tokenizer) as `vocab_size`. Where neither
    tells, the spec's vocab_size is None: the KV cache can still be sized, the weights cannot.
    """
    cfg = read_json(path)
    dim, n_heads = _int(cfg, "dim", path), _int(cfg, "n_heads", path)
    listed = _field(cfg, "vocab_size", path, -1, "")
    if not isinstance(listed, int) or isinstance(listed, bool):
        raise InfermeterError(f"{path}: field 'vocab_size' must be an integer, got {listed!r}")
    vocab = vocab_size if vocab_size is not None else (listed if listed > 0 else None)
    rope_theta = _float(cfg, "rope_theta", path, default=10000.0)
    scaling = None
    if _bool(cfg, "use_scaled_rope", path):
        factor = _float(cfg, "rope_scaling_factor", path, default=8.0)
        scaling = RopeScaling("llama3", factor, 1.0, 4.0, 8192)
    default_max = 131072 if scaling else (8192 if rope_theta >= 500000 else 4096)
    multiplier = cfg.get("ffn_dim_multiplier")
    return _spec(
        path, name=path.parent.name or "meta-checkpoint", arch="llama",
        n_layers=_layers(cfg, "n_layers", path), dim=dim, n_heads=n_heads,
        n_kv_heads=_kv_heads(cfg, path, "n_kv_heads", n_heads, "n_heads"),
        head_dim=_head_dim(cfg, path, dim, n_heads, "dim", "n_heads"),
        ffn_dim=meta_ffn_dim(dim, _int(cfg, "multiple_of", path, default=256),
                             None if multiplier is None
                             else _float(cfg, "ffn_dim_multiplier", path)),
        vocab_size=vocab, norm_eps=_float(cfg, "norm_eps", path, default=1e-5),
        rope_theta=rope_theta, rope_scaling=scaling,
        max_seq_len=_int(cfg, "max_seq_len", path, default=default_max), source=str(path),
    )


# ---- HF config.json --------------------------------------------------------------------------
def _hf_rope(cfg: dict[str, Any], path: Path) -> tuple[float, RopeScaling | None]:
    """rope_theta and rope_scaling, from transformers 4.x fields or 5.x `rope_parameters`."""
    params = _object(cfg, "rope_parameters", path)
    if cfg.get("rope_theta") is not None:
        theta = _float(cfg, "rope_theta", path)
    else:
        theta = _float(params, "rope_theta", path, default=10000.0, prefix="rope_parameters.")
    key = "rope_scaling" if cfg.get("rope_scaling") is not None else "rope_parameters"
    raw = _object(cfg, key, path)
    kind = raw.get("rope_type") or raw.get("type") or "default"
    if not isinstance(kind, str):
        raise InfermeterError(f"{path}: field '{key}.rope_type' must be a string, got {kind!r}")
    if kind == "default" or raw.get("factor") is None:
        return theta, None
    known = {"rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings", "rope_theta"}
    extra = tuple(sorted((k, v) for k, v in raw.items() if k not in known))
    where = f"{key}."
    return theta, RopeScaling(
        kind, _float(raw, "factor", path, prefix=where),
        _float(raw, "low_freq_factor", path, default=1.0, prefix=where),
        _float(raw, "high_freq_factor", path, default=4.0, prefix=where),
        _int(raw, "original_max_position_embeddings", path, prefix=where,
             default=_int(cfg, "max_position_embeddings", path, default=8192)),
        extra)


def _hf_window(cfg: dict[str, Any], model_type: str, n_layers: int,
               path: Path) -> tuple[int | None, tuple[int, ...]]:
    """The window length and the layers that use it, following transformers' rules per model
    type; (None, ()) without a window. Llama 4: its attention chunk and chunked layers."""
    if model_type == "llama4_text":
        return _llama4_chunks(cfg, n_layers, path)
    window = None if cfg.get("sliding_window") is None else _int(cfg, "sliding_window", path)
    types = _field(cfg, "layer_types", path, None, "")
    if types:
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise InfermeterError(f"{path}: field 'layer_types' must be a list of strings, got "
                                  f"{types!r}")
        if len(types) != n_layers:
            raise InfermeterError(f"{path}: field 'layer_types' has {len(types)} entries for "
                                  f"{n_layers} layers")
        layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    elif window is None:
        layers = ()
    elif model_type in ("qwen2", "qwen3", "qwen3_moe"):  # when enabled, from max_window_layers on
        start = _int(cfg, "max_window_layers", path, default=0, minimum=0)
        layers = tuple(range(start, n_layers)) if _bool(cfg, "use_sliding_window", path) else ()
    elif model_type in ("gemma2", "gpt_oss"):  # layers 0, 2, 4, ... slide
        layers = tuple(range(0, n_layers, 2))
    elif model_type == "gemma3_text":  # every sliding_window_pattern-th layer is global
        pattern = _int(cfg, "sliding_window_pattern", path, default=6)
        layers = tuple(i for i in range(n_layers) if (i + 1) % pattern)
    elif model_type in ("mistral", "mixtral", "phi3"):
        layers = all_layers(n_layers)
    else:
        layers = ()
    if layers and window is None:
        raise InfermeterError(f"{path}: field 'layer_types' names sliding_attention layers but "
                              "'sliding_window' is missing")
    return (window, layers) if layers else (None, ())


def _llama4_chunks(cfg: dict[str, Any], n_layers: int,
                   path: Path) -> tuple[int | None, tuple[int, ...]]:
    """Llama 4: the RoPE layers attend within attention_chunk_size-token chunks, the NoPE ones
    (no_rope_layers 0; by default every no_rope_layer_interval-th) to every token, as
    transformers' Llama4TextConfig rules; layer_types, where given, wins."""
    if cfg.get("attention_chunk_size") is None:
        return None, ()
    chunk = _int(cfg, "attention_chunk_size", path)
    types = _field(cfg, "layer_types", path, None, "")
    if types:
        if not isinstance(types, list) or len(types) != n_layers:
            raise InfermeterError(f"{path}: field 'layer_types' must list one type a layer "
                                  f"({n_layers}), got {types!r}")
        layers = tuple(i for i, t in enumerate(types) if t == "chunked_attention")
    elif rope := _field(cfg, "no_rope_layers", path, None, ""):
        if not isinstance(rope, list) or len(rope) != n_layers \
                or not all(type(flag) is int and flag in (0, 1) for flag in rope):
            raise InfermeterError(f"{path}: field 'no_rope_layers' must hold one 0 or 1 a layer "
                                  f"({n_layers}), got {rope!r}")
        layers = tuple(i for i, flag in enumerate(rope) if flag)
    else:
        interval = _int(cfg, "no_rope_layer_interval", path, default=4)
        layers = tuple(i for i in range(n_layers) if (i + 1) % interval)
    return (chunk, layers) if layers else (None, ())


def _hf_moe_mla(cfg: dict[str, Any], model_type: str, path: Path) -> dict[str, Any]:
    if model_type == "mixtral":
        fields = {"n_experts": _int(cfg, "num_local_experts", path),
                  "n_active_experts": _int(cfg, "num_experts_per_tok", path),
                  "moe_ffn_dim": _int(cfg, "intermediate_size", path)}
    elif model_type == "qwen3_moe":
        experts_key = "num_experts" if "num_experts" in cfg else "num_local_experts"  # 5.x
        n_layers = _layers(cfg, "num_hidden_layers", path)
        step = _int(cfg, "decoder_sparse_step", path, default=1)
        only = _field(cfg, "mlp_only_layers", path, [], "") or []
        if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
            raise InfermeterError(f"{path}: field 'mlp_only_layers' must be a list of layer "
                                  f"numbers, got {only!r}")
        fields = {"n_experts": _int(cfg, experts_key, path),
                  "n_active_experts": _int(cfg, "num_experts_per_tok", path),
                  "moe_ffn_dim": _int(cfg, "moe_intermediate_size", path),
                  "norm_topk_prob": _bool(cfg, "norm_topk_prob", path),
                  # transformers' rule: experts where not mlp_only and (i + 1) % step == 0
                  "moe_dense_layers": tuple(i for i in range(n_layers)
                                            if i in only or (i + 1) % step)}
    elif model_type == "gpt_oss":
        fields = {"n_experts": _int(cfg, "num_local_experts", path),
                  "n_active_experts": _int(cfg, "num_experts_per_tok", path),
                  "moe_ffn_dim": _int(cfg, "intermediate_size", path), "moe_bias": True,
                  "swiglu_alpha": _float(cfg, "swiglu_alpha", path, default=1.702),
                  "swiglu_limit": _float(cfg, "swiglu_limit", path, default=7.0)}
    elif model_type == "llama4_text":
        n_layers = _layers(cfg, "num_hidden_layers", path)
        step = _int(cfg, "interleave_moe_layer_step", path, default=1)
        moe = _field(cfg, "moe_layers", path, list(range(step - 1, n_layers, step)), "")
        if not isinstance(moe, list) or not all(isinstance(i, int) for i in moe):
            raise InfermeterError(f"{path}: field 'moe_layers' must be a list of layer numbers, "
                                  f"got {moe!r}")
        fields = {"n_experts": _int(cfg, "num_local_experts", path),
                  "n_active_experts": _int(cfg, "num_experts_per_tok", path),
                  "n_shared_experts": 1, "moe_ffn_dim": _int(cfg, "intermediate_size", path),
                  "norm_topk_prob": False,  # sigmoid scores of the top k, as they are
                  "moe_dense_layers": tuple(i for i in range(n_layers) if i not in moe)}
    elif model_type == "deepseek_v3":
        fields = {"n_experts": _int(cfg, "n_routed_experts", path),
                  "n_active_experts": _int(cfg, "num_experts_per_tok", path),
                  "n_shared_experts": _int(cfg, "n_shared_experts", path, default=0, minimum=0),
                  "moe_ffn_dim": _int(cfg, "moe_intermediate_size", path),
                  "n_dense_layers": _int(cfg, "first_k_dense_replace", path, default=0,
                                         minimum=0),
                  "q_lora_rank": _int(cfg, "q_lora_rank", path, default=0, minimum=0),
                  "kv_lora_rank": _int(cfg, "kv_lora_rank", path),
                  "qk_nope_head_dim": _int(cfg, "qk_nope_head_dim", path),
                  "qk_rope_head_dim": _int(cfg, "qk_rope_head_dim", path),
                  "v_head_dim": _int(cfg, "v_head_dim", path)}
    else:
        return {}
    if fields["n_active_experts"] > fields["n_experts"]:
        raise InfermeterError(f"{path}: field 'num_experts_per_tok' {fields['n_active_experts']} "
                              f"is more than the model's {fields['n_experts']} experts")
    return fields


def _gemma3_rope(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """Gemma 3's two RoPE settings: transformers 5.x nests them in rope_parameters by layer type
    (full_attention, sliding_attention); 4.x has rope_theta and rope_scaling for the global
    layers and rope_local_base_freq for the sliding ones."""
    params = _object(cfg, "rope_parameters", path)
    if isinstance(params.get("full_attention"), dict):
        theta, scaling = _hf_rope({"rope_parameters": params["full_attention"],
                                   "max_position_embeddings": cfg.get("max_position_embeddings")},
                                  path)
        local = _object(params, "sliding_attention", path)
        if local.get("factor") is not None and local.get("rope_type", "default") != "default":
            raise InfermeterError(f"{path}: field 'rope_parameters.sliding_attention' scales "
                                  "RoPE; the engine scales only the global layers' RoPE")
        local_theta = _float(local, "rope_theta", path, default=10000.0,
                             prefix="rope_parameters.sliding_attention.")
    else:
        theta, scaling = _hf_rope(cfg, path)
        local_theta = _float(cfg, "rope_local_base_freq", path, default=10000.0)
    return {"rope_theta": theta, "rope_scaling": scaling, "rope_local_theta": local_theta}


def _gemma_scales(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """Gemma's query scalar and its two soft caps (a null cap: none; Gemma 2 sets both)."""
    def cap(key: str) -> float | None:
        return None if cfg.get(key) is None else _float(cfg, key, path)

    return {"query_pre_attn_scalar": _float(cfg, "query_pre_attn_scalar", path),
            "final_logit_softcap": cap("final_logit_softcapping"),
            "attn_logit_softcap": cap("attn_logit_softcapping")}


def _llama4_text(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """Llama 4's config.json (model_type llama4) nests the language model in text_config, which
    is what is sized (the vision encoder beside it is not); tie_word_embeddings and the dtype
    may be said at the top level only."""
    text = _object(cfg, "text_config", path)
    if not text:
        raise InfermeterError(f"{path}: model_type 'llama4' without a 'text_config' object")
    top = {key: cfg[key] for key in ("tie_word_embeddings", "torch_dtype", "dtype",
                                     "quantization_config")
           if cfg.get(key) is not None and text.get(key) is None}
    return {**text, **top, "model_type": "llama4_text"}


# Gemma3TextConfig's defaults for the fields a published Gemma3ForConditionalGeneration
# config.json leaves out of its text_config (google/gemma-3-4b-it's says only the width, the FFN,
# the layers, the RoPE scaling and the window).
_GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0}


def _gemma3_text(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """Gemma 3 from 4B up (model_type gemma3, Gemma3ForConditionalGeneration) nests the language
    model in text_config, with Gemma3TextConfig's defaults for what it leaves out; that is what
    is sized and run (the vision tower and projector beside it are not)."""
    text = _object(cfg, "text_config", path)
    if not text:
        raise InfermeterError(f"{path}: model_type 'gemma3' without a 'text_config' object")
    top = {key: cfg[key] for key in ("tie_word_embeddings", "torch_dtype", "dtype")
           if cfg.get(key) is not None and text.get(key) is None}
    defaults = {key: value for key, value in _GEMMA3_TEXT_DEFAULTS.items() if key not in text}
    return {**defaults, **text, **top, "model_type": "gemma3_text"}


def text_model_note(spec: ModelSpec) -> str | None:
    """For a spec read from a multimodal config.json (one with a vision_config: Gemma 3 from 4B,
    Llama 4), the line that says only its text model is sized and run; else None."""
    path = Path(spec.source)
    if path.suffix != ".json" or not path.is_file():
        return None
    try:
        vision = json.loads(path.read_text()).get("vision_config")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(vision, dict):
        return None
    return ("text model only: the vision tower and its projector (config.json's vision_config) "
            "are neither counted in the weights nor loaded")


def _gpt_oss_llama4(cfg: dict[str, Any], model_type: str, path: Path) -> dict[str, Any]:
    """What only gpt-oss and Llama 4 set: an o_proj bias (attention_bias covers it), gpt-oss's
    sinks and mxfp4 experts, Llama 4's chunked attention."""
    if model_type not in ("gpt_oss", "llama4_text"):
        return {}
    quant = _object(cfg, "quantization_config", path)
    return {"o_bias": _bool(cfg, "attention_bias", path), "attn_sinks": model_type == "gpt_oss",
            "expert_weight_dtype": "mxfp4" if quant.get("quant_method") == "mxfp4" else None,
            "window_kind": "chunked" if model_type == "llama4_text" else "sliding"}


def spec_from_hf_config(path: Path) -> ModelSpec:
    cfg = read_json(path)
    if cfg.get("model_type") == "llama4":
        cfg = _llama4_text(cfg, path)
    elif cfg.get("model_type") == "gemma3":
        cfg = _gemma3_text(cfg, path)
    model_type = cfg.get("model_type")
    if model_type not in SIZING_ARCHS:
        raise InfermeterError(f"{path}: unsupported model_type {model_type!r} "
                              f"(supported: {', '.join(SIZING_ARCHS)})")
    dim, n_heads = _int(cfg, "hidden_size", path), _int(cfg, "num_attention_heads", path)
    n_layers = _layers(cfg, "num_hidden_layers", path)
    if model_type == "deepseek_v3":
        head_dim = _int(cfg, "qk_nope_head_dim", path) + _int(cfg, "qk_rope_head_dim", path)
    else:
        head_dim = _head_dim(cfg, path, dim, n_heads, "hidden_size", "num_attention_heads")
    window, window_layers = _hf_window(cfg, model_type, n_layers, path)
    if model_type == "gemma3_text":
        rope = _gemma3_rope(cfg, path)
    else:
        theta, scaling = _hf_rope(cfg, path)
        rope = {"rope_theta": theta, "rope_scaling": scaling}
    gemma = _gemma_scales(cfg, path) if model_type in ("gemma2", "gemma3_text") else {}
    dtype = _dtype(cfg, path)
    return _spec(
        path, name=path.parent.name if path.name == "config.json" else path.stem,
        arch=model_type, n_layers=n_layers, dim=dim, n_heads=n_heads,
        n_kv_heads=_kv_heads(cfg, path, "num_key_value_heads", n_heads, "num_attention_heads"),
        head_dim=head_dim, ffn_dim=_int(cfg, "intermediate_size_mlp" if model_type ==
                                        "llama4_text" else "intermediate_size", path),
        vocab_size=_int(cfg, "vocab_size", path),
        norm_eps=_float(cfg, "rms_norm_eps", path, default=1e-6), **rope,
        max_seq_len=_int(cfg, "max_position_embeddings", path, default=4096),
        tie_embeddings=_bool(cfg, "tie_word_embeddings", path,
                             default=model_type in ("gemma2", "gemma3_text")),
        qkv_bias=model_type == "qwen2" or _bool(cfg, "attention_bias", path),
        qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
        sliding_window=window, sliding_window_layers=window_layers,
        norms_per_layer=4 if model_type in ("gemma2", "gemma3_text") else 2, **gemma,
        torch_dtype=dtype, weight_dtype=_weight_dtype(cfg, path, dtype), source=str(path),
        **_hf_moe_mla(cfg, model_type, path), **_gpt_oss_llama4(cfg, model_type, path),
    )


# ---- --model ---------------------------------------------------------------------------------
def _meta_checkpoint(params: Path) -> ModelSpec:
    """A params.json with the vocabulary size from beside it where it says -1: the tokenizer in
    its folder or one up (Meta's downloads), or the first shard."""
    from infermeter.specs.meta_vocab import meta_vocab_size

    return spec_from_meta_params(params, meta_vocab_size(params.parent, read_json(params)))


def spec_from_path(path: Path) -> ModelSpec:
    """A folder with config.json (HF) or params.json (Meta), or either JSON file itself."""
    if path.is_dir():
        if (path / "config.json").is_file():
            return spec_from_hf_config(path / "config.json")
        if (path / "params.json").is_file():
            return _meta_checkpoint(path / "params.json")
        raise InfermeterError(f"{path}: no config.json or params.json in this folder")
    if not path.exists():
        raise InfermeterError(f"{path}: no such file or directory")
    cfg = read_json(path)
    if "model_type" in cfg:
        return spec_from_hf_config(path)
    if "dim" in cfg and "n_layers" in cfg:
        return _meta_checkpoint(path)
    raise InfermeterError(f"{path}: neither an HF config.json (model_type) nor a Meta "
                          "params.json (dim, n_layers)")


def resolve_model(text: str) -> ModelSpec:
    """`--model`: a preset name (case-insensitive) or a path."""
    key = text.strip().lower()
    if not key:  # Path("") is the current folder: say what is wrong instead
        raise InfermeterError("--model is empty: give a preset name (see `infermeter presets`), "
                              "a config.json / params.json or a checkpoint folder")
    if key in PRESETS:
        return PRESETS[key]
    path = Path(text).expanduser()
    if key.endswith(".gguf") or is_gguf(path):  # llama.cpp's one-file format
        return spec_from_gguf(path)
    if path.exists() or "/" in text or text.endswith(".json"):
        return spec_from_path(path)
    close = difflib.get_close_matches(key, list(PRESETS), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `infermeter presets`"
    raise InfermeterError(f"unknown model {text!r}{hint}")
