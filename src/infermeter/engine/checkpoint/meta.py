"""Meta's checkpoint format: params.json + consolidated.00.pth ... consolidated.NN.pth.

Each shard holds one model-parallel rank's slice of every weight (fairscale layers in Meta's
llama/model.py):
  ColumnParallelLinear (wq, wk, wv and their biases, w1, w3, output): split along dim 0 (outputs)
  RowParallelLinear    (wo, w2):                                       split along dim 1 (inputs)
  ParallelEmbedding    (tok_embeddings):                               split along dim 1 (features)
  RMSNorm weights: replicated in every shard; `rope.freqs` (old checkpoints): ignored.
Loaded on one process, the slices are concatenated back along that dimension. `shard_for_rank`
is the inverse, used by the writer. Tensor-parallel loading (parallel.ShardPlan, which splits
along the same dimensions) reads each rank's slice straight from the files that hold it.

Checkpoints are untrusted: shards are read with torch.load(weights_only=True, mmap=True) only, so
no pickle code runs and a shard's bytes are paged in lazily, one tensor at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from infermeter.errors import InfermeterError
from infermeter.specs.loaders import meta_ffn_dim
from infermeter.specs.model import ModelSpec
from infermeter.specs.pth import load_pth

if TYPE_CHECKING:
    from infermeter.engine.parallel.sharding import ShardPlan

_SHARD_RE = re.compile(r"^consolidated\.(\d+)\.pth$")
IGNORED_KEYS = ("rope.freqs",)
_DIM0 = ("attention.wq.", "attention.wk.", "attention.wv.", "feed_forward.w1.",
         "feed_forward.w3.", "output.")
_DIM1 = ("attention.wo.", "feed_forward.w2.", "tok_embeddings.")


def split_dim(name: str) -> int | None:
    """Model-parallel dimension of a Meta tensor name; None when replicated (norms)."""
    key = "." + name
    if any("." + p in key for p in _DIM0):
        return 0
    if any("." + p in key for p in _DIM1):
        return 1
    return None


def shard_for_rank(tensor: Tensor, name: str, rank: int, world: int) -> Tensor:
    """Rank `rank`'s slice of a full tensor, split as Meta's fairscale layers split it."""
    dim = split_dim(name)
    if dim is None or world == 1:
        return tensor
    return tensor.chunk(world, dim=dim)[rank]


def shard_paths(folder: Path) -> list[Path]:
    """consolidated.00.pth ... in rank order; a gap in the numbering is an error."""
    found = {}
    for path in folder.glob("consolidated.*.pth"):
        match = _SHARD_RE.match(path.name)
        if match:
            found[int(match.group(1))] = path
    if not found:
        raise InfermeterError(f"{folder}: no consolidated.NN.pth shards next to params.json")
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        width = len(next(iter(found.values())).name.split(".")[1])
        names = ", ".join(f"consolidated.{i:0{width}d}.pth" for i in missing)
        raise InfermeterError(f"{folder}: missing shard {names} "
                              f"(found {len(found)} shards numbered up to {max(found)})")
    return [found[i] for i in range(len(found))]


def check_shard_count(spec: ModelSpec, n_shards: int, folder: Path) -> None:
    """Every split dimension must divide evenly into the shards."""
    sizes = {"attention heads": spec.n_heads, "KV heads": spec.n_kv_heads,
             "FFN size": spec.ffn_dim, "model dim": spec.dim, "vocabulary": spec.vocab_size}
    bad = [f"{n} {what}" for what, n in sizes.items() if n % n_shards]
    if bad:
        raise InfermeterError(f"{folder}: {n_shards} shards do not divide the model's "
                              f"{', '.join(bad)} (params.json)")


def check_meta_tensors(folder: Path, spec: ModelSpec, expected: dict[str, torch.Size]) -> None:
    """read_meta_tensors' checks of every shard alone (names and shapes, from torch.load's
    mmap: no tensor data read): an error for a checkpoint it would refuse, before any work."""
    paths = shard_paths(folder)
    check_shard_count(spec, len(paths), folder)
    for path in paths:
        _check_shard(path, load_pth(path), expected, len(paths))


def read_meta_tensors(folder: Path, spec: ModelSpec, expected: dict[str, torch.Size],
                      shard: ShardPlan | None = None) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, CPU tensor) for every name in `expected` (full shapes).

    shard None: the full tensor, the files merged along split_dim. The merge is the only host
    copy made (none with one file: it stays mmap-backed); the caller converts it and drops it
    before the next one is built.
    shard (tensor parallel): this rank's slice only, read from the files that hold it. With as
    many files as ranks, rank r opens consolidated.r.pth alone and yields its tensors as they
    are (mmap-backed, no merge): parallel.ShardPlan splits every tensor as Meta's files do.
    Other counts re-shard: each file's overlap with the rank's slice, concatenated.
    Each file's names and shapes are checked (_check_shard) when it is opened.
    """
    paths = shard_paths(folder)
    check_shard_count(spec, len(paths), folder)
    opened: dict[int, dict[str, Tensor]] = {}

    def state(index: int) -> dict[str, Tensor]:  # a file is opened only when a slice needs it
        if index not in opened:
            opened[index] = load_pth(paths[index])
            _check_shard(paths[index], opened[index], expected, len(paths))
        return opened[index]

    n_files = len(paths)
    # Replicated tensors (norms) come from a file this rank reads anyway.
    home = [0] if shard is None else [shard.rank * n_files // shard.world]
    if shard is None:  # every file holds a slice of the split tensors: all are checked first
        for index in range(n_files):
            state(index)
    for name, full_shape in expected.items():
        dim = split_dim(name)
        if dim is None:
            yield name, state(home[0])[name]
            continue
        piece = shard.slice_of(name) if shard is not None else None
        if piece is not None and piece.dim != dim:
            raise InfermeterError(f"internal: {name} is split along dim {piece.dim} by the "
                                  f"tensor-parallel plan but along {dim} in Meta's files")
        start, length = (0, full_shape[dim]) if piece is None else (piece.start, piece.length)
        per_file = full_shape[dim] // n_files
        parts = []
        for index in range(start // per_file, (start + length - 1) // per_file + 1):
            part = state(index)[name]
            lo = max(start - index * per_file, 0)
            hi = min(start + length - index * per_file, per_file)
            parts.append(part if (lo, hi) == (0, per_file) else part.narrow(dim, lo, hi - lo))
        yield name, parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _check_shard(path: Path, state: dict[str, Tensor], expected: dict[str, torch.Size],
                 n_files: int) -> None:
    """One of n_files shards against params.json: every expected name and no other
    (IGNORED_KEYS aside), each tensor its share of the full shape (split along split_dim, or
    whole); names and shapes only, no tensor data read."""
    names = set(state) - set(IGNORED_KEYS)
    missing = sorted(set(expected) - names)
    extra = sorted(names - set(expected))
    if missing:
        raise InfermeterError(f"{path}: missing tensor {missing[0]}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise InfermeterError(f"{path}: unexpected tensor {extra[0]} (params.json describes "
                              "a different model?)")
    for name, full_shape in expected.items():
        want = list(full_shape)
        dim = split_dim(name)
        if dim is not None:
            want[dim] //= n_files
        if list(state[name].shape) != want:
            raise InfermeterError(
                f"{path}: tensor {name} has shape {list(state[name].shape)}, but params.json "
                f"implies {want} per shard ({n_files} shard(s), full {list(full_shape)})")


# ---- writer ----------------------------------------------------------------------------------
def _ffn_fields(spec: ModelSpec) -> dict[str, Any]:
    """multiple_of / ffn_dim_multiplier that make Meta's formula give exactly spec.ffn_dim."""
    for multiple_of in (1024, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if meta_ffn_dim(spec.dim, multiple_of, None) == spec.ffn_dim:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": None}
    # Any size: a multiplier that lands just at or below ffn_dim, then round up to ffn_dim.
    hidden = int(2 * (4 * spec.dim) / 3)
    return {"multiple_of": spec.ffn_dim, "ffn_dim_multiplier": spec.ffn_dim / hidden}


def meta_params(spec: ModelSpec) -> dict[str, Any]:
    """params.json for a spec Meta's format can express (plain or llama3 RoPE, no bias/window)."""
    scaling = spec.rope_scaling
    if spec.is_moe:
        raise InfermeterError(f"model {spec.name}: Meta's params.json cannot express experts "
                              f"({spec.arch}); save it in HF format")
    if spec.qk_norm:
        raise InfermeterError(f"model {spec.name}: Meta's params.json cannot express q/k norms "
                              f"({spec.arch}); save it in HF format")
    if spec.qkv_bias or spec.sliding_window_layers or (
            scaling is not None and (scaling.kind, scaling.low_freq_factor,
                                     scaling.high_freq_factor, scaling.original_max_position)
            != ("llama3", 1.0, 4.0, 8192)):
        raise InfermeterError(f"model {spec.name}: Meta's params.json cannot express qkv bias, "
                              "sliding windows or this RoPE scaling; save it in HF format")
    params: dict[str, Any] = {
        "dim": spec.dim, "n_layers": spec.n_layers, "n_heads": spec.n_heads,
        "n_kv_heads": spec.n_kv_heads, "vocab_size": spec.vocab_size, **_ffn_fields(spec),
        "norm_eps": spec.norm_eps, "rope_theta": spec.rope_theta, "max_seq_len": spec.max_seq_len,
    }
    if spec.head_dim * spec.n_heads != spec.dim:
        params["head_dim"] = spec.head_dim
    if scaling is not None:
        params.update(use_scaled_rope=True, rope_scaling_factor=scaling.factor)
    return params


def save_meta_checkpoint(state: dict[str, Tensor], spec: ModelSpec, folder: Path,
                         n_shards: int = 1) -> list[Path]:
    """Write params.json and n_shards consolidated.NN.pth files, split as Meta splits them.

    `state` is a Meta-named state dict (Transformer.state_dict()); tied embeddings are written
    as two tensors, as Meta's Llama 3.2 checkpoints do (params.json has no tie flag).
    """
    folder.mkdir(parents=True, exist_ok=True)
    check_shard_count(spec, n_shards, folder)
    (folder / "params.json").write_text(json.dumps(meta_params(spec), indent=2) + "\n")
    paths = []
    for rank in range(n_shards):
        # clone(): torch.save of a view would write the whole underlying storage.
        shard = {name: shard_for_rank(t, name, rank, n_shards).detach().cpu().clone()
                 for name, t in state.items()}
        path = folder / f"consolidated.{rank:02d}.pth"
        torch.save(shard, path)
        paths.append(path)
    return paths
