"""What the benchmark scripts that append generate Results to results/<name>-<device>.jsonl share
(generation_sweep.py, ttft_sweep.py, moe_kernel_ab.py, step_kernels_ab.py; each imports this
file from beside it): running their parts or models one after another, each group's latest run,
the A/B scripts' per-run TPOTs and verdict, and the summary written beside the Results and to
$OUT."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from infermeter.errors import InfermeterError
from infermeter.measure.result import Result, append_jsonl, read_results


def fmt(value: float | None, spec: str = ".1f") -> str:
    """A figure for a table or a line, "-" where it was not measured."""
    return "-" if value is None else format(value, spec)


def target_line(name: str, value: float | None, unit: str, goal: float, op: str) -> str:
    """One issue target beside the figure measured for it: "  NAME: 65.60 % (target >= 80 %)
    MISSED"; "-" where nothing measured it. op: ">=" or "<=" (the figure's side of the goal)."""
    met = value is not None and (value <= goal if op == "<=" else value >= goal)
    verdict = "-" if value is None else ("met" if met else "MISSED")
    return f"  {name}: {fmt(value, '.2f')} {unit} (target {op} {goal:g} {unit}) {verdict}"


def mbu_targets(results: list[Result], goals: dict[str, float], issue: int,
                kind: Callable[[Result], str], batch: int = 1) -> str:
    """Each model's decode-MBU target (goals: model -> MBU %) beside the median MBU of its
    batch-`batch` Results of each kind (kind(result): the A/B's label), in model then kind
    order of appearance; a model with a target but no Result says "-"."""
    by_case: dict[tuple[str, str], list[float]] = {}
    for r in results:
        name, mbu = r.model["name"], r.metrics.get("mbu_pct")
        if name in goals and r.config.get("batch_size") == batch and mbu is not None:
            by_case.setdefault((name, kind(r)), []).append(mbu)
    lines = [f"targets (issue {issue}), measured in this file:"]
    for model, goal in goals.items():
        kinds = [(k, v) for (name, k), v in by_case.items() if name == model]
        for k, values in kinds or [(None, None)]:
            label = f"{model} batch {batch} decode MBU" + (f", {k}" if k else "")
            lines.append(target_line(label, statistics.median(values) if values else None, "%",
                                     goal, ">="))
    return "\n".join(lines)


def progress(start: float, name: str) -> None:
    print(f"[{time.perf_counter() - start:6.1f} s] {name}", file=sys.stderr, flush=True)


def give_back_memory(device: str) -> None:
    """After a generate request failed: a request that failed after loading its weights (a
    Generator refusing its options, say) left them to the error's frames, gone only once its
    except clause is over; their blocks, and any compiled graphs, go back here, before the next
    request's fit check, which counts torch's cached blocks as used. (run_generate gives its
    memory back itself when it returns.) device: the request's ("cuda" needs no GPU here)."""
    import torch

    from infermeter.generate.memory import collect

    collect(torch.device(device))


def run_parts(parts: list[str], run_part: Callable[[str, Path, dict], None], path: Path,
              env: dict, start: float) -> None:
    """run_part(part, path, env) for each part in turn; one part's user-level failure
    (InfermeterError: a model that does not fit, say) is one line, its memory is given back, and
    the rest still run."""
    for part in parts:
        progress(start, part)
        try:
            run_part(part, path, env)
            continue
        except InfermeterError as err:
            print(f"{part}: error: {err}", file=sys.stderr)
        give_back_memory("cuda")  # the sweeps' parts run on the GPU


def run_in_processes(script: str, models: list[str], args: list[str], start: float) -> None:
    """`script --one MODEL *args` for each model, each in a process of its own: a fresh CUDA
    context and dynamo cache, and one model's crash leaves the others."""
    for model in models:
        progress(start, model)
        child = subprocess.run([sys.executable, script, "--one", model, *args])
        if child.returncode:
            print(f"{model}: its process exited with {child.returncode}", file=sys.stderr)


def latest_of_each(results: list[Result], group: Callable[[Result], str]) -> list[Result]:
    """Each group's Results from its latest run only (the file keeps every run: a figure the
    docs cite never disappears from it). A run is the Results of one command, which share the
    env timestamp captured when it started."""
    last: dict[str, str] = {}
    for r in results:
        last[group(r)] = max(last.get(group(r), ""), str(r.env.get("timestamp", "")))
    return [r for r in results if str(r.env.get("timestamp", "")) == last[group(r)]]


def run_tpots(result: Result) -> list[float]:
    """ms a decode step in each timed run: the run's decode time over its steps."""
    steps = result.metrics.get("decode_steps") or 0
    return [ms / steps for ms in result.samples.get("decode_ms", [])] if steps else []


def ab_arguments(doc: str, models: list[str], rounds: int, order: str,
                 name: str) -> argparse.ArgumentParser:
    """The A/B scripts' common flags: --models, --rounds (`order`: the kinds one round runs),
    --results, --summary-only, --name and --slug (of results/NAME-SLUG.jsonl) and --one (a
    child's model; run_in_processes passes it)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=models, default=models)
    parser.add_argument("--rounds", type=int, default=rounds, help=f"{order}, repeated (ABAB)")
    parser.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "results"))
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--name", default=name, help=f"the Results' file, results/NAME-<device>"
                        f".jsonl, and its summary (default: {name}): a measurement of its own "
                        "keeps apart from the A/B's usual file")
    parser.add_argument("--slug", help="summarise results/NAME-SLUG.jsonl (default: this "
                        "machine's device)")
    parser.add_argument("--one", choices=models, help=argparse.SUPPRESS)
    return parser


def ab_file(args: argparse.Namespace) -> tuple[dict, str, Path]:
    """(this machine's env, the device slug, the A/B's JSONL path (--name, --slug), its folder
    made)."""
    from infermeter.measure.env import capture_env, device_slug

    env = capture_env()
    slug = args.slug or device_slug(env)
    path = Path(args.results) / f"{args.name}-{slug}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return env, slug, path


def run_ab_case(request: object, env: dict, path: Path, model: str, kind: str, round_: int,
                key: str, ran: str, baseline: bool = False) -> None:
    """One request of an A/B script: each of its Results labelled config.ab = {key: kind,
    "round": round_} (and "baseline": true where the run times an older source tree as the
    A/B's baseline: the report never takes such a Result for a column's figure), appended to
    `path` as soon as it is done and printed with what ran (config[ran]); a request that fails
    (e.g. a model that does not fit) prints its error and the A/B goes on, with the memory of
    either given back before the next request's fit check (a fit check counts torch's cached
    blocks as used)."""
    from infermeter.generate.job import run_generate

    def save(result: Result) -> None:
        result.config["ab"] = {key: kind, "round": round_, **({"baseline": True} if baseline
                                                                else {})}
        append_jsonl(path, [result])
        m = result.metrics
        print(f"  {model} batch {result.config.get('batch_size')} {kind} (ran "
              f"{result.config.get(ran)}), round {round_}: TPOT p50 "
              f"{fmt((m['tpot_ms'] or {}).get('p50'), '.4f')} ms, MBU {fmt(m.get('mbu_pct'))}%",
              flush=True)

    try:
        run_generate(request, env, on_result=save)
        return  # run_generate gave its weights' memory back
    except InfermeterError as err:
        print(f"{model} {kind}: error: {err}", file=sys.stderr)
    give_back_memory(request.device)


def run_tpot_cells(runs: list[float]) -> list[str]:
    """A summary row's median and range of the per-run TPOTs (run_tpots), "-" without runs."""
    if not runs:
        return ["-", "-"]
    return [fmt(statistics.median(runs), ".4f"), f"{min(runs):.4f}-{max(runs):.4f}"]


def median_ratio(base: list[float], other: list[float]) -> tuple[float, bool]:
    """other / base from their medians, and whether the two ranges are apart (neither side's
    values reach into the other's)."""
    ratio = statistics.median(other) / statistics.median(base)
    return ratio, max(other) < min(base) or max(base) < min(other)


def ab_line(case: str, runs: dict[str, list[float]], base: str, other: str) -> str:
    """An A/B's verdict for one case: other / base TPOT from the medians of their per-run TPOTs
    (`runs` by kind), and whether the two ranges of runs are apart (drift or noise overlaps)."""
    base_runs, other_runs = runs.get(base), runs.get(other)
    if not base_runs or not other_runs:
        return f"{case}: {other} / {base}: - (a side has no timed runs)"
    ratio, apart = median_ratio(base_runs, other_runs)
    return (f"{case}: {other} / {base} TPOT {ratio:.3f} (per-run medians, {len(base_runs)} and "
            f"{len(other_runs)} runs; ranges {'apart' if apart else 'overlap'})")


def write_summary(path: Path, summarise: Callable[[list[Result]], str], start: float) -> int:
    """Print summarise(the Results in `path`) and write it beside them as <stem>-summary.txt;
    where $OUT is set, the JSONL and the summary go there too, unless `path` is in $OUT or a
    folder under it (it comes back from there already; a copy would overwrite $OUT's own file
    of that name, another run's Results). 1 where `path` holds nothing."""
    if not path.exists():
        print(f"no results in {path}", file=sys.stderr)
        return 1
    text = summarise(read_results(path))
    print(text)
    name = f"{path.stem}-summary.txt"
    (path.parent / name).write_text(text + "\n")
    out = os.environ.get("OUT")
    if out and not path.resolve().is_relative_to(Path(out).resolve()):
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out) / path.name)
        (Path(out) / name).write_text(text + "\n")
    print(f"wrote {path} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0
