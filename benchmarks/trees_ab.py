"""Time one `infermeter generate` case on several source trees, one process each, in
alternating order: what a commit cost (or won), measured on one machine in one command.

Why a script: a step's speed moves 1-2% between processes on the same GPU, so two trees are
compared only by alternating their processes (ABAB) in one device command, and an older tree
runs its own code, not today's, so it runs as a process of its own with its src/ first on the
path. The device has no git: the trees travel as folders, made here first.

  python benchmarks/trees_ab.py snapshot REV [REV ...] --into DIR
      each revision's src/ and pyproject.toml, from git, into DIR/<12-hex>/, with a REV file;
      with --between OLD NEW --points N, also N commits evenly spaced among the first-parent
      commits after OLD up to NEW that touch --paths (default src/): a bisection's next
      points
  python benchmarks/trees_ab.py run TREE[@KEY=VALUE...] [...] --name NAME [--rounds N]
          [--timeout S] [--caches fresh|own|shared] [--trace DIR] -- GENERATE_FLAGS
      per round, each TREE in the order given: `python -m infermeter generate GENERATE_FLAGS`
      with TREE/src first on PYTHONPATH and INFERMETER_SOURCE_REVISION its REV, and each
      @KEY=VALUE set in that process's environment (a tree may come twice, with and without:
      an allocator or compiler setting timed against the default in one command); the
      Results go to results/NAME-<device>.jsonl, each labelled config.ab = {"tree": its 12 hex
      digits, "round": k, "command": this command's start}, "environment": "KEY=VALUE ..."
      where the entry set some, and "baseline": true on every entry after the first (the one
      under test comes first; the report never takes a baseline's or an environment's
      figure); each process compiles into an empty compiler cache of its own (--caches fresh,
      the default: each tunes anew) or, with --caches own, into its entry's (empty in round
      0, reused after), so no tree reloads what another tree's process compiled and tuned
      ("caches" in config.ab); --caches shared leaves the environment's to all; with --trace
      DIR each process also traces a few decode steps into DIR/<round>-<entry>-<12 hex>/ (for
      `infermeter trace A --against B`); then the summary (below)
  python benchmarks/trees_ab.py summary --name NAME
      the latest command's Results: each process's TPOT p50, per-run range, decode tok/s, MBU,
      SM clocks as its timed runs ended and the kernel configs its compile timed (0: every
      pick reloaded from the compiler's cache; where its Results have them), and per batch each
      baseline against the first tree twice: over runs (per-run TPOT medians; whether the
      ranges are apart) and over processes (each process's median one sample: whether the
      processes' ranges are apart, and each tree's spread between its processes; with one
      process a side, a line that says the runs cannot tell), beside the Results as
      NAME-<device>-summary.txt

A process that fails or passes --timeout prints one line and the rest still run.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_common import (  # noqa: E402
    ab_line,
    fmt,
    median_ratio,
    progress,
    run_tpot_cells,
    run_tpots,
    write_summary,
)

from infermeter.errors import InfermeterError  # noqa: E402
from infermeter.measure.clocks import sm_span  # noqa: E402
from infermeter.measure.result import Result, append_jsonl, read_results  # noqa: E402
from infermeter.measure.trace import check_trace_dir  # noqa: E402
from infermeter.textable import render_table  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
REVISION = re.compile(r"[0-9a-f]{40}")
SETTING = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")
CACHES = ("shared", "own", "fresh")  # --caches: cache_settings says what each gives


class Entry(NamedTuple):
    """One timed process a round: a snapshot folder, its revision, and the environment
    settings its entry named (TREE@KEY=VALUE...), in the order given."""
    tree: Path
    rev: str
    settings: tuple[str, ...] = ()

    @property
    def ab(self) -> dict[str, str]:
        """What names the entry in its Results' config.ab: its tree's 12 hex digits and, where
        it has settings, "environment": them, space-separated."""
        return {"tree": self.rev[:12],
                **({"environment": " ".join(self.settings)} if self.settings else {})}


def parse_entry(text: str) -> Entry:
    """TREE[@KEY=VALUE...] -> Entry; InfermeterError where the tree is not a snapshot or a
    setting is not KEY=VALUE."""
    tree, *settings = text.split("@")
    for setting in settings:
        if not SETTING.fullmatch(setting):
            raise InfermeterError(f"{text}: {setting!r} is not an environment setting "
                                  "KEY=VALUE")
    return Entry(Path(tree), tree_revision(Path(tree)), tuple(settings))


def tree_revision(tree: Path) -> str:
    """The 40-hex revision a snapshot folder holds (its REV file); InfermeterError where the
    folder is not one (no src/infermeter, no REV, or a REV that is no revision)."""
    if not (tree / "src" / "infermeter" / "__init__.py").is_file():
        raise InfermeterError(f"{tree}: not a source tree (no src/infermeter/__init__.py); "
                              "make one with `trees_ab.py snapshot`")
    try:
        rev = (tree / "REV").read_text().strip()
    except OSError:
        raise InfermeterError(f"{tree}: no REV file naming its revision") from None
    if not REVISION.fullmatch(rev):
        raise InfermeterError(f"{tree}/REV: {rev[:50]!r} is not a 40-hex revision")
    return rev


def snapshot(revisions: list[str], into: Path) -> list[Path]:
    """Each revision's src/ and pyproject.toml from git into `into`/<12 hex>/ with its REV."""
    trees = []
    for name in revisions:
        found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}"],
                               capture_output=True, text=True)
        if found.returncode:
            raise InfermeterError(f"{name}: no such commit in this repository")
        rev = found.stdout.strip()
        tree = into / rev[:12]
        tree.mkdir(parents=True, exist_ok=True)
        held = [path for path in ("src", "pyproject.toml") if not subprocess.run(
            ["git", "cat-file", "-e", f"{rev}:{path}"], capture_output=True).returncode]
        if "src" not in held:
            raise InfermeterError(f"{name}: no src/ in that commit")
        archive = subprocess.run(["git", "archive", rev, *held], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        (tree / "REV").write_text(rev + "\n")
        trees.append(tree)
    return trees


def spaced_commits(old: str, new: str, points: int, paths: list[str]) -> list[str]:
    """`points` commits evenly spaced among the first-parent commits after `old` up to `new`
    that touch `paths`, oldest first (all of them where there are no more than that)."""
    listed = subprocess.run(["git", "rev-list", "--reverse", "--first-parent", f"{old}..{new}",
                             "--", *paths], capture_output=True, text=True)
    if listed.returncode:
        raise InfermeterError(f"--between {old} {new}: {listed.stderr.strip() or 'no range'}")
    commits = listed.stdout.split()
    if len(commits) <= points:
        return commits
    return [commits[(i + 1) * len(commits) // (points + 1)] for i in range(points)]


def cache_settings(caches: str, scratch: Path, index: int, round_: int) -> tuple[str, ...]:
    """The compiler cache (TORCHINDUCTOR_CACHE_DIR) the index-th entry's process gets in round
    round_, under --caches: "shared", none set (the environment's, as every process shares by
    default); "own", a folder of the entry's, empty in its first round and reused after (each
    tree tunes its own kernel configs once, never reloading another tree's picks); "fresh", an
    empty folder for every process (each tunes anew)."""
    if caches == "shared":
        return ()
    folder = f"cache-{index}" if caches == "own" else f"cache-{index}-round-{round_}"
    return (f"TORCHINDUCTOR_CACHE_DIR={scratch / folder}",)


def child_env(entry: Entry, extra: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment an entry's process runs in: its tree's src/ ahead of whatever
    PYTHONPATH held (a device's installed wheels stay reachable), its revision named for its
    Results, `extra` settings (its compiler cache), then its own settings over the rest."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(entry.tree.resolve() / "src"), os.environ.get("PYTHONPATH")) if p)
    env["INFERMETER_SOURCE_REVISION"] = entry.rev
    env.update(setting.split("=", 1) for setting in (*extra, *entry.settings))
    env.pop("OUT", None)  # an older tree's scripts must not write into the device's $OUT
    return env


def run_tree(entry: Entry, flags: list[str], timeout: float | None, output: Path,
             extra: tuple[str, ...] = (), trace: Path | None = None) -> str | None:
    """`generate FLAGS --output OUTPUT` (and `--trace TRACE`, a folder of this process's own)
    in the entry's process; None, or why it gave nothing."""
    command = [sys.executable, "-m", "infermeter", "generate", *flags, "--output", str(output),
               *(("--trace", str(trace)) if trace else ())]
    child = subprocess.Popen(command, cwd=entry.tree, env=child_env(entry, extra),
                             start_new_session=True)  # its compile workers die with it
    try:
        code = child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        return f"timed out after {timeout:g} s"
    return f"exited with {code}" if code else None


def labelled(results: list[Result], entry: Entry, round_: int, command: str,
             baseline: bool, caches: str = "shared") -> list[Result]:
    for result in results:
        result.config["ab"] = {**entry.ab, "round": round_, "command": command,
                               **({"baseline": True} if baseline else {}),
                               **({"caches": caches} if caches != "shared" else {})}
    return results


def label(ab: dict[str, Any]) -> str:
    """An entry as the progress lines and the summary name it, from its config.ab (Entry.ab):
    the tree's 12 hex digits, then its settings."""
    return " ".join(p for p in (ab["tree"], ab.get("environment")) if p)


def trace_folder(traces: Path | None, round_: int, index: int, entry: Entry) -> Path | None:
    """--trace: a process's own folder under TRACES, <round>-<entry's place>-<tree's 12 hex>
    (an entry's place tells apart one tree run with and without settings)."""
    return traces / f"{round_}-{index}-{entry.rev[:12]}" if traces else None


def run(entries: list[Entry], flags: list[str], rounds: int, timeout: float | None,
        path: Path, start: float, caches: str = "shared", traces: Path | None = None) -> None:
    """rounds x entries processes, each entry's Results labelled and appended to `path`; each
    process's compiler cache as cache_settings says, and its trace folder as trace_folder."""
    command = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(rounds):
            for index, entry in enumerate(entries):
                name = label(entry.ab)
                progress(start, f"round {round_}: {name} ({entry.tree})")
                output = Path(scratch) / f"{round_}-{index}.jsonl"
                failed = run_tree(entry, flags, timeout, output,
                                  cache_settings(caches, Path(scratch), index, round_),
                                  trace_folder(traces, round_, index, entry))
                try:
                    found = read_results(output) if output.exists() else []
                except InfermeterError as err:
                    failed, found = f"its Results cannot be read here ({err})", []
                if failed or not found:
                    print(f"{name} round {round_}: {failed or 'wrote no Result'}",
                          file=sys.stderr)
                if found:
                    append_jsonl(path, labelled(found, entry, round_, command, index > 0,
                                                caches))
                for result in found:  # as it goes: a command cut short still shows these
                    m = result.metrics
                    print(f"{name} round {round_}, batch {result.config.get('batch_size')}: "
                          f"TPOT p50 {fmt((m.get('tpot_ms') or {}).get('p50'), '.4f')} ms, "
                          f"decode tok/s {fmt(m.get('decode_tok_per_s'))}", flush=True)


def sm_clocks(result: Result) -> str:
    """The SM clock range (MHz) over a Result's timed runs' ends (metrics.gpu_clocks), "-"
    where it has none (a tree from before the field, no NVML)."""
    read = ((result.metrics.get("gpu_clocks") or {}).get("sm_mhz")) or []
    return sm_span(read)


def tuned(result: Result) -> str:
    """How many kernel configs the process timed to pick them (metrics.compiler): 0 where it
    reloaded every pick from the compiler's cache; "-" where the Result has no such count."""
    count = (result.metrics.get("compiler") or {}).get("tuning_benchmarks")
    return "-" if count is None else str(count)


def summarise(results: list[Result]) -> str:
    """The latest command's processes in the order they ran, and each baseline tree against
    the first, per batch size."""
    ours = [r for r in results if isinstance(r.config.get("ab"), dict)
            and "tree" in r.config["ab"]]
    if not ours:
        return "no Results of trees_ab.py in this file"
    latest = max(r.config["ab"].get("command", "") for r in ours)
    ours = [r for r in ours if r.config["ab"].get("command", "") == latest]
    rows, runs, processes = [], {}, {}
    for r in ours:
        ab, m, tpots = r.config["ab"], r.metrics, run_tpots(r)
        batch = r.config.get("batch_size")
        rows.append([label(ab), ab["round"], batch, fmt((m.get("tpot_ms") or {}).get("p50"),
                     ".4f"), *run_tpot_cells(tpots)[1:], fmt(m.get("decode_tok_per_s")),
                     fmt(m.get("mbu_pct")), sm_clocks(r), tuned(r)])
        runs.setdefault(batch, {}).setdefault(label(ab), []).extend(tpots)
        if tpots:
            processes.setdefault(batch, {}).setdefault(label(ab), []).append(
                statistics.median(tpots))
    first = next(label(r.config["ab"]) for r in ours if not r.config["ab"].get("baseline"))
    lines = [f"{ours[0].model.get('name')}, `generate` one process a tree, the first tree "
             f"{first} (the others marked config.ab.baseline); command of {latest}",
             render_table(("tree", "round", "batch", "TPOT p50 ms", "per-run TPOT ms (range)",
                           "decode tok/s", "MBU %", "SM MHz", "configs timed"),
                          rows)]
    for batch, by_tree in runs.items():
        for tree in by_tree:
            if tree != first:
                lines += [ab_line(f"batch {batch}", by_tree, first, tree),
                          process_line(f"batch {batch}", processes.get(batch, {}), first,
                                       tree)]
    return "\n".join(lines)


def process_line(case: str, processes: dict[str, list[float]], base: str, other: str) -> str:
    """The verdict over processes, not runs: each process's median per-run TPOT is one sample
    (a step's speed moves more between processes than between one process's runs). With two
    or more processes a side, other / base from the medians of those samples, whether the two
    sides' process ranges are apart, and each side's own spread (max / min - 1); with fewer,
    a line that says the runs' verdict above cannot tell the trees from the processes."""
    base_p, other_p = processes.get(base, []), processes.get(other, [])
    if min(len(base_p), len(other_p)) < 2:
        return (f"{case}: {other} / {base}: one process a side, so the ranges above are one "
                f"process's runs; a process's speed moves more (alternate two rounds or more)")
    ratio, apart = median_ratio(base_p, other_p)

    def spread(values: list[float]) -> str:
        return f"{(max(values) / min(values) - 1) * 100:.1f}%"

    return (f"{case}: {other} / {base} TPOT {ratio:.3f} over processes (medians of {len(base_p)} "
            f"and {len(other_p)} processes' per-run medians; processes "
            f"{'apart' if apart else 'overlap'}; spread within {base} {spread(base_p)}, within "
            f"{other} {spread(other_p)})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    ours = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    snap = sub.add_parser("snapshot", help="revisions from git into folders")
    snap.add_argument("revisions", nargs="*")
    snap.add_argument("--into", required=True)
    snap.add_argument("--between", nargs=2, metavar=("OLD", "NEW"),
                      help="also --points commits between these two")
    snap.add_argument("--points", type=int, default=5)
    snap.add_argument("--paths", nargs="+", default=["src/"],
                      help="the commits --between counts are those touching these")
    timed = sub.add_parser("run", help="time `generate -- FLAGS` on each tree, alternating")
    timed.add_argument("trees", nargs="+", metavar="TREE[@KEY=VALUE...]")
    timed.add_argument("--rounds", type=int, default=2)
    timed.add_argument("--timeout", type=float, help="seconds a process may run")
    timed.add_argument("--trace", metavar="DIR",
                       help="each process traces a few decode steps (generate --trace) into a "
                            "folder of its own under DIR: <round>-<entry>-<tree's 12 hex>")
    # fresh by default: on an H100 on 2026-12-07 one tree ran at two speeds 5% apart on a
    # cache the trees shared (fast where its process compiled afresh, slow where it loaded the
    # cache) and at one speed on fresh caches, 7.3% from the next tree (docs/engine.md)
    timed.add_argument("--caches", choices=CACHES, default="fresh",
                       help="each process's compiler cache: an empty one every process "
                            "(fresh, the default), one of each entry's own, or the "
                            "environment's (shared)")
    for p in (timed, sub.add_parser("summary", help="the latest command's summary")):
        p.add_argument("--name", required=True, help="results/NAME-<device>.jsonl")
        p.add_argument("--results", default=str(RESULTS))
        p.add_argument("--slug", help="the device part of the file name (default: this one's)")
    args = parser.parse_args(ours)
    start = time.perf_counter()
    try:
        if args.action == "snapshot":
            if args.points < 1:
                raise InfermeterError(f"--points {args.points}: at least 1")
            between = spaced_commits(*args.between, args.points, args.paths) \
                if args.between else []
            if not args.revisions and not between:
                raise InfermeterError("name revisions, or --between OLD NEW with commits "
                                      "between them")
            for tree in snapshot(args.revisions + between, Path(args.into)):
                print(tree)
            return 0
        if args.action == "run":
            if args.rounds < 1:
                raise InfermeterError(f"--rounds {args.rounds}: at least 1")
            if args.timeout is not None and not args.timeout > 0:
                raise InfermeterError(f"--timeout {args.timeout:g}: a number of seconds above 0")
            if not flags or "--output" in flags or "-o" in flags:
                raise InfermeterError("give generate's flags after --, without --output (each "
                                      "process writes its own, gathered here)")
            if "--trace" in flags:
                raise InfermeterError("give --trace DIR before --, not among generate's flags "
                                      "(each process traces into a folder of its own under it)")
            if args.trace:  # a folder that cannot be made: one line now, not one per process
                check_trace_dir(args.trace)
            entries = [parse_entry(text) for text in args.trees]  # all checked before any runs
        path = results_path(args)
        if args.action == "run":
            run(entries, flags, args.rounds, args.timeout, path, start, args.caches,
                Path(args.trace) if args.trace else None)
        return write_summary(path, summarise, start)
    except InfermeterError as err:
        print(f"trees_ab.py: error: {err}", file=sys.stderr)
        return 1


def results_path(args: argparse.Namespace) -> Path:
    slug = args.slug
    if slug is None:
        from infermeter.measure.env import capture_env, device_slug

        slug = device_slug(capture_env())
    path = Path(args.results) / f"{args.name}-{slug}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
