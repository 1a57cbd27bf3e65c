"""GGUF files of the other architectures the engine runs, written here with the gguf package's
writer as llama.cpp's converter lays them out: Qwen3 (q/k norms, HF row order), Gemma 2 and 3
(norms stored as 1 + w, window layers, soft caps, Gemma 3's local RoPE base), Mixtral ("llama"
with experts) and Qwen3-MoE (stacked experts and a router). Each loads to the same weights and
greedy tokens as the same weights in safetensors, in F32 and Q8_0; Qwen3 and Qwen3-MoE also read
as transformers reads them; a missing expert or norm is one error line; kv sizes them. gpt-oss
(written from transformers' GptOssForCausalLM as llama.cpp's converter splits and names it, F32
and with MXFP4 experts) gives transformers' logits and greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch

from infermeter.cli import main
from infermeter.engine.checkpoint.load import load_weights
from infermeter.engine.model import build_model
from infermeter.errors import InfermeterError
from infermeter.specs import sizes
from infermeter.specs.gguf_meta import gguf_facts, spec_from_gguf
from infermeter.specs.loaders import spec_from_hf_config
from infermeter.specs.presets import PRESETS
from tests.gguf_files import (
    MXFP4,
    assert_loads_as_safetensors,
    assert_transformers_reads_gguf,
    gguf,
    mxfp4_round,
    round_to,
    write_gguf,
    write_gpt_oss_gguf,
)
from tests.hf_reference import assert_matches_transformers, tiny_hf_model

# ffn 128, head_dim 32, dim 64: every row a whole number of Q8_0's 32-value blocks
BASE = PRESETS["debug"].with_updates(ffn_dim=128, head_dim=32, norm_eps=1e-6)
GEMMA = BASE.with_updates(norms_per_layer=4, tie_embeddings=True, sliding_window=6,
                          query_pre_attn_scalar=32.0)
SPECS = {
    "qwen3": BASE.with_updates(arch="qwen3", qk_norm=True, rope_theta=1000000.0,
                               tie_embeddings=True),
    # layers 0 and 2 slide; query scalar = head_dim (llama.cpp's rule below 46 layers)
    "gemma2": GEMMA.with_updates(arch="gemma2", n_layers=3, sliding_window_layers=(0, 2),
                                 attn_logit_softcap=50.0, final_logit_softcap=30.0),
    # 7 layers: 0-4 and 6 slide, 5 is global; the local RoPE base apart from the global one
    "gemma3": GEMMA.with_updates(arch="gemma3_text", n_layers=7, qk_norm=True,
                                 sliding_window_layers=(0, 1, 2, 3, 4, 6), rope_theta=1000000.0,
                                 rope_local_theta=10000.0),
    "mixtral": BASE.with_updates(arch="mixtral", n_experts=4, n_active_experts=2,
                                 moe_ffn_dim=128),
    "qwen3_moe": BASE.with_updates(arch="qwen3_moe", qk_norm=True, n_experts=8,
                                   n_active_experts=2, moe_ffn_dim=64, rope_theta=1000000.0),
}
PROMPT = [[5, 17, 42, 99, 3, 250, 7, 8, 9]]  # 9 tokens: past the 6-token window


def _source(name: str, quant: str = "F32", **changes):
    """SPECS[name] (with `changes`), seeded random weights with norms apart from their identity
    (Gemma's around 0, the others' around 1) and a wide router, rounded to what `quant`
    stores."""
    spec = SPECS[name].with_updates(**changes)
    model = build_model(spec, seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("norm.weight"):
                param.normal_(0.0 if spec.arch.startswith("gemma") else 1.0, 0.2, generator=gen)
            elif key.endswith("feed_forward.gate.weight"):
                param.normal_(0.0, 1.0, generator=gen)
    round_to(model, quant)
    return model


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
@pytest.mark.parametrize("name", list(SPECS))
def test_gguf_loads_as_the_same_weights_in_safetensors(name, quant, tmp_path) -> None:
    assert_loads_as_safetensors(_source(name, quant), tmp_path / f"{name}.gguf", quant, PROMPT,
                                10)


# transformers' GGUF configs leave some fields at their config classes' defaults: Qwen3's
# head_dim (128), Qwen3-MoE's expert width (768), Gemma's query scalar (256, so head_dim 256 by
# llama.cpp's rule) and Gemma 2's caps (50, 30). The files compared with it have those.
FOR_TRANSFORMERS = {"qwen3": {"head_dim": 128}, "qwen3_moe": {"moe_ffn_dim": 768},
                    "gemma2": {"head_dim": 256, "query_pre_attn_scalar": 256.0},
                    "gemma3": {"head_dim": 256, "query_pre_attn_scalar": 256.0}}


@pytest.mark.parametrize("name", list(FOR_TRANSFORMERS))
@torch.inference_mode()
def test_gguf_reads_as_transformers_reads_it(name, tmp_path) -> None:
    """transformers' own GGUF loader gives the engine's logits: llama.cpp's HF row order of q, k
    and the q/k norms, its stacked experts, Gemma's norms stored as 1 + w."""
    assert_transformers_reads_gguf(
        write_gguf(_source(name, **FOR_TRANSFORMERS[name]), tmp_path / "m.gguf"), PROMPT)


@pytest.mark.parametrize(("pattern", "slides"), [
    ([i % 3 < 2 for i in range(62)], lambda i: i % 3 < 2),  # a flag a layer
    (3, lambda i: i % 3 < 2),  # all but every third layer (llama.cpp's set_swa_pattern)
    (0, lambda i: True)])  # llama.cpp's 0: every layer slides
def test_gemma_metadata_follows_llama_cpp(tmp_path, pattern, slides) -> None:
    """What llama.cpp fixes in code: a 62-layer Gemma 3 is the 27B, whose query scalar is
    dim / heads; a file's own pattern and local base win over the defaults."""
    spec = SPECS["gemma3"]
    path = write_gguf(_source("gemma3"), tmp_path / "g.gguf")
    assert spec_from_gguf(path).with_updates(name="x") == spec.with_updates(
        name="x", torch_dtype="bfloat16", max_seq_len=spec.max_seq_len)
    writer = gguf.GGUFWriter(str(tmp_path / "big.gguf"), "gemma3")
    for add, value in ((writer.add_block_count, 62), (writer.add_embedding_length, 5376),
                       (writer.add_head_count, 32), (writer.add_head_count_kv, 16),
                       (writer.add_key_length, 128), (writer.add_feed_forward_length, 21504),
                       (writer.add_sliding_window, 1024), (writer.add_rope_freq_base, 1e6),
                       (writer.add_rope_freq_base_swa, 20000.0),
                       (writer.add_sliding_window_pattern, pattern)):
        add(value)
    writer.add_tensor("token_embd.weight", torch.zeros(8, 5376).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    big = spec_from_gguf(tmp_path / "big.gguf")
    assert big.query_pre_attn_scalar == 168.0 and big.rope_local_theta == 20000.0
    assert big.sliding_window_layers == tuple(i for i in range(62) if slides(i))


@pytest.mark.parametrize(("name", "dropped"), [("mixtral", "blk.1.ffn_up_exps.weight"),
                                               ("qwen3_moe", "blk.0.ffn_gate_inp.weight"),
                                               ("gemma3", "blk.2.attn_k_norm.weight"),
                                               ("gemma2", "blk.1.post_ffw_norm.weight")])
def test_a_missing_expert_or_norm_is_one_line(name, dropped, tmp_path, capsys) -> None:
    path = write_gguf(_source(name), tmp_path / "m.gguf", drop=(dropped,))
    with pytest.raises(InfermeterError, match=rf"missing tensor {dropped.replace('.', '[.]')}$"):
        load_weights(path)
    assert main(["generate", "--checkpoint", str(path), "--device", "cpu",
                 "--prompt-ids", "1,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"missing tensor {dropped}" in err


@pytest.mark.parametrize("name", ["gemma3", "qwen3_moe"])
def test_kv_sizes_the_file(name, tmp_path, capsys) -> None:
    """Gemma 3's window layers hold 6 tokens; Qwen3-MoE's active weights are 2 of 8 experts."""
    path = write_gguf(_source(name), tmp_path / "m.gguf")
    assert main(["kv", "--model", str(path), "--seq-len", "64", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.splitlines()[0])["metrics"]
    spec = SPECS[name]
    assert metrics["kv_cache_bytes"] == sizes.kv_cache_bytes(spec, 1, 64, "bfloat16")
    assert metrics["weight_bytes_active"] == sizes.weight_bytes(spec, "bfloat16", active=True)
    if name == "gemma3":  # 6 window layers of 6 tokens, 1 global of 64; K and V; 2 x 32
        assert metrics["kv_cache_bytes"] == (6 * 6 + 64) * 2 * 2 * 32 * 2
    else:
        assert metrics["weight_bytes_active"] < metrics["weight_bytes"]


def _gpt_oss(folder, mxfp4: bool = False):
    """tests/test_gpt_oss.py's tiny GptOssForCausalLM (sinks, biases, YaRN, a window on layer 0,
    clamped experts), widened to 32-value MXFP4 blocks along each expert row (dim and ffn 32);
    mxfp4: its experts' matrices rounded to what MXFP4 stores."""
    transformers = pytest.importorskip("transformers")
    from tests.test_gpt_oss import CONFIG, _spread

    hf = tiny_hf_model(folder, transformers.GptOssConfig(**CONFIG),
                       transformers.GptOssForCausalLM, _spread)
    if mxfp4:  # rows of the files' [E, out, in] layout: the HF [E, in, out]'s columns
        with torch.no_grad():
            for layer in hf.model.layers:
                for weight in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                    weight.copy_(mxfp4_round(weight.transpose(-1, -2)).transpose(-1, -2))
        hf.save_pretrained(folder)
    return hf


@pytest.mark.parametrize("mxfp4", [False, True], ids=["F32", "MXFP4"])
@torch.inference_mode()
def test_gpt_oss_gguf_equals_transformers(mxfp4, tmp_path) -> None:
    """The file's spec is the HF config's (window layers, sinks, biases, SwiGLU clamp, YaRN
    betas and no truncation fixed in code); the logits over 40 tokens within 1e-4 and greedy
    tokens after 1, 5 and 17 (past the window) equal transformers' on the same weights."""
    from tests.test_gpt_oss import VOCAB

    hf = _gpt_oss(tmp_path / "hf", mxfp4)
    path = write_gpt_oss_gguf(hf, tmp_path / "gpt-oss.gguf", mxfp4)
    spec = spec_from_gguf(path)
    assert spec.with_updates(name="x", torch_dtype="x") == spec_from_hf_config(
        tmp_path / "hf" / "config.json").with_updates(name="x", torch_dtype="x")
    assert (spec.sliding_window_layers, spec.swiglu_limit) == ((0,), 7.0)
    assert gguf_facts(path).quant_type == ("MXFP4_MOE" if mxfp4 else "F32")
    model = load_weights(path)
    model.setup_cache(2, 64)
    assert_matches_transformers(model, hf, VOCAB, 10)


def test_gpt_oss_mxfp4_experts_read_as_gguf_dequantizes_them(tmp_path) -> None:
    """Each MXFP4 expert tensor loads as gguf's own dequantize of the file's blocks, and the
    rounding kept the weights apart from the F32 ones (so MXFP4 was really read)."""
    hf = _gpt_oss(tmp_path / "hf")
    path = write_gpt_oss_gguf(hf, tmp_path / "m.gguf", mxfp4=True)
    reader = gguf.GGUFReader(str(path))
    blocks = {t.name: t for t in reader.tensors if t.tensor_type == MXFP4}
    assert sorted(blocks) == sorted(f"blk.{i}.ffn_{p}_exps.weight"
                                    for i in range(2) for p in ("gate", "up", "down"))
    state = load_weights(path).state_dict()
    experts = hf.model.layers[1].mlp.experts
    for part, meta in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
        tensor = blocks[f"blk.1.ffn_{part}_exps.weight"]
        expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, MXFP4).copy())
        assert torch.equal(state[f"layers.1.feed_forward.{meta}.weight"], expected), part
    assert not torch.equal(state["layers.1.feed_forward.w2.weight"],
                           experts.down_proj.detach().transpose(-1, -2))
