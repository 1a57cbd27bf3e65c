"""Tensor parallelism under torchrun: the process group, and each rank's shard of the model.

The only file that knows ranks. The model code reads its head counts and weight shapes from its
own modules, never from a rank; the loaders narrow tensors with the ShardPlan handed to them.

Layout (Megatron-LM / Meta's fairscale layers; gpt-fast's tp.py), rank r of tp ranks:
  wq, wk, wv (+ biases), w1, w3   column-parallel: output rows split, no communication
  wo, w2                          row-parallel: input columns split, partial sums all-reduced
  tok_embeddings [V, dim]         features split (Meta's ParallelEmbedding): [V, dim/tp];
                                  the lookup [B, T, dim/tp] is all-gathered to [B, T, dim]
  output [V, dim], untied         vocabulary split: [V/tp, dim]; logits [B, T, V/tp] all-gathered
  output tied to the embedding    the embedding's shard [V, dim/tp] times the rank's features of
                                  h; the partial logits [B, T, V] are all-reduced
  norms, RoPE tables              replicated
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

import os
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from infermeter.engine.linear import Linear
from infermeter.engine.model import Transformer, add_then_norm
from infermeter.errors import InfermeterError
from infermeter.spec.model import ModelSpec
from infermeter.spec.sizes import check_tp, kv_heads_per_rank

# Seconds a collective may wait (a rank stuck longer ends the run), and teardown's bounded wait.
COLLECTIVE_TIMEOUT_S = 600.0
TEARDOWN_TIMEOUT_S = 60.0
_teardown_timed_out = False


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
        return Slice(*table[module]) if module in table else None

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


def row_parallel_sites(model: Transformer) -> list[tuple[int, Linear, nn.Module]]:
    """(site, layer, norm after it) for every row-parallel layer, in forward order: layer i's
    wo is site 2i (its ffn_norm follows), its w2 site 2i + 1 (the next layer's attention_norm
    follows, or the final norm). The one numbering of the all-reduce call sites."""
    following = [layer.attention_norm for layer in model.layers[1:]] + [model.norm]
    sites = []
    for i, layer in enumerate(model.layers):
        sites.append((2 * i, layer.attention.wo, layer.ffn_norm))
        sites.append((2 * i + 1, layer.feed_forward.w2, following[i]))
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


# ---- the process group -------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    group: Any = None  # the ProcessGroup; None: not initialised (load and inspect only)


# How the step's all-reduces run (--tp-all-reduce). One token's [B, 1, dim] activations are
# 8-16 KiB, so each all-reduce costs latency, not bandwidth. "nccl": NCCL's kernels.
# "one-shot": inductor lowers the compiled step's small all-reduces to torch's symmetric-memory
# one-shot kernel (every rank reads its peers' buffers over NVLink and sums; one kernel, no NCCL
# protocol, no NVLink multicast); slower than "triton", kept as an A/B baseline.
# "triton": peer_all_reduce.py's kernel (every rank stores its slice straight into its peers'
# symmetric buffers, one handshake), which also does the residual add and the RMSNorm after
# the all-reduce; "triton-unfused": the same all-reduce alone (the add and norm stay
# inductor's kernel; what --compile-prefill's one-layer graph can hold). Both in every step,
# eager or compiled. "auto" (the default): "triton" where peer_all_reduce_usable says every rank
# can run it, else "nccl". The measurements behind these choices: docs/engine.md, "The fused
# all-reduce" and "Tried and lost".
ALL_REDUCE_KINDS = ("auto", "nccl", "one-shot", "triton", "triton-unfused")
AUTO_ALL_REDUCE = "triton"  # what auto picks on the GPUs of one host (report_select's default)


# Inductor options for --tp-all-reduce one-shot. "_collective.auto_select" lowers the compiled
# step's all-reduces of at most 128 KiB to symmetric-memory one-shot kernels. CUDA-graph trees
# are turned off: on torch 2.11 (2 x H100) the first compiled step failed with
# "Detected 10 tensor(s) in the cudagraph pool not tracked as outputs" - the symmetric-memory
# rendezvous allocates its small per-buffer metadata through the caching allocator, and under
# graph trees that lands in the graph's private pool during the recording warm-up (pytorch PR
# 175450 moves it to cudaMalloc). Without trees inductor warms up in the ordinary allocator,
# then captures one CUDA graph per compiled shape, with the same fixed addresses.
ONE_SHOT_INDUCTOR_OPTIONS = {"_collective.auto_select": True, "triton.cudagraph_trees": False}


def one_shot_compile_options(tp: TensorParallel) -> dict[str, Any]:
    """Enable symmetric memory for the group and return the inductor options under which the
    compiled step's small all-reduces become one-shot kernels (eager steps keep NCCL). Needs
    CUDA GPUs."""
    if tp.device.type != "cuda":
        raise InfermeterError("--tp-all-reduce one-shot needs CUDA GPUs (symmetric memory); "
                              "this run's ranks are on the CPU")
    from infermeter.engine.parallel.peer_all_reduce import enable_symm_mem

    enable_symm_mem(tp.group.group_name)  # torch's call, its deprecation warning silenced
    return dict(ONE_SHOT_INDUCTOR_OPTIONS)


def peer_all_reduce_usable(tp: TensorParallel) -> bool:
    """Whether every rank can run peer_all_reduce.py's kernels: CUDA ranks, all on this host
    (symmetric memory does not span hosts), Triton installed, and GPUs that reach each other
    (NVLink or PCIe peer access). The ranks agree through one all-reduce: ranks that chose
    differently would wait on each other forever."""
    from infermeter.engine.kernels.triton_support import triton

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(tp.world)))
    usable = (tp.device.type == "cuda" and triton is not None and local_world == tp.world
              and all(torch.cuda.can_device_access_peer(tp.local_rank, other)
                      for other in range(tp.world) if other != tp.local_rank))
    if tp.group is not None:
        flag = torch.tensor([int(usable)], device=tp.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=tp.group)
        usable = bool(flag.item())
    return usable


def use_peer_all_reduce(model: Transformer, tp: TensorParallel,
                        buffers: list[Tensor] | None = None, fuse_norm: bool = True) -> None:
    """Switch a sharded model's decode-sized all-reduces to peer_all_reduce.py's kernels (a
    collective: every rank calls it). fuse_norm: each all-reduce also does the residual add and
    the RMSNorm after it (model.add_norm; one kernel where there were two); else the plain
    all-reduce kernel in wo's and w2's hooks. buffers: every rank's buffer as this process sees
    it (shared CPU tensors, for the tests); by default they are allocated in torch symmetric
    memory, which needs CUDA GPUs that can reach each other."""
    from infermeter.engine.kernels.triton_support import triton_runs_on
    from infermeter.engine.parallel import peer_all_reduce

    collectives = getattr(model, "tp_collectives", None)
    if not isinstance(collectives, Collectives):
        raise InfermeterError("--tp-all-reduce triton needs a tensor-parallel model (--tp 2+)")
    probe = model.norm.weight
    if (buffers is None and tp.device.type != "cuda") or not triton_runs_on(probe):
        raise InfermeterError("--tp-all-reduce triton needs CUDA GPUs and Triton (symmetric "
                              f"memory); this run's ranks are on {tp.device.type}")
    n_sites = 2 * len(model.layers)
    # The buffers before any change to the model: if they cannot be had (PeerBufferUnavailable)
    # the model keeps its NCCL all-reduces, and --tp-all-reduce auto runs on with them.
    peer = peer_all_reduce.PeerAllReduce(tp.rank, buffers, n_sites) if buffers is not None \
        else peer_all_reduce.PeerAllReduce.for_group(tp.group, tp.device, n_sites)
    collectives.peer, collectives.peer_index = peer, peer_all_reduce.register(peer)
    if fuse_norm:  # each norm learns the site whose all-reduce comes with it
        for site, _, norm in row_parallel_sites(model):
            norm.all_reduce_site = site
        collectives.fused = True
        model.add_norm = collectives.add_norm


def init_distributed(device: str = "cuda", tp: int | None = None) -> TensorParallel | None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    None when this process runs alone. NCCL for cuda (the rank's GPU is LOCAL_RANK), gloo for
    cpu. tp (the --tp flag) must equal the number of processes; None means "all of them".
    Calling it again returns the same group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun sets it; 1 alone
    if world == 1:
        if tp and tp > 1:
            raise InfermeterError(f"--tp {tp} needs {tp} processes: let infermeter start them "
                                  f"(`infermeter generate --tp {tp} ...`) or run "
                                  f"`torchrun --nproc_per_node {tp} -m infermeter ...`")
        return None
    if tp is not None and tp != world:
        raise InfermeterError(f"--tp {tp}, but torchrun started {world} processes")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InfermeterError(f"local rank {local_rank} has no GPU: this host shows "
                                  f"{torch.cuda.device_count()} CUDA device(s)")
        where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)  # before NCCL init: its communicator binds to this GPU
    else:
        where = torch.device("cpu")
    if not dist.is_initialized():
        options: dict[str, Any] = {"timeout": timedelta(seconds=COLLECTIVE_TIMEOUT_S)}
        if where.type == "cuda":
            options["device_id"] = where  # eager NCCL init; barrier() knows its device
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo", **options)
    return TensorParallel(rank, world, local_rank, where, dist.group.WORLD)


def teardown(timeout_s: float | None = None, barrier: bool = True) -> bool:
    """Barrier, then destroy the process group, waiting at most timeout_s (default
    TEARDOWN_TIMEOUT_S); True if it finished.

    Both run in a daemon thread: a peer that died or an NCCL shutdown that hangs (seen for over
    seven minutes on 2xH200) cannot keep this process alive. On a timeout it says so on stderr
    and moves on; `teardown_timed_out()` then tells the entry point to exit without waiting for
    the stuck thread (python -m infermeter does, with os._exit).
    """
    global _teardown_timed_out
    if not (dist.is_available() and dist.is_initialized()):
        return True
    failure: list[BaseException] = []
    device = torch.cuda.current_device() if dist.get_backend() == "nccl" else None

    def work() -> None:
        try:
            if device is not None:
                torch.cuda.set_device(device)  # the current device is per thread
            if barrier:
                dist.barrier()
            dist.destroy_process_group()
        except BaseException as err:  # reported below: never raise in a thread
            failure.append(err)

    thread = threading.Thread(target=work, name="infermeter-teardown", daemon=True)
    thread.start()
    timeout_s = TEARDOWN_TIMEOUT_S if timeout_s is None else timeout_s
    thread.join(timeout_s)
    if thread.is_alive():
        _teardown_timed_out = True
        print(f"infermeter: warning: process-group teardown did not finish in {timeout_s:g} s; "
              "exiting without it", file=sys.stderr, flush=True)
        return False
    if failure:
        print(f"infermeter: warning: process-group teardown failed: {failure[0]}",
              file=sys.stderr, flush=True)
    return not failure


def teardown_timed_out() -> bool:
    return _teardown_timed_out


def group_size() -> int:
    """Processes in this run's group: 1 alone, the tp degree under torchrun."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def ranks_meet(device: torch.device | None = None) -> None:
    """Under tensor parallelism (a group of 2+ ranks), wait until every rank is here; with a
    CUDA device, until its queued work is done too. What a measurement calls before each thing
    it times, so that every rank starts it together: generate's warm-up and timed runs (the
    collectives inside a run would align the ranks anyway, but a late rank's lag would count in
    the others' TTFT) and each copy case (the ranks share the host's links). Alone: nothing."""
    if group_size() > 1:
        dist.barrier()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)


def rank_spec(spec: ModelSpec, world: int) -> ModelSpec:
    """A spec whose KV cache is exactly one rank's shard (its query and KV heads), to measure that
    shard alone (the copy benchmark). Every rank's shard has this shape; an MLA latent is held
    whole by every rank."""
    if world == 1 or spec.is_mla:
        return spec
    return spec.with_updates(n_heads=spec.n_heads // world,
                             n_kv_heads=kv_heads_per_rank(spec, world))
