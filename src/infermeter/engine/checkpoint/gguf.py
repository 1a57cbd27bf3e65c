"""GGUF weights (llama.cpp): each tensor dequantized with the `gguf` package, then in Meta layout.

Names: llama.cpp's `blk.N.attn_q.weight` is Meta's `layers.N.attention.wq.weight`, and so on
(`gguf_to_meta_name`); no `output.weight` means the output is tied to the embedding.

Rows of wq / wk: llama.cpp's converter permutes a Llama's (and Mixtral's) q_proj / k_proj from
HF's rotate_half order back to Meta's interleaved pairs (its RoPE "norm" type), which is the
engine's layout: they load as they are. Qwen2, Qwen3, Qwen3-MoE and Gemma run llama.cpp's "neox"
RoPE, which is rotate_half: their q/k rows (and biases, and the q/k norms' features) are in HF's
order and get hf.unpermute, as an HF checkpoint does.

Gemma's norms: llama.cpp's converter stores 1 + w (its RMSNorm multiplies by the weight as it
is), the engine's Gemma norms hold w and apply 1 + w (as HF): 1 is taken off on load.
Experts: ffn_gate_exps / ffn_up_exps [E, ffn, dim] and ffn_down_exps [E, dim, ffn] are already
the engine's stacked tensors; ffn_gate_inp [E, dim] is the router. llama.cpp's older Mixtral
files hold one tensor per expert (blk.N.ffn_gate.E.weight [ffn, dim], ffn_up.E likewise,
ffn_down.E [dim, ffn]): each is dequantized and the E of them stacked in expert order.

gpt-oss: llama.cpp's converter splits HF's gate_up_proj (gate and up rows interleaved) into
ffn_gate_exps and ffn_up_exps (and their biases) and transposes the x @ W matrices, so they too
are the engine's stacked [E, out, in] tensors and [E, out] biases; its experts are MXFP4 as
published (dequantized by gguf's quants like any type). Its q/k keep HF's row order (neox RoPE),
its pre-FFN norm is named post_attention_norm, and the sinks [n_heads] are attn_sinks.weight.

Memory: one tensor at a time, dequantized on the host in float32 ([rows, cols], the file's
quantized blocks never leave the memory map), then converted by load.assign_tensors to the run
dtype and device before the next one is read. Every tensor's name, shape and quant type is
checked before the first one is read (check_gguf_tensors: those checks alone), so a file the
reader would refuse or cannot dequantize fails before any work.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from infermeter.engine.checkpoint.hf import rope_heads, unpermute
from infermeter.engine.checkpoint.names import NameMap
from infermeter.errors import InfermeterError
from infermeter.specs.gguf_meta import ROPE_FREQS, import_gguf, open_gguf, tensor_shapes
from infermeter.specs.model import GEMMA_ARCHS, ModelSpec

if TYPE_CHECKING:
    from infermeter.engine.parallel.sharding import ShardPlan

NAMES = NameMap(
    top={"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
         "output.weight": "output.weight"},
    layer={"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
           "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1",
           "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
           "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
           "attn_q_norm": "attention.q_norm", "attn_k_norm": "attention.k_norm",
           # Gemma: the norms of attention's and the FFN's outputs (ffn_norm is its pre-FFN norm)
           "post_attention_norm": "attention_post_norm", "post_ffw_norm": "ffn_post_norm"},
    prefix="blk.")
# An MoE layer's FFN: the router and the stacked experts ([E, out, in], the engine's layout).
EXPERT_NAMES = NameMap(
    top={}, layer={"ffn_gate_inp": "feed_forward.gate", "ffn_gate_exps": "feed_forward.w1",
                   "ffn_down_exps": "feed_forward.w2", "ffn_up_exps": "feed_forward.w3"},
    prefix="blk.")
# llama.cpp's older MoE layout: one tensor per expert, named after the dense FFN's plus its id.
_PER_EXPERT = re.compile(r"^(blk\.\d+\.ffn_(?:gate|up|down))\.(\d+)\.weight$")
# gpt-oss: llama.cpp's converter names the pre-FFN norm post_attention_norm (HF's
# post_attention_layernorm); its sinks [n_heads] carry no .weight in the engine's name.
GPT_OSS_NAMES = NameMap(top=NAMES.top, layer={**NAMES.layer, "post_attention_norm": "ffn_norm"},
                        prefix=NAMES.prefix)
_SINKS = re.compile(r"^(?:blk|layers)\.(\d+)\.(?:attn_sinks\.weight|attention\.sinks)$")
# Architectures whose q/k rows llama.cpp keeps in HF's rotate_half order (its neox RoPE).
_HF_ROW_ORDER = ("qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "gpt_oss")


def gguf_to_meta_name(name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'layers.3.attention.wq.weight'; None for other names."""
    sinks = _SINKS.match(name)
    if sinks:
        return f"layers.{sinks[1]}.attention.sinks"
    return EXPERT_NAMES.to_meta(name) or NAMES.to_meta(name)


def meta_to_gguf_name(name: str, stacked: bool = False, arch: str | None = None) -> str:
    """The file's name of a Meta tensor; stacked: an MoE layer's [E, ...] experts or router
    (gpt-oss's FFN is experts in every layer, their biases [E, out] included)."""
    sinks = _SINKS.match(name)
    if sinks:
        return f"blk.{sinks[1]}.attn_sinks.weight"
    if ".feed_forward.gate." in name or (arch == "gpt_oss" and ".feed_forward." in name):
        stacked = True
    return (EXPERT_NAMES if stacked else GPT_OSS_NAMES if arch == "gpt_oss"
            else NAMES).from_meta(name)


def _match_names(path: Path, reader: Any, spec: ModelSpec,
                 expected: dict[str, torch.Size]) -> dict[str, Any]:
    """Meta name -> the reader's tensor for every expected tensor; missing or unknown: errors."""
    wanted = {meta_to_gguf_name(name, len(shape) == 3, spec.arch): name
              for name, shape in expected.items()}
    by_meta: dict[str, Any] = {}  # a stacked tensor of the older layout: its experts' list
    experts: dict[str, dict[int, Any]] = {}  # stacked name -> expert id -> per-expert tensor
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:  # read into the spec
            continue
        per_expert = _PER_EXPERT.match(tensor.name)
        stacked = per_expert and f"{per_expert[1]}_exps.weight"
        if stacked in wanted and int(per_expert[2]) < expected[wanted[stacked]][0] \
                and wanted[stacked] not in by_meta:
            experts.setdefault(stacked, {})[int(per_expert[2])] = tensor
            continue
        if tensor.name not in wanted:
            known = gguf_to_meta_name(tensor.name) is not None
            raise InfermeterError(f"{path}: unexpected tensor {tensor.name} " + (
                "(the metadata describes a different model?)" if known
                else f"(not part of a {spec.arch} model)"))
        by_meta[wanted[tensor.name]] = tensor
    missing = []
    for stacked, tensors in experts.items():
        ids = range(expected[wanted[stacked]][0])
        if wanted[stacked] in by_meta:  # both layouts of one projection
            raise InfermeterError(f"{path}: unexpected tensor {tensors[min(tensors)].name} "
                                  f"(beside {stacked})")
        base = stacked.removesuffix("_exps.weight")
        missing += [f"{base}.{e}.weight" for e in ids if e not in tensors]
        by_meta[wanted[stacked]] = [tensors.get(e) for e in ids]
    missing += [gguf for gguf, meta in wanted.items() if meta not in by_meta]
    if missing:
        raise InfermeterError(f"{path}: missing tensor {missing[0]}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return by_meta


def dequantize(tensor: Any) -> np.ndarray:
    """One reader tensor as float32 [rows, cols] (or [n]), whatever its quant type."""
    gguf = import_gguf()
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise InfermeterError(f"tensor {tensor.name} is {tensor.tensor_type.name}, which the "
                              "gguf package cannot dequantize (pip install -U gguf may)") from None
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    values = np.asarray(values, dtype=np.float32).reshape(shape)
    # F32 tensors come back as views of the read-only memory map: torch wants its own memory
    return values if values.flags.writeable else values.copy()


def _check_types(path: Path, tensors: list[Any]) -> None:
    """Dequantize one row of each quant type the file uses: a type gguf cannot read fails here,
    before any weight is loaded."""
    seen: set[int] = set()
    for tensor in tensors:
        if tensor.tensor_type in seen:
            continue
        seen.add(tensor.tensor_type)
        gguf = import_gguf()
        row = tensor.data.reshape(-1, tensor.data.shape[-1])[:1]
        try:
            gguf.quants.dequantize(row, tensor.tensor_type)
        except NotImplementedError:
            raise InfermeterError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, "
                                  "which the gguf package cannot dequantize "
                                  "(pip install -U gguf may)") from None


def _parts(tensor: Any) -> list[Any]:
    """The reader tensors a _match_names entry stands for: itself, or the older layout's
    experts."""
    return tensor if isinstance(tensor, list) else [tensor]


def _checked_tensors(path: Path, reader: Any, spec: ModelSpec,
                     expected: dict[str, torch.Size]) -> dict[str, Any]:
    """_match_names' answer once every tensor's shape (from the file's tensor descriptions) is
    what the metadata implies and every quant type can be dequantized (_check_types): all of
    it before any weight is read."""
    by_meta = _match_names(path, reader, spec, expected)
    shapes = tensor_shapes(reader)
    for name, shape in expected.items():
        want = tuple(shape[1:]) if isinstance(by_meta[name], list) else tuple(shape)
        for part in _parts(by_meta[name]):
            if shapes[part.name] != want:
                raise InfermeterError(f"{path}: tensor {part.name} has shape "
                                      f"{list(shapes[part.name])}, the metadata implies "
                                      f"{list(want)}")
    _check_types(path, [part for name in expected for part in _parts(by_meta[name])])
    return by_meta


def check_gguf_tensors(path: Path, spec: ModelSpec, expected: dict[str, torch.Size]) -> None:
    """read_gguf_tensors' checks alone (names and shapes from the tensor descriptions, one row
    of each quant type): an error for a file it would refuse, before any work."""
    _checked_tensors(path, open_gguf(path), spec, expected)


def read_gguf_tensors(path: Path, spec: ModelSpec, expected: dict[str, torch.Size],
                      shard: ShardPlan | None = None) -> Iterator[tuple[str, Tensor]]:
    """Yield (Meta name, float32 CPU tensor in Meta layout) for every name in `expected`.

    shard (tensor parallel): the whole tensor is dequantized (blocks run along a row), then the
    rank keeps its slice (a copy, so the full tensor's memory goes with it).
    """
    by_meta = _checked_tensors(path, open_gguf(path), spec, expected)
    for name in expected:
        tensor = by_meta[name]
        out = torch.from_numpy(np.stack([dequantize(part) for part in tensor])
                               if isinstance(tensor, list) else dequantize(tensor))
        heads = rope_heads(name, spec)
        if heads is not None and spec.arch in _HF_ROW_ORDER:
            out = unpermute(out, heads)
        if spec.arch in GEMMA_ARCHS and name.endswith("norm.weight"):
            out -= 1.0  # stored as 1 + w
        if shard is not None and shard.slice_of(name) is not None:
            out = shard.narrow(name, out).clone()
        yield name, out
