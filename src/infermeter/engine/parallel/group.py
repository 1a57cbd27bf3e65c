"""The tensor-parallel process group under torchrun: joining it, this rank's place in it, and
ending it without ever hanging (a dead peer or a stuck NCCL shutdown cannot keep a rank alive).

`tp` is always the group's size (an int); a TensorParallel, named `parallel` where it is held,
is one rank's view of the group (its rank, the size as `world`, its device, the process group).
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from infermeter.errors import InfermeterError

# Seconds a collective may wait (a rank stuck longer ends the run), and teardown's bounded wait.
COLLECTIVE_TIMEOUT_S = 600.0
TEARDOWN_TIMEOUT_S = 60.0
_teardown_timed_out = False


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    group: Any = None  # the ProcessGroup; None: not initialised (load and inspect only)


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
