"""Tensor parallelism: each rank's shard of the model (the shard plan, the split layers' hooks and
the collectives inside them). The process group is group.py's; the all-reduce kinds
all_reduce.py's. The model code reads its head counts and weight shapes from its own modules,
never from a rank; the loaders narrow tensors with the ShardPlan handed to them.

Layout (Megatron-LM / Meta's fairscale layers; gpt-fast's tp.py), rank r of tp ranks:
  wq, wk, wv (+ biases), w1, w3   column-parallel: output rows split, no communication
  wo, w2                          row-parallel: input columns split, partial sums all-reduced
  tok_embeddings [V, dim]         features split (Meta's ParallelEmbedding): [V, dim/tp];
                                  the lookup [B, T, dim/tp] is all-gathered to [B, T, dim]
  output [V, dim], untied         vocabulary split: [V/tp, dim]; logits [B, T, V/tp] all-gathered
  output tied to the embedding    the embedding's shard [V, dim/tp] times the rank's features of
                                  h; the partial logits [B, T, V] are all-reduced
  norms, RoPE tables              replicated
  MoE: experts' w1, w3 [E, ffn, dim] rows split (dim 1), w2 [E, dim, ffn] columns (dim 2): every
  rank holds every expert's slice, like a dense FFN; the router is replicated, so every rank
  routes alike, and the MoE block's output is all-reduced as w2's is
  gpt-oss: sinks [H] split by query head (as wq's rows); w1, w3 biases [E, ffn] split with
  their rows; wo's bias [dim] and w2's [E, dim] replicated and added by rank 0 only
  (Linear.adds_bias, MoEFeedForward.adds_down_bias), so the all-reduced sum holds each once
Biases of row-parallel layers go into rank 0's partial sum rather than after the all-reduce
because every all-reduce then carries them as it is: NCCL's, the peer kernel's, and the one
fused with the residual add and the norm (add_norm), which has no place for a bias.
Embedding and output are split rather than replicated (gpt-fast replicates them) because that is
exactly how Meta's checkpoints are split, so a checkpoint with tp shards loads one file per rank
with no merge; it is also what kvsize.weight_bytes_per_rank counts, and Llama-2-13B's output
matrix (164M parameters) is then not read by both ranks every decode step.

Heads: rank r computes query heads [r*H/tp, (r+1)*H/tp). GQA groups are contiguous (query head
h reads KV head h // (H/H_kv)), so the rank needs KV heads [r*H_kv/tp, (r+1)*H_kv/tp) when tp
divides H_kv, and the single KV head r*H_kv // tp when tp > H_kv (tp/H_kv ranks hold a copy).
Every rank holds ceil(H_kv/tp) KV heads: its cache is kvsize.kv_cache_bytes(..., tp) exactly.

Communication per decode step: two all-reduces of [B, 1, dim] per layer, one all-gather of the
embedding and one of the logits. The collectives are torch.distributed._functional_collectives
calls inside forward hooks, so a torch.compile(fullgraph=True) decode step captures them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from infermeter.engine.linear import Linear
from infermeter.engine.model import FeedForward, Transformer, add_then_norm
from infermeter.engine.moe import MoEFeedForward
from infermeter.errors import InfermeterError
from infermeter.specs.model import ModelSpec
from infermeter.specs.sizes import check_tp, kv_heads_per_rank


# ---- the shard plan: which slice of every tensor a rank holds --------------------------------
class Slice(NamedTuple):
    dim: int  # the dimension of the full tensor that is split
    start: int
    length: int
    full: int  # the full tensor's size along `dim`


@dataclass(frozen=True)
class ShardPlan:
    """Rank `rank` of `world`'s slice of every tensor of `spec` (Meta names)."""

    spec: ModelSpec
    rank: int
    world: int

    def __post_init__(self) -> None:
        spec, world = self.spec, self.world
        check_tp(spec, world)
        if not 0 <= self.rank < world:
            raise InfermeterError(f"rank {self.rank} is outside 0..{world - 1}")
        sizes = {"model dim": spec.dim, "FFN size": spec.ffn_dim}
        if spec.is_moe:
            sizes["expert FFN size"] = spec.moe_ffn_dim
        if not spec.tie_embeddings:
            sizes["vocabulary"] = spec.vocab_size
        bad = [f"{n} {what}" for what, n in sizes.items() if n % world]
        if bad:
            raise InfermeterError(f"tp={world} does not divide {spec.name}'s {', '.join(bad)}")

    @property
    def heads(self) -> tuple[int, int]:
        """(first query head, number of query heads) of this rank."""
        count = self.spec.n_heads // self.world
        return self.rank * count, count

    @property
    def kv_heads(self) -> tuple[int, int]:
        """(first KV head, number of KV heads): the KV heads this rank's query heads read."""
        return self.rank * self.spec.n_kv_heads // self.world, kv_heads_per_rank(
            self.spec, self.world)

    def slice_of(self, name: str) -> Slice | None:
        """The rank's slice of tensor `name` in full-tensor coordinates; None: replicated."""
        if self.world == 1:
            return None
        spec, hd, r = self.spec, self.spec.head_dim, self.rank
        module = name.rsplit(".", 2)[-2]  # 'layers.3.attention.wq.weight' -> 'wq'
        q0, nq = self.heads
        k0, nk = self.kv_heads
        d, f, v = spec.dim // self.world, spec.ffn_dim // self.world, spec.vocab_size // self.world
        table = {
            "wq": (0, q0 * hd, nq * hd, spec.n_heads * hd),
            "wk": (0, k0 * hd, nk * hd, spec.n_kv_heads * hd),
            "wv": (0, k0 * hd, nk * hd, spec.n_kv_heads * hd),
            "wo": (1, q0 * hd, nq * hd, spec.n_heads * hd),
            "w1": (0, r * f, f, spec.ffn_dim),
            "w3": (0, r * f, f, spec.ffn_dim),
            "w2": (1, r * f, f, spec.ffn_dim),
            "tok_embeddings": (1, r * d, d, spec.dim),
            "output": (1, r * d, d, spec.dim) if spec.tie_embeddings
            else (0, r * v, v, spec.vocab_size),
        }
        if name.endswith(".sinks"):  # gpt-oss's [H], one per query head
            return Slice(0, q0, nq, spec.n_heads)
        if module in ("wo", "w2") and name.endswith(".bias"):  # [dim] / [E, dim]: rank 0 adds
            return None
        if module in ("w1", "w3", "w2") and self._experts(name):  # [E, ffn, dim] / [E, dim, ffn]
            fe = spec.moe_ffn_dim // self.world
            return Slice(2 if module == "w2" else 1, r * fe, fe, spec.moe_ffn_dim)
        return Slice(*table[module]) if module in table else None

    def _experts(self, name: str) -> bool:
        """Whether `name` is an MoE layer's stacked experts ('layers.3.feed_forward.w1.weight')."""
        parts = name.split(".")
        return len(parts) > 3 and parts[0] == "layers" and parts[2] == "feed_forward" and \
            self.spec.is_moe_layer(int(parts[1]))

    def narrow(self, name: str, tensor: Tensor) -> Tensor:
        """The rank's slice of the full tensor `name` (a view; replicated tensors as they are)."""
        piece = self.slice_of(name)
        if piece is None:
            return tensor
        if tensor.shape[piece.dim] != piece.full:
            raise InfermeterError(f"tensor {name} has {tensor.shape[piece.dim]} rows along dim "
                                  f"{piece.dim}, the model needs {piece.full}")
        return tensor.narrow(piece.dim, piece.start, piece.length)

    def full_shape(self, name: str, local: torch.Size | tuple[int, ...]) -> torch.Size:
        """The full tensor's shape, from this rank's shape of it."""
        shape = list(local)
        piece = self.slice_of(name)
        if piece is not None:
            shape[piece.dim] = piece.full
        return torch.Size(shape)


# ---- collectives (traceable by torch.compile) --------------------------------------------------
def _group_or_fail(group: Any) -> Any:
    if group is None:
        raise InfermeterError("a tensor-parallel model ran without a process group "
                              "(start it with torchrun, or call init_distributed first)")
    return group


def all_reduce(x: Tensor, group: Any) -> Tensor:
    return funcol.all_reduce(x, "sum", _group_or_fail(group))


def all_gather_last(x: Tensor, group: Any, world: int) -> Tensor:
    """[..., n] on each rank -> [..., world * n], rank order along the last dim."""
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    stacked = gather(x.contiguous(), 0, _group_or_fail(group))  # [world * x.shape[0], ...]
    stacked = stacked.view(world, *x.shape)
    return stacked.movedim(0, -2).reshape(*x.shape[:-1], world * x.shape[-1])


class Collectives:
    """A sharded model's all-reduces: NCCL's (funcol), or, once use_peer_all_reduce has set
    `peer`, peer_all_reduce.py's kernel for every tensor that fits its slot (the decode step's;
    prefill's [B, T, dim] stays NCCL's). `site` names the call site: the peer kernel gives each
    its own buffer region (see peer_all_reduce.py for why).

    fused: wo's and w2's outputs leave their hooks unreduced and add_norm (the model's add_norm)
    reduces them together with the residual add and the norm that follows."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.peer: Any = None  # a peer_all_reduce.PeerAllReduce
        self.peer_index = -1  # its index in peer_all_reduce's registry (the op's argument)
        self.fused = False

    def all_reduce(self, x: Tensor, site: int | None) -> Tensor:
        if site is not None and self.fused:
            return x  # add_norm reduces it
        if site is not None and self.peer is not None and self.peer.takes(x):
            return torch.ops.infermeter.peer_all_reduce(x, self.peer_index, site)
        return all_reduce(x, self.group)

    def add_norm(self, residual: Tensor, delta: Tensor, norm: nn.Module) -> tuple[Tensor, Tensor]:
        """model.AddNorm for a model whose wo/w2 outputs arrive unreduced (fused): h = residual
        + all-reduce(delta) and norm(h), in one kernel where it fits, else NCCL then the two."""
        site = norm.all_reduce_site
        if self.peer.takes_rows(delta, residual):
            return torch.ops.infermeter.peer_all_reduce_add_norm(
                delta, residual, norm.weight, norm.eps, self.peer_index, site)
        return add_then_norm(residual, all_reduce(delta, self.group), norm)


def row_parallel_sites(model: Transformer) -> list[tuple[int, nn.Module, nn.Module]]:
    """(site, layer, norm after it) for every row-parallel layer, in forward order: layer i's
    wo is site 2i (its ffn_norm follows), its w2 site 2i + 1 (the next layer's attention_norm
    follows, or the final norm); an MoE layer's whole block is its site 2i + 1 (its experts'
    w2 partial sums, already weighted, leave the block unreduced). The one numbering of the
    all-reduce call sites."""
    following = [layer.attention_norm for layer in model.layers[1:]] + [model.norm]
    sites = []
    for i, layer in enumerate(model.layers):
        ffn = layer.feed_forward
        sites.append((2 * i, layer.attention.wo, layer.ffn_norm))
        sites.append((2 * i + 1, ffn.w2 if isinstance(ffn, FeedForward) else ffn, following[i]))
    return sites


def _reduce_hook(collectives: Collectives, site: int | None) -> Any:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return collectives.all_reduce(output, site)
    return hook


def _gather_hook(group: Any, world: int) -> Any:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return all_gather_last(output, group, world)
    return hook


def _feature_slice_hook(start: int, length: int) -> Any:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return (inputs[0].narrow(-1, start, length),)  # h [B, T, dim] -> [B, T, dim/tp]
    return hook


# ---- sharding a model --------------------------------------------------------------------------
@torch.no_grad()
def shard_model(model: Transformer, rank: int, world: int, group: Any = None) -> ShardPlan:
    """Make `model` rank `rank`'s shard, in place: narrowed weights, head counts, collectives.

    Works on a meta-device model (the loaders then assign the rank's tensors) and on a loaded
    one (its full weights are sliced and freed). `group` defaults to the initialised WORLD
    group; without one the model can be loaded and inspected but not run.
    """
    plan = ShardPlan(model.spec, rank, world)
    if getattr(model, "shard_plan", None) is not None:
        raise InfermeterError("this model is already sharded")
    model.shard_plan = plan
    if world == 1:
        return plan
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            local = plan.narrow(f"{module_name}.{name}", param)
            if local is not param:
                # clone(): a narrowed view would keep the full tensor's storage alive.
                local = local if local.device.type == "meta" else local.clone()
                setattr(module, name, nn.Parameter(local, requires_grad=False))
    model.tie_weights()
    _, n_heads = plan.heads
    _, n_kv_heads = plan.kv_heads
    collectives = model.tp_collectives = Collectives(group)
    for layer in model.layers:
        layer.attention.n_heads, layer.attention.n_kv_heads = n_heads, n_kv_heads
    for site, linear, _ in row_parallel_sites(model):  # wo and w2
        linear.register_forward_hook(_reduce_hook(collectives, site))
        if rank != 0:  # their biases (gpt-oss's) are in rank 0's partial sum only
            if isinstance(linear, Linear):
                linear.adds_bias = False
            elif isinstance(linear, MoEFeedForward):
                linear.adds_down_bias = False
    model.tok_embeddings.register_forward_hook(_gather_hook(group, world))
    if model.spec.tie_embeddings:
        piece = plan.slice_of("output.weight")
        model.output.register_forward_pre_hook(_feature_slice_hook(piece.start, piece.length))
        model.output.register_forward_hook(_reduce_hook(collectives, None))  # [B, T, V]: NCCL
    else:
        model.output.register_forward_hook(_gather_hook(group, world))
    if model.max_seq_len:  # a cache allocated before sharding has every KV head: rebuild it
        model.setup_cache(model.max_batch_size, model.max_seq_len, model.cache_dtype)
    return plan


def rank_spec(spec: ModelSpec, world: int) -> ModelSpec:
    """A spec whose KV cache is exactly one rank's shard (its query and KV heads), to measure that
    shard alone (the copy benchmark). Every rank's shard has this shape; an MLA latent is held
    whole by every rank."""
    if world == 1 or spec.is_mla:
        return spec
    return spec.with_updates(n_heads=spec.n_heads // world,
                             n_kv_heads=kv_heads_per_rank(spec, world))
