"""GGUF files written by the tests with the gguf package's own writer (llama.cpp's layout): an
engine model's weights as F32 / F16 / Q8_0 tensors, the shape as llama.cpp's metadata keys, and
optionally a vocabulary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from infermeter.engine.checkpoint.gguf import meta_to_gguf_name
from infermeter.engine.checkpoint.hf import permute, rope_heads
from infermeter.engine.checkpoint.load import load_weights, save_checkpoint
from infermeter.engine.fusion import meta_state_dict
from infermeter.engine.generator import GenerationConfig, Generator
from infermeter.specs.gguf_meta import GGUF_ARCH
from infermeter.specs.model import GEMMA_ARCHS

gguf = pytest.importorskip("gguf")

QUANTS = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
          "Q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
              "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
MXFP4 = gguf.GGMLQuantizationType.MXFP4  # gpt-oss's experts (gguf 0.18 and later)


def as_stored(weight: torch.Tensor, quant: str) -> torch.Tensor:
    """What a tensor reads back as after being written in `quant` (1-D tensors stay F32)."""
    if weight.dim() == 1 or quant == "F32":
        return weight
    if quant == "F16":
        return weight.half().float()
    qtype = QUANTS[quant]
    blocks = gguf.quants.quantize(weight.numpy(), qtype)
    return torch.from_numpy(gguf.quants.dequantize(blocks, qtype).copy()).reshape(weight.shape)


@torch.no_grad()
def round_to(model: torch.nn.Module, quant: str) -> None:
    """Replace the model's weights by what `quant` stores, so a safetensors copy of the model
    and its GGUF hold the same numbers. Gemma's norms (stored as 1 + w) go to multiples of
    2 ** -12, which 1 + w and back keep exactly in float32."""
    gemma = model.spec.arch in GEMMA_ARCHS
    for name, tensor in model.state_dict().items():
        if tensor.dim() >= 2 and not (name == "output.weight" and model.spec.tie_embeddings):
            tensor.copy_(as_stored(tensor, quant))
        elif gemma and name.endswith("norm.weight"):
            tensor.copy_(torch.round(tensor * 4096) / 4096)


def write_gguf(model: torch.nn.Module, path: Path, quant: str = "F32", *,
               arch: str | None = None, drop: tuple[str, ...] = (),
               raw: dict[str, tuple[np.ndarray, int]] | None = None,
               extra: dict[str, np.ndarray] | None = None,
               keys: dict[str, Any] | None = None) -> Path:
    """`model`'s weights as a llama.cpp GGUF. drop: GGUF tensor names left out; raw: GGUF name ->
    (bytes [rows, bytes per row], ggml type id) written instead of the weight; extra: more F32
    tensors (rope_freqs.weight); keys: metadata key -> value written instead of the model's
    (its type from the Python value: int INT32, float FLOAT32, list ARRAY), None: left out."""
    spec = model.spec
    arch = arch or GGUF_ARCH[spec.arch]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(spec.name)
    writer.add_context_length(spec.max_seq_len)
    writer.add_embedding_length(spec.dim)
    writer.add_block_count(spec.n_layers)
    writer.add_feed_forward_length(spec.ffn_dim)
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(spec.n_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_vocab_size(spec.vocab_size)
    writer.add_file_type(FILE_TYPES[quant])
    if spec.sliding_window_layers:  # as llama.cpp's converter writes Gemma's
        writer.add_sliding_window(spec.sliding_window)
    for add, value in ((writer.add_attn_logit_softcapping, spec.attn_logit_softcap),
                       (writer.add_final_logit_softcapping, spec.final_logit_softcap)):
        if value is not None:
            add(value)
    if spec.rope_local_theta not in (None, 10000.0):  # llama.cpp's fixed Gemma 3 local base
        writer.add_rope_freq_base_swa(spec.rope_local_theta)
    if spec.is_moe:
        writer.add_expert_count(spec.n_experts)
        writer.add_expert_used_count(spec.n_active_experts)
        if spec.arch == "qwen3_moe":  # Mixtral's experts are feed_forward_length wide
            writer.add_expert_feed_forward_length(spec.moe_ffn_dim)
    for key, value in (keys or {}).items():
        writer.kv_data[0].pop(key, None)
        if isinstance(value, list):
            writer.add_array(key, value)
        elif value is not None:
            writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
    for name, tensor in meta_state_dict(model).items():
        if name == "output.weight" and spec.tie_embeddings:
            continue
        gguf_name = meta_to_gguf_name(name, tensor.dim() == 3)
        if gguf_name in drop:
            continue
        if raw and gguf_name in raw:
            data, type_id = raw[gguf_name]
            writer.add_tensor(gguf_name, data, raw_dtype=gguf.GGMLQuantizationType(type_id))
            continue
        tensor = tensor.detach().float().contiguous()
        heads = rope_heads(name, spec)
        if heads is not None and spec.arch not in ("llama", "mistral", "mixtral"):
            tensor = permute(tensor, heads)  # llama.cpp's neox RoPE keeps HF's row order
        if spec.arch in GEMMA_ARCHS and name.endswith("norm.weight"):
            tensor = tensor + 1  # llama.cpp's converter stores Gemma's norms as 1 + w
        array = tensor.numpy()
        if array.ndim == 1 or quant == "F32":
            writer.add_tensor(gguf_name, array.astype(np.float32))
        elif quant == "F16":
            writer.add_tensor(gguf_name, array.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, QUANTS[quant]),
                              raw_dtype=QUANTS[quant])
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_loads_as_safetensors(source: torch.nn.Module, path: Path, quant: str,
                                prompt: list[list[int]], new_tokens: int) -> torch.nn.Module:
    """`source` written as a GGUF at `path` in `quant` and as a safetensors checkpoint beside it
    (hf/): both load to the same spec (but its name and dtype), the same tensors and the same
    greedy tokens after `prompt`. Returns the model loaded from the GGUF."""
    save_checkpoint(source, path.parent / "hf", "hf")
    write_gguf(source, path, quant)
    from_gguf, from_hf = load_weights(path), load_weights(path.parent / "hf")
    assert from_gguf.spec.with_updates(name="x", torch_dtype="x") == \
        from_hf.spec.with_updates(name="x", torch_dtype="x")
    gguf_state, hf_state = from_gguf.state_dict(), from_hf.state_dict()
    assert gguf_state.keys() == hf_state.keys()
    for key in gguf_state:
        assert torch.equal(gguf_state[key], hf_state[key]), key
    greedy = [Generator(model, max_seq_len=32).generate(
        prompt, GenerationConfig(max_new_tokens=new_tokens)).output_token_ids
        for model in (from_gguf, from_hf)]
    assert greedy[0] == greedy[1], greedy
    return from_gguf


@torch.inference_mode()
def assert_transformers_reads_gguf(path: Path, prompt: list[list[int]]) -> None:
    """transformers' own GGUF loader on `path` gives the engine's logits over `prompt` [1, T]
    (within 1e-4); skips without transformers or accelerate (its GGUF loading needs it)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ours = load_weights(path)
    ours.setup_cache(1, 16)
    tokens = torch.tensor(prompt)
    logits = ours(tokens, torch.arange(tokens.shape[1]))
    assert (hf(tokens).logits - logits).abs().max() < 1e-4


def mxfp4_round(weight: torch.Tensor) -> torch.Tensor:
    """What `weight` [..., in] reads back as from MXFP4 (blocks of 32 along its last dim)."""
    blocks = gguf.quants.quantize(weight.numpy(), MXFP4)
    return torch.from_numpy(gguf.quants.dequantize(blocks, MXFP4).copy()).reshape(weight.shape)


def write_gpt_oss_gguf(hf: torch.nn.Module, path: Path, mxfp4: bool = False) -> Path:
    """transformers' GptOssForCausalLM `hf` as llama.cpp's converter (GptOssModel) writes it:
    gguf's own HF -> GGUF name map; the sinks as attn_sinks.weight; gate_up_proj [E, dim, 2 ffn]
    (gate and up columns interleaved) split into ffn_gate_exps / ffn_up_exps [E, ffn, dim], its
    bias likewise, down_proj transposed to [E, dim, ffn]; q/k as they are (HF's row order).
    mxfp4: the experts' matrices as MXFP4 blocks (what the published files hold), else F32."""
    config = hf.config
    writer = gguf.GGUFWriter(str(path), "gpt-oss")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.num_local_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_sliding_window(config.sliding_window)
    writer.add_expert_feed_forward_length(config.intermediate_size)
    rope = config.rope_parameters
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE if mxfp4
                         else gguf.LlamaFileType.ALL_F32)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, config.num_hidden_layers)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in hf.state_dict().items():
        tensor = tensor.detach().float()
        if name.endswith(".sinks"):
            tensors[names.get_name(name + ".weight", try_suffixes=(".weight",))] = tensor
        elif name.endswith("gate_up_proj"):  # [E, dim, 2 ffn] -> gate, up [E, ffn, dim]
            tensor = tensor.transpose(-1, -2)
            for part, rows in (("gate_proj", tensor[:, ::2]), ("up_proj", tensor[:, 1::2])):
                tensors[names.get_name(name.replace("gate_up_proj", part) + ".weight",
                                       try_suffixes=(".weight",))] = rows
        elif name.endswith("gate_up_proj_bias"):  # [E, 2 ffn] -> gate, up [E, ffn]
            for part, rows in (("gate_proj", tensor[..., ::2]), ("up_proj", tensor[..., 1::2])):
                tensors[names.get_name(name.replace("gate_up_proj_bias", part) + ".bias",
                                       try_suffixes=(".bias",))] = rows
        elif name.endswith("down_proj"):  # [E, ffn, dim] -> [E, dim, ffn]
            tensors[names.get_name(name + ".weight", try_suffixes=(".weight",))] = \
                tensor.transpose(-1, -2)
        elif name.endswith("down_proj_bias"):
            tensors[names.get_name(name.replace("_bias", ".bias"), try_suffixes=(".bias",))] \
                = tensor
        else:
            tensors[names.get_name(name, try_suffixes=(".weight", ".bias"))] = tensor
    for gguf_name, tensor in tensors.items():
        array = np.ascontiguousarray(tensor.numpy(), dtype=np.float32)
        if mxfp4 and gguf_name.endswith("_exps.weight"):
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, MXFP4), raw_dtype=MXFP4)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_vocab_gguf(path: Path, kind: str, tokens: list[str], types: list[int], *,
                     scores: list[float] | None = None, merges: list[str] | None = None,
                     pre: str | None = None, bos: int | None = None, eos: int | None = None,
                     unk: int | None = None, add_bos: bool | None = None,
                     template: str | None = None, arch: str = "llama", eot: int | None = None,
                     add_eos: bool | None = None, space_prefix: bool | None = None) -> Path:
    """A GGUF holding only a vocabulary (tokenizer.ggml.*) and optionally a chat template."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model(kind)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if merges is not None:
        writer.add_token_merges(merges)
    for add, value in ((writer.add_bos_token_id, bos), (writer.add_eos_token_id, eos),
                       (writer.add_unk_token_id, unk), (writer.add_add_bos_token, add_bos),
                       (writer.add_chat_template, template), (writer.add_eot_token_id, eot),
                       (writer.add_add_eos_token, add_eos),
                       (writer.add_add_space_prefix, space_prefix)):
        if value is not None:
            add(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
