"""A tiny torchrun entry for test_parallel.py's launch tests: `python -m tests.tp_entry MODE`.

fail: rank 1 reports a user error while rank 0 waits in a collective for it;
bug:  rank 1 raises an unexpected exception (a traceback, not a user error);
hang: every rank's process-group destroy hangs forever (as NCCL's did on 2xH200): the bounded
      teardown must give up after 1 s and the process still exit 0.
"""

from __future__ import annotations

import sys
import threading

import torch.distributed as dist

from infermeter.engine.parallel import group
from infermeter.errors import InfermeterError
from infermeter.launch import run_entry


def main() -> int:
    mode = sys.argv[1]
    parallel = group.init_distributed("cpu")
    if mode == "fail" and parallel.rank == 1:
        raise InfermeterError("rank one broke on purpose")
    if mode == "bug" and parallel.rank == 1:
        raise RuntimeError("an unexpected bug on rank one")
    if mode == "hang":
        group.TEARDOWN_TIMEOUT_S = 1.0
        dist.destroy_process_group = lambda *args, **kwargs: threading.Event().wait()
    dist.barrier()  # with a failed peer, rank 0 blocks (or breaks) here until it is stopped
    if parallel.rank == 0:
        print(f"{mode}: rank 0 done", flush=True)
    return 0


def cli_like_main() -> int:
    """What cli.main does with a user error: report it, return 2."""
    try:
        return main()
    except InfermeterError as err:
        from infermeter.launch import report_error

        report_error(str(err))
        return 2


if __name__ == "__main__":
    raise SystemExit(run_entry(cli_like_main))
