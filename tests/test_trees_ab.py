"""benchmarks/trees_ab.py: one generate case over source trees, one process each, alternating.

The trees here are stand-ins: each holds an `infermeter` package whose `generate` writes one
Result (its TPOT per run from the tree's own speed, its revision from the environment the
script sets), sleeps past the timeout, or fails, so the script's order, labels, checks and
summary are tested without a model or a GPU. snapshot runs git on a small repository made here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from infermeter.measure.result import read_results
from tests.benchmark_scripts import load_benchmark

trees_ab = load_benchmark("trees_ab")

# A stand-in `python -m infermeter generate ... --output F`: one generate Result whose runs
# take MS a step (the tree's speed, from its file; "1.0,1.2": its first process 1.0, its
# second 1.2, cycling), its env.source_revision the environment's,
# its batch from --batch-size, AB_SLOWER in its environment multiplying MS, AB_SM its SM clock
# (metrics.gpu_clocks), AB_TUNED the configs its compile timed (metrics.compiler); it records
# its argv, PYTHONPATH's first entry and its compiler cache beside it.
STAND_IN = '''
import json, os, sys, time
from pathlib import Path
here = Path(__file__).resolve().parents[2]
mode = (here / "MODE").read_text().strip()
args = sys.argv[1:]
if mode == "sleep":
    time.sleep(60)
if mode == "fail":
    sys.exit(3)
done = len((here / "calls").read_text().splitlines()) if (here / "calls").exists() else 0
speeds = (here / "MS").read_text().split(",")  # the k-th process of the tree takes the k-th
ms = float(speeds[done % len(speeds)]) * float(os.environ.get("AB_SLOWER", "1"))
batch = int(args[args.index("--batch-size") + 1])
with open(here / "calls", "a") as calls:
    calls.write(json.dumps({"argv": args, "path": os.environ["PYTHONPATH"].split(os.pathsep)[0],
                            "out": os.environ.get("OUT"),
                            "cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}) + "\\n")
result = {"schema": SCHEMA, "kind": "generate", "model": {"name": "m"},
          "config": {"batch_size": batch, "mode": "compiled"},
          "env": {"source_revision": os.environ["INFERMETER_SOURCE_REVISION"]},
          "metrics": {"tpot_ms": {"p50": ms}, "decode_tok_per_s": batch * 1000 / ms,
                      "mbu_pct": 50.0, "decode_steps": 10},
          "samples": {"decode_ms": [10 * ms, 10 * ms * 1.001]}, "warnings": []}
if "AB_SM" in os.environ:  # the SM clock a GPU's Result records as its runs end
    result["metrics"]["gpu_clocks"] = {"sm_mhz": [1980, int(os.environ["AB_SM"])]}
if "AB_TUNED" in os.environ:  # the configs its compile timed (metrics.compiler)
    result["metrics"]["compiler"] = {"tuning_benchmarks": int(os.environ["AB_TUNED"])}
with open(args[args.index("--output") + 1], "a") as out:
    out.write(json.dumps(result) + "\\n")
'''


def stand_in_tree(root: Path, rev: str, ms: float | str = 1.0, mode: str = "ok") -> Path:
    from infermeter.measure.result import SCHEMA_VERSION

    tree = root / rev[:12]
    package = tree / "src" / "infermeter"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(STAND_IN.replace("SCHEMA", str(SCHEMA_VERSION)))
    (tree / "REV").write_text(rev + "\n")
    (tree / "MS").write_text(str(ms))
    (tree / "MODE").write_text(mode)
    return tree


NEW, OLD = "a" * 40, "b" * 40
FLAGS = ["--", "--model", "llama-3.2-1b", "--batch-size", "8"]


def run_ab(tmp_path, trees, *extra):
    return trees_ab.main(["run", *map(str, trees), "--name", "t", "--results",
                          str(tmp_path / "results"), "--slug", "gpu", *extra, *FLAGS])


def test_trees_alternate_each_in_its_own_process_and_the_baselines_are_marked(tmp_path,
                                                                              capsys,
                                                                              monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    new, old = stand_in_tree(tmp_path, NEW, 1.0), stand_in_tree(tmp_path, OLD, 1.1)
    assert run_ab(tmp_path, [new, old], "--rounds", "2") == 0
    path = tmp_path / "results" / "t-gpu.jsonl"
    results = read_results(path)
    # ABAB: each process ran its own tree's code and named its own revision
    assert [r.env["source_revision"] for r in results] == [NEW, OLD, NEW, OLD]
    assert [(r.config["ab"]["tree"], r.config["ab"]["round"], r.config["ab"].get("baseline"))
            for r in results] == [(NEW[:12], 0, None), (OLD[:12], 0, True),
                                  (NEW[:12], 1, None), (OLD[:12], 1, True)]
    assert len({r.config["ab"]["command"] for r in results}) == 1
    for tree in (new, old):
        calls = [json.loads(line) for line in (tree / "calls").read_text().splitlines()]
        assert [c["path"] for c in calls] == [str((tree / "src").resolve())] * 2
        assert all(c["argv"][:5] == ["generate", "--model", "llama-3.2-1b", "--batch-size", "8"]
                   and c["out"] is None for c in calls)  # $OUT kept from the trees
    text = (tmp_path / "results" / "t-gpu-summary.txt").read_text()
    out = capsys.readouterr().out
    # a line as each process ends (a command cut short still shows them), then the summary
    assert out.splitlines()[:4] == [
        f"{NEW[:12]} round 0, batch 8: TPOT p50 1.0000 ms, decode tok/s 8000.0",
        f"{OLD[:12]} round 0, batch 8: TPOT p50 1.1000 ms, decode tok/s 7272.7",
        f"{NEW[:12]} round 1, batch 8: TPOT p50 1.0000 ms, decode tok/s 8000.0",
        f"{OLD[:12]} round 1, batch 8: TPOT p50 1.1000 ms, decode tok/s 7272.7"]
    assert out.endswith(text)
    assert f"batch 8: {OLD[:12]} / {NEW[:12]} TPOT 1.100 (per-run" in text
    assert "ranges apart" in text
    assert (f"batch 8: {OLD[:12]} / {NEW[:12]} TPOT 1.100 over processes (medians of 2 and 2 "
            f"processes' per-run medians; processes apart; spread within {NEW[:12]} 0.0%, "
            f"within {OLD[:12]} 0.0%)") in text
    # where $OUT is set the Results and the summary come back through it too
    assert (tmp_path / "out" / "t-gpu-summary.txt").read_text() == text


def test_the_verdict_over_processes_sees_what_one_process_a_tree_cannot(tmp_path):
    """Each tree's processes at three speeds, the trees 1% apart by their medians: the line
    over processes gives that ratio, says the processes overlap and gives each tree's spread
    between its processes (4% and 7%, larger than the trees' difference). One round of trees
    1.05 apart: the runs' ranges are apart, and a line says that one process a side cannot
    tell the trees from the processes."""
    new = stand_in_tree(tmp_path, NEW, "1.00,1.04,1.02")
    old = stand_in_tree(tmp_path, OLD, "0.99,1.06,1.03")
    assert run_ab(tmp_path, [new, old], "--rounds", "3") == 0
    lines = (tmp_path / "results" / "t-gpu-summary.txt").read_text().splitlines()
    runs, processes = lines[-2:]
    assert runs.startswith(f"batch 8: {OLD[:12]} / {NEW[:12]} TPOT 1.010 (per-run medians, "
                           "6 and 6 runs; ranges overlap)")
    assert processes == (f"batch 8: {OLD[:12]} / {NEW[:12]} TPOT 1.010 over processes "
                         "(medians of 3 and 3 processes' per-run medians; processes overlap; "
                         f"spread within {NEW[:12]} 4.0%, within {OLD[:12]} 7.1%)")
    apart = tmp_path / "apart"
    apart.mkdir()
    new, old = stand_in_tree(apart, NEW, "1.00"), stand_in_tree(apart, OLD, "1.05")
    assert run_ab(apart, [new, old], "--rounds", "1") == 0
    runs, last = (apart / "results" / "t-gpu-summary.txt").read_text().splitlines()[-2:]
    assert runs.endswith("TPOT 1.050 (per-run medians, 2 and 2 runs; ranges apart)")
    assert last == (f"batch 8: {OLD[:12]} / {NEW[:12]}: one process a side, so the ranges above "
                    "are one process's runs; a process's speed moves more (alternate two rounds "
                    "or more)")


def test_each_process_traces_into_a_folder_of_its_own_under_trace(tmp_path):
    """--trace DIR: every process's generate gets --trace DIR/<round>-<entry>-<12 hex>, so the
    same tree twice (plain and with a setting) and its two rounds never share a folder; without
    --trace no process traces."""
    new, old = stand_in_tree(tmp_path, NEW), stand_in_tree(tmp_path, OLD)
    traces = tmp_path / "traces"
    assert run_ab(tmp_path, [new, old, f"{new}@AB_SLOWER=2"], "--rounds", "2",
                  "--trace", str(traces)) == 0

    def traced(tree: Path) -> list[str | None]:
        argvs = [json.loads(line)["argv"] for line in (tree / "calls").read_text().splitlines()]
        return [argv[argv.index("--trace") + 1] if "--trace" in argv else None
                for argv in argvs]

    assert traced(new) == [str(traces / f"{r}-{i}-{NEW[:12]}") for r in (0, 1) for i in (0, 2)]
    assert traced(old) == [str(traces / f"{r}-1-{OLD[:12]}") for r in (0, 1)]
    plain = tmp_path / "plain"
    plain.mkdir()
    lone = stand_in_tree(plain, NEW)
    assert run_ab(plain, [lone], "--rounds", "1") == 0
    assert traced(lone) == [None]


def caches_of(tree: Path) -> list[str | None]:
    """The compiler cache each of the stand-in tree's processes ran with, in order."""
    return [json.loads(line)["cache"] for line in (tree / "calls").read_text().splitlines()]


@pytest.mark.parametrize("caches", ["shared", "own", "fresh", None])
def test_each_process_compiles_into_the_cache_caches_gives_it(tmp_path, monkeypatch, caches):
    """shared: the environment's for all; own: a folder an entry, the same in every round and
    apart from the other entry's; fresh (also without --caches): a folder a process. An
    entry's own setting wins."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    new, old = stand_in_tree(tmp_path, NEW, 1.0), stand_in_tree(tmp_path, OLD, 1.1)
    pinned = f"{old}@TORCHINDUCTOR_CACHE_DIR=/pinned"
    flag = () if caches is None else ("--caches", caches)
    assert run_ab(tmp_path, [new, pinned], "--rounds", "2", *flag) == 0
    caches = caches or "fresh"
    ours = caches_of(new)
    assert caches_of(old) == ["/pinned", "/pinned"]
    if caches == "shared":
        assert ours == [None, None]
    elif caches == "own":
        assert ours[0] == ours[1] and ours[0].endswith("cache-0")
    else:
        assert ours[0] != ours[1] and all(c and "/pinned" not in c for c in ours)
    labels = [r.config["ab"].get("caches")
              for r in read_results(tmp_path / "results" / "t-gpu.jsonl")]
    assert labels == [None if caches == "shared" else caches] * 4


def test_the_summary_is_the_latest_commands(tmp_path, capsys):
    new, old = stand_in_tree(tmp_path, NEW, 1.0), stand_in_tree(tmp_path, OLD, 1.2)
    assert run_ab(tmp_path, [new, old], "--rounds", "1") == 0
    (new / "MS").write_text("1.3")  # the next command: the first tree is now the slower one
    assert run_ab(tmp_path, [new, old], "--rounds", "1") == 0
    assert len(read_results(tmp_path / "results" / "t-gpu.jsonl")) == 4
    capsys.readouterr()
    assert trees_ab.main(["summary", "--name", "t", "--results", str(tmp_path / "results"),
                          "--slug", "gpu"]) == 0
    text = capsys.readouterr().out
    assert f"TPOT {1.2 / 1.3:.3f}" in text and "1.0000" not in text


def test_a_tree_with_environment_settings_is_an_entry_of_its_own(tmp_path, monkeypatch):
    """TREE@KEY=VALUE: the same tree with a setting in its process's environment, timed in
    alternation with the plain tree and labelled config.ab.environment (the report's mark);
    several settings in one entry; the summary names each entry by tree and settings."""
    monkeypatch.delenv("AB_SLOWER", raising=False)
    tree = stand_in_tree(tmp_path, NEW, 1.0)
    slower = f"{tree}@AB_SLOWER=1.25@AB_SM=1755@AB_TUNED=40@OTHER=a=b"  # a value may hold "="
    assert run_ab(tmp_path, [tree, slower], "--rounds", "2") == 0
    results = read_results(tmp_path / "results" / "t-gpu.jsonl")
    assert [(r.config["ab"].get("environment"), r.config["ab"].get("baseline"),
             r.metrics["tpot_ms"]["p50"]) for r in results] == \
        [(None, None, 1.0), ("AB_SLOWER=1.25 AB_SM=1755 AB_TUNED=40 OTHER=a=b", True, 1.25)] * 2
    assert {r.env["source_revision"] for r in results} == {NEW}
    text = (tmp_path / "results" / "t-gpu-summary.txt").read_text()
    settings = "AB_SLOWER=1.25 AB_SM=1755 AB_TUNED=40 OTHER=a=b"
    assert f"batch 8: {NEW[:12]} {settings} / {NEW[:12]} TPOT 1.250" in text
    # the SM clocks as the runs ended, and the configs its compile timed, where Results have them
    rows = [line.split() for line in text.splitlines() if line.startswith(NEW[:12])]
    assert [row[-2:] for row in rows] == [["-", "-"], ["1,755-1,980", "40"]] * 2
    assert "AB_SLOWER" not in os.environ  # set in the child's environment, not this one's


def test_a_process_past_its_time_or_failing_is_one_line_and_the_rest_run(tmp_path, capsys):
    slow = stand_in_tree(tmp_path, "c" * 40, mode="sleep")
    broken = stand_in_tree(tmp_path, "d" * 40, mode="fail")
    new = stand_in_tree(tmp_path, NEW, 1.0)
    assert run_ab(tmp_path, [new, slow, broken], "--rounds", "1", "--timeout", "4") == 0
    err = capsys.readouterr().err
    assert f"{'c' * 12} round 0: timed out after 4 s" in err
    assert f"{'d' * 12} round 0: exited with 3" in err
    assert [r.env["source_revision"] for r in read_results(tmp_path / "results" / "t-gpu.jsonl")] \
        == [NEW]


@pytest.mark.parametrize("case, message", [
    ("missing", "not a source tree"),
    ("no REV", "no REV file"),
    ("bad REV", "is not a 40-hex revision"),
    ("output", "without --output"),
    ("no flags", "give generate's flags after --"),
    ("rounds", "--rounds 0: at least 1"),
    ("timeout", "--timeout 0: a number of seconds above 0"),
    ("setting", "'AB SLOWER' is not an environment setting KEY=VALUE"),
    ("trace", "give --trace DIR before --"),
    ("trace file", "a file, not a folder"),
])
def test_bad_input_is_one_line_before_anything_runs(tmp_path, capsys, case, message):
    new = stand_in_tree(tmp_path, NEW)
    other = stand_in_tree(tmp_path, OLD)
    flags = list(FLAGS)
    extra = []
    if case == "missing":
        other = tmp_path / "nowhere"
    elif case == "no REV":
        (other / "REV").unlink()
    elif case == "bad REV":
        (other / "REV").write_text("main\n")
    elif case == "output":
        flags += ["--output", "x.jsonl"]
    elif case == "no flags":
        flags = []
    elif case == "rounds":
        extra = ["--rounds", "0"]
    elif case == "setting":
        other = f"{other}@AB SLOWER"
    elif case == "trace":
        flags += ["--trace", "traces"]
    elif case == "trace file":
        (tmp_path / "traces").write_text("")
        extra = ["--trace", str(tmp_path / "traces")]
    else:
        extra = ["--timeout", "0"]
    code = trees_ab.main(["run", str(new), str(other), "--name", "t", "--results",
                          str(tmp_path / "results"), "--slug", "gpu", *extra, *flags])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and message in err
    assert not (new / "calls").exists() and not (tmp_path / "results").exists()


def _repo(tmp_path, commits):
    """A git repository with one commit per entry of `commits` (each: path -> text, written
    and added): the repository, its git command prefix and the commits' revisions."""
    repo = tmp_path / "repo"
    (repo / "src" / "infermeter").mkdir(parents=True)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    revs = []
    for k, files in enumerate(commits):
        for path, text in files.items():
            (repo / path).write_text(text)
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-qm", str(k)], check=True)
        revs.append(subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                   check=True).stdout.strip())
    return repo, git, revs


def test_snapshot_takes_each_revisions_source_and_names_it(tmp_path, monkeypatch, capsys):
    repo, _, revs = _repo(tmp_path, [{"src/infermeter/__init__.py": f"# {text}\n",
                                      "pyproject.toml": "", "notes.txt": text}
                                     for text in ("one", "two")])
    monkeypatch.chdir(repo)
    assert trees_ab.main(["snapshot", "HEAD~1", "HEAD", "--into", str(tmp_path / "trees")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "trees" / rev[:12]) for rev in revs]
    for rev, text in zip(revs, ("one", "two"), strict=True):
        tree = tmp_path / "trees" / rev[:12]
        assert trees_ab.tree_revision(tree) == rev
        assert (tree / "src" / "infermeter" / "__init__.py").read_text() == f"# {text}\n"
        assert not (tree / "notes.txt").exists()  # src/ and pyproject.toml only
    assert trees_ab.main(["snapshot", "nosuchrev", "--into", str(tmp_path / "trees")]) == 1
    assert "nosuchrev: no such commit in this repository" in capsys.readouterr().err


def test_snapshot_between_two_commits_takes_evenly_spaced_ones_touching_the_paths(
        tmp_path, monkeypatch, capsys):
    """Seven commits after the first; six touch src/ (one only notes.txt): --points 2 takes the
    2nd and 4th of those six, oldest first, and --points past their count takes them all."""
    repo, git, revs = _repo(tmp_path, [
        {"notes.txt" if k == 3 else "src/infermeter/__init__.py": f"# {k}\n"} for k in range(8)])
    touching = [rev for k, rev in enumerate(revs[1:], start=1) if k != 3]
    monkeypatch.chdir(repo)
    into = tmp_path / "trees"
    assert trees_ab.main(["snapshot", "--between", revs[0], revs[-1], "--points", "2",
                          "--into", str(into)]) == 0
    assert capsys.readouterr().out.split() == [str(into / touching[k][:12]) for k in (2, 4)]
    assert trees_ab.spaced_commits(revs[0], revs[-1], 9, ["src/"]) == touching
    assert trees_ab.main(["snapshot", "--into", str(into)]) == 1
    assert "name revisions, or --between OLD NEW" in capsys.readouterr().err
    subprocess.run([*git, "rm", "-rq", "src"], check=True)
    subprocess.run([*git, "commit", "-qm", "no source"], check=True)
    assert trees_ab.main(["snapshot", "HEAD", "--into", str(into)]) == 1
    assert "HEAD: no src/ in that commit" in capsys.readouterr().err
