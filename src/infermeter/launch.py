"""`infermeter ... --tp N`: start N ranks under torchrun, and end every rank cleanly.

    infermeter generate --model llama-2-13b --tp 2        # this file starts torchrun
    torchrun --nproc_per_node 2 -m infermeter generate --model llama-2-13b   # the same by hand

`relaunch_if_needed` runs torchrun's own launcher (torch.distributed.run, as
`python -m torch.distributed.run --standalone --nproc_per_node N -m infermeter <the same args>`)
inside this process, so its agent's log lines can be kept off the terminal and a failure shown
as one line. The ranks inherit this process's stdout and stderr; only rank 0 prints.

Failures: a rank that fails writes its error to a file in INFERMETER_ERROR_DIR instead of
stderr; torchrun sees its non-zero exit and stops the other ranks at once (they may fail too,
e.g. a peer's collective breaks). The launcher then prints each distinct user error once (the
root cause, not its echoes), or else the first traceback, and exits non-zero.

Teardown: `run_entry` (python -m infermeter) ends a rank through parallel.teardown, whose wait
is bounded; if that wait timed out, the process leaves with os._exit rather than hang on the
stuck thread. A rank that failed skips the barrier and leaves the same way.

No torch import at module level: `infermeter kv` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

# NVLink SHARP / multicast always off for the ranks: on the shared multi-GPU machines this was
# written on, a program using multicast can put the host's GPUs out of service, and NCCL or
# symmetric memory trying it at init or teardown is a suspected source of teardown hangs.
CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
             "NVSHMEM_DISABLE_NVLS": "1"}
ERROR_DIR_ENV = "INFERMETER_ERROR_DIR"


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_rank_zero() -> bool:
    """Only rank 0 prints and writes Results (every process is rank 0 outside torchrun)."""
    return process_rank() == 0


# ---- errors of one rank ------------------------------------------------------------------------
def _write_error(kind: str, text: str) -> bool:
    """Leave this rank's error for the launcher; False when not started by it."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder or not under_torchrun():
        return False
    record = {"rank": process_rank(), "time": time.time(), "kind": kind, "text": text}
    path = Path(folder) / f"rank-{process_rank()}.json"
    path.write_text(json.dumps(record))
    return True


def report_error(message: str) -> None:
    """A user error ("infermeter: error: ..."): to the launcher, else to stderr (with the rank
    under a torchrun started by hand, where every failing rank prints its own)."""
    if _write_error("error", message):
        return
    where = f"rank {process_rank()}: " if under_torchrun() else ""
    print(f"infermeter: error: {where}{message}", file=sys.stderr, flush=True)


def run_entry(main: Callable[[], int]) -> int:
    """python -m infermeter: run main, then end this rank without ever hanging."""
    try:
        code = main()
    except Exception:
        if not _write_error("traceback", traceback.format_exc()):
            raise
        code = 1
    if not under_torchrun():
        return code
    # A rank ends its process group itself (teardown is a no-op where none was started)
    from infermeter.engine.parallel.group import teardown, teardown_timed_out

    if code == 0:
        teardown()
    if code != 0 or teardown_timed_out():
        # A failed rank's peers are being stopped, and a stuck teardown thread would keep the
        # interpreter from exiting: leave now, output flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


# ---- starting the ranks -------------------------------------------------------------------------
def relaunch_if_needed(tp: int | None, argv: Sequence[str]) -> int | None:
    """Start torchrun for --tp N (N > 1) unless already under it; None: carry on here."""
    if not tp or tp == 1 or under_torchrun():
        return None
    return launch(tp, argv)


def launch(nproc: int, argv: Sequence[str], module: str = "infermeter") -> int:
    """Run `python -m <module> <argv>` as nproc ranks on this host; its exit code."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(["--standalone", f"--nproc_per_node={nproc}",
                                "--monitor_interval=0.1", "-m", module, *argv])
    with tempfile.TemporaryDirectory(prefix="infermeter-ranks-") as folder:
        threads = str(max(1, (os.cpu_count() or 1) // nproc))
        env = {**CHILD_ENV, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads),
               ERROR_DIR_ENV: folder}
        with _environ(env), _quiet_torchrun():
            try:
                torchrun.run(args)
            except ChildFailedError as err:
                return _report_failures(Path(folder), err, nproc)
            except (KeyboardInterrupt, SignalException) as err:  # the agent stopped the ranks
                print(f"infermeter: interrupted ({err})", file=sys.stderr)
                return 130
            except Exception as err:  # rendezvous or agent trouble: one line, not its traceback
                print(f"infermeter: error: torchrun could not run {nproc} ranks: {err}",
                      file=sys.stderr)
                return 1
    return 0


def _report_failures(folder: Path, err: Exception, nproc: int) -> int:
    """Each distinct user error once; else the first rank's traceback; else exit codes."""
    records = sorted((json.loads(p.read_text()) for p in folder.glob("rank-*.json")),
                     key=lambda record: record["time"])
    errors: dict[str, list[int]] = {}
    for record in records:
        if record["kind"] == "error":
            errors.setdefault(record["text"], []).append(record["rank"])
    for text, ranks in errors.items():
        where = "" if len(ranks) == nproc else f"rank {', '.join(map(str, sorted(ranks)))}: "
        print(f"infermeter: error: {where}{text}", file=sys.stderr)
    if errors:
        return 2
    if records:
        first = records[0]
        print(f"infermeter: rank {first['rank']} failed:\n{first['text'].rstrip()}",
              file=sys.stderr)
        return 1
    failures = getattr(err, "failures", {})
    for rank, failure in sorted(failures.items()):
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        print(f"infermeter: error: rank {rank} {how}", file=sys.stderr)
    return 1


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` (torchrun's ranks inherit it), restored afterwards."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _quiet_torchrun() -> Iterator[None]:
    """Keep torchrun's agent logs (startup banners, its failure report) off the terminal.

    Its loggers (torch.distributed.run, torch.distributed.elastic.*) end at "torch.distributed",
    which torch gives its own stderr handler: swap that for a NullHandler meanwhile.
    """
    logger = logging.getLogger("torch.distributed")
    saved = (logger.handlers[:], logger.propagate)
    logger.handlers = [logging.NullHandler()]
    logger.propagate = False
    try:
        yield
    finally:
        logger.handlers, logger.propagate = saved
