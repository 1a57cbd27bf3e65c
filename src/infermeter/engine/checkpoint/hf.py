"""Hugging Face format: config.json + model.safetensors, or shards + model.safetensors.index.json.

Names map one to one onto Meta's (`hf_to_meta_name`). One real difference: HF applies RoPE with
`rotate_half`, pairing feature i with i + head_dim/2, while Meta pairs 2i with 2i+1. Meta->HF
conversion (transformers' convert_llama_weights_to_hf.py) permutes the rows of wq and wk per head:
    permute(w) = w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2)
                  .reshape(n_heads * head_dim, dim)
`unpermute` is its inverse, applied to q/k weights *and* biases (Qwen2) and to the per-head
q/k norm weights (Qwen3). Models trained natively in HF layout (Qwen2, Qwen3, Mistral) need
the same treatment: attention scores only see q.k, and permuting q's and k's features the same
way maps rotate_half RoPE exactly onto interleaved RoPE.

Only safetensors are read (safe_open memory-maps the file and never unpickles); a folder with
just pytorch_model.bin is refused with a clear message. No code from the folder is ever run
(config.json's auto_map / trust_remote_code are ignored).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from infermeter.engine.checkpoint.names import NameMap
from infermeter.errors import InfermeterError
from infermeter.specs.loaders import read_json
from infermeter.specs.model import GEMMA_ARCHS, ModelSpec

if TYPE_CHECKING:
    from infermeter.engine.parallel.sharding import ShardPlan

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
NAMES = NameMap(
    top={"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
         "lm_head.weight": "output.weight"},
    layer={"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
           "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
           "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
           "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
           "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attention.q_norm",
           "self_attn.k_norm": "attention.k_norm"},
    prefix="model.layers.")


# Gemma's four norms a layer: its post_attention_layernorm is the norm of attention's output
# (Llama's is the FFN's input norm, here pre_feedforward_layernorm).
GEMMA_NAMES = NameMap(
    top=NAMES.top,
    layer={**NAMES.layer, "post_attention_layernorm": "attention_post_norm",
           "pre_feedforward_layernorm": "ffn_norm",
           "post_feedforward_layernorm": "ffn_post_norm"},
    prefix=NAMES.prefix)


def _names(spec: ModelSpec | None) -> NameMap:
    return GEMMA_NAMES if spec is not None and spec.arch in GEMMA_ARCHS else NAMES


def hf_to_meta_name(name: str, spec: ModelSpec | None = None) -> str | None:
    """'model.layers.3.self_attn.q_proj.weight' -> 'layers.3.attention.wq.weight'; None for a
    name that has no Meta counterpart. spec: whose names (Gemma's differ; None: Llama's)."""
    return _names(spec).to_meta(name)


def meta_to_hf_name(name: str, spec: ModelSpec | None = None) -> str:
    return _names(spec).from_meta(name)


def rope_heads(meta_name: str, spec: ModelSpec) -> int | None:
    """Heads whose rows HF permuted (wq: n_heads, wk: n_kv_heads), None for other tensors.
    Qwen3's q_norm / k_norm weights [head_dim] scale one head's features in HF's order, so
    they are permuted as one head."""
    if ".attention.wq." in meta_name:
        return spec.n_heads
    if ".attention.wk." in meta_name:
        return spec.n_kv_heads
    if meta_name.endswith((".attention.q_norm.weight", ".attention.k_norm.weight")):
        return 1
    return None


def unpermute(t: Tensor, n_heads: int) -> Tensor:
    """HF rotate_half row order -> Meta interleaved row order; t is [rows, dim] or [rows]."""
    rest = t.shape[1:]
    return t.reshape(n_heads, 2, -1, *rest).transpose(1, 2).reshape(t.shape)


def permute(t: Tensor, n_heads: int) -> Tensor:
    """Meta interleaved row order -> HF rotate_half row order (convert_llama_weights_to_hf)."""
    rest = t.shape[1:]
    return t.reshape(n_heads, -1, 2, *rest).transpose(1, 2).reshape(t.shape)


def weight_files(folder: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InfermeterError(f"{index}: no 'weight_map' object")
        files = {name: folder / str(file) for name, file in weight_map.items()}
        for path in sorted(set(files.values())):
            if path.parent != folder or not path.is_file():
                raise InfermeterError(f"{index}: lists {path.name}, which is not in {folder}")
        return files
    single = folder / SINGLE_FILE
    if not single.is_file():
        others = sorted(p.name for p in folder.glob("*.safetensors"))
        if len(others) == 1:
            single = folder / others[0]
        elif others:
            raise InfermeterError(f"{folder}: {len(others)} .safetensors files but no {INDEX_FILE}")
        elif any(folder.glob("*.bin")):
            raise InfermeterError(f"{folder}: only pickle (.bin) weights; infermeter reads "
                                  "safetensors only (convert with transformers' save_pretrained)")
        else:
            raise InfermeterError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")
    with _open(single) as handle:
        return {name: single for name in handle.keys()}  # noqa: SIM118 - not a dict


def _open(path: Path) -> Any:  # safetensors' safe_open handle (a private type)
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise InfermeterError(f"{path}: cannot read as safetensors ({err})") from None


def _match_names(files: dict[str, Path], spec: ModelSpec,
                 expected: dict[str, torch.Size]) -> dict[str, str]:
    """Meta name -> HF name for every expected tensor; missing or unknown ones are errors."""
    by_meta: dict[str, str] = {}
    for hf_name, path in files.items():
        meta = hf_to_meta_name(hf_name, spec)
        if meta is None and not _IGNORED.search(hf_name):
            raise InfermeterError(f"{path}: unexpected tensor {hf_name} "
                                  f"(not part of a {spec.arch} model)")
        if meta == "output.weight" and spec.tie_embeddings:
            continue  # a tied model may still store lm_head: a copy of the embedding
        if meta is not None:
            by_meta[meta] = hf_name
    missing = sorted(set(expected) - set(by_meta))
    if missing:
        folder = next(iter(files.values())).parent
        raise InfermeterError(f"{folder}: missing tensor {meta_to_hf_name(missing[0], spec)}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(set(by_meta) - set(expected))
    if extra:
        hf_name = by_meta[extra[0]]
        raise InfermeterError(f"{files[hf_name]}: unexpected tensor {hf_name} "
                              "(config.json describes a different model?)")
    return by_meta


def read_hf_tensors(folder: Path, spec: ModelSpec, expected: dict[str, torch.Size],
                    shard: ShardPlan | None = None) -> Iterator[tuple[str, Tensor]]:
    """Yield (Meta name, CPU tensor in Meta layout) for every name in `expected` (full shapes).

    shard (tensor parallel): only the rank's slice of each tensor is read (get_slice reads just
    those bytes). The q/k permutation is within each head and a rank's slice is whole heads, so
    unpermuting the slice's heads gives exactly the slice of the unpermuted tensor.
    """
    files = weight_files(folder)
    by_meta = _match_names(files, spec, expected)
    handles: dict[Path, Any] = {}
    for name, shape in expected.items():
        hf_name = by_meta[name]
        path = files[hf_name]
        if path not in handles:
            handles[path] = _open(path)
        try:
            found = list(handles[path].get_slice(hf_name).get_shape())  # header only, no data
        except SafetensorError:
            raise InfermeterError(f"{path}: has no tensor {hf_name} "
                                  f"(listed there by {INDEX_FILE})") from None
        if found != list(shape):
            raise InfermeterError(f"{path}: tensor {hf_name} has shape {found}, "
                                  f"config.json implies {list(shape)}")
        piece = shard.slice_of(name) if shard is not None else None
        if piece is None:
            tensor = handles[path].get_tensor(hf_name)
        else:
            index = [slice(None)] * piece.dim + [slice(piece.start, piece.start + piece.length)]
            tensor = handles[path].get_slice(hf_name)[tuple(index)]
        if rope_heads(name, spec) is None:
            yield name, tensor
        else:  # whole heads: rows // head_dim (all of wq / wk, the rank's, a q/k norm's one)
            yield name, unpermute(tensor, tensor.shape[0] // spec.head_dim)


# ---- writer ----------------------------------------------------------------------------------
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM"}


def _whole(value: float | None) -> float | int | None:
    """An integral float as an int: transformers' Gemma3TextConfig types query_pre_attn_scalar
    as int and refuses 168.0."""
    return int(value) if value is not None and float(value).is_integer() else value


def hf_config(spec: ModelSpec, dtype: str) -> dict[str, object]:
    """A config.json that transformers and spec_from_hf_config read back as `spec`."""
    cfg: dict[str, object] = {
        "architectures": [_ARCHITECTURES[spec.arch]], "model_type": spec.arch,
        "hidden_size": spec.dim, "intermediate_size": spec.ffn_dim,
        "num_attention_heads": spec.n_heads, "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim, "num_hidden_layers": spec.n_layers,
        "vocab_size": spec.vocab_size, "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta, "max_position_embeddings": spec.max_seq_len,
        "tie_word_embeddings": spec.tie_embeddings, "hidden_act": "silu", "torch_dtype": dtype,
    }
    scaling = spec.rope_scaling
    if scaling is not None:
        cfg["rope_scaling"] = {
            "rope_type": scaling.kind, "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position}
    # Only Qwen2 has q/k/v bias without an o_proj bias (Llama's attention_bias adds both).
    if spec.qkv_bias != (spec.arch == "qwen2"):
        raise InfermeterError(f"model {spec.name}: an HF {spec.arch} config cannot express "
                              f"qkv_bias={spec.qkv_bias}")
    gemma = spec.arch in GEMMA_ARCHS
    if gemma:  # transformers 4.x's fields, which 5.x reads too
        cfg.update(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                   rope_local_base_freq=spec.rope_local_theta,
                   query_pre_attn_scalar=_whole(spec.query_pre_attn_scalar),
                   final_logit_softcapping=spec.final_logit_softcap,
                   attn_logit_softcapping=None)
    elif (spec.rope_local_theta, spec.query_pre_attn_scalar, spec.final_logit_softcap) != \
            (None, None, None):
        raise InfermeterError(f"model {spec.name}: an HF {spec.arch} config cannot express a "
                              "local RoPE base, query_pre_attn_scalar or logit soft-capping")
    if spec.qk_norm != (spec.arch in ("qwen3", *GEMMA_ARCHS)):  # the model type says it
        raise InfermeterError(f"model {spec.name}: an HF {spec.arch} config cannot express "
                              f"qk_norm={spec.qk_norm}")
    if spec.sliding_window_layers:
        windows = set(spec.sliding_window_layers)
        cfg["sliding_window"] = spec.sliding_window
        cfg["use_sliding_window"] = True
        cfg["layer_types"] = ["sliding_attention" if i in windows else "full_attention"
                              for i in range(spec.n_layers)]
    return cfg


def save_hf_checkpoint(state: dict[str, Tensor], spec: ModelSpec, folder: Path,
                       n_shards: int = 1) -> list[Path]:
    """Write config.json and safetensors (with an index when n_shards > 1) in HF layout.

    `state` is Meta-named (Transformer.state_dict()); q/k rows are permuted back to HF's order.
    Tied models drop lm_head, as save_pretrained does.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name == "output.weight" and spec.tie_embeddings:
            continue
        heads = rope_heads(name, spec)
        tensor = tensor.detach().cpu()
        tensors[meta_to_hf_name(name, spec)] = (tensor if heads is None
                                          else permute(tensor, heads)).contiguous()
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(hf_config(spec, dtype), indent=2) + "\n")
    if n_shards == 1:
        save_file(tensors, str(folder / SINGLE_FILE), metadata={"format": "pt"})
        return [folder / SINGLE_FILE]
    names = list(tensors)
    chunks = [names[i::n_shards] for i in range(n_shards)]
    weight_map, paths = {}, []
    for i, chunk in enumerate(chunks):
        path = folder / f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(path), metadata={"format": "pt"})
        weight_map.update({n: path.name for n in chunk})
        paths.append(path)
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return paths
