"""How the decode step's all-reduces run (--tp-all-reduce): NCCL's kernels, inductor's
symmetric-memory one-shot lowering, or peer_all_reduce.py's Triton kernels, and switching a
sharded model to them."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from infermeter.engine.model import Transformer
from infermeter.engine.parallel.group import TensorParallel
from infermeter.engine.parallel.sharding import Collectives, row_parallel_sites
from infermeter.errors import InfermeterError

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


def one_shot_compile_options(parallel: TensorParallel) -> dict[str, Any]:
    """Enable symmetric memory for the group and return the inductor options under which the
    compiled step's small all-reduces become one-shot kernels (eager steps keep NCCL). Needs
    CUDA GPUs."""
    if parallel.device.type != "cuda":
        raise InfermeterError("--tp-all-reduce one-shot needs CUDA GPUs (symmetric memory); "
                              "this run's ranks are on the CPU")
    from infermeter.engine.parallel.peer_all_reduce import enable_symm_mem

    enable_symm_mem(parallel.group.group_name)  # torch's call, its deprecation warning silenced
    return dict(ONE_SHOT_INDUCTOR_OPTIONS)


def peer_all_reduce_usable(parallel: TensorParallel) -> bool:
    """Whether every rank can run peer_all_reduce.py's kernels: CUDA ranks, all on this host
    (symmetric memory does not span hosts), Triton installed, and GPUs that reach each other
    (NVLink or PCIe peer access). The ranks agree through one all-reduce: ranks that chose
    differently would wait on each other forever."""
    from infermeter.engine.kernels.triton_support import triton

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(parallel.world)))
    usable = (parallel.device.type == "cuda" and triton is not None
              and local_world == parallel.world
              and all(torch.cuda.can_device_access_peer(parallel.local_rank, other)
                      for other in range(parallel.world) if other != parallel.local_rank))
    if parallel.group is not None:
        flag = torch.tensor([int(usable)], device=parallel.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=parallel.group)
        usable = bool(flag.item())
    return usable


def use_peer_all_reduce(model: Transformer, parallel: TensorParallel,
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
    if (buffers is None and parallel.device.type != "cuda") or not triton_runs_on(probe):
        raise InfermeterError("--tp-all-reduce triton needs CUDA GPUs and Triton (symmetric "
                              f"memory); this run's ranks are on {parallel.device.type}")
    n_sites = 2 * len(model.layers)
    # The buffers before any change to the model: if they cannot be had (PeerBufferUnavailable)
    # the model keeps its NCCL all-reduces, and --tp-all-reduce auto runs on with them.
    peer = peer_all_reduce.PeerAllReduce(parallel.rank, buffers, n_sites) if buffers is not None \
        else peer_all_reduce.PeerAllReduce.for_group(parallel.group, parallel.device, n_sites)
    collectives.peer, collectives.peer_index = peer, peer_all_reduce.register(peer)
    if fuse_norm:  # each norm learns the site whose all-reduce comes with it
        for site, _, norm in row_parallel_sites(model):
            norm.all_reduce_site = site
        collectives.fused = True
        model.add_norm = collectives.add_norm
