"""The shell scripts a GPU run of the open targets starts from: every part's command lines (the
`infermeter` ones and the benchmark scripts') parse with today's flags (a renamed flag would
otherwise surface only on the device), the parts listed, handled and documented agree, and the
scripts refuse an unknown part with their usage. Also the A/B scripts' summaries: each issue
target beside the figure measured for it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infermeter.cli import build_parser
from tests.benchmark_scripts import (
    BENCHMARKS,
    case_branches,
    load_benchmark,
    part_arguments,
    part_body,
    shell_text,
)


def _words(line: str) -> list[str]:
    """A command's words, shell variables (file paths there) given a placeholder."""
    line = line.split(";;", 1)[0].split("||", 1)[0]
    line = re.sub(r'"[^"]*\$[^"]*"', "x", line)  # a quoted word holding a variable
    return shlex.split(re.sub(r'\$\{?\w+\}?(/[\w./-]*)?', "x", line))


def _command_lines(script: Path, within: str | None = None) -> list[list[str]]:
    """`python3 -m infermeter ...` lines (continuations joined) of the script, or of `within`
    (one of its branches, from case_branches), arrays expanded, other shell variables (file paths
    there) given a placeholder."""
    lines = []
    for line in (within or shell_text(script)).splitlines():
        if "-m infermeter " not in line or line.lstrip().startswith("#"):
            continue
        line = line.split("-m infermeter ", 1)[1].split(">", 1)[0].split("||", 1)[0]
        line = line.split(";;", 1)[0]  # a case branch's end
        line = re.sub(r'"[^"]*\$[^"]*"', "x", line)  # a quoted word holding a variable
        line = re.sub(r'\$\{?\w+\}?(/[\w./-]*)?', "x", line)
        lines.append(shlex.split(line))
    return lines


def test_the_offload_targets_parse_one_command_a_target():
    """reload, traffic, decode: one `infermeter offload` each, issue 26's measurements."""
    branches = case_branches(BENCHMARKS / "offload_targets.sh")
    assert sorted(branches) == ["decode", "reload", "traffic"]
    lines = _command_lines(BENCHMARKS / "offload_targets.sh")
    assert len(lines) == 3
    parser = build_parser()
    by_target = {}
    for target, body in branches.items():
        (argv,) = _command_lines(BENCHMARKS / "offload_targets.sh", body)
        by_target[target] = parser.parse_args(argv)  # a bad flag exits 2 (SystemExit fails)
        assert argv[0] == "offload" and "llama-3.1-8b" in argv
        assert by_target[target].output == "x" and by_target[target].dtype == "bf16"
    reload, traffic, decode = (by_target[k] for k in ("reload", "traffic", "decode"))
    assert (reload.prefix_len, reload.suffix_len, reload.block_size) == (
        [8192], [128, 1024], [16, 256])
    assert not reload.traffic and not reload.offloaded_decode
    assert traffic.traffic == ["d2h", "h2d", "both"] and traffic.traffic_method == ["dma",
                                                                                  "mapped"]
    assert decode.offloaded_decode and decode.context == 32768 and not decode.traffic


def test_the_scripts_refuse_an_unknown_part():
    for script in ("open_targets.sh", "offload_targets.sh"):
        run = subprocess.run(["bash", str(BENCHMARKS / script), "nope"],
                             capture_output=True, text=True, timeout=30,
                             env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ""})
        assert run.returncode == 2 and "usage:" in run.stderr, script


def _parts() -> list[str]:
    """The parts open_targets.sh accepts (its first case statement's pattern)."""
    text = (BENCHMARKS / "open_targets.sh").read_text()
    return re.search(r'case "\$\{1:-\}" in\n  ([\w|-]+)\) ;;', text).group(1).split("|")


def test_every_part_is_handled_listed_and_in_the_usage():
    script = BENCHMARKS / "open_targets.sh"
    text = script.read_text()
    parts = _parts()
    assert sorted(case_branches(script)) == sorted(parts)
    listed = re.findall(r"^#   part ([\w-]+) ", text, re.M)
    assert listed == parts  # the header lists them in the order the script takes them
    assert "{" + "|".join(parts) + "}" in text  # the usage line
    assert {"ab", "ttft", "step-batch", "offload-reload", "offload-traffic",
            "offload-decode"} <= set(parts) and "prefill" not in parts and "offload" not in parts


def test_the_offload_parts_run_one_target_each():
    branches = case_branches(BENCHMARKS / "open_targets.sh")
    for target in ("reload", "traffic", "decode"):
        assert _words(branches[f"offload-{target}"].strip()) == [
            "bash", "benchmarks/offload_targets.sh", target, "x"]


def test_every_benchmark_script_line_parses_with_its_script_s_flags():
    """`python3 benchmarks/X.py ...` in a part: X's own parser takes the line."""
    branches = case_branches(BENCHMARKS / "open_targets.sh")
    parsed = {}
    for part, body in branches.items():
        for script, rest in re.findall(r"python3 benchmarks/(\w+)\.py ([^\n]*)", body):
            module = load_benchmark(script)
            if hasattr(module, "arguments"):
                parsed[part] = module.arguments().parse_args(_words(rest))
    assert parsed["ab"].parts == ["ab"] and parsed["ttft"].parts == ["ttft"]
    assert parsed["long"].parts == ["long"]
    step = parsed["step"]
    assert step.rounds == 1 and step.trace == "x" and step.results == "x"
    assert {"moe", "moe-large", "step-large", "gpt-oss"} <= set(parsed)


def test_the_generate_parts_run_compiled_bf16_seed_cases():
    """dense: Gemma-3-12B and Gemma-2-9B at batch 1 (Qwen3-8B is measured and committed);
    step-batch: Llama-3.2-1B at batch 8 and 32, default kernels."""
    branches = case_branches(BENCHMARKS / "open_targets.sh")
    parser = build_parser()
    for part, batches in (("dense", [1]), ("step-batch", [8, 32])):
        (line,) = re.findall(r"-m infermeter (generate [^\n]*)", branches[part])
        args = parser.parse_args(_words(line))
        assert args.dtype == "bf16" and args.batch_size == batches and args.output == "x"
        assert (args.prompt_len, args.max_new_tokens, args.max_seq_len) == ([80], 432, 512)
        assert args.mode in (None, ["compiled"])  # compiled is generate's default on a GPU
    models = re.search(r"for model in ([\w.\- ]+); do", branches["dense"]).group(1).split()
    assert models == ["gemma-3-12b", "gemma-2-9b"]
    batch = parser.parse_args(_words(re.search(r"-m infermeter (generate [^\n]*)",
                                               branches["step-batch"]).group(1)))
    assert batch.model == "llama-3.2-1b" and batch.mode == ["compiled"]
    assert not any(flag in branches["step-batch"] for flag in ("--step-kernels", "--moe-kernel",
                                                               "--decode-attention"))


def test_the_batch_prefill_part_runs_batch_8_three_ways_twice():
    """step-batch-prefill: Llama-3.2-1B bf16 at batch 8, the seed case, with the default
    prefill, an eager exact one and PDL off, the same command otherwise, two rounds."""
    branch = part_body("step-batch-prefill")
    assert "for round in 0 1; do" in branch
    extras = re.search(r'for extra in ((?:"[^"]*" ?)+); do', branch).group(1)
    (line,) = re.findall(r"-m infermeter (generate [^\n]*)", branch)
    parser = build_parser()
    ways = []
    for extra in shlex.split(extras):
        args = parser.parse_args(_words(line.replace("$extra", extra)))
        assert (args.model, args.dtype, args.batch_size, args.mode) == \
            ("llama-3.2-1b", "bf16", [8], ["compiled"])
        assert (args.prompt_len, args.max_new_tokens, args.max_seq_len) == ([80], 432, 512)
        ways.append((args.prefill, args.pdl, args.compile_prefill))
    assert ways == [(None, None, False), ("exact", None, False), (None, False, False)]


TREES_AB_RUN = r"python3 benchmarks/trees_ab\.py (run [^\n]*)"  # its words from "run"


def _trees_ab(part: str) -> tuple[str, list[str], Any]:
    """A trees_ab.py part over this tree's snapshot: its branch, its run line's own words
    (before --) and generate's parse of the rest, after checking what every such part shares:
    Results into $dest, and this tree snapshotted by the function that stops where no 40-hex
    revision is given."""
    text = shell_text(BENCHMARKS / "open_targets.sh")
    branch = part_body(part)
    line = _trees_ab_line(text, branch)
    words = _words(line)
    ours, flags = words[:words.index("--")], words[words.index("--") + 1:]
    assert ours[ours.index("--results") + 1] == "x"
    # this tree snapshotted: by snapshot_here itself, or by issue_pair / issue_ab, which call it
    assert re.search(r"^\s+(snapshot_here|issue_pair|issue_ab) ?", branch, re.M)
    snapshot = re.search(r"^snapshot_here\(\) \{\n(.*?)^\}", text, re.M | re.S).group(1)
    assert 'echo "${INFERMETER_SOURCE_REVISION:?' in snapshot  # no REV: the part stops
    return branch, ours, build_parser().parse_args(["generate", *flags])


def _function(text: str, name: str) -> str:
    """The body of open_targets.sh's shell function `name`."""
    return re.search(rf"^{name}\(\) \{{\n(.*?)^\}}", text, re.M | re.S).group(1)


def _trees_ab_line(text: str, branch: str) -> str:
    """A part's trees_ab.py run line: its own, or issue_ab's with the part's words for "$@"."""
    found = re.findall(TREES_AB_RUN, branch)
    if found:
        (line,) = found
        return line
    (call,) = re.findall(r"^\s+issue_ab ([^\n]*)", branch, re.M)
    (line,) = re.findall(TREES_AB_RUN, _function(text, "issue_ab"))
    return line.replace('"$@"', call.split(";;")[0])


def _batch8_trees_ab(part: str) -> tuple[str, str, list[str]]:
    """_trees_ab's part, on the batch-8 case of Llama-3.2-1B: its branch, run line and words."""
    branch, ours, args = _trees_ab(part)
    assert (args.model, args.dtype, args.batch_size, args.mode) == \
        ("llama-3.2-1b", "bf16", [8], ["compiled"])
    assert (args.prompt_len, args.max_new_tokens, args.max_seq_len) == ([80], 432, 512)
    (line,) = re.findall(TREES_AB_RUN, branch)
    return branch, line, ours


def test_the_issue_tree_parts_time_the_issue_s_snapshot_against_this_tree_on_fresh_caches():
    """step-batch-issue-tree (batch 8 at 1B, two rounds), step-large-issue-tree (issue 27's
    no-loss check at 7B: Llama-2-7B fp16, batch 1, one round) and step-large-spread (the same
    case, three rounds: the spread between processes beside the trees'): this tree, then cdd90d2's
    snapshot, every process on an empty compiler cache of its own."""
    text = shell_text(BENCHMARKS / "open_targets.sh")
    pair = _function(text, "issue_pair")
    assert "issue=.trees/cdd90d230f8d" in pair and "snapshot_here" in pair
    assert "issue_pair" in _function(text, "issue_ab")
    for part, rounds in (("step-batch-issue-tree", "2"), ("step-large-issue-tree", "1"),
                         ("step-large-spread", "3")):
        branch, ours, args = _trees_ab(part)
        assert "issue_ab " in branch and ours[1:3] == ["x", "x"]  # "$here" "$issue"
        assert ours[ours.index("--caches") + 1] == "fresh"
        assert ours[ours.index("--rounds") + 1] == rounds
        assert ours[ours.index("--name") + 1] == part
    for part in ("step-large-issue-tree", "step-large-spread"):
        _, _, large = _trees_ab(part)
        assert (large.model, large.dtype, large.batch_size, large.mode) == \
            ("llama-2-7b", "fp16", [1], ["compiled"])
        assert (large.prompt_len, large.max_new_tokens, large.max_seq_len) == ([80], 432, 512)


def test_the_large_traces_part_reads_the_folders_trees_ab_traces_into():
    """step-large-traces: the 7B case on this tree and the issue's, one round, each process
    tracing under $traces; the summary reads each trace from the folder trees_ab.trace_folder
    names (round 0, the entry's place, the tree's 12 hex) and this tree's --against the
    issue's."""
    branch, ours, args = _trees_ab("step-large-traces")
    assert ours[ours.index("--rounds") + 1] == "1" and ours[ours.index("--trace") + 1] == "x"
    assert ours[ours.index("--caches") + 1] == "fresh"
    assert (args.model, args.dtype, args.batch_size) == ("llama-2-7b", "fp16", [1])
    trees_ab = load_benchmark("trees_ab")
    here = trees_ab.Entry(Path("here"), "a" * 40)
    issue = trees_ab.Entry(Path(".trees/cdd90d230f8d"), "cdd90d230f8d" + "0" * 28)
    ours_folder = trees_ab.trace_folder(Path("T"), 0, 0, here).name
    theirs_folder = trees_ab.trace_folder(Path("T"), 0, 1, issue).name
    assert ours_folder == "0-0-" + "a" * 12  # the part spells it 0-0-$(head -c 12 $here/REV)
    assert 'ours="$traces/0-0-$(head -c 12 "$here/REV")/trace-rank0.json"' in branch
    assert f'theirs="$traces/{theirs_folder}/trace-rank0.json"' in branch
    assert 'infermeter trace "$ours" --against "$theirs"' in branch


def test_the_batch_placement_part_times_this_tree_plain_and_with_expandable_segments():
    """step-batch-placement: trees_ab.py over this tree's snapshot, plain first, then with the
    allocator's expandable segments in its environment, three rounds, the batch-8 case."""
    _, line, ours = _batch8_trees_ab("step-batch-placement")
    assert line.split()[1:3] == [
        '"$here"', '"$here@PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"']
    assert ours[ours.index("--rounds") + 1] == "3"


def test_the_batch_tuning_part_gives_each_process_a_cache_of_its_own_twice():
    """step-batch-tuning: trees_ab.py over this tree's snapshot as three entries, each with an
    inductor cache of its own (three different folders), two rounds (the first tunes afresh,
    the second reloads its own picks), the batch-8 case; then the picks come back."""
    branch, line, ours = _batch8_trees_ab("step-batch-tuning")
    entries = re.findall(r'"\$here@[^"]*"', line)
    assert entries == [f'"$here@TORCHINDUCTOR_CACHE_DIR=$caches/{i}"' for i in (1, 2, 3)]
    assert ours[ours.index("--rounds") + 1] == "2"
    assert "-name '*.best_config'" in branch and "step-batch-tuning-picks-$slug.tar.gz" in branch


def test_the_run_part_runs_the_main_job_on_its_default_into_a_device_folder():
    lines = [argv for argv in _command_lines(BENCHMARKS / "open_targets.sh") if argv[0] == "run"]
    assert len(lines) == 1
    args = build_parser().parse_args(lines[0])
    assert args.out == "x" and args.model is None and args.checkpoint is None


def test_every_part_names_only_models_its_script_knows():
    """`benchmarks/X.py ... --models A B` lines of the parts script: A and B are X's MODELS
    (a typo would otherwise fail on the device, after the machine started); together the step
    parts, and the MoE parts, cover every model of their A/B."""
    text = shell_text(BENCHMARKS / "open_targets.sh")
    lines = re.findall(r"benchmarks/(\w+)\.py [^\n]*--models ([\w.\- ]+)", text)
    assert {script for script, _ in lines} >= {"step_kernels_ab", "moe_kernel_ab"}
    named: dict[str, set[str]] = {}
    for script, models in lines:
        known = load_benchmark(script).MODELS
        assert set(models.split()) <= set(known), (script, models)
        named.setdefault(script, set()).update(models.split())
    for script in ("step_kernels_ab", "moe_kernel_ab"):
        assert named[script] == set(load_benchmark(script).MODELS), script


def _ab_result(model: str, key: str, kind: str, round_: int, mbu: float, batch: int = 1):
    from infermeter.measure.result import Result

    return Result("generate", {"name": model}, {"ab": {key: kind, "round": round_},
                                                "batch_size": batch, "dtype": "bf16"},
                  {"timestamp": "t"}, {"mbu_pct": mbu, "tpot_ms": {"p50": 1.0}})


def test_the_step_summary_judges_issue_27s_mbu_targets_from_the_results():
    script = load_benchmark("step_kernels_ab")
    results = [_ab_result("llama-3.2-1b", "kernels", "split", 0, 60.0),
               _ab_result("llama-3.2-1b", "kernels", "fused", 0, 82.0),
               _ab_result("llama-3.2-1b", "kernels", "split", 1, 70.0),
               _ab_result("smollm2-135m", "kernels", "fused", 0, 39.9)]
    lines = script.summary(results).split("targets (issue 27), measured in this file:\n")[1]
    assert lines.splitlines() == [
        "  llama-3.2-1b batch 1 decode MBU, split: 65.00 % (target >= 80 %) MISSED",
        "  llama-3.2-1b batch 1 decode MBU, fused: 82.00 % (target >= 80 %) met",
        "  qwen2.5-0.5b batch 1 decode MBU: - % (target >= 65 %) -",
        "  smollm2-135m batch 1 decode MBU, fused: 39.90 % (target >= 40 %) MISSED"]


# The fused kind's switches step_kernels_ab.py runs it once for each value of: the kernels
# module and its attribute, run_model's keyword, the values (the module's own first), the other
# value's label, the command line's flag and its parsed name
FUSED_SWITCHES = {
    "q/k norms": ("qk_norm_rope", "QK_NORM_KERNELS", "qk_ways", (2, 1),
                  "fused/qk-norms-in-wqkv", "--qk-norm-kernels", "qk_norm_kernels"),
    "prefetch": ("prefetch", "DISTANCE", "distances", (0, 2), "fused/prefetch-2", "--prefetch",
                 "prefetch"),
    "attention pdl": ("decode_attention", "ATTENTION_PDL", "attention_pdl", ("both", "combine"),
                      "fused/attention-pdl-combine", "--attention-pdl", "attention_pdl"),
    "attention without pdl": ("decode_attention", "ATTENTION_PDL", "attention_pdl",
                              ("both", "none"), "fused/attention-no-pdl", "--attention-pdl",
                              "attention_pdl"),
    "split stages": ("decode_attention", "SPLIT_STAGES", "split_stages", (0, 1),
                     "fused/split-stages-1", "--split-stages", "split_stages"),
    "tiles": ("fused_step", "TILES_FROM", "tiles", ("table", "gemv"), "fused/gemv-tiles",
              "--fused-tiles", "fused_tiles"),
    "head": ("infermeter.engine.model", "FUSED_HEAD", "heads", ("off", "on"), "fused/fused-head",
             "--fused-head", "fused_head"),
    "early release": ("pdl", "EARLY_RELEASE", "releases", ("on", "off"),
                      "fused/late-release", "--early-release", "early_release"),
    "attention release": ("pdl", "ATTENTION_RELEASE", "attention_releases", ("auto", "before"),
                          "fused/early-attention", "--attention-release", "attention_release"),
    "attention release after": ("pdl", "ATTENTION_RELEASE", "attention_releases",
                                ("auto", "after"), "fused/late-attention", "--attention-release",
                                "attention_release"),
}


@pytest.mark.parametrize("switch", FUSED_SWITCHES)
def test_the_step_ab_runs_the_fused_kind_once_for_each_value_and_sets_it_back(monkeypatch,
                                                                             tmp_path, switch):
    """--qk-norm-kernels 2 1 (qk_norm_rope.QK_NORM_KERNELS: the q/k norms in a kernel of their
    own, or in wqkv's), --prefetch 0 2 (prefetch.DISTANCE), --attention-pdl both combine|none
    (decode_attention.ATTENTION_PDL), --split-stages 0 1 (decode_attention.SPLIT_STAGES),
    --fused-tiles table gemv (fused_step.TILES_FROM), --fused-head off on (model.FUSED_HEAD)
    --early-release on off (pdl.EARLY_RELEASE) and --attention-release auto before|after
    (pdl.ATTENTION_RELEASE): the fused case runs once with
    each value, the module's own under its usual label; split runs once, at the module's value;
    that value comes back after; the summary sets one against the other; the command line
    takes the values in either order and refuses one there is not."""
    import importlib

    name, attribute, keyword, values, other, flag, dest = FUSED_SWITCHES[switch]
    module = importlib.import_module(name if "." in name else f"infermeter.engine.kernels.{name}")
    script = load_benchmark("step_kernels_ab")
    seen = []
    monkeypatch.setattr(script, "run_ab_case", lambda request, env, path, model, label, *rest:
                        seen.append((label, getattr(module, attribute))))
    monkeypatch.setattr(module, attribute, values[0])
    script.run_model("debug", 1, tmp_path / "ab.jsonl", {}, kinds=("split", "fused"),
                     device="cpu", **{keyword: values})
    assert seen == [("split", values[0]), ("fused", values[0]), (other, values[1])]
    assert getattr(module, attribute) == values[0]
    results = [_ab_result("qwen3-30b-a3b", "kernels", kind, 0, 50.0)
               for kind in ("fused", other)]
    assert f"qwen3-30b-a3b: {other} / fused:" in script.summary(results)
    parser = script.arguments()
    backwards = [str(value) for value in values[::-1]]
    assert getattr(parser.parse_args([flag, *backwards]), dest) == list(values[::-1])
    with pytest.raises(SystemExit):
        parser.parse_args([flag, "3"])

def test_the_step_ab_sets_the_prefetch_distance_through_its_checked_setter(monkeypatch,
                                                                          tmp_path):
    """run_model sets prefetch.DISTANCE through prefetch.set_distance: a distance it cannot run
    is refused before any case, and the distance comes back after."""
    from infermeter.engine.kernels import prefetch
    script = load_benchmark("step_kernels_ab")
    seen = []
    monkeypatch.setattr(script, "run_ab_case", lambda *args: seen.append(args[4]))
    monkeypatch.setattr(prefetch, "DISTANCE", 0)
    with pytest.raises(ValueError, match="prefetch distance must be one of"):
        script.run_model("debug", 1, tmp_path / "ab.jsonl", {}, kinds=("fused",),
                         device="cpu", distances=(5,))
    assert seen == [] and prefetch.DISTANCE == 0


def test_the_step_ab_times_a_tiles_file_s_entry_and_sets_the_table_back(monkeypatch, tmp_path):
    """--fused-tiles table file --tiles-file F: the fused kind runs once with the table's tiles
    and once with the entry F (a fused_tiles.py Result) suggests for this GPU (the CPU's name,
    "" here), labelled ".../file-tiles"; split once; FILE_ENTRY and TILES_FROM come back after.
    A file with no entry for this GPU gives {} (the GEMV's tiles); "file" without a file is
    refused, on the command line and in run_model, before any case."""
    from infermeter.engine.kernels import fused_step
    from infermeter.errors import InfermeterError
    from infermeter.measure.result import Result, write_json
    script = load_benchmark("step_kernels_ab")
    tiles = tmp_path / "fused-tiles-quick.json"
    suggested = {"": {"gemv_add": {"64": [2, 64, 4]}}, "NVIDIA H200": {"gemv_add": {"64": [8,
                                                                                          128, 8]}}}
    write_json(tiles, Result("generate", {"name": "debug"}, {}, {},
                             {"suggested_fused_tiles": suggested}))
    seen = []
    monkeypatch.setattr(script, "run_ab_case", lambda request, env, path, model, label, *rest:
                        seen.append((label, fused_step.TILES_FROM, fused_step.tile_entry(""))))
    table = fused_step.tile_entry("")
    script.run_model("debug", 1, tmp_path / "ab.jsonl", {}, kinds=("split", "fused"),
                     device="cpu", tiles=("table", "file"), tiles_file=str(tiles))
    assert seen == [("split", "table", table), ("fused", "table", table),
                    ("fused/file-tiles", "file", {"gemv_add": {64: (2, 64, 4)}})]
    assert (fused_step.TILES_FROM, fused_step.FILE_ENTRY) == ("table", {})
    assert script.file_entry(str(tiles), "NVIDIA H100 80GB HBM3") == {}  # none for that GPU
    with pytest.raises(InfermeterError, match="needs --tiles-file"):
        script.run_model("debug", 1, tmp_path / "ab.jsonl", {}, kinds=("fused",),
                         device="cpu", tiles=("file",))
    assert len(seen) == 3  # refused before any case
    results = [_ab_result("llama-3.2-1b", "kernels", kind, 0, 50.0)
               for kind in ("fused/recorded", "fused/recorded/file-tiles")]
    assert "llama-3.2-1b: fused/recorded/file-tiles / fused/recorded:" in \
        script.summary(results)
    with pytest.raises(SystemExit):
        script.arguments().parse_args(["--fused-tiles", "file", "--tiles-file"])
    # the command line: no file, or one not there, is one error line and exit 1, no case run
    root = BENCHMARKS.parent
    for extra in ([], ["--tiles-file", str(tmp_path / "missing.json")]):
        run = subprocess.run([sys.executable, str(BENCHMARKS / "step_kernels_ab.py"),
                              "--fused-tiles", "table", "file", "--results", str(tmp_path),
                              *extra], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(root / "src")})
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.strip().splitlines() == [run.stderr.strip()], run.stderr
        assert run.stderr.startswith("error: ") and ("--tiles-file" in run.stderr
                                                     or "no such file" in run.stderr), run.stderr
    assert not list(tmp_path.glob("step-kernels-*"))


def test_a_later_tiles_file_replaces_the_earlier_ones_at_the_widths_it_timed(tmp_path):
    """--tiles-file A B: B's bests replace A's at every (kernel, width) B timed, and where B
    timed a width but suggests nothing there (its best was the default tiles) A's cell goes
    too; A's other cells stay; a width with q/k norms (no entry) removes nothing."""
    from infermeter.measure.result import Result, write_json
    script = load_benchmark("step_kernels_ab")
    gpu = "NVIDIA H200"

    def grid(name, suggested, timed):
        path = tmp_path / name
        shapes = [{"kernel": kernel, "n_cols": width, "qk_norm": qk} for kernel, width, qk in timed]
        write_json(path, Result("generate", {"name": "debug"}, {}, {},
                                {"suggested_fused_tiles": {gpu: suggested}, "shapes": shapes}))
        return str(path)

    quick = grid("quick.json", {"gemv_add": {"2048": [1, 1024, 4], "896": [2, 512, 4]},
                                "gemv_swiglu": {"2048": [2, 2048, 4]},
                                "norm_qkv_rope": {"2048": [4, 1024, 4]}},
                 [("gemv_add", 2048, False), ("gemv_add", 896, False),
                  ("gemv_swiglu", 2048, False), ("norm_qkv_rope", 2048, False)])
    full = grid("full.json", {"gemv_add": {"2048": [2, 2048, 8]}},
                [("gemv_add", 2048, False), ("gemv_swiglu", 2048, False),
                 ("norm_qkv_rope", 2048, True)])
    assert script.file_entry([quick, full], gpu) == {
        "gemv_add": {2048: (2, 2048, 8), 896: (2, 512, 4)},  # full's best; 896 untimed there
        "norm_qkv_rope": {2048: (4, 1024, 4)}}  # full timed it with q/k norms only
    assert script.file_entry([full, quick], gpu) == script.file_entry(quick, gpu)  # order counts
    assert script.file_entry([quick], gpu) == script.file_entry(quick, gpu)
    args = script.arguments().parse_args(["--fused-tiles", "file", "--tiles-file", quick, full])
    assert args.tiles_file == [quick, full]


def test_the_step_ab_runs_every_kind_once_for_each_argmax_way_at_the_batch_asked(monkeypatch,
                                                                              tmp_path):
    """--argmax-parts 64 0 (sampling.ARGMAX_PARTS) reaches every kind, split too (every step
    ends in the argmax), the module's value under the usual label and set back after; --batch 8
    makes each case's request decode 8 sequences, labelled "/batch-8" before any other mark;
    the summary sets each way against the default's, and issue 27's targets (batch 1's) leave
    batch-8 Results out; the command line refuses a batch of 0 and a part count there is not."""
    from infermeter.engine import sampling
    script = load_benchmark("step_kernels_ab")
    seen = []
    monkeypatch.setattr(script, "run_ab_case", lambda request, env, path, model, label, *rest:
                        seen.append((label, sampling.ARGMAX_PARTS, request.batch_sizes)))
    monkeypatch.setattr(sampling, "ARGMAX_PARTS", 64)
    script.run_model("debug", 1, tmp_path / "ab.jsonl", {}, kinds=("split", "fused"),
                     device="cpu", argmax_parts=(64, 0), batch=8)
    assert seen == [("split/batch-8", 64, (8,)), ("split/batch-8/argmax-parts-0", 0, (8,)),
                    ("fused/batch-8", 64, (8,)), ("fused/batch-8/argmax-parts-0", 0, (8,))]
    assert sampling.ARGMAX_PARTS == 64
    seen.clear()
    script.run_model("debug", 1, tmp_path / "ab.jsonl", {}, kinds=("split",), device="cpu")
    assert seen == [("split", 64, (1,))]  # the defaults: batch 1, the module's parts
    results = [_ab_result("llama-3.2-1b", "kernels", kind, 0, 50.0, batch=8)
               for kind in ("split/batch-8", "split/batch-8/argmax-parts-0")]
    text = script.summary(results)
    assert "llama-3.2-1b: split/batch-8/argmax-parts-0 / split/batch-8:" in text, text
    assert "50.00 %" not in text  # batch 8 is not the targets'
    parser = script.arguments()
    assert parser.parse_args(["--batch", "8"]).batch == 8 and parser.parse_args([]).batch == 1
    assert parser.parse_args(["--argmax-parts", "0", "64"]).argmax_parts == [0, 64]
    for bad in (["--batch", "0"], ["--argmax-parts", "3"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_the_step_ab_runs_every_kind_unsplit_and_not(monkeypatch, tmp_path):
    """--unsplit off on (decode_attention.UNSPLIT) reaches every kind, split too (both steps
    run the split-KV attention), after each argmax way, "off" under the usual label; the
    module's value comes back after; the summary sets one against the other. --early-block
    on off (EARLY_BLOCK) likewise, labelled ".../early-block" and ".../late-block" (the
    default, "auto", unmarked), the late one set against the early one where both ran."""
    from infermeter.engine.kernels import decode_attention
    script = load_benchmark("step_kernels_ab")
    seen = []
    monkeypatch.setattr(script, "run_ab_case", lambda request, env, path, model, label, *rest:
                        seen.append((label, decode_attention.UNSPLIT)))
    script.run_model("debug", 1, tmp_path / "ab.jsonl", {}, kinds=("split", "fused"),
                     device="cpu", argmax_parts=(64, 0), unsplits=("off", "on"))
    assert seen == [("split", "off"), ("split/unsplit", "on"),
                    ("split/argmax-parts-0", "off"), ("split/argmax-parts-0/unsplit", "on"),
                    ("fused", "off"), ("fused/unsplit", "on"),
                    ("fused/argmax-parts-0", "off"), ("fused/argmax-parts-0/unsplit", "on")]
    assert decode_attention.UNSPLIT == "off"
    results = [_ab_result("qwen2.5-0.5b", "kernels", kind, 0, 50.0)
               for kind in ("fused/recorded", "fused/recorded/unsplit")]
    assert "qwen2.5-0.5b: fused/recorded/unsplit / fused/recorded:" in script.summary(results)
    seen.clear()
    monkeypatch.setattr(script, "run_ab_case", lambda request, env, path, model, label, *rest:
                        seen.append((label, decode_attention.EARLY_BLOCK)))
    script.run_model("debug", 1, tmp_path / "ab.jsonl", {}, kinds=("split",), device="cpu",
                     batch=8, early_blocks=("auto", "on", "off"))
    assert seen == [("split/batch-8", "auto"), ("split/batch-8/early-block", "on"),
                    ("split/batch-8/late-block", "off")]
    assert decode_attention.EARLY_BLOCK == "auto"
    kinds = ("split/batch-8", "split/batch-8/early-block", "split/batch-8/late-block")
    results = [_ab_result("llama-3.2-1b", "kernels", kind, 0, 50.0, batch=8) for kind in kinds]
    summary = script.summary(results)
    assert "llama-3.2-1b: split/batch-8/late-block / split/batch-8/early-block:" in summary
    assert "llama-3.2-1b: split/batch-8/early-block / split/batch-8:" in summary
    assert "llama-3.2-1b: split/batch-8/late-block / split/batch-8:" not in summary
    results = [r for r in results if r.config["ab"]["kernels"] != kinds[1]]  # no early one
    assert "llama-3.2-1b: split/batch-8/late-block / split/batch-8:" in script.summary(results)
    parser = script.arguments()
    assert parser.parse_args(["--unsplit", "on", "off"]).unsplit == ["on", "off"]
    assert parser.parse_args([]).unsplit == ["off"]
    assert parser.parse_args(["--early-block", "off", "on"]).early_block == ["off", "on"]
    assert parser.parse_args([]).early_block == ["auto"]
    for bad in (["--unsplit", "maybe"], ["--early-block", "late"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_the_step_ab_sets_the_attention_s_early_release_against_its_late_one():
    """--attention-release after before split wqkv: the summary sets ".../early-attention",
    ".../early-split" and ".../early-wqkv" against ".../late-attention" where it ran (their
    ratio, before / after), each against the unmarked "auto" case only where it did not."""
    script = load_benchmark("step_kernels_ab")
    kinds = ("fused/recorded", "fused/recorded/late-attention",
             "fused/recorded/early-attention", "fused/recorded/early-split",
             "fused/recorded/early-wqkv")
    results = [_ab_result("llama-3.2-1b", "kernels", kind, 0, 50.0) for kind in kinds]
    summary = script.summary(results)
    for early in ("attention", "split", "wqkv"):
        pair = f"llama-3.2-1b: fused/recorded/early-{early} / fused/recorded/late-attention:"
        assert pair in summary
        assert f"llama-3.2-1b: fused/recorded/early-{early} / fused/recorded:" not in summary
    results = [r for r in results if r.config["ab"]["kernels"] != kinds[1]]  # no late one
    assert "llama-3.2-1b: fused/recorded/early-attention / fused/recorded:" \
        in script.summary(results)
    parser = script.arguments()
    assert parser.parse_args([]).attention_release == ["auto"]
    assert parser.parse_args(["--attention-release", "after", "before"]).attention_release \
        == ["after", "before"]


def test_the_step_ab_runs_every_kind_at_each_silu_block_through_its_checked_setter(
        monkeypatch, tmp_path):
    """--silu-block 1024 128 (swiglu.BLOCK) reaches every kind, the default under the usual
    label, set through swiglu.set_block and back after; the summary sets the other block
    against the default's; a block there is not is refused by the command line, and by the
    setter before any case; the script's default is the kernel's and the report's."""
    from infermeter.engine.kernels import swiglu
    from infermeter.report.select import DEFAULT_SILU_BLOCK
    script = load_benchmark("step_kernels_ab")
    assert script.DEFAULT_SILU_BLOCK == swiglu.BLOCK == DEFAULT_SILU_BLOCK
    seen = []
    monkeypatch.setattr(script, "run_ab_case", lambda request, env, path, model, label, *rest:
                        seen.append((label, swiglu.BLOCK)))
    script.run_model("debug", 1, tmp_path / "ab.jsonl", {}, kinds=("split", "fused"),
                     device="cpu", silu_blocks=(1024, 128))
    assert seen == [("split", 1024), ("split/silu-block-128", 128),
                    ("fused", 1024), ("fused/silu-block-128", 128)]
    assert swiglu.BLOCK == 1024
    results = [_ab_result("llama-2-7b", "kernels", kind, 0, 50.0)
               for kind in ("split", "split/silu-block-128")]
    assert "llama-2-7b: split/silu-block-128 / split:" in script.summary(results)
    seen.clear()
    with pytest.raises(ValueError, match="unknown silu BLOCK 100"):
        script.run_model("debug", 1, tmp_path / "ab.jsonl", {}, kinds=("split",),
                         device="cpu", silu_blocks=(100,))
    assert seen == [] and swiglu.BLOCK == 1024
    parser = script.arguments()
    assert parser.parse_args(["--silu-block", "128", "1024"]).silu_block == [128, 1024]
    assert parser.parse_args([]).silu_block == [1024]
    with pytest.raises(SystemExit):
        parser.parse_args(["--silu-block", "100"])


def test_the_step_ab_runs_every_kind_with_inductor_s_tuning_and_without(monkeypatch, tmp_path):
    """--compile-tuning on off (generator.COMPILE_TUNING) reaches every kind, "on" under the
    usual label, "off" labelled ".../no-tuning", the module's value back after; the summary
    sets one against the other; the command line refuses a way there is not."""
    from infermeter.engine import generator
    script = load_benchmark("step_kernels_ab")
    seen = []
    monkeypatch.setattr(script, "run_ab_case", lambda request, env, path, model, label, *rest:
                        seen.append((label, generator.COMPILE_TUNING)))
    script.run_model("debug", 1, tmp_path / "ab.jsonl", {}, kinds=("split", "fused"),
                     device="cpu", tunings=("on", "off"), batch=8)
    assert seen == [("split/batch-8", "on"), ("split/batch-8/no-tuning", "off"),
                    ("fused/batch-8", "on"), ("fused/batch-8/no-tuning", "off")]
    assert generator.COMPILE_TUNING == "on"
    results = [_ab_result("llama-2-7b", "kernels", kind, 0, 50.0)
               for kind in ("split", "split/no-tuning")]
    assert "llama-2-7b: split/no-tuning / split:" in script.summary(results)
    parser = script.arguments()
    assert parser.parse_args(["--compile-tuning", "off", "on"]).compile_tuning == ["off", "on"]
    assert parser.parse_args([]).compile_tuning == ["on"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--compile-tuning", "maybe"])


def test_the_compile_tuning_part_times_7b_then_batch_8_with_and_without_tuning():
    """step-compile-tuning: the split step in the graph trees at Llama-2-7B batch 1, then at
    Llama-3.2-1B batch 8, each with inductor's tuning and without, two rounds, into one file.
    Nothing else differs from the default step."""
    module = load_benchmark("step_kernels_ab")
    body = part_body("step-compile-tuning")
    lines = re.findall(r"python3 benchmarks/step_kernels_ab\.py ([^\n]*(?:\\\n[^\n]*)*)", body)
    parsed = [module.arguments().parse_args(_words(line.replace("\\\n", " ")))
              for line in lines]
    default = module.arguments().parse_args([])
    assert [(args.models, args.batch) for args in parsed] == [(["llama-2-7b"], 1),
                                                              (["llama-3.2-1b"], 8)]
    for args in parsed:
        assert (args.compile_tuning, args.kernels, args.rounds, args.graphs, args.name) == \
            (["on", "off"], ["split"], 2, ["trees"], "step-compile-tuning")
        assert (args.silu_block, args.argmax_parts, args.early_block) == \
            (default.silu_block, default.argmax_parts, default.early_block)


def test_the_moe_summary_judges_issue_25s_targets_at_batch_1_only():
    script = load_benchmark("moe_kernel_ab")
    results = [_ab_result("qwen3-30b-a3b", "kernel", "torch", 0, 41.0),
               _ab_result("qwen3-30b-a3b", "kernel", "triton", 0, 61.5),
               _ab_result("qwen3-30b-a3b", "kernel", "triton", 0, 90.0, batch=4)]
    text = script.summary(results)
    assert "  qwen3-30b-a3b batch 1 decode MBU, triton: 61.50 % (target >= 60 %) met" in text
    assert "  qwen3-30b-a3b batch 1 decode MBU, torch: 41.00 % (target >= 60 %) MISSED" in text
    assert "  mixtral-8x7b batch 1 decode MBU: - % (target >= 75 %) -" in text
    assert "90.00 %" not in text  # batch 4 is not the target's


def test_the_step_ab_marks_a_baseline_trees_results(monkeypatch, tmp_path):
    """--baseline (an older source tree timed as the A/B's baseline): every case it runs is
    marked (run_ab_case's baseline), the default marks none; the flag reaches each model's
    process."""
    script = load_benchmark("step_kernels_ab")
    seen = []
    monkeypatch.setattr(script, "run_ab_case", lambda request, env, path, model, label, round_,
                        key, ran, baseline=False: seen.append((label, baseline)))
    for baseline in (False, True):
        script.run_model("debug", 1, tmp_path / "ab.jsonl", {}, kinds=("split", "fused"),
                         device="cpu", baseline=baseline)
    assert seen == [("split", False), ("fused", False), ("split", True), ("fused", True)]
    assert script.arguments().parse_args(["--baseline"]).baseline
    assert not script.arguments().parse_args([]).baseline


def test_a_part_measuring_on_its_own_names_its_file_and_the_a_b_keeps_its_usual_one(tmp_path):
    """--name keeps a part's Results out of the A/B's usual results/step-kernels-<device>.jsonl
    (the file the docs' step A/Bs cite): step-batch-graphs' two batches both land in
    step-batch-graphs-<device>.jsonl, and a line without --name writes step-kernels-."""
    module = load_benchmark("step_kernels_ab")
    body = part_body("step-batch-graphs")
    lines = re.findall(r"python3 benchmarks/step_kernels_ab\.py ([^\n]*)", body)
    parsed = [module.arguments().parse_args(_words(line)) for line in lines]
    assert [args.batch for args in parsed] == [8, 32]
    assert {args.name for args in parsed} == {"step-batch-graphs"}
    assert all(args.graphs == ["trees", "recorded"] for args in parsed)
    args = module.arguments().parse_args(["--results", str(tmp_path), "--slug", "gpu"])
    named = module.arguments().parse_args(["--results", str(tmp_path / "d"), "--slug", "gpu",
                                           "--name", "mine"])
    assert module.ab_file(args)[1:] == ("gpu", tmp_path / "step-kernels-gpu.jsonl")
    assert module.ab_file(named)[2] == tmp_path / "d" / "mine-gpu.jsonl"
    assert (tmp_path / "d").is_dir()  # made for the Results to come


def test_the_large_prefill_graphs_part_times_7b_layer_then_static_on_empty_caches():
    """step-large-prefill-graphs: the main job's case (Llama-2-7B fp16, batch 1, the seed
    lengths), the layer prefill graphs then static, each process on an empty compiler cache."""
    branch = part_body("step-large-prefill-graphs")
    assert "for graphs in layer static; do" in branch
    assert "TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)" in branch
    (argv,) = _command_lines(BENCHMARKS / "open_targets.sh", branch)
    args = build_parser().parse_args([word if word != "x" else "static" for word in argv[:-2]])
    assert (args.model, args.dtype, args.batch_size, args.mode) == \
        ("llama-2-7b", "fp16", [1], ["compiled"])
    assert (args.prompt_len, args.max_new_tokens, args.max_seq_len) == ([80], 432, 512)
    assert args.prefill_graphs == "static" and argv[-2:] == ["--output", "x"]  # "$graphs"


def test_the_large_switches_part_times_7b_s_split_step_each_switch_both_ways():
    """step-large-switches: Llama-2-7B at batch 1, the split step in the graph trees, one
    process a switch, each into step-large-switches-<device>.jsonl: the argmax in 64 parts
    (the default) and in one reduction, then the one-block programs' block loaded before the
    PDL wait (the default) and after it. Nothing else differs from the default step."""
    module = load_benchmark("step_kernels_ab")
    body = part_body("step-large-switches")
    lines = re.findall(r"python3 benchmarks/step_kernels_ab\.py ([^\n]*)", body)
    parsed = [module.arguments().parse_args(_words(line)) for line in lines]
    default = module.arguments().parse_args([])
    assert [(args.argmax_parts, args.early_block) for args in parsed] == \
        [([64, 0], default.early_block), (default.argmax_parts, ["on", "off"])]
    for args in parsed:
        assert (args.models, args.kernels, args.batch, args.rounds) == \
            (["llama-2-7b"], ["split"], 1, 1)
        assert args.graphs == ["trees"] and args.name == "step-large-switches"
        assert module.MODELS["llama-2-7b"] == "fp16"


@pytest.mark.parametrize("part, model, batch", [("step-large-silu", "llama-2-7b", 1),
                                                ("step-batch-silu", "llama-3.2-1b", 8)])
def test_the_silu_parts_time_the_split_step_at_both_activation_blocks(part, model, batch):
    """step-large-silu (Llama-2-7B at batch 1) and step-batch-silu (Llama-3.2-1B at issue 27's
    batch 8): the split step in the graph trees, the activation kernel at 1024 columns a
    program (the default) and 128, two rounds in one command into <part>-<device>.jsonl.
    Nothing else differs from the default step."""
    module = load_benchmark("step_kernels_ab")
    args = part_arguments(part, "step_kernels_ab")
    default = module.arguments().parse_args([])
    assert args.silu_block == [1024, 128]
    assert (args.models, args.kernels, args.batch, args.rounds, args.graphs, args.name) == \
        ([model], ["split"], batch, 2, ["trees"], part)
    assert (args.argmax_parts, args.early_block, args.unsplit) == \
        (default.argmax_parts, default.early_block, default.unsplit)


def test_the_block_part_times_the_early_load_in_each_step_both_ways():
    """step-block: Llama-2-7B's split step in the graph trees with the one-block programs'
    block after the PDL wait, then before it (step-large-switches' order reversed), then the
    fused step in the recorded graph at SmolLM2-135M and Llama-3.2-1B before and after; each
    command one round into a file of its own. Nothing else differs from the default step."""
    module = load_benchmark("step_kernels_ab")
    body = part_body("step-block")
    lines = re.findall(r"python3 benchmarks/step_kernels_ab\.py ([^\n]*)", body)
    parsed = [module.arguments().parse_args(_words(line)) for line in lines]
    default = module.arguments().parse_args([])
    assert [(args.models, args.kernels, args.graphs, args.early_block, args.name)
            for args in parsed] == \
        [(["llama-2-7b"], ["split"], ["trees"], ["off", "on"], "step-large-switches-reversed"),
         (["smollm2-135m", "llama-3.2-1b"], ["fused"], ["recorded"], ["on", "off"],
          "step-small-block")]
    for args in parsed:
        assert (args.batch, args.rounds, args.argmax_parts, args.unsplit) == \
            (1, 1, default.argmax_parts, default.unsplit)


def test_the_7b_bisect_part_times_this_tree_two_snapshots_between_and_the_issue_s():
    """step-large-bisect: this tree, then 0558cf5's and 86471a7's snapshots (each checked for
    before anything runs), then the issue's tree, one round, each process on an empty compiler
    cache, the main job's 7B case."""
    branch, ours, args = _trees_ab("step-large-bisect")
    assert "issue_pair" in branch
    # "$here" and "$issue" read as x (a quoted variable), the two snapshots as themselves
    assert ours[1:5] == ["x", ".trees/0558cf5e868b", ".trees/86471a7fda23", "x"]
    assert 'trees_ab.py run "$here" .trees/0558cf5e868b .trees/86471a7fda23 "$issue"' in branch
    checked = re.search(r"for tree in ([^;]*); do", branch).group(1).split()
    assert checked == [".trees/0558cf5e868b", ".trees/86471a7fda23"]
    assert branch.index("for tree in") < branch.index("trees_ab.py run")
    assert ours[ours.index("--caches") + 1] == "fresh"
    assert ours[ours.index("--rounds") + 1] == "1"
    assert ours[ours.index("--name") + 1] == "step-large-bisect"
    assert (args.model, args.dtype, args.batch_size, args.mode) == \
        ("llama-2-7b", "fp16", [1], ["compiled"])
    assert (args.prompt_len, args.max_new_tokens, args.max_seq_len) == ([80], 432, 512)
