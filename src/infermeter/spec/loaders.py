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
from infermeter.spec.model import SIZING_ARCHS, ModelSpec, RopeScaling, all_layers
from infermeter.spec.presets import PRESETS


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InfermeterError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InfermeterError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise InfermeterError(f"{path}: cannot read ({err.strerror})") from None
    if not isinstance(data, dict):
        raise InfermeterError(f"{path}: expected a JSON object")
    return data


def _need(cfg: dict[str, Any], key: str, path: Path) -> Any:
    if cfg.get(key) is None:
        raise InfermeterError(f"{path}: missing field {key!r}")
    return cfg[key]


def _int(cfg: dict[str, Any], key: str, path: Path, default: Any = None) -> int:
    value = cfg.get(key, default)
    if value is None:
        value = _need(cfg, key, path)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InfermeterError(f"{path}: field {key!r} must be an integer, got {value!r}")
    return value


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
    caller passes the real size (from the checkpoint or tokenizer) as `vocab_size`.
    """
    cfg = read_json(path)
    dim, n_heads = _int(cfg, "dim", path), _int(cfg, "n_heads", path)
    vocab = vocab_size if vocab_size is not None else cfg.get("vocab_size", -1)
    if not isinstance(vocab, int) or vocab <= 0:
        raise InfermeterError(f"{path}: vocab_size is {vocab!r}; cannot tell the vocabulary size "
                              "(no tokenizer.model or checkpoint shard next to it)")
    rope_theta = float(cfg.get("rope_theta", 10000.0))
    scaling = None
    if cfg.get("use_scaled_rope"):
        factor = float(cfg.get("rope_scaling_factor") or 8.0)
        scaling = RopeScaling("llama3", factor, 1.0, 4.0, 8192)
    default_max = 131072 if scaling else (8192 if rope_theta >= 500000 else 4096)
    return ModelSpec(
        name=path.parent.name or "meta-checkpoint", arch="llama",
        n_layers=_int(cfg, "n_layers", path), dim=dim, n_heads=n_heads,
        n_kv_heads=_int(cfg, "n_kv_heads", path, default=n_heads),
        head_dim=_int(cfg, "head_dim", path, default=dim // n_heads),
        ffn_dim=meta_ffn_dim(dim, _int(cfg, "multiple_of", path, default=256),
                             cfg.get("ffn_dim_multiplier")),
        vocab_size=vocab, norm_eps=float(cfg.get("norm_eps", 1e-5)), rope_theta=rope_theta,
        rope_scaling=scaling, max_seq_len=_int(cfg, "max_seq_len", path, default=default_max),
        source=str(path),
    )


# ---- HF config.json --------------------------------------------------------------------------
def _hf_rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope_theta and rope_scaling, from transformers 4.x fields or 5.x `rope_parameters`."""
    params = cfg.get("rope_parameters") or {}
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    raw = cfg.get("rope_scaling") or params
    kind = raw.get("rope_type") or raw.get("type") or "default"
    if kind == "default" or not raw.get("factor"):
        return theta, None
    known = {"rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings", "rope_theta"}
    extra = tuple(sorted((k, v) for k, v in raw.items() if k not in known))
    return theta, RopeScaling(
        kind, float(raw["factor"]), float(raw.get("low_freq_factor", 1.0)),
        float(raw.get("high_freq_factor", 4.0)),
        int(raw.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))),
        extra)


def _hf_window_layers(cfg: dict[str, Any], model_type: str, n_layers: int) -> tuple[int, ...]:
    """Which layers use the sliding window, following transformers' rules per model type."""
    if cfg.get("layer_types"):
        return tuple(i for i, t in enumerate(cfg["layer_types"]) if t == "sliding_attention")
    if not cfg.get("sliding_window"):
        return ()
    if model_type == "qwen2":  # only when enabled, and only from max_window_layers on
        if not cfg.get("use_sliding_window"):
            return ()
        return tuple(range(int(cfg.get("max_window_layers", 0)), n_layers))
    if model_type == "gemma2":  # layers 0, 2, 4, ... slide
        return tuple(range(0, n_layers, 2))
    if model_type in ("mistral", "mixtral", "phi3"):
        return all_layers(n_layers)
    return ()


def _hf_moe_mla(cfg: dict[str, Any], model_type: str, path: Path) -> dict[str, Any]:
    if model_type == "mixtral":
        return {"n_experts": _int(cfg, "num_local_experts", path),
                "n_active_experts": _int(cfg, "num_experts_per_tok", path),
                "moe_ffn_dim": _int(cfg, "intermediate_size", path)}
    if model_type == "deepseek_v3":
        return {"n_experts": _int(cfg, "n_routed_experts", path),
                "n_active_experts": _int(cfg, "num_experts_per_tok", path),
                "n_shared_experts": _int(cfg, "n_shared_experts", path, default=0),
                "moe_ffn_dim": _int(cfg, "moe_intermediate_size", path),
                "n_dense_layers": _int(cfg, "first_k_dense_replace", path, default=0),
                "q_lora_rank": cfg.get("q_lora_rank") or 0,
                "kv_lora_rank": _int(cfg, "kv_lora_rank", path),
                "qk_nope_head_dim": _int(cfg, "qk_nope_head_dim", path),
                "qk_rope_head_dim": _int(cfg, "qk_rope_head_dim", path),
                "v_head_dim": _int(cfg, "v_head_dim", path)}
    return {}


def spec_from_hf_config(path: Path) -> ModelSpec:
    cfg = read_json(path)
    model_type = cfg.get("model_type")
    if model_type not in SIZING_ARCHS:
        raise InfermeterError(f"{path}: unsupported model_type {model_type!r} "
                              f"(supported: {', '.join(SIZING_ARCHS)})")
    dim, n_heads = _int(cfg, "hidden_size", path), _int(cfg, "num_attention_heads", path)
    n_layers = _int(cfg, "num_hidden_layers", path)
    if model_type == "deepseek_v3":
        head_dim = _int(cfg, "qk_nope_head_dim", path) + _int(cfg, "qk_rope_head_dim", path)
    else:
        head_dim = _int(cfg, "head_dim", path, default=dim // n_heads)
    windows = _hf_window_layers(cfg, model_type, n_layers)
    theta, scaling = _hf_rope(cfg)
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    return ModelSpec(
        name=path.parent.name if path.name == "config.json" else path.stem,
        arch=model_type, n_layers=n_layers, dim=dim, n_heads=n_heads,
        n_kv_heads=_int(cfg, "num_key_value_heads", path, default=n_heads),
        head_dim=head_dim, ffn_dim=_int(cfg, "intermediate_size", path),
        vocab_size=_int(cfg, "vocab_size", path),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=_int(cfg, "max_position_embeddings", path, default=4096),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", model_type == "gemma2")),
        qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        sliding_window=cfg.get("sliding_window") if windows else None,
        sliding_window_layers=windows,
        norms_per_layer=4 if model_type == "gemma2" else 2,
        torch_dtype=str(dtype), source=str(path),
        **_hf_moe_mla(cfg, model_type, path),
    )


# ---- --model ---------------------------------------------------------------------------------
def spec_from_path(path: Path) -> ModelSpec:
    """A folder with config.json (HF) or params.json (Meta), or either JSON file itself."""
    if path.is_dir():
        if (path / "config.json").is_file():
            return spec_from_hf_config(path / "config.json")
        if (path / "params.json").is_file():
            from infermeter.spec.meta_vocab import meta_vocab_size

            params = path / "params.json"
            return spec_from_meta_params(params, meta_vocab_size(path, read_json(params)))
        raise InfermeterError(f"{path}: no config.json or params.json in this folder")
    if not path.exists():
        raise InfermeterError(f"{path}: no such file or directory")
    cfg = read_json(path)
    if "model_type" in cfg:
        return spec_from_hf_config(path)
    if "dim" in cfg and "n_layers" in cfg:
        return spec_from_meta_params(path)
    raise InfermeterError(f"{path}: neither an HF config.json (model_type) nor a Meta "
                          "params.json (dim, n_layers)")


def resolve_model(text: str) -> ModelSpec:
    """`--model`: a preset name (case-insensitive) or a path."""
    key = text.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(text).expanduser()
    if path.exists() or "/" in text or text.endswith(".json"):
        return spec_from_path(path)
    close = difflib.get_close_matches(key, list(PRESETS), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `infermeter presets`"
    raise InfermeterError(f"unknown model {text!r}{hint}")
