"""Meta checkpoints: shards merge to the same model; bad folders give one clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from infermeter.engine.checkpoint.load import (
    check_checkpoint,
    load_model,
    load_weights,
    save_checkpoint,
)
from infermeter.engine.checkpoint.meta import load_pth, shard_for_rank, split_dim
from infermeter.engine.model import build_model
from infermeter.errors import InfermeterError
from infermeter.specs.presets import PRESETS
from tests.checkpoint_errors import check_error

# GQA with 4 query heads and 2 KV heads, so a 2-shard checkpoint splits the KV heads too.
SPEC = PRESETS["debug"].with_updates(name="meta-test")


class NotATensor:  # a custom class makes a pickle that weights_only=True must refuse
    def __reduce__(self):
        return (print, ("this would run on load",))


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return build_model(SPEC)


@pytest.fixture(scope="module")
def folders(source, tmp_path_factory):
    out = {}
    for n in (1, 2):
        folder = tmp_path_factory.mktemp(f"meta{n}")
        save_checkpoint(source, folder, "meta", n_shards=n)
        out[n] = folder
    return out


def _copy(folder, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(folder, target)
    return target


def test_split_dims_follow_fairscale() -> None:
    assert split_dim("layers.3.attention.wq.weight") == 0
    assert split_dim("layers.3.attention.wk.bias") == 0
    assert split_dim("layers.3.feed_forward.w3.weight") == 0
    assert split_dim("output.weight") == 0
    assert split_dim("layers.3.attention.wo.weight") == 1
    assert split_dim("layers.3.feed_forward.w2.weight") == 1
    assert split_dim("tok_embeddings.weight") == 1
    assert split_dim("layers.3.attention_norm.weight") is None
    assert split_dim("norm.weight") is None


@torch.inference_mode()
def test_one_and_two_shards_load_to_the_same_state_and_logits(source, folders) -> None:
    shard = torch.load(folders[2] / "consolidated.01.pth", weights_only=True)
    assert shard["layers.0.attention.wk.weight"].shape == (16, 64)  # 1 of 2 KV heads x 16
    assert shard["layers.0.attention.wo.weight"].shape == (64, 32)
    assert shard["tok_embeddings.weight"].shape == (256, 32)
    one, two = load_weights(folders[1]), load_weights(folders[2])
    for name, tensor in source.state_dict().items():
        assert torch.equal(one.state_dict()[name], tensor), name
        assert torch.equal(two.state_dict()[name], tensor), name
    tokens = torch.randint(0, SPEC.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = []
    for model in (one, two):
        model.setup_cache(2, 16)
        logits.append(model(tokens, torch.arange(12)))
    assert torch.equal(logits[0], logits[1])


def test_shard_for_rank_inverts_the_merge(source) -> None:
    weight = source.state_dict()["layers.1.attention.wo.weight"]
    parts = [shard_for_rank(weight, "layers.1.attention.wo.weight", r, 2) for r in range(2)]
    assert torch.equal(torch.cat(parts, dim=1), weight)


def test_load_model_dtype_and_spec(folders) -> None:
    model = load_model(folders[2], dtype="bf16", max_batch_size=1, max_seq_len=8, kv_dtype="fp16")
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model.cache_dtype == torch.float16
    assert (model.spec.n_kv_heads, model.spec.ffn_dim, model.spec.vocab_size) == (2, 176, 256)
    assert not model.tok_embeddings.weight.requires_grad


def test_missing_shard(folders, tmp_path) -> None:
    folder = _copy(folders[2], tmp_path)
    shutil.copy(folder / "consolidated.01.pth", folder / "consolidated.02.pth")
    (folder / "consolidated.01.pth").unlink()
    with pytest.raises(InfermeterError, match=r"missing shard consolidated\.01\.pth"):
        load_weights(folder)


def test_shard_count_that_does_not_divide_heads(folders, tmp_path) -> None:
    folder = _copy(folders[1], tmp_path)
    for i in (1, 2):
        shutil.copy(folder / "consolidated.00.pth", folder / f"consolidated.{i:02d}.pth")
    with pytest.raises(InfermeterError, match="3 shards do not divide .*attention heads"):
        load_weights(folder)


def test_shapes_that_do_not_match_params(folders, tmp_path) -> None:
    folder = _copy(folders[2], tmp_path)
    params = json.loads((folder / "params.json").read_text())
    params["n_kv_heads"] = 4  # the shards hold 2 KV heads' worth of wk / wv
    (folder / "params.json").write_text(json.dumps(params))
    with pytest.raises(InfermeterError,
                       match=r"consolidated\.00\.pth: tensor layers\.0\.attention\.wk\.weight "
                             r"has shape \[16, 64\], but params.json implies \[32, 64\]"):
        load_weights(folder)


def test_missing_and_unexpected_tensors(folders, tmp_path) -> None:
    folder = _copy(folders[1], tmp_path)
    path = folder / "consolidated.00.pth"
    state = torch.load(path, weights_only=True)
    state["rope.freqs"] = torch.zeros(8)  # old checkpoints carry this: ignored
    state["layers.2.ffn_norm.weight"] = torch.ones(64)
    torch.save(state, path)
    with pytest.raises(InfermeterError, match="unexpected tensor layers.2.ffn_norm.weight"):
        load_weights(folder)
    del state["layers.2.ffn_norm.weight"], state["norm.weight"]
    torch.save(state, path)
    with pytest.raises(InfermeterError, match="consolidated.00.pth: missing tensor norm.weight"):
        load_weights(folder)


def test_check_checkpoint_refuses_a_missing_or_misshapen_tensor(folders, tmp_path) -> None:
    """`run` calls it before its first stage (such a checkpoint failed only in generate): every
    shard's names and shapes, read through torch.load's mmap."""
    for folder in folders.values():
        check_checkpoint(folder)
    folder = _copy(folders[2], tmp_path)
    path = folder / "consolidated.01.pth"
    state = torch.load(path, weights_only=True)
    wk = state.pop("layers.1.attention.wk.weight")
    torch.save(state, path)
    assert check_error(folder) == f"{path}: missing tensor layers.1.attention.wk.weight"
    state["layers.1.attention.wk.weight"] = wk[:8].clone()
    torch.save(state, path)
    assert check_error(folder) == (
        f"{path}: tensor layers.1.attention.wk.weight has shape [8, 64], but params.json "
        "implies [16, 64] per shard (2 shard(s), full [32, 64])")


def test_pickle_needing_code_execution_is_refused(folders, tmp_path, capsys) -> None:
    folder = _copy(folders[1], tmp_path)
    path = folder / "consolidated.00.pth"
    state = torch.load(path, weights_only=True)
    state["evil"] = NotATensor()
    torch.save(state, path)
    with pytest.raises(InfermeterError, match="needs arbitrary code execution"):
        load_pth(path)
    with pytest.raises(InfermeterError, match="refused"):
        load_weights(folder)
    assert "this would run on load" not in capsys.readouterr().out


def test_corrupt_shard_and_empty_folder(folders, tmp_path) -> None:
    folder = _copy(folders[1], tmp_path)
    (folder / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InfermeterError, match="cannot read as a PyTorch checkpoint"):
        load_weights(folder)
    (folder / "consolidated.00.pth").unlink()
    with pytest.raises(InfermeterError, match="no consolidated.NN.pth shards"):
        load_weights(folder)
