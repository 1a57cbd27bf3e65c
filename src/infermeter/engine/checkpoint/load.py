"""One entry point for weights: `load_model(source, ...)` -> a ready Transformer with its cache.

source is one of
  - a ModelSpec, or "random:<anything --model accepts>" (a preset, a config.json/params.json or a
    folder): seeded random weights (random_weights.py);
  - a folder with config.json + *.safetensors: HF format (hf_checkpoint.py);
  - a folder with params.json + consolidated.NN.pth: Meta format (meta_checkpoint.py);
  - a .gguf file (llama.cpp): shape from its metadata, weights dequantized (checkpoint/gguf.py).
A folder with a config but no weights is an error that points at "random:" instead of silently
measuring random weights.

Memory: the model is built on the meta device (no storage), then each tensor is read (mmap'd),
converted to the target dtype/device and assigned (load_state_dict(assign=True)) before the next
one is read. Host memory therefore peaks at the loaded model (when device is cpu) plus one tensor,
never twice the model. With one Meta shard or matching dtypes on cpu, tensors stay mmap-backed.
Parameters are loaded with requires_grad=False: this is an inference engine.
Every reader checks the tensors' names and shapes before it reads the first one (a
tensor-parallel rank of a Meta checkpoint: each file it opens); `check_checkpoint` runs those
checks alone, from the headers, for a command to call before its work.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from infermeter.engine.checkpoint.gguf import check_gguf_tensors, read_gguf_tensors
from infermeter.engine.checkpoint.hf import check_hf_tensors, read_hf_tensors, save_hf_checkpoint
from infermeter.engine.checkpoint.meta import (
    check_meta_tensors,
    read_meta_tensors,
    save_meta_checkpoint,
)
from infermeter.engine.dtypes import torch_dtype
from infermeter.engine.model import Transformer, build_model
from infermeter.engine.random_weights import init_random_weights
from infermeter.errors import InfermeterError
from infermeter.specs.gguf_meta import is_gguf, spec_from_gguf
from infermeter.specs.loaders import resolve_model, spec_from_hf_config, spec_from_path
from infermeter.specs.model import ModelSpec, check_engine_arch

if TYPE_CHECKING:
    from infermeter.engine.parallel.group import TensorParallel

RANDOM_PREFIX = "random:"
# per format: (the reader, its name and shape checks alone, which read no tensor data)
FORMATS = {"hf": (read_hf_tensors, check_hf_tensors),
           "meta": (read_meta_tensors, check_meta_tensors),
           "gguf": (read_gguf_tensors, check_gguf_tensors)}


def detect_format(folder: Path) -> str:
    """'hf' or 'meta' for a checkpoint folder, 'gguf' for a GGUF file; else an error."""
    if is_gguf(folder):
        return "gguf"
    if not folder.exists():
        raise InfermeterError(f"{folder}: no such checkpoint folder or GGUF file")
    if not folder.is_dir():  # the CLI's --model NAME is the source random:NAME
        raise InfermeterError(f"{folder}: not a checkpoint folder or GGUF file (random weights "
                              f"of a preset or config: --model NAME, or {RANDOM_PREFIX}NAME)")
    if (folder / "config.json").is_file():
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise InfermeterError(f"{folder}: config.json but no weights; use "
                                  f"{RANDOM_PREFIX}{folder} (--model {folder}) for random "
                                  "weights of this shape")
        return "hf"
    if (folder / "params.json").is_file():
        if not any(folder.glob("consolidated.*.pth")):
            raise InfermeterError(f"{folder}: params.json but no consolidated.NN.pth shards; "
                                  f"use {RANDOM_PREFIX}{folder} (--model {folder}) for random "
                                  "weights")
        return "meta"
    raise InfermeterError(f"{folder}: no config.json (HF) or params.json (Meta) in this folder")


def expected_shapes(model: Transformer) -> dict[str, torch.Size]:
    """Meta name -> shape of every tensor a checkpoint must provide (tied: no output.weight)."""
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    if model.spec.tie_embeddings:
        shapes.pop("output.weight")
    return shapes


def assign_tensors(model: Transformer, tensors: Iterable[tuple[str, Tensor]],
                   device: torch.device | str, dtype: torch.dtype) -> Transformer:
    """Materialise a meta-device model from (name, tensor) pairs, one tensor at a time."""
    state: dict[str, Tensor] = {}
    for name, tensor in tensors:
        # .to() is a no-op (keeps the mmap) when dtype and device already match.
        state[name] = tensor.to(device=device, dtype=dtype).contiguous()
    if model.spec.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the Parameters, so share them again
    return model.requires_grad_(False)


def spec_for(source: str | Path | ModelSpec) -> tuple[ModelSpec, Path | None, str]:
    """(spec, checkpoint folder (or GGUF file), "hf" | "meta" | "gguf" | "random") for a source."""
    if isinstance(source, ModelSpec):
        return source, None, "random"
    text = str(source)
    if text.startswith(RANDOM_PREFIX):
        return resolve_model(text[len(RANDOM_PREFIX):]), None, "random"
    folder = Path(text).expanduser()
    fmt = detect_format(folder)
    if fmt == "hf":
        return spec_from_hf_config(folder / "config.json"), folder, fmt
    if fmt == "gguf":
        return spec_from_gguf(folder), folder, fmt
    return spec_from_path(folder), folder, fmt


def load_weights(source: str | Path | ModelSpec, device: torch.device | str = "cpu",
                 dtype: torch.dtype | str = torch.float32, seed: int = 0,
                 parallel: TensorParallel | None = None) -> Transformer:
    """A Transformer with weights from `source` and no KV cache yet.

    parallel (parallel.init_distributed's answer): the model is this rank's shard, built on the meta
    device, sharded there (parallel.shard_model), then filled with the rank's slices only.
    """
    spec, folder, fmt = spec_for(source)
    check_engine_arch(spec)
    target = torch_dtype(dtype)
    if folder is None and parallel is None:
        return build_model(spec, device, target, seed=seed)
    model = build_model(spec, device, target, on_meta=True)
    shapes = expected_shapes(model)  # full shapes, before sharding
    shard = None
    if parallel is not None:
        from infermeter.engine.parallel.sharding import shard_model

        shard = shard_model(model, parallel.rank, parallel.world, parallel.group)
    if folder is None:  # random weights: each rank keeps its slices of the tp 1 model
        model = model.to_empty(device=device)
        model.tie_weights()
        init_random_weights(model, seed=seed, shard=shard)
        return model
    read = FORMATS[fmt][0]
    return assign_tensors(model, read(folder, spec, shapes, shard), device, target)


def check_checkpoint(source: str | Path | ModelSpec) -> None:
    """Refuse, with load_weights' own error line, a checkpoint whose tensors load_weights would
    refuse: a missing or unexpected tensor, a wrong shape (a GGUF's quant type the reader
    cannot dequantize too). Reads names and shapes from the files' headers (a Meta shard's
    through torch.load's mmap; a GGUF's one row of each quant type), no weights, so a command
    calls it before work a bad checkpoint would waste. Random weights pass, and so does a
    model the engine cannot run: kv still sizes it, and each stage that needs the engine
    says what it lacks."""
    spec, folder, fmt = spec_for(source)
    if folder is None:
        return
    try:  # the engine's own checks (its architectures, RoPE, head size), as build_model's
        check_engine_arch(spec)
        shapes = expected_shapes(build_model(spec, on_meta=True))
    except InfermeterError:
        return
    FORMATS[fmt][1](folder, spec, shapes)


def load_model(source: str | Path | ModelSpec, device: torch.device | str = "cpu",
               dtype: torch.dtype | str = torch.float32, max_batch_size: int = 1,
               max_seq_len: int | None = None, kv_dtype: torch.dtype | str | None = None,
               seed: int = 0, parallel: TensorParallel | None = None) -> Transformer:
    """Load (or randomly initialise) a model and allocate its static KV cache.

    max_seq_len None means the spec's max_seq_len; kv_dtype None means the weights' dtype.
    """
    model = load_weights(source, device, dtype, seed, parallel)
    length = model.spec.max_seq_len if max_seq_len is None else max_seq_len
    model.setup_cache(max_batch_size, length, dtype=kv_dtype, device=device)
    return model


def save_checkpoint(model: Transformer, folder: Path, fmt: str = "hf",
                    n_shards: int = 1) -> list[Path]:
    """Write `model`'s weights as an HF ("hf") or Meta ("meta") checkpoint with n_shards files."""
    from infermeter.engine.fusion import meta_state_dict

    # A fused model's wq/wk/wv (w1/w3) are row views of one matrix: files want their own.
    state = {name: t.clone() if t._is_view() else t
             for name, t in meta_state_dict(model).items()}
    if fmt == "hf":
        return save_hf_checkpoint(state, model.spec, Path(folder), n_shards)
    if fmt == "meta":
        return save_meta_checkpoint(state, model.spec, Path(folder), n_shards)
    raise InfermeterError(f"unknown checkpoint format {fmt!r} (use 'hf' or 'meta')")
