"""GGUF checkpoints (llama.cpp) written here with the gguf package's writer: random small Llama and
Qwen2 models in F32 / F16 / Q8_0 load to the same weights and greedy tokens as the same weights in
safetensors; kv reads the shape and both sizes; bad files are one error line."""

from __future__ import annotations

import json
import math
import struct
import sys

import numpy as np
import pytest
import torch

from infermeter.cli import main
from infermeter.engine.checkpoint.load import check_checkpoint, load_weights
from infermeter.engine.model import build_model
from infermeter.errors import InfermeterError
from infermeter.specs.gguf_meta import spec_from_gguf
from infermeter.specs.model import RopeScaling
from infermeter.specs.presets import PRESETS
from tests.checkpoint_errors import check_error
from tests.gguf_files import (
    assert_loads_as_safetensors,
    assert_transformers_reads_gguf,
    gguf,
    round_to,
    write_gguf,
)

# ffn 128: Q8_0 packs blocks of 32 values along every row
LLAMA = PRESETS["debug"].with_updates(ffn_dim=128)
SPECS = {
    "llama": LLAMA,
    "llama-tied": LLAMA.with_updates(tie_embeddings=True),
    "qwen2": LLAMA.with_updates(arch="qwen2", qkv_bias=True, tie_embeddings=True, norm_eps=1e-6),
}
PROMPT = [[5, 17, 42, 99, 3, 250]]


def _source(name: str, quant: str):
    model = build_model(SPECS[name], seed=1)
    if SPECS[name].qkv_bias:  # non-trivial biases, so their row order matters
        with torch.no_grad():
            for layer in model.layers:
                for bias in (layer.attention.wq.bias, layer.attention.wk.bias):
                    bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    round_to(model, quant)
    return model


@pytest.mark.parametrize(("name", "quant"), [("llama", "F32"), ("llama", "Q8_0"),
                                             ("llama-tied", "F16"), ("qwen2", "F16"),
                                             ("qwen2", "Q8_0")])
def test_gguf_loads_as_the_same_weights_in_safetensors(name, quant, tmp_path) -> None:
    from_gguf = assert_loads_as_safetensors(_source(name, quant), tmp_path / f"{name}.gguf",
                                            quant, PROMPT, 12)
    assert from_gguf.spec.name == name and from_gguf.spec.torch_dtype == "bfloat16"
    if SPECS[name].tie_embeddings:
        assert from_gguf.output.weight is from_gguf.tok_embeddings.weight


@torch.inference_mode()
def test_qwen2_gguf_reads_as_transformers_reads_it(tmp_path) -> None:
    """transformers' own GGUF loader on our Qwen2 file gives the engine's logits: the q/k row
    order (llama.cpp keeps Qwen2's HF order) and the biases are read the same way."""
    assert_transformers_reads_gguf(write_gguf(_source("qwen2", "F32"), tmp_path / "q.gguf"),
                                   PROMPT)


def test_llama31_rope_factors_read_back(tmp_path) -> None:
    """llama.cpp stores Llama 3.1's RoPE scaling as a rope_freqs tensor of divisors."""
    from infermeter.engine.rope import inv_frequencies

    scaled = LLAMA.with_updates(rope_theta=500000.0,
                                rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    plain = inv_frequencies(scaled.with_updates(rope_scaling=None))
    divisors = (plain / inv_frequencies(scaled)).numpy().astype(np.float32)
    model = build_model(scaled)
    path = write_gguf(model, tmp_path / "l31.gguf", extra={"rope_freqs.weight": divisors})
    spec = spec_from_gguf(path)
    assert spec.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert spec.rope_theta == 500000.0
    path = write_gguf(model, tmp_path / "odd.gguf",
                      extra={"rope_freqs.weight": divisors[::-1].copy()})
    with pytest.raises(InfermeterError, match="RoPE factors other than Llama 3.1's"):
        spec_from_gguf(path)


def _stored_bytes(path) -> int:
    """Every tensor's bytes as the format defines them: F32 4 a value, F16 2, Q8_0 34 a 32."""
    reader = gguf.GGUFReader(path)
    sizes = {"F32": (1, 4), "F16": (1, 2), "Q8_0": (32, 34)}
    total = 0
    for tensor in reader.tensors:
        block, size = sizes[tensor.tensor_type.name]
        total += math.prod(int(d) for d in tensor.shape) // block * size
    return total


def test_kv_reports_the_file_and_the_run_bytes(tmp_path, capsys) -> None:
    path = write_gguf(_source("llama", "Q8_0"), tmp_path / "m.gguf", "Q8_0")
    assert main(["kv", "--model", str(path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    spec = SPECS["llama"]
    assert result["metrics"]["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2  # K+V, layers, heads
    assert result["config"]["weight_format"] == "gguf Q8_0"
    assert result["metrics"]["weight_bytes_file"] == _stored_bytes(path)
    params = sum(p.numel() for p in build_model(spec).parameters())
    assert result["metrics"]["weight_bytes"] == 2 * params  # as run: bf16
    assert main(["kv", "--model", str(path)]) == 0
    assert "in the file (gguf Q8_0)" in capsys.readouterr().out


def test_generate_result_names_the_quant_type(tmp_path, capsys) -> None:
    path = write_gguf(_source("llama", "Q8_0"), tmp_path / "m.gguf", "Q8_0")
    assert main(["generate", "--checkpoint", str(path), "--prompt-ids", "1,2,3", "--device",
                 "cpu", "--max-new-tokens", "4", "--repeats", "1", "--warmup", "0",
                 "--no-roofline", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["config"]["weight_format"] == "gguf Q8_0"
    assert result["config"]["weights"] == "checkpoint"


# ---- bad files: one error line ----------------------------------------------------------------
@pytest.fixture
def good(tmp_path):
    return write_gguf(_source("llama", "F32"), tmp_path / "good.gguf")


def _patch_type(path, tensor_index: int, type_id: int) -> None:
    """Overwrite one tensor's ggml type id in the file's tensor descriptions."""
    field = gguf.GGUFReader(path).tensors[tensor_index].field
    at = field.offset + sum(int(part.nbytes) for part in field.parts[:4])  # name, dims, type
    data = bytearray(path.read_bytes())
    data[at:at + 4] = struct.pack("<I", type_id)
    path.write_bytes(bytes(data))


def _cli_error(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("infermeter: error: ")
    return err


def test_wrong_magic(good, capsys) -> None:
    good.write_bytes(b"GGML" + good.read_bytes()[4:])
    with pytest.raises(InfermeterError, match="not a GGUF file"):
        load_weights(good)
    assert "not a GGUF file" in _cli_error(["kv", "--model", str(good)], capsys)


@pytest.mark.parametrize("keep", [0.6, 0.001])  # in the tensors' data; in the metadata
def test_truncated_file(good, keep, capsys) -> None:
    data = good.read_bytes()
    good.write_bytes(data[:max(int(len(data) * keep), 100)])
    with pytest.raises(InfermeterError, match="truncated"):
        load_weights(good)
    assert "truncated" in _cli_error(["generate", "--checkpoint", str(good), "--device", "cpu",
                                      "--prompt-ids", "1,2"], capsys)


def test_unknown_quant_type(good) -> None:
    _patch_type(good, 0, 99)
    with pytest.raises(InfermeterError, match="quant type unknown to gguf"):
        load_weights(good)


def test_quant_type_the_reader_cannot_dequantize(tmp_path) -> None:
    """Q8_1 is a known type (llama.cpp's intermediate) that gguf has no dequantizer for: the
    error comes before any weight is read."""
    spec = SPECS["llama"]
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    raw = np.zeros((spec.ffn_dim, spec.dim // block * size), dtype=np.uint8)
    path = write_gguf(_source("llama", "F32"), tmp_path / "q81.gguf",
                      raw={"blk.1.ffn_up.weight": (raw, gguf.GGMLQuantizationType.Q8_1)})
    with pytest.raises(InfermeterError, match="blk.1.ffn_up.weight is Q8_1, which the gguf "
                                              "package cannot dequantize"):
        load_weights(path)


def test_missing_tensor(tmp_path) -> None:
    path = write_gguf(_source("llama", "F32"), tmp_path / "m.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(InfermeterError, match="missing tensor blk.1.ffn_up.weight"):
        load_weights(path)


def test_check_checkpoint_refuses_a_missing_or_misshapen_tensor(tmp_path, monkeypatch) -> None:
    """`run` calls it before its first stage (such a file failed only in generate): names and
    shapes from the tensor descriptions, no tensor dequantized."""
    def no_data(tensor):
        raise AssertionError(f"{tensor.name} dequantized")
    monkeypatch.setattr("infermeter.engine.checkpoint.gguf.dequantize", no_data)
    source = _source("llama", "F32")
    check_checkpoint(write_gguf(source, tmp_path / "good.gguf"))
    check_checkpoint(write_gguf(_source("llama-tied", "F16"), tmp_path / "tied.gguf"))
    missing = write_gguf(source, tmp_path / "missing.gguf", drop=("blk.1.ffn_up.weight",))
    assert check_error(missing) == f"{missing}: missing tensor blk.1.ffn_up.weight"
    misshapen = write_gguf(source, tmp_path / "misshapen.gguf", drop=("blk.1.ffn_up.weight",),
                           extra={"blk.1.ffn_up.weight": np.zeros((128, 32))})
    assert check_error(misshapen) == (f"{misshapen}: tensor blk.1.ffn_up.weight has shape "
                                       "[128, 32], the metadata implies [128, 64]")


def test_unsupported_architecture(tmp_path, capsys) -> None:
    path = write_gguf(_source("llama", "F32"), tmp_path / "m.gguf", arch="phi3")
    message = "GGUF architecture 'phi3' is not supported"
    with pytest.raises(InfermeterError, match=message):
        load_weights(path)
    assert message in _cli_error(["kv", "--model", str(path)], capsys)


# metadata values as config.json's fields are checked: key -> value written, and the error line
HEADS, DIM, EPS = "llama.attention.head_count", "llama.embedding_length", \
    "llama.attention.layer_norm_rms_epsilon"
BAD_KEYS = [
    ({HEADS: 0}, f"GGUF key {HEADS} must be a positive integer, got 0"),
    ({HEADS: 4.5}, f"GGUF key {HEADS} must be an integer, got 4.5"),
    ({HEADS: True}, f"GGUF key {HEADS} must be an integer, got True"),
    ({HEADS: [0, 0]}, f"GGUF key {HEADS} must be a positive integer, got 0"),  # per layer
    # a hybrid model's 0 on its layers without attention: what the engine lacks, said first
    ({HEADS: [0, 4]}, f"{HEADS} differs between layers ([0, 4]...); the engine needs one value "
                      "for every layer"),
    ({HEADS: ["4", "4"]}, f"GGUF key {HEADS} must be an integer, got '4'"),
    ({HEADS: [4, 2]}, f"{HEADS} differs between layers ([4, 2]...); the engine needs one value "
                      "for every layer"),
    ({DIM: "abc"}, f"GGUF key {DIM} must be an integer, got 'abc'"),
    ({DIM: [64, 64]}, f"GGUF key {DIM} must be an integer, got [64, 64]"),  # not a per-layer key
    ({"llama.context_length": -5}, "GGUF key llama.context_length must be a positive integer, "
                                   "got -5"),
    ({"llama.block_count": 100_000}, "GGUF key llama.block_count is 100,000, more layers than "
                                     "any model has (at most 10,000)"),
    ({HEADS: 3, "llama.attention.key_length": None},
     f"llama.embedding_length 64 is not a multiple of {HEADS} 3 and there is no "
     "llama.attention.key_length: the head size is unknown"),
    ({"llama.rope.freq_base": "x"}, "GGUF key llama.rope.freq_base must be a positive number, "
                                    "got 'x'"),
    ({"llama.rope.freq_base": math.nan}, "GGUF key llama.rope.freq_base must be a positive "
                                         "number, got nan"),
    ({EPS: "x"}, f"GGUF key {EPS} must be a positive number, got 'x'"),
    ({EPS: 0.0}, f"GGUF key {EPS} must be a positive number, got 0.0"),
    ({EPS: math.inf}, f"GGUF key {EPS} must be a positive number, got inf"),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": -1.0},
     "GGUF key llama.rope.scaling.factor must be a positive number, got -1.0"),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0,
      "llama.rope.scaling.original_context_length": 0},
     "GGUF key llama.rope.scaling.original_context_length must be a positive integer, got 0"),
    ({"general.file_type": "x"}, "GGUF key general.file_type must be an integer, got 'x'"),
]


@pytest.fixture(scope="module")
def llama_f32():
    return _source("llama", "F32")


@pytest.mark.parametrize(("keys", "message"), BAD_KEYS)
def test_bad_metadata_value(llama_f32, tmp_path, keys, message, capsys) -> None:
    """A count that is 0, not an integer or an array, a float that is not a positive number:
    one error line naming the key and the value, before any arithmetic uses it."""
    path = write_gguf(llama_f32, tmp_path / "m.gguf", keys=keys)
    assert _cli_error(["kv", "--model", str(path)], capsys) == \
        f"infermeter: error: {path}: {message}"


@pytest.mark.parametrize("heads", [4.0, [4, 4]])  # written as a float; one value a layer
def test_head_count_a_float_or_per_layer_reads_as_the_integer(llama_f32, tmp_path,
                                                              heads) -> None:
    path = write_gguf(llama_f32, tmp_path / "m.gguf", keys={HEADS: heads})
    assert spec_from_gguf(path).n_heads == 4


def test_without_the_gguf_package(good, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    good.write_bytes(good.read_bytes() + b"\0")  # a new size: not the cached reader
    with pytest.raises(InfermeterError, match="pip install gguf"):
        spec_from_gguf(good)
