"""`infermeter run`: the main job. Sizes the KV cache, times moving it, generating, and reloading
it against recomputing it, for one setting, then prints the reference table and writes Results
and report into one folder.

Files in the folder (--out): results.jsonl (appended after each stage, atomically), report.md,
report.html and plots/*.png (with matplotlib). Ctrl-C keeps the finished stages and makes the
report from them (exit 130); a stage that fails with a user error is one line and the others
still run (exit 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from infermeter.commands.common import positive_int
from infermeter.errors import InfermeterError

RESULTS_NAME = "results.jsonl"


def add_run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the main job: KV size, KV moving speed, generation speed, "
                       "then the reference table and a report folder",
                       description="Size the KV cache, time moving it between GPU and host "
                       "memory and time generation for one setting; print the reference table "
                       "and write results.jsonl, report.md, report.html (and plots) into --out. "
                       "Default: the reference setting (llama-2-7b, random fp16 weights, batch "
                       "1, 512-token cache: 80 prompt + 432 new tokens) on the first GPU; "
                       "without a GPU, the debug preset on the CPU. Generate also times "
                       "prefill alone (batch 1) at longer prompts (512, 2048, 8192 and the "
                       "longest that fits; on the CPU 128 and up to 256 tokens) for the "
                       "report's reload-vs-recompute table. Offload then times a prefix's KV "
                       "cache reloaded from host memory against recomputed (as `infermeter "
                       "offload`: suffixes of the prompt's and the cache's length, prefixes of "
                       "1, 4 and 16 cache lengths, the longest capped at what fits; 1 and 4 on "
                       "the CPU; also from a paged host copy in 16-token blocks).")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help="preset name or config path: random weights "
                        "(default llama-2-7b; debug without a GPU)")
    source.add_argument("--checkpoint", metavar="DIR", help="measure this Meta or HF "
                        "checkpoint: kv from its config, generate from its weights")
    p.add_argument("--batch-size", type=positive_int, help="sequences per batch (default 1)")
    p.add_argument("--seq-len", type=positive_int, help="KV-cache tokens: prompt + new tokens "
                   "(default 512; 64 on the CPU)")
    p.add_argument("--dtype", help="weights and KV cache: fp16, bf16, fp32 (default fp16; "
                   "a checkpoint's own dtype; fp32 on the CPU)")
    p.add_argument("--out", metavar="DIR", help="results folder (default "
                   "./infermeter-results/<UTC timestamp>)")
    p.add_argument("--trace", metavar="DIR", help="also record torch.profiler traces (after "
                   "the timed runs, so no number changes): DIR/copy and DIR/generate, and the "
                   "decode-step breakdown in the generate Result")
    p.set_defaults(handler=_run)


@dataclass
class Progress:
    """What the stages left behind, for the closing lines and the exit code."""

    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    interrupted: bool = False


def _note(text: str) -> None:
    print(f"infermeter run: {text}", file=sys.stderr, flush=True)


def _out_folder(out: str | None) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    folder = Path(out) if out else Path("infermeter-results") / stamp
    if folder.exists() and not folder.is_dir():
        raise InfermeterError(f"{folder}: a file; --out names the results folder")
    if (folder / RESULTS_NAME).exists():  # appending would mix two runs in one report
        raise InfermeterError(f"{folder} already holds {RESULTS_NAME}; choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InfermeterError(f"{folder}: cannot create the results folder ({err})") from None
    return folder


def _banner(setting, env: dict, folder: Path) -> str:
    if not setting.on_gpu:
        return (f"infermeter run: no CUDA GPU found: running on the CPU ("
                f"{'debug preset, ' if setting.spec.name == 'debug' else ''}copy --device cpu, "
                f"generate eager, few repeats), not a GPU measurement: {setting.describe()}; "
                f"results in {folder}")
    what = "the reference setting: " if setting.reference else ""
    return (f"infermeter run: {what}{setting.describe()} on {env.get('device_name')} (cuda:0); "
            f"results in {folder}")


def _run_stages(setting, env: dict, results_path: Path, progress: Progress) -> None:
    from infermeter.measure.result import append_jsonl
    from infermeter.run.stages import STAGES

    for number, (name, what, stage) in enumerate(STAGES, start=1):
        _note(f"[{number}/{len(STAGES)}] {name}: {what} ...")
        start = time.perf_counter()
        try:
            results = stage(setting, env)
        except InfermeterError as err:  # one line; the other stages still measure
            _note(f"error: {name} stage failed: {err}")
            progress.failed.append(name)
            continue
        append_jsonl(results_path, results)  # atomic: a Ctrl-C leaves the old or the new file
        progress.done.append(name)
        _note(f"[{number}/{len(STAGES)}] {name}: {len(results)} Result(s) in "
              f"{time.perf_counter() - start:.1f} s")


def _write_report(folder: Path, results_path: Path) -> None:
    """report.md, report.html and plots from the Results written so far; the reference table
    on stdout."""
    import importlib.util
    import shutil

    from infermeter.measure.result import atomic_write
    from infermeter.report.build import build_report, render, write_plots
    from infermeter.report.tables import Report

    report = build_report([str(results_path)], root=folder)  # notes name "results.jsonl:N"
    for name, fmt in (("report.md", "markdown"), ("report.html", "html")):
        atomic_write(folder / name, render(report, fmt).encode("utf-8"))
    plots = importlib.util.find_spec("matplotlib") is not None  # optional: the report extra
    if plots:
        write_plots(report, str(folder / "plots"))
    width = shutil.get_terminal_size((160, 40)).columns
    # the terminal gets the reference table only; its notes and the extended table are long
    reference = Report(report.tables[:1], [], report.columns)
    print(render(reference, "terminal", width=width), end="", flush=True)
    _note(f"wrote {results_path.name}, report.md (all tables and notes), report.html"
          f"{', plots/' if plots else ''} in {folder}")


def _exit_code(progress: Progress) -> int:
    from infermeter.run.stages import STAGES

    missing = [name for name, _, _ in STAGES if name not in progress.done + progress.failed]
    if progress.interrupted:
        _note(f"interrupted: {', '.join(missing) or 'the report'} did not run; kept "
              f"{', '.join(progress.done) or 'nothing'}")
        return 130
    if progress.failed:
        _note(f"{', '.join(progress.failed)} failed (see above); the report has the rest")
        return 2
    return 0


def _run(args: argparse.Namespace) -> int:
    from infermeter.copy.job import gpu_available
    from infermeter.launch import under_torchrun
    from infermeter.measure.env import capture_env
    from infermeter.run.stages import plan_setting

    if under_torchrun():  # the job times one GPU; tensor parallelism is `copy/generate --tp`
        raise InfermeterError("infermeter run measures one GPU: start it without torchrun")
    setting = plan_setting(args.model, args.checkpoint, args.batch_size, args.seq_len,
                           args.dtype, gpu=gpu_available())
    if args.trace:  # a bad folder fails before the results folder exists
        import dataclasses

        from infermeter.measure.trace import check_trace_dir

        check_trace_dir(args.trace)
        setting = dataclasses.replace(setting, trace_dir=args.trace)
    folder = _out_folder(args.out)
    env = capture_env()
    print(_banner(setting, env, folder), flush=True)
    results_path = folder / RESULTS_NAME
    progress = Progress()
    try:
        _run_stages(setting, env, results_path, progress)
        if progress.done:
            _write_report(folder, results_path)
        else:
            _note("no stage finished: no report")
    except KeyboardInterrupt:  # keep what finished: its Results are already on disk
        progress.interrupted = True
        _report_after_interrupt(folder, results_path, progress)
    return _exit_code(progress)


def _report_after_interrupt(folder: Path, results_path: Path, progress: Progress) -> None:
    if not progress.done:
        return
    try:
        _write_report(folder, results_path)
    except KeyboardInterrupt:  # a second Ctrl-C: atomic writes leave no partial file
        _note("report not written (interrupted again)")
