"""HF safetensors checkpoints: name map, rotary permutation, sharding, random weights, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from infermeter.engine.checkpoint.hf import INDEX_FILE, hf_to_meta_name, permute, unpermute
from infermeter.engine.checkpoint.load import (
    check_checkpoint,
    load_model,
    load_weights,
    save_checkpoint,
)
from infermeter.engine.model import build_model
from infermeter.errors import InfermeterError
from infermeter.specs.model import RopeScaling
from infermeter.specs.presets import PRESETS
from tests.checkpoint_errors import check_error

DEBUG = PRESETS["debug"]
SPECS = {
    "llama-gqa": DEBUG,
    "llama31": DEBUG.with_updates(rope_theta=500000.0,
                                  rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64)),
    "qwen2-tied": DEBUG.with_updates(arch="qwen2", qkv_bias=True, tie_embeddings=True,
                                     norm_eps=1e-6),
    "mistral": DEBUG.with_updates(arch="mistral", sliding_window=8, sliding_window_layers=(0, 1)),
}


def _hf_permute_reference(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf.py permute(), verbatim in shape logic."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def _same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_permutation_matches_transformers_and_inverts() -> None:
    w = torch.randn(4 * 16, 64)
    assert torch.equal(permute(w, 4), _hf_permute_reference(w, 4))
    assert torch.equal(unpermute(permute(w, 4), 4), w)
    bias = torch.randn(2 * 16)
    assert torch.equal(unpermute(permute(bias, 2), 2), bias)
    assert torch.equal(permute(bias, 2), _hf_permute_reference(bias[:, None], 2)[:, 0])


def test_name_map() -> None:
    assert hf_to_meta_name("model.layers.7.self_attn.q_proj.bias") == "layers.7.attention.wq.bias"
    gate = hf_to_meta_name("model.layers.0.mlp.gate_proj.weight")
    assert gate == "layers.0.feed_forward.w1.weight"
    assert hf_to_meta_name("model.layers.0.post_attention_layernorm.weight") == \
        "layers.0.ffn_norm.weight"
    assert hf_to_meta_name("lm_head.weight") == "output.weight"
    assert hf_to_meta_name("model.layers.0.block_sparse_moe.gate.weight") is None


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("n_shards", [1, 3])
def test_round_trip(name: str, n_shards: int, tmp_path) -> None:
    spec = SPECS[name]
    source = build_model(spec)
    save_checkpoint(source, tmp_path, "hf", n_shards=n_shards)
    assert (tmp_path / INDEX_FILE).is_file() == (n_shards > 1)
    check_checkpoint(tmp_path)  # what loads passes the check (tied: no lm_head in the files)
    loaded = load_weights(tmp_path)
    assert loaded.spec == spec.with_updates(name=tmp_path.name)
    _same_state(loaded, source)
    if spec.tie_embeddings:
        assert loaded.output.weight is loaded.tok_embeddings.weight
        files = tmp_path.glob("*.safetensors")
        assert not any("lm_head.weight" in load_file(path) for path in files)


@torch.inference_mode()
def test_written_checkpoint_runs_in_transformers(tmp_path) -> None:
    """Our writer's permutation is HF's: transformers gives our logits for our files."""
    transformers = pytest.importorskip("transformers")
    source = build_model(SPECS["qwen2-tied"])
    with torch.no_grad():  # non-trivial q/k biases, so their permutation matters
        for layer in source.layers:
            layer.attention.wq.bias.normal_(0, 0.5)
            layer.attention.wk.bias.normal_(0, 0.5)
    save_checkpoint(source, tmp_path, "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    tokens = torch.randint(0, DEBUG.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    source.setup_cache(1, 12)
    assert (hf(tokens).logits - source(tokens, torch.arange(12))).abs().max() < 1e-4


def test_random_sources_are_seeded(tmp_path) -> None:
    a = load_model("random:debug", max_batch_size=1, max_seq_len=8, seed=3)
    b = load_model(DEBUG, max_batch_size=1, max_seq_len=8, seed=3)
    c = load_model("random:debug", max_batch_size=1, max_seq_len=8, seed=4)
    _same_state(a, b)
    assert not torch.equal(a.output.weight, c.output.weight)
    assert a.cache_bytes() == 2 * 2 * 2 * 16 * 8 * 4  # K+V, 2 layers, 2 heads, 16 dims, 8 tokens
    save_checkpoint(a, tmp_path, "hf")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(InfermeterError, match="config.json but no weights; use random:"):
        load_weights(tmp_path)
    spec = load_model(f"random:{tmp_path}", max_seq_len=8).spec
    assert spec.dim == DEBUG.dim


def _write_config(folder, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def folder(tmp_path):
    save_checkpoint(build_model(DEBUG), tmp_path / "ckpt", "hf")
    return tmp_path / "ckpt"


@pytest.mark.parametrize(("model_type", "message"), [
    ("phi3", "architecture 'phi3' can be sized but not run"),
    ("made_up_lm", "unsupported model_type 'made_up_lm'"),
])
def test_unsupported_architecture(folder, model_type: str, message: str) -> None:
    _write_config(folder, model_type=model_type)
    with pytest.raises(InfermeterError, match=message):
        load_weights(folder)


def test_check_checkpoint_leaves_an_architecture_the_engine_cannot_run_to_the_stages(
        folder) -> None:
    """kv still sizes such a model in run (check_checkpoint passes it, even with a tensor
    missing), while loading it is the engine's one line."""
    _write_config(folder, model_type="phi3")
    path = folder / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path)
    check_checkpoint(folder)
    with pytest.raises(InfermeterError, match="can be sized but not run"):
        load_weights(folder)


def test_check_checkpoint_leaves_a_rope_the_engine_cannot_run_to_the_stages(folder) -> None:
    """A RoPE scaling the engine lacks is build_model's line, which the stages give; kv still
    sizes the model."""
    _write_config(folder, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    check_checkpoint(folder)
    with pytest.raises(InfermeterError, match="RoPE scaling 'dynamic' is not supported"):
        load_weights(folder)


@pytest.mark.parametrize("how", ["empty file", "empty index"])
def test_safetensors_without_tensors_is_one_line(folder, how) -> None:
    if how == "empty file":
        save_file({}, folder / "model.safetensors")
    else:
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    for call in (check_checkpoint, load_weights):
        with pytest.raises(InfermeterError, match="safetensors files hold no tensors"):
            call(folder)


def test_missing_tensor_and_wrong_shape(folder) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(InfermeterError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        load_weights(folder)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(176, 64)
    save_file(tensors, path)
    _write_config(folder, intermediate_size=192)
    with pytest.raises(InfermeterError, match=r"model.layers.0.mlp.gate_proj.weight has shape "
                                              r"\[176, 64\], config.json implies \[192, 64\]"):
        load_weights(folder)


def _no_tensor_data(monkeypatch) -> None:
    """Reading a tensor's data (hf._read) fails the test: the check reads headers only."""
    def read(*args):
        raise AssertionError("tensor data read")
    monkeypatch.setattr("infermeter.engine.checkpoint.hf._read", read)


def test_check_checkpoint_refuses_a_missing_or_misshapen_tensor_from_headers(
        folder, monkeypatch) -> None:
    """`run` calls it before its first stage: such a checkpoint failed only in generate."""
    _no_tensor_data(monkeypatch)
    check_checkpoint(folder)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    up = tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, path)
    assert check_error(folder) == f"{folder}: missing tensor model.layers.1.mlp.up_proj.weight"
    tensors["model.layers.1.mlp.up_proj.weight"] = up[:, :32].contiguous()
    save_file(tensors, path)
    assert check_error(folder) == (f"{path}: tensor model.layers.1.mlp.up_proj.weight has "
                                    "shape [176, 32], config.json implies [176, 64]")
    tensors["model.layers.1.mlp.up_proj.weight"] = up
    tensors["model.layers.2.mlp.up_proj.weight"] = up.clone()
    save_file(tensors, path)
    assert "unexpected tensor model.layers.2.mlp.up_proj.weight" in check_error(folder)


def test_check_checkpoint_takes_an_expert_s_shape_from_its_stacked_tensor(tmp_path,
                                                                          monkeypatch) -> None:
    spec = DEBUG.with_updates(arch="qwen3_moe", qk_norm=True, n_experts=4, n_active_experts=2,
                              moe_ffn_dim=48, norm_topk_prob=True)
    save_checkpoint(build_model(spec), tmp_path, "hf")
    _no_tensor_data(monkeypatch)
    check_checkpoint(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    tensors[name] = tensors[name][:40].contiguous()
    save_file(tensors, path)
    assert check_error(tmp_path) == (f"{path}: tensor {name} has shape [40, 64], config.json "
                                      "implies [48, 64]")


@pytest.mark.parametrize("lm_head", [False, True])
def test_check_checkpoint_takes_a_tied_model_with_or_without_lm_head(tmp_path, lm_head) -> None:
    """As the loader: a tied model needs no lm_head and may keep one (a copy of the
    embedding); an untied one needs it."""
    save_checkpoint(build_model(SPECS["qwen2-tied"]), tmp_path, "hf")  # no lm_head
    path = tmp_path / "model.safetensors"
    if lm_head:
        tensors = load_file(path)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        save_file(tensors, path)
    check_checkpoint(tmp_path)
    load_weights(tmp_path)
    _write_config(tmp_path, tie_word_embeddings=False)
    if lm_head:
        check_checkpoint(tmp_path)
    else:
        assert check_error(tmp_path) == f"{tmp_path}: missing tensor lm_head.weight"


def test_unexpected_tensor_and_bad_index(folder) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.mlp.experts.0.weight"] = torch.zeros(2)
    save_file(tensors, path)
    with pytest.raises(InfermeterError, match="unexpected tensor model.layers.0.mlp.experts"):
        load_weights(folder)
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(InfermeterError, match="lists model-00002-of-00002.safetensors"):
        load_weights(folder)


def test_pickle_only_and_corrupt_weights_are_refused(folder) -> None:
    shutil.move(folder / "model.safetensors", folder / "pytorch_model.bin")
    with pytest.raises(InfermeterError, match="safetensors only"):
        load_weights(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(InfermeterError, match="cannot read as safetensors"):
        load_weights(folder)


def test_not_a_checkpoint(tmp_path) -> None:
    with pytest.raises(InfermeterError, match="no config.json"):
        load_weights(tmp_path)
    with pytest.raises(InfermeterError, match="nope: no such checkpoint folder or GGUF file"):
        load_weights(tmp_path / "nope")


def test_index_pointing_at_the_wrong_shard(tmp_path) -> None:
    save_checkpoint(build_model(DEBUG), tmp_path, "hf", n_shards=2)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(InfermeterError, match=f"{files[1]}: has no tensor {name}"):
        load_weights(tmp_path)
