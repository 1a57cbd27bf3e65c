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
from collections import Counter
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


# MoE layers: the router under its model's block name; the experts, one tensor per expert and
# projection in the files, are stacked into one [E, ...] tensor per projection (moe.py).
MOE_NAMES = {
    "mixtral": NameMap(top=NAMES.top, layer={**NAMES.layer,
                                             "block_sparse_moe.gate": "feed_forward.gate"},
                       prefix=NAMES.prefix),
    "qwen3_moe": NameMap(top=NAMES.top, layer={**NAMES.layer, "mlp.gate": "feed_forward.gate"},
                         prefix=NAMES.prefix),
}
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\."
                     r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_PART = {"w1": "w1", "w2": "w2", "w3": "w3", "gate_proj": "w1", "up_proj": "w3",
                "down_proj": "w2"}
_EXPERT_BLOCK = {"mixtral": ("block_sparse_moe", {"w1": "w1", "w2": "w2", "w3": "w3"}),
                 "qwen3_moe": ("mlp", {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"})}


# gpt-oss: the router is mlp.router; each layer's experts are four stacked tensors, input-major
# (x @ W): mlp.experts.gate_up_proj [E, dim, 2 ffn] with gate and up interleaved (gate: the
# even columns, up: the odd ones, transformers' GptOssExperts), its bias [E, 2 ffn],
# down_proj [E, ffn, dim] and its bias [E, dim]; the sinks are self_attn.sinks [n_heads].
# The published files hold gate_up_proj and down_proj as MXFP4 (_blocks and _scales, see
# _dequantize_mxfp4); a dequantized (bf16) checkpoint holds them as they are.
GPT_OSS_NAMES = NameMap(top=NAMES.top, layer={**NAMES.layer, "mlp.router": "feed_forward.gate"},
                        prefix=NAMES.prefix)
_GPT_OSS_EXPERTS = {"w1.weight": ("gate_up_proj", 0), "w3.weight": ("gate_up_proj", 1),
                    "w2.weight": ("down_proj", None), "w1.bias": ("gate_up_proj_bias", 0),
                    "w3.bias": ("gate_up_proj_bias", 1), "w2.bias": ("down_proj_bias", None)}
# MXFP4's 4-bit values (E2M1: sign, 2 exponent bits, 1 mantissa bit), by code
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _names(spec: ModelSpec | None) -> NameMap:
    if spec is not None and spec.arch == "gpt_oss":
        return GPT_OSS_NAMES
    if spec is not None and spec.arch in MOE_NAMES:
        return MOE_NAMES[spec.arch]
    return GEMMA_NAMES if spec is not None and spec.arch in GEMMA_ARCHS else NAMES


def expert_to_meta(name: str, spec: ModelSpec) -> tuple[str, int] | None:
    """'model.layers.3.mlp.experts.5.up_proj.weight' -> ('layers.3.feed_forward.w3.weight', 5):
    the stacked tensor and the expert's index in it; None for other names."""
    match = _EXPERT.match(name)
    if match is None or spec.arch not in _EXPERT_BLOCK or \
            match.group(2) != _EXPERT_BLOCK[spec.arch][0]:
        return None
    layer, expert, part = match.group(1), int(match.group(3)), _EXPERT_PART[match.group(4)]
    return f"layers.{layer}.feed_forward.{part}.weight", expert


def expert_hf_name(meta_name: str, expert: int, spec: ModelSpec) -> str:
    """The file's name of expert `expert`'s slice of a stacked tensor (expert_to_meta's inverse)."""
    layer, rest = meta_name.removeprefix("layers.").split(".", 1)
    block, parts = _EXPERT_BLOCK[spec.arch]
    part = parts[rest.split(".")[1]]  # 'feed_forward.w1.weight' -> 'w1'
    return f"model.layers.{layer}.{block}.experts.{expert}.{part}.weight"


# A multimodal checkpoint (Gemma3ForConditionalGeneration) keeps its language model under a
# prefix (as published, and as save_pretrained writes it: language_model.model.*; as transformers
# names it inside the model: model.language_model.*) beside vision weights the engine skips.
_TEXT_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                  "language_model.lm_head.": "lm_head."}
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.")


def text_model_name(name: str) -> str | None:
    """A checkpoint name as a text-only model's ('language_model.model.norm.weight' ->
    'model.norm.weight'); None for a vision tower's or projector's tensor."""
    if name.startswith(_VISION_PREFIXES):
        return None
    for prefix, plain in _TEXT_PREFIXES.items():
        if name.startswith(prefix):
            return plain + name.removeprefix(prefix)
    return name


def _stacked(name: str, shape: torch.Size, spec: ModelSpec) -> bool:
    return spec.is_moe and len(shape) == 3 and ".feed_forward.w" in name


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
                 expected: dict[str, torch.Size]) -> dict[str, list[str]]:
    """Meta name -> HF names for every expected tensor (one, or a stacked tensor's E experts in
    order); missing or unknown ones are errors."""
    by_meta: dict[str, str] = {}
    experts: dict[str, dict[int, str]] = {}
    for hf_name, path in files.items():
        text_name = text_model_name(hf_name)
        if text_name is None:  # a multimodal checkpoint's vision weights: not run
            continue
        expert = expert_to_meta(text_name, spec)
        if expert is not None:
            experts.setdefault(expert[0], {})[expert[1]] = hf_name
            continue
        meta = hf_to_meta_name(text_name, spec)
        if meta is None and not _IGNORED.search(hf_name):
            raise InfermeterError(f"{path}: unexpected tensor {hf_name} "
                                  f"(not part of a {spec.arch} model)")
        if meta == "output.weight" and spec.tie_embeddings:
            continue  # a tied model may still store lm_head: a copy of the embedding
        if meta is not None:
            by_meta[meta] = hf_name
    names: dict[str, list[str]] = {meta: [hf] for meta, hf in by_meta.items()}
    absent: list[str] = []
    for meta, shape in expected.items():
        if not _stacked(meta, shape, spec):
            if meta not in by_meta:
                absent.append(meta_to_hf_name(meta, spec))
            continue
        found = experts.pop(meta, {})
        absent += [expert_hf_name(meta, e, spec) for e in range(shape[0]) if e not in found]
        names[meta] = [found[e] for e in range(shape[0]) if e in found]
        if len(found) > shape[0]:
            hf_name = found[max(found)]
            raise InfermeterError(f"{files[hf_name]}: unexpected tensor {hf_name} (config.json "
                                  f"says {shape[0]} experts)")
    if absent:
        folder = next(iter(files.values())).parent
        raise InfermeterError(f"{folder}: missing tensor {absent[0]}"
                              + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))
    extra = sorted(set(by_meta) - set(expected)) + sorted(experts)
    if extra:
        hf_name = names[extra[0]][0] if extra[0] in names else \
            next(iter(experts[extra[0]].values()))
        raise InfermeterError(f"{files[hf_name]}: unexpected tensor {hf_name} "
                              "(config.json describes a different model?)")
    return names


def _check_shapes(files: dict[str, Path], spec: ModelSpec, expected: dict[str, torch.Size],
                  names: dict[str, list[str]], handles: dict[Path, Any]) -> None:
    """Every matched tensor's shape, from its file's header, as config.json implies it (an
    expert's: its stacked tensor's less the experts' dim)."""
    for meta, shape in expected.items():
        want = shape[1:] if _stacked(meta, shape, spec) else shape
        for hf_name in names[meta]:
            _check_shape(files, hf_name, want, handles)


def _checked_plan(folder: Path, spec: ModelSpec, expected: dict[str, torch.Size],
                  handles: dict[Path, Any]) -> tuple[dict[str, Path], dict[str, Any]]:
    """(HF name -> file, Meta name -> where it comes from: _match_names' answer, or
    _gpt_oss_plan's) once every expected tensor is there, none unexpected and each shape as
    config.json implies; from the safetensors headers only, no tensor data read."""
    files = weight_files(folder)
    if not files:  # an empty file, or an index's empty weight_map: nothing to name a file by
        raise InfermeterError(f"{folder}: its safetensors files hold no tensors")
    if spec.arch == "gpt_oss":
        return files, _gpt_oss_plan(files, spec, expected, handles)
    names = _match_names(files, spec, expected)
    _check_shapes(files, spec, expected, names, handles)
    return files, names


def check_hf_tensors(folder: Path, spec: ModelSpec, expected: dict[str, torch.Size]) -> None:
    """read_hf_tensors' checks of names and shapes alone (headers only): an error for a
    checkpoint it would refuse, before any work."""
    _checked_plan(folder, spec, expected, {})


def read_hf_tensors(folder: Path, spec: ModelSpec, expected: dict[str, torch.Size],
                    shard: ShardPlan | None = None) -> Iterator[tuple[str, Tensor]]:
    """Yield (Meta name, CPU tensor in Meta layout) for every name in `expected` (full shapes).
    Every name and shape is checked (check_hf_tensors) before the first tensor is read.

    shard (tensor parallel): only the rank's slice of each tensor is read (get_slice reads just
    those bytes). The q/k permutation is within each head and a rank's slice is whole heads, so
    unpermuting the slice's heads gives exactly the slice of the unpermuted tensor.
    """
    handles: dict[Path, Any] = {}
    files, plan = _checked_plan(folder, spec, expected, handles)
    if spec.arch == "gpt_oss":
        yield from _gpt_oss_tensors(files, plan, spec, expected, handles, shard)
        return
    for name, shape in expected.items():
        if _stacked(name, shape, spec):  # E expert files -> one [E, out, in] tensor
            piece = shard.slice_of(name) if shard is not None else None
            part = None if piece is None else piece._replace(dim=piece.dim - 1)  # one expert's
            yield name, torch.stack([_read(files, hf_name, handles, part)
                                     for hf_name in plan[name]])
            continue
        hf_name = plan[name][0]
        piece = shard.slice_of(name) if shard is not None else None
        tensor = _read(files, hf_name, handles, piece)
        if rope_heads(name, spec) is None:
            yield name, tensor
        else:  # whole heads: rows // head_dim (all of wq / wk, the rank's, a q/k norm's one)
            yield name, unpermute(tensor, tensor.shape[0] // spec.head_dim)


def _gpt_oss_source(name: str) -> tuple[str, int | None] | None:
    """'layers.3.feed_forward.w3.weight' -> ('model.layers.3.mlp.experts.gate_up_proj', 1): the
    file's tensor and which interleaved half (None: all of it, transposed for a matrix); the
    sinks -> (their name, None); None for the names GPT_OSS_NAMES maps one to one."""
    layer, rest = name.removeprefix("layers.").split(".", 1) if name.startswith("layers.") \
        else ("", "")
    if rest == "attention.sinks":
        return f"model.layers.{layer}.self_attn.sinks", None
    part = _GPT_OSS_EXPERTS.get(rest.removeprefix("feed_forward."))
    if not rest.startswith("feed_forward.") or part is None:
        return None
    return f"model.layers.{layer}.mlp.experts.{part[0]}", part[1]


def _gpt_oss_file_shape(meta_shape: torch.Size, half: int | None) -> list[int]:
    """The file's shape of the tensor an engine tensor of meta_shape comes from."""
    if len(meta_shape) == 3:  # [E, out, in] <- [E, in, out] (gate_up: 2 x out, interleaved)
        return [meta_shape[0], meta_shape[2], meta_shape[1] * (1 if half is None else 2)]
    if len(meta_shape) == 2 and half is not None:  # [E, ffn] <- [E, 2 ffn]
        return [meta_shape[0], 2 * meta_shape[1]]
    return list(meta_shape)


def _gpt_oss_plan(files: dict[str, Path], spec: ModelSpec, expected: dict[str, torch.Size],
                  handles: dict[Path, Any]) -> dict[str, tuple[str, int | None]]:
    """Meta name -> (its file tensor, which interleaved half: _gpt_oss_source) for every
    expected tensor, each checked from its file's header: there (as itself, or as MXFP4
    _blocks and _scales that pair up) with the shape config.json implies; a file tensor no
    engine tensor comes from is an error."""
    sources: dict[str, tuple[str, int | None]] = {}
    for name in expected:
        source = _gpt_oss_source(name)
        sources[name] = source if source is not None else (meta_to_hf_name(name, spec), None)
    wanted = {hf for hf, _ in sources.values()}
    packed = {f"{hf}{suffix}" for hf in wanted for suffix in ("_blocks", "_scales")}
    for hf_name, path in files.items():
        if hf_name not in wanted and hf_name not in packed and not _IGNORED.search(hf_name):
            raise InfermeterError(f"{path}: unexpected tensor {hf_name} "
                                  f"(not part of a {spec.arch} model)")
    for name, shape in expected.items():
        hf_name, half = sources[name]
        file_shape = _gpt_oss_file_shape(shape, half)
        blocks, scales = f"{hf_name}_blocks", f"{hf_name}_scales"
        if hf_name in files:
            _check_shape(files, hf_name, file_shape, handles)
        elif blocks in files and scales in files:
            found = _mxfp4_shape(_header(files, blocks, handles), _header(files, scales, handles),
                                 f"{files[blocks]}: MXFP4 tensor {hf_name}")
            if found != file_shape:
                raise InfermeterError(f"{files[blocks]}: MXFP4 tensor {hf_name} has shape "
                                      f"{found}, config.json implies {file_shape}")
        else:
            absent = scales if blocks in files else hf_name
            raise InfermeterError(f"{next(iter(files.values())).parent}: missing tensor {absent}")
    return sources


def _gpt_oss_tensors(files: dict[str, Path], sources: dict[str, tuple[str, int | None]],
                     spec: ModelSpec, expected: dict[str, torch.Size], handles: dict[Path, Any],
                     shard: ShardPlan | None) -> Iterator[tuple[str, Tensor]]:
    """read_hf_tensors for gpt-oss, from _gpt_oss_plan's sources: each engine tensor from its
    file tensor (an interleaved half of gate_up, a transposed matrix, MXFP4 dequantized to
    bf16); a file tensor two engine tensors come from is read once and kept until both are
    made. shard: the rank's slice of each engine tensor, cut from the whole one (MXFP4 blocks
    and the interleaving run along the split dims, so a rank reads and dequantizes whole
    tensors, one or two at a time)."""
    left = Counter(hf for hf, _ in sources.values())  # engine tensors still to make of each
    kept: dict[str, Tensor] = {}
    for name in expected:
        hf_name, half = sources[name]
        if hf_name in kept:
            full = kept[hf_name]
        elif hf_name in files:
            full = _read(files, hf_name, handles, None)
        else:  # MXFP4, as _gpt_oss_plan found it
            full = _dequantize_mxfp4(_read(files, f"{hf_name}_blocks", handles, None),
                                     _read(files, f"{hf_name}_scales", handles, None))
        left[hf_name] -= 1
        if left[hf_name]:
            kept[hf_name] = full
        else:
            kept.pop(hf_name, None)
        tensor = full if half is None else full[..., half::2]
        if tensor.dim() == 3:
            tensor = tensor.transpose(1, 2)  # x @ W's [E, in, out] -> the engine's [E, out, in]
        heads = rope_heads(name, spec)
        if heads is not None:
            tensor = unpermute(tensor, tensor.shape[0] // spec.head_dim)
        if shard is not None:
            tensor = shard.narrow(name, tensor)
        yield name, tensor.contiguous()


def _mxfp4_shape(blocks: tuple[list[int], str], scales: tuple[list[int], str],
                 what: str) -> list[int]:
    """The x @ W shape [E, G * 32, rows] that MXFP4 blocks (shape, safetensors dtype) uint8
    [E, rows, G, 16] and scales uint8 [E, rows, G] dequantize to; blocks and scales that do not
    pair up are an error, which `what` (the file and tensor) begins."""
    (blocks_shape, blocks_dtype), (scales_shape, scales_dtype) = blocks, scales
    if blocks_dtype != "U8" or scales_dtype != "U8" or len(blocks_shape) != 4 \
            or blocks_shape[-1] != 16 or blocks_shape[:-1] != scales_shape:
        raise InfermeterError(f"{what}: blocks {blocks_shape} ({blocks_dtype}) and scales "
                              f"{scales_shape} ({scales_dtype}) do not pair up")
    n_experts, rows, groups, _ = blocks_shape
    return [n_experts, groups * 32, rows]


def _dequantize_mxfp4(blocks: Tensor, scales: Tensor) -> Tensor:
    """MXFP4 -> bf16, as transformers' convert_moe_packed_tensors: blocks uint8
    [E, rows, G, 16] (two 4-bit codes a byte, the low nibble first), scales uint8 [E, rows, G]
    (a power of two, biased by 127, per 32 values) -> [E, G * 32, rows] (x @ W layout), blocks
    and scales as _mxfp4_shape checked them. bf16 holds every such value exactly (a 1-bit
    mantissa, float32's exponent range)."""
    lut = torch.tensor(_FP4_VALUES, dtype=torch.float32)
    n_experts, rows, groups, _ = blocks.shape
    out = torch.empty(n_experts, rows, groups * 32, dtype=torch.bfloat16)
    for e in range(n_experts):  # one expert at a time bounds the int64 codes' memory
        codes = torch.stack((blocks[e] & 0x0F, blocks[e] >> 4), dim=-1).long()  # [rows, G, 16, 2]
        powers = torch.exp2(scales[e].float() - 127)[..., None]  # [rows, G, 1]
        out[e] = (lut[codes].flatten(-2) * powers).flatten(-2)  # exact in float32 and bf16
    return out.transpose(1, 2)  # [E, G * 32, rows]


def _handle(files: dict[str, Path], hf_name: str, handles: dict[Path, Any]) -> Any:
    """The open file holding hf_name (opened once, kept in handles)."""
    path = files[hf_name]
    if path not in handles:
        handles[path] = _open(path)
    return handles[path]


def _header(files: dict[str, Path], hf_name: str,
            handles: dict[Path, Any]) -> tuple[list[int], str]:
    """A tensor's shape and safetensors dtype ('U8', 'BF16', ...): its file's header only."""
    try:
        view = _handle(files, hf_name, handles).get_slice(hf_name)
    except SafetensorError:
        raise InfermeterError(f"{files[hf_name]}: has no tensor {hf_name} "
                              f"(listed there by {INDEX_FILE})") from None
    return list(view.get_shape()), view.get_dtype()


def _check_shape(files: dict[str, Path], hf_name: str, shape: torch.Size | list[int],
                 handles: dict[Path, Any]) -> None:
    found = _header(files, hf_name, handles)[0]
    if found != list(shape):
        raise InfermeterError(f"{files[hf_name]}: tensor {hf_name} has shape {found}, "
                              f"config.json implies {list(shape)}")


def _read(files: dict[str, Path], hf_name: str, handles: dict[Path, Any],
          piece: Any) -> Tensor:
    """One tensor (or the `piece`, a sharding Slice, of it), its shape already checked."""
    handle = _handle(files, hf_name, handles)
    if piece is None:
        return handle.get_tensor(hf_name)
    index = [slice(None)] * piece.dim + [slice(piece.start, piece.start + piece.length)]
    return handle.get_slice(hf_name)[tuple(index)]


# ---- writer ----------------------------------------------------------------------------------
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                  "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def _whole(value: float | None) -> float | int | None:
    """An integral float as an int: transformers' Gemma3TextConfig types query_pre_attn_scalar
    as int and refuses 168.0."""
    return int(value) if value is not None and float(value).is_integer() else value


def hf_writable(spec: ModelSpec) -> bool:
    """Whether the writer (and so the hf mode, which builds transformers' model from the
    engine's weights through hf_config) can express `spec`'s architecture. Not gpt-oss's: its
    fused, interleaved experts have no writer."""
    return spec.arch in _ARCHITECTURES


def _check_writable(spec: ModelSpec) -> None:
    if not hf_writable(spec):
        raise InfermeterError(f"model {spec.name}: writing an HF {spec.arch} checkpoint is not "
                              f"supported (it writes: {', '.join(_ARCHITECTURES)})")


def hf_config(spec: ModelSpec, dtype: str) -> dict[str, object]:
    """A config.json that transformers and spec_from_hf_config read back as `spec`."""
    _check_writable(spec)
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
                   query_pre_attn_scalar=_whole(spec.query_pre_attn_scalar),
                   final_logit_softcapping=spec.final_logit_softcap,
                   attn_logit_softcapping=spec.attn_logit_softcap)
        if spec.arch == "gemma3_text":
            cfg["rope_local_base_freq"] = spec.rope_local_theta
    if (spec.arch != "gemma3_text" and spec.rope_local_theta is not None) or (not gemma and (
            spec.query_pre_attn_scalar, spec.final_logit_softcap, spec.attn_logit_softcap) !=
            (None, None, None)):
        raise InfermeterError(f"model {spec.name}: an HF {spec.arch} config cannot express a "
                              "local RoPE base, query_pre_attn_scalar or logit soft-capping")
    if spec.qk_norm != (spec.arch in ("qwen3", "qwen3_moe", "gemma3_text")):  # the type says it
        raise InfermeterError(f"model {spec.name}: an HF {spec.arch} config cannot express "
                              f"qk_norm={spec.qk_norm}")
    cfg.update(_moe_config(spec))
    if spec.sliding_window_layers:
        windows = set(spec.sliding_window_layers)
        cfg["sliding_window"] = spec.sliding_window
        cfg["use_sliding_window"] = True
        cfg["layer_types"] = ["sliding_attention" if i in windows else "full_attention"
                              for i in range(spec.n_layers)]
    return cfg


def _moe_config(spec: ModelSpec) -> dict[str, object]:
    """The expert fields of a Mixtral or Qwen3-MoE config.json; refuses what the type cannot say."""
    if spec.arch not in _EXPERT_BLOCK:
        if spec.is_moe:
            raise InfermeterError(f"model {spec.name}: an HF {spec.arch} config cannot express "
                                  "experts")
        return {}
    if not spec.is_moe or spec.n_shared_experts or spec.n_dense_layers:
        raise InfermeterError(f"model {spec.name}: an HF {spec.arch} config needs routed "
                              "experts only (no shared experts, no leading dense layers)")
    cfg: dict[str, object] = {"num_experts_per_tok": spec.n_active_experts}
    if spec.arch == "mixtral":
        if spec.moe_dense_layers or not spec.norm_topk_prob or spec.moe_ffn_dim != spec.ffn_dim:
            raise InfermeterError(f"model {spec.name}: an HF mixtral config has experts in "
                                  "every layer, of intermediate_size, renormalised")
        cfg["num_local_experts"] = spec.n_experts
        return cfg
    return {**cfg, "num_experts": spec.n_experts, "moe_intermediate_size": spec.moe_ffn_dim,
            "norm_topk_prob": spec.norm_topk_prob, "decoder_sparse_step": 1,
            "mlp_only_layers": list(spec.moe_dense_layers)}


def save_hf_checkpoint(state: dict[str, Tensor], spec: ModelSpec, folder: Path,
                       n_shards: int = 1) -> list[Path]:
    """Write config.json and safetensors (with an index when n_shards > 1) in HF layout.

    `state` is Meta-named (Transformer.state_dict()); q/k rows are permuted back to HF's order.
    Tied models drop lm_head, as save_pretrained does.
    """
    _check_writable(spec)  # before the folder is made
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name == "output.weight" and spec.tie_embeddings:
            continue
        heads = rope_heads(name, spec)
        tensor = tensor.detach().cpu()
        if _stacked(name, tensor.shape, spec):  # one tensor per expert, as HF stores them
            for expert, piece in enumerate(tensor):
                tensors[expert_hf_name(name, expert, spec)] = piece.contiguous()
            continue
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
