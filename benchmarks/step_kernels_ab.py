"""Split against fused decode-step kernels (--step-kernels, engine/kernels/fused_step.py), per
model size, on one GPU: the measurement the default waits for (issue 27).

    python benchmarks/step_kernels_ab.py [--models llama-3.2-1b ...] [--rounds 2] [--trace DIR]
    python benchmarks/step_kernels_ab.py --summary-only

Each model runs in a process of its own (a fresh CUDA context and dynamo cache; one model's
failure leaves the others), which times "split" and "fused", --rounds times over (ABAB...: drift
shows as a difference between rounds), each through `infermeter generate`'s own loop: random
weights in the model's usual dtype (MODELS), batch 1, compiled, an 80-token prompt and 432 new
tokens in a 512-token cache (generation_sweep.py's seed case), REPEATS timed runs after one
untimed, the HBM bandwidth measured in the same run for MBU. Every Result is appended to
results/step-kernels-<device>.jsonl as soon as it is done (config.ab: the kernels asked for and
the round; config.step_kernels: what ran), and $OUT gets a copy. The summary
(results/step-kernels-<device>-summary.txt) gives, for each model's latest run and each kind:
TPOT p50 over every step, the median and range of the per-run TPOTs (a run's decode time over its
steps), MBU and the warm-up; then fused / split, and whether the per-run ranges are apart; then
issue 27's MBU targets (MBU_GOALS) beside each kind's median MBU, met or MISSED.
With --kernels split (or fused) only that kind runs. With --graphs trees recorded each round
times the kinds under each way of replaying the step's CUDA graph (engine/generator.STEP_GRAPHS:
inductor's graph trees, the default, or our own recording, which leaves the host one replay a
step), the recorded ones labelled "split/recorded" and "fused/recorded", and the summary adds
recorded / trees per kernel kind.
With --trace DIR each case also records a few profiled decode steps after its timed runs
(DIR/<model>-<kernels>-<round>/, as generate --trace), and the summary adds the median step's
kernel count and the time between its kernels (metrics.breakdown.step_gaps): how many kernels
the fused step removed, and what that did to the gaps.
With --qk-norm-kernels 1 2 the fused kind runs once for each way of a model's per-head q/k norms
(kernels/qk_norm_rope.QK_NORM_KERNELS: 2, a kernel of their own after norm + wqkv, the default;
1, in the wqkv kernel, a program a head), the latter labelled "fused/qk-norms-in-wqkv", and the
summary adds one against the other. A model without q/k norms runs the same kernels either way.
With --prefetch 0 2 the fused kind runs once for each prefetch distance (kernels/prefetch.py:
each fused kernel pulls the first bytes of the product that many kernels on into L2; 0, none,
the default), labelled "fused/recorded/prefetch-2" and so on, and the summary adds each against
the same kind without. With --attention-pdl both combine none it runs once for each way the
decode attention's two kernels launch under PDL (decode_attention.ATTENTION_PDL: both with
it, the default; the split kernel plainly and the combine with it; neither), labelled
"fused/recorded", "fused/recorded/attention-pdl-combine" and "fused/recorded/attention-no-pdl";
with --split-stages 0 1 once for each num_stages of the split kernel's PDL launches
(decode_attention.SPLIT_STAGES; 0, Triton's own), labelled ".../split-stages-1". With
--argmax-parts 64 0 every kind
runs once for each way the step's argmax reduces a row (sampling.ARGMAX_PARTS: N, in N parts, 64
the default; 0, torch's in one reduction), labelled ".../argmax-parts-0" off the default.
With --unsplit off on every kind runs once with the decode attention split over programs and
a combine kernel after (the default) and once unsplit where a row's cache fits one program
(decode_attention.UNSPLIT: no combine kernel), labelled ".../unsplit"; with --early-block on
off once with a one-block split program's block loaded before the PDL wait, labelled
".../early-block", and once after it, ".../late-block" (decode_attention.EARLY_BLOCK; the
default, "auto", loads it before the wait in the fused step and after it in the split one,
and adds no mark). With --fused-tiles
table file --tiles-file F the fused kind runs once with FUSED_TILES and once with the entry F (a
fused_tiles.py Result; several, each over the ones before it at the widths it timed) suggests
for this GPU (fused_step.TILES_FROM), labelled
".../file-tiles" ("gemv", the GEMV's tiles: ".../gemv-tiles"); with --fused-head off on once
with the final norm and the head apart and once as one kernel (model.FUSED_HEAD), labelled
".../fused-head"; with --early-release on off once with wo's, w13's and w2's kernels and the
combine releasing the next kernel before their PDL wait (the default) and once after it
(pdl.EARLY_RELEASE), labelled ".../late-release" (".../early-release" marks "on" in Results from
before it became the default); with --attention-release after before once with norm +
wqkv's kernel and the attention's split kernel releasing the next kernel after their PDL wait
and once before it (pdl.ATTENTION_RELEASE; "auto", the default, picks by the step's weight
bytes), labelled ".../late-attention" and ".../early-attention"; "split" and "wqkv" move only
the split kernel's or norm + wqkv's release, ".../early-split" and ".../early-wqkv", each set
against ".../late-attention" where it ran. With
--silu-block 1024 128 every kind runs once for each count
of columns a program of the SwiGLU activation kernel handles (kernels/swiglu.py's BLOCK; 1024
the default), labelled ".../silu-block-128" off the default (the split step launches that
kernel; the fused step's layers compute the activation in their own kernel, its prefill still
launches it).
With --compile-tuning on off every kind runs once with inductor tuning the step's own kernels
by timing them while it compiles (generator.COMPILE_TUNING "on", the default) and once with
its heuristic configs, labelled ".../no-tuning".
With --batch N the cases run N sequences instead of one, labelled ".../batch-N"; past one the
step is split whatever --kernels asks (only batch 1 fuses), and issue 27's MBU targets, which
are batch 1's, leave those Results out.
Each compiled case compiles afresh: at 7-8B a warm-up is over a minute (docs/engine.md), so run
the large models one per command where a command may take 10 minutes.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch
from sweep_common import (
    ab_arguments,
    ab_file,
    ab_line,
    fmt,
    latest_of_each,
    mbu_targets,
    run_ab_case,
    run_in_processes,
    run_tpot_cells,
    run_tpots,
    write_summary,
)
from tile_grid import table_from_json  # benchmarks/ beside this script

from infermeter.commands.common import positive_int
from infermeter.engine.generator import COMPILE_TUNING_WAYS, STEP_GRAPHS
from infermeter.engine.kernels.decode_attention import (
    ATTENTION_PDL_WAYS,
    EARLY_BLOCK_WAYS,
    UNSPLIT_WAYS,
)
from infermeter.engine.kernels.fused_step import TILES_FROM_WAYS
from infermeter.engine.kernels.gemv import gpu_name
from infermeter.engine.kernels.pdl import ATTENTION_RELEASE_WAYS, EARLY_RELEASE_WAYS
from infermeter.engine.kernels.prefetch import DISTANCES as PREFETCH_DISTANCES
from infermeter.engine.kernels.swiglu import BLOCKS as SILU_BLOCKS
from infermeter.engine.kernels.swiglu import DEFAULT_BLOCK as DEFAULT_SILU_BLOCK
from infermeter.engine.model import FUSED_HEAD_WAYS
from infermeter.engine.sampling import DEFAULT_ARGMAX_PARTS
from infermeter.errors import InfermeterError
from infermeter.generate.request import GenerateRequest, build_request
from infermeter.measure.result import Result, read_results
from infermeter.measure.trace import make_trace_dir
from infermeter.textable import render_table

# issue 27's models and dtypes: the small ones, then the 7-8B that must not lose
# qwen3-0.6b: the fused kernel's q/k-norm variant (one program a head), no target of its own
# qwen3-30b-a3b: an MoE layer takes the fused attention kernels (norm + wqkv, the q/k norms' own
# kernel, wo + add) and, with the Triton experts (MOE_KERNELS), its block as four kernels: 9 or
# 10 kernels a layer where the split step runs 17 (issue 25)
# llama-3.2-3b: the first size past the step's size line (step_choice.SMALL_STEP_BYTES, 3 GB)
MODELS = {"smollm2-135m": "fp16", "qwen2.5-0.5b": "bf16", "qwen3-0.6b": "bf16",
          "llama-3.2-1b": "bf16", "llama-3.2-3b": "bf16", "llama-2-7b": "fp16",
          "llama-3.1-8b": "bf16", "qwen3-30b-a3b": "bf16"}
MOE_KERNELS = {"qwen3-30b-a3b": "triton"}  # the experts an MoE model's cases run
# engine/model.STEP_KERNELS, each named (not generate's auto)
KINDS = ("split", "fused")
# issue 27's targets: decode MBU at batch 1 against the same run's measured HBM bandwidth
MBU_GOALS = {"llama-3.2-1b": 80.0, "qwen2.5-0.5b": 65.0, "smollm2-135m": 40.0}
PROMPT_LEN, NEW_TOKENS, CACHE, REPEATS = 80, 432, 512, 5


def ab_request(model: str, kind: str, graphs: str = STEP_GRAPHS[0], batch: int = 1,
               **overrides) -> GenerateRequest:
    """One case of the A/B: `model`'s random weights at `batch` sequences (1 unless asked),
    compiled, with `kind` kernels, the step replayed as `graphs` says. overrides (device,
    dtype, modes, max_new_tokens, repeats, roofline) are for the CPU check."""
    options = {"device": "cuda", "dtype": MODELS.get(model), "modes": ("compiled",),
               "batch_sizes": (batch,), "prompt_lens": (PROMPT_LEN,),
               "max_new_tokens": NEW_TOKENS, "max_seq_len": CACHE, "repeats": REPEATS,
               "warmup": 1, **overrides}
    if model in MOE_KERNELS:
        options.setdefault("moe_kernel", MOE_KERNELS[model])
    return build_request(f"random:{model}", step_kernels=kind, step_graphs=graphs, **options)


# qk_norm_rope.QK_NORM_KERNELS's values, the default first
QK_NORM_WAYS = (2, 1)
QK_IN_WQKV = "qk-norms-in-wqkv"  # the label's mark of QK_NORM_KERNELS 1
PREFETCHED = "prefetch-"  # the label's mark of a prefetch distance (prefetch.DISTANCE)
# the label's marks of decode_attention.ATTENTION_PDL's other ways and of SPLIT_STAGES
ATTENTION_MARKS = {"both": "", "combine": "attention-pdl-combine", "none": "attention-no-pdl"}
SPLIT_STAGED = "split-stages-"
ARGMAX_PARTED = "argmax-parts-"  # the label's mark of sampling.ARGMAX_PARTS off its default
BATCHED = "batch-"  # the label's mark of a batch past one
UNSPLIT_MARK = "unsplit"  # the label's mark of decode_attention.UNSPLIT "on"
# the label's marks of decode_attention.EARLY_BLOCK asked by name ("auto" has none)
BLOCK_MARKS = {"auto": "", "on": "early-block", "off": "late-block"}
# the label's marks of fused_step.TILES_FROM off the table
TILE_MARKS = {"table": "", "gemv": "gemv-tiles", "file": "file-tiles"}
FUSED_HEAD_MARK = "fused-head"  # the label's mark of model.FUSED_HEAD "on"
# the label's marks of pdl.EARLY_RELEASE off its default ("on" since 2026-12-07), and of "on"
# in the Results from before that day
LATE_RELEASE_MARK, EARLY_RELEASE_MARK = "late-release", "early-release"
# the label's marks of pdl.ATTENTION_RELEASE asked by name ("auto" has none); the early ones
ATTENTION_RELEASE_MARKS = {"auto": "", "after": "late-attention", "before": "early-attention",
                           "split": "early-split", "wqkv": "early-wqkv"}
EARLY_ATTENTION_MARKS = tuple(ATTENTION_RELEASE_MARKS[way] for way in ("before", "split", "wqkv"))
SILU_BLOCKED = "silu-block-"  # the label's mark of swiglu.BLOCK off its default
NO_TUNING_MARK = "no-tuning"  # the label's mark of generator.COMPILE_TUNING "off"


def label(kind: str, graphs: str, qk_kernels: int = 2, distance: int = 0,
          attention_pdl: str = "both", split_stages: int = 0,
          argmax_parts: int = DEFAULT_ARGMAX_PARTS, batch: int = 1, unsplit: str = "off",
          early_block: str = "auto", tiles: str = "table", head: str = "off",
          silu_block: int = DEFAULT_SILU_BLOCK, tuning: str = "on",
          release: str = "on", attention_release: str = "auto") -> str:
    """An A/B case's name: the kernel kind, "/recorded" added where the step is recorded,
    "/batch-N" where it runs N sequences,
    "/qk-norms-in-wqkv" where the fused kind's q/k norms run in the wqkv kernel,
    "/prefetch-N" where its kernels prefetch N kernels ahead, ATTENTION_MARKS' mark where the
    decode attention launches other than both kernels under PDL, "/split-stages-N" where
    its split kernel has N pipeline stages, "/argmax-parts-N" where the argmax reduces a row
    in N parts other than the default's (0: in one reduction), "/unsplit" where the attention
    ran unsplit,
    BLOCK_MARKS' mark where a one-block split program loaded its block before ("/early-block")
    or after ("/late-block") the wait by name rather than by the step's default,
    TILE_MARKS' mark where the fused kernels took their tiles from other than the table,
    "/fused-head" where the final norm and the head ran as one kernel, "/silu-block-N" where
    the activation kernel's programs took N columns other than the default's, "/no-tuning"
    where inductor kept its heuristic configs, "/late-release" where the fused products and
    combine released the next kernel after their PDL wait, ATTENTION_RELEASE_MARKS' mark where
    norm + wqkv and the split kernel released it after ("/late-attention") or before
    ("/early-attention"; the one kernel's alone: "/early-split", "/early-wqkv") theirs by name
    rather than by the step's size."""
    name = kind if graphs == STEP_GRAPHS[0] else f"{kind}/{graphs}"
    marks = [f"{BATCHED}{batch}" if batch != 1 else "", QK_IN_WQKV if qk_kernels == 1 else "",
             f"{PREFETCHED}{distance}" if distance else "", ATTENTION_MARKS[attention_pdl],
             f"{SPLIT_STAGED}{split_stages}" if split_stages else "",
             f"{ARGMAX_PARTED}{argmax_parts}" if argmax_parts != DEFAULT_ARGMAX_PARTS else "",
             UNSPLIT_MARK if unsplit == "on" else "", BLOCK_MARKS[early_block],
             TILE_MARKS[tiles], FUSED_HEAD_MARK if head == "on" else "",
             f"{SILU_BLOCKED}{silu_block}" if silu_block != DEFAULT_SILU_BLOCK else "",
             NO_TUNING_MARK if tuning == "off" else "",
             LATE_RELEASE_MARK if release == "off" else "",
             ATTENTION_RELEASE_MARKS[attention_release]]
    return "/".join([name, *filter(None, marks)])


def _settings() -> list[tuple[str, object, str, bool]]:
    """What run_model varies, in the order its cases nest: (its keyword, the module and the
    attribute the keyword's values set, whether every kind takes them or the fused one only).
    A module's own checked setter, where it has one (prefetch.set_distance), sets the value:
    _apply."""
    from infermeter.engine import generator as engine_generator
    from infermeter.engine import model as engine_model
    from infermeter.engine import sampling
    from infermeter.engine.kernels import (
        decode_attention,
        fused_step,
        pdl,
        prefetch,
        qk_norm_rope,
        swiglu,
    )

    return [("qk_ways", qk_norm_rope, "QK_NORM_KERNELS", False),
            ("distances", prefetch, "DISTANCE", False),
            ("attention_pdl", decode_attention, "ATTENTION_PDL", False),
            ("split_stages", decode_attention, "SPLIT_STAGES", False),
            ("tiles", fused_step, "TILES_FROM", False),
            ("heads", engine_model, "FUSED_HEAD", False),
            ("releases", pdl, "EARLY_RELEASE", False),
            ("attention_releases", pdl, "ATTENTION_RELEASE", False),
            ("argmax_parts", sampling, "ARGMAX_PARTS", True),
            ("unsplits", decode_attention, "UNSPLIT", True),
            ("early_blocks", decode_attention, "EARLY_BLOCK", True),
            ("silu_blocks", swiglu, "BLOCK", True),
            ("tunings", engine_generator, "COMPILE_TUNING", True)]


def run_model(model: str, rounds: int, path: Path, env: dict, trace: str | None = None,
              graphs: tuple[str, ...] = STEP_GRAPHS[:1], kinds: tuple[str, ...] = KINDS,
              batch: int = 1, baseline: bool = False, tiles_file: str | list[str] | None = None,
              **overrides) -> None:
    """Each of `kinds` (split then fused) under each of `graphs`, `rounds` times, at `batch`
    sequences, once for each combination of the values asked of _settings()' keywords in
    `overrides` (qk_ways: qk_norm_rope.QK_NORM_KERNELS; distances: prefetch.DISTANCE;
    attention_pdl and split_stages: decode_attention's; tiles:
    fused_step.TILES_FROM, "file" taking `tiles_file`'s entry for this GPU; heads:
    model.FUSED_HEAD; releases: pdl.EARLY_RELEASE; attention_releases:
    pdl.ATTENTION_RELEASE; argmax_parts:
    sampling.ARGMAX_PARTS; unsplits and early_blocks: decode_attention's UNSPLIT and
    EARLY_BLOCK; silu_blocks: swiglu.BLOCK; tunings: generator.COMPILE_TUNING), a fused-only
    setting at the module's own value for split; each set back after. The other overrides go
    to the request (device, dtype, ... for the CPU check). Each Result is appended to `path`
    once done (marked an older tree's with `baseline`); with `trace` (a folder) each case's
    profiled steps go to a folder of their own in it."""
    from infermeter.engine.kernels import fused_step

    settings = _settings()
    kept = {keyword: getattr(module, attribute) for keyword, module, attribute, _ in settings}
    asked = {keyword: tuple(overrides.pop(keyword, (kept[keyword],))) for keyword in kept}
    kept_entry = fused_step.FILE_ENTRY
    if "file" in asked["tiles"]:
        device = torch.device(overrides.get("device", "cuda"))
        fused_step.FILE_ENTRY = file_entry(tiles_file, gpu_name(device))
    try:
        for round_, way, kind in itertools.product(range(rounds), graphs, kinds):
            values = [asked[keyword] if every or kind == "fused" else (kept[keyword],)
                      for keyword, _, _, every in settings]
            for combination in itertools.product(*values):
                case = dict(zip(kept, combination))
                for (_, module, attribute, _), value in zip(settings, combination):
                    _apply(module, attribute, value)
                name = label(kind, way, case["qk_ways"], case["distances"],
                             case["attention_pdl"], case["split_stages"],
                             case["argmax_parts"], batch, case["unsplits"],
                             case["early_blocks"], case["tiles"], case["heads"],
                             case["silu_blocks"], case["tunings"], case["releases"],
                             case["attention_releases"])
                if trace:
                    overrides["trace_dir"] = str(make_trace_dir(
                        Path(trace) / f"{model}-{name.replace('/', '-')}-{round_}"))
                run_ab_case(ab_request(model, kind, way, batch, **overrides), env, path,
                            model, name, round_, "kernels", "step_kernels", baseline)
    finally:
        for keyword, module, attribute, _ in settings:
            _apply(module, attribute, kept[keyword])
        fused_step.FILE_ENTRY = kept_entry


def _apply(module: object, attribute: str, value: object) -> None:
    """module.attribute = value, through the module's set_<attribute> where it has one (it
    refuses a value it cannot run)."""
    setter = getattr(module, f"set_{attribute.lower()}", None)
    if setter is None:
        setattr(module, attribute, value)
    else:
        setter(value)


def file_entry(tiles_files: str | list[str] | None, gpu: str) -> dict:
    """The FUSED_TILES entry benchmarks/fused_tiles.py Result files suggest for GPU `gpu` (a
    device name, gemv.gpu_name's), {} where they suggest none there. Several files are read in
    order, each replacing what the ones before it suggested at every (kernel, width) it timed,
    its best there or, where its best was the default tiles (a grid leaves those out), nothing:
    a full grid at one model's widths over a quick grid of several models."""
    if not tiles_files:
        raise InfermeterError("--fused-tiles file needs --tiles-file (a fused_tiles.py Result)")
    entry: dict[str, dict] = {}
    for name in [tiles_files] if isinstance(tiles_files, str) else tiles_files:
        results = read_results(Path(name))
        if not results:
            continue
        metrics = results[-1].metrics
        for shape in metrics.get("shapes") or []:  # the cells this file timed (q/k norms: none)
            if not shape.get("qk_norm"):
                entry.get(shape["kernel"], {}).pop(int(shape["n_cols"]), None)
        suggested = table_from_json(metrics.get("suggested_fused_tiles") or {}).get(gpu, {})
        for kernel, cells in suggested.items():
            entry.setdefault(kernel, {}).update(cells)
    return {kernel: cells for kernel, cells in entry.items() if cells}


def step_figures(result: Result) -> tuple[str, str]:
    """The traced median step's kernel count and gaps (ms), or "-" without a GPU trace."""
    gaps = (result.metrics.get("breakdown") or {}).get("step_gaps") or {}
    median = gaps.get("median_of_steps") or {}
    return (fmt(median.get("kernels"), ".0f"), fmt(median.get("gaps_ms"), ".4f"))


def summary(results: list[Result]) -> str:
    """The table of each model's latest A/B, fused / split per model, then issue 27's MBU
    targets beside each kind's median MBU over its rounds."""
    rows, lines = [], []
    by_model: dict[str, dict[str, list[float]]] = {}
    latest = latest_of_each([r for r in results if "ab" in r.config], lambda r: r.model["name"])
    for r in latest:
        m, kind, name = r.metrics, r.config["ab"]["kernels"], r.model["name"]
        runs = run_tpots(r)
        by_model.setdefault(name, {}).setdefault(kind, []).extend(runs)
        rows.append([name, r.config.get("dtype", "-"), kind, r.config.get("step_kernels") or "-",
                     r.config["ab"]["round"], fmt((m.get("tpot_ms") or {}).get("p50"), ".4f"),
                     *run_tpot_cells(runs), fmt(m.get("mbu_pct")), fmt(m.get("decode_tok_per_s")),
                     fmt(m.get("warmup_s")), *step_figures(r), len(r.warnings)])
    for name, kinds in by_model.items():
        lines.append(ab_line(name, kinds, "split", "fused"))
        for kind in kinds:
            if kind.endswith(QK_IN_WQKV):  # the q/k norms in wqkv's kernel against apart
                lines.append(ab_line(name, kinds, kind.rsplit("/", 1)[0], kind))
            base, last = kind.rsplit("/", 1) if "/" in kind else ("", kind)
            early = f"{base}/{BLOCK_MARKS['on']}"
            late_attention = f"{base}/{ATTENTION_RELEASE_MARKS['after']}"
            if last == BLOCK_MARKS["off"] and early in kinds:  # the block late against early
                lines.append(ab_line(name, kinds, early, kind))
            elif last in EARLY_ATTENTION_MARKS and late_attention in kinds:
                lines.append(ab_line(name, kinds, late_attention, kind))  # before / after
            # prefetching, the attention's other launches, other split stages, unsplit,
            # a block asked by name, other activation blocks: against not
            elif last.startswith((PREFETCHED, SPLIT_STAGED, ARGMAX_PARTED, SILU_BLOCKED)) \
                    or last in (UNSPLIT_MARK, *ATTENTION_MARKS.values(),
                                *filter(None, BLOCK_MARKS.values()), *TILE_MARKS.values(),
                                *filter(None, ATTENTION_RELEASE_MARKS.values()),
                                FUSED_HEAD_MARK, NO_TUNING_MARK, LATE_RELEASE_MARK,
                                EARLY_RELEASE_MARK):
                lines.append(ab_line(name, kinds, base, kind))
        recorded = [label(kind, "recorded") for kind in KINDS[:2]]
        if all(kind in kinds for kind in recorded):  # both kernels in the recorded step
            lines.append(ab_line(name, kinds, *recorded))
        for kind in KINDS:  # where the recorded step ran too
            if label(kind, "recorded") in kinds:
                lines.append(ab_line(name, kinds, kind, label(kind, "recorded")))
    table = render_table(["model", "dtype", "kernels", "ran", "round", "TPOT p50 ms",
                          "run TPOT median", "run TPOT range", "MBU %", "decode tok/s",
                          "warm-up s", "kernels/step", "gaps ms/step", "warnings"], rows)
    targets = mbu_targets(latest, MBU_GOALS, 27, lambda r: r.config["ab"]["kernels"])
    return "\n\n".join([table, "\n".join(lines), targets])


def _ways(parser, flag: str, ways: tuple[str, ...], text: str) -> None:
    """A flag taking one or more of `ways` (each case runs once for each), the first the
    default."""
    parser.add_argument(flag, nargs="+", choices=ways, default=[ways[0]], help=text)


def arguments():
    parser = ab_arguments(__doc__, list(MODELS), 1, "split, fused", "step-kernels")
    parser.add_argument("--trace", metavar="DIR", help="profile a few decode steps of each "
                        "case into DIR (kernels and gaps per step in the summary)")
    parser.add_argument("--graphs", nargs="+", choices=STEP_GRAPHS, default=list(STEP_GRAPHS[:1]),
                        help="how the step's CUDA graph is replayed, each in turn (default: "
                        "trees, inductor's)")
    parser.add_argument("--kernels", nargs="+", choices=KINDS, default=list(KINDS),
                        help="the kernel kinds to time, in this order (default: split fused)")
    parser.add_argument("--qk-norm-kernels", nargs="+", type=int, choices=QK_NORM_WAYS,
                        default=[QK_NORM_WAYS[0]], metavar="N", help="the fused kind once for "
                        "each: a model's q/k norms in a kernel after wqkv (2) or in wqkv's (1) "
                        "(default: 2)")
    parser.add_argument("--prefetch", nargs="+", type=int, choices=PREFETCH_DISTANCES,
                        default=[0], metavar="N", help="the fused kind once for each: its "
                        "kernels prefetch the weight N kernels on into L2 (0: none; default: 0)")
    _ways(parser, "--attention-pdl", ATTENTION_PDL_WAYS, "the fused kind once for each way the "
          "decode attention's two kernels launch under PDL: both with it, the split kernel "
          "plainly (combine), neither (default: both)")
    parser.add_argument("--split-stages", nargs="+", type=int, choices=(0, 1, 2),
                        default=[0], metavar="N", help="the fused kind once for each: the split "
                        "kernel's pipeline stages under PDL (0: Triton's own; default: 0)")
    parser.add_argument("--argmax-parts", nargs="+", type=int, choices=(0, 16, 64, 256),
                        default=[DEFAULT_ARGMAX_PARTS], metavar="N", help="every kind once "
                        "for each: the step's argmax over a row in one reduction (0) or in N "
                        f"parts (default: {DEFAULT_ARGMAX_PARTS})")
    parser.add_argument("--batch", type=positive_int, default=1, metavar="N",
                        help="the sequences each case decodes (default: 1; past one the step "
                        "is split, whatever --kernels asks)")
    parser.add_argument("--baseline", action="store_true", help="mark the Results an older "
                        "source tree's, timed as the A/B's baseline (run with that tree's src/ "
                        "on PYTHONPATH); the report never takes them for a column's figure")
    _ways(parser, "--unsplit", UNSPLIT_WAYS, "every kind once for each: the decode attention "
          "split over programs with a combine kernel (off) or unsplit where a row's cache fits "
          "one program (on) (default: off)")
    _ways(parser, "--early-block", EARLY_BLOCK_WAYS, "every kind once for each: a one-block "
          "split program loads its block before the PDL wait (on), after it (off), or before "
          "it in the fused step and after it in the split one (auto; the default)")
    _ways(parser, "--fused-tiles", TILES_FROM_WAYS, "the fused kind once for each place its "
          "kernels take their tiles from: the table (FUSED_TILES), none (the GEMV's, adapted), "
          "or the entry --tiles-file suggests for this GPU (default: table)")
    _ways(parser, "--early-release", EARLY_RELEASE_WAYS, "the fused kind once for each: wo's, "
          "w13's and w2's kernels and the attention's combine release the next kernel after "
          "their PDL wait (off) or before it (on) (default: on)")
    _ways(parser, "--attention-release", ATTENTION_RELEASE_WAYS, "the fused kind once for "
          "each: norm + wqkv's kernel and the attention's split kernel release the next kernel "
          "after their PDL wait, before it, or only the split kernel or norm + wqkv before it "
          "(default: auto, by the step's weight bytes)")
    _ways(parser, "--fused-head", FUSED_HEAD_WAYS, "the fused kind once for each: the final norm "
          "and the output head as two kernels (off) or one (on) (default: off)")
    parser.add_argument("--tiles-file", nargs="+", metavar="FILE", help="benchmarks/"
                        "fused_tiles.py Results, for --fused-tiles file: each file's bests "
                        "replace the ones before it at the widths it timed")
    _ways(parser, "--compile-tuning", COMPILE_TUNING_WAYS, "every kind once for each: inductor "
          "tunes the step's own kernels by timing them while compiling (on) or keeps its "
          "heuristic configs (off) (default: on)")
    parser.add_argument("--silu-block", nargs="+", type=int, choices=SILU_BLOCKS,
                        default=[DEFAULT_SILU_BLOCK], metavar="N", help="every kind once for "
                        "each: the SwiGLU activation kernel's programs take N columns "
                        f"(default: {DEFAULT_SILU_BLOCK})")
    return parser


def main() -> int:
    parser = arguments()
    args = parser.parse_args()
    if "file" in args.fused_tiles:  # no file, or one that cannot be read: one line, before any case
        try:
            file_entry(args.tiles_file, "")
        except InfermeterError as err:
            raise SystemExit(f"error: {err}") from None
    env, slug, path = ab_file(args)
    if args.one:
        run_model(args.one, args.rounds, path, env, trace=args.trace, graphs=tuple(args.graphs),
                  kinds=tuple(args.kernels), qk_ways=tuple(args.qk_norm_kernels),
                  distances=tuple(args.prefetch), attention_pdl=tuple(args.attention_pdl),
                  split_stages=tuple(args.split_stages),
                  argmax_parts=tuple(args.argmax_parts), batch=args.batch,
                  unsplits=tuple(args.unsplit), early_blocks=tuple(args.early_block),
                  tiles=tuple(args.fused_tiles), tiles_file=args.tiles_file,
                  heads=tuple(args.fused_head), releases=tuple(args.early_release),
                  attention_releases=tuple(args.attention_release),
                  silu_blocks=tuple(args.silu_block),
                  tunings=tuple(args.compile_tuning),
                  baseline=args.baseline)
        return 0
    start = time.perf_counter()
    traced = ["--trace", args.trace] if args.trace else []
    run_in_processes(__file__, [] if args.summary_only else args.models,
                     ["--rounds", str(args.rounds), "--results", args.results, "--name", args.name,
                      "--slug", slug,
                      "--graphs", *args.graphs, "--kernels", *args.kernels,
                      "--qk-norm-kernels", *map(str, args.qk_norm_kernels),
                      "--prefetch", *map(str, args.prefetch),
                      "--attention-pdl", *args.attention_pdl,
                      "--split-stages", *map(str, args.split_stages),
                      "--argmax-parts", *map(str, args.argmax_parts),
                      "--unsplit", *args.unsplit, "--early-block", *args.early_block,
                      "--fused-tiles", *args.fused_tiles, "--fused-head", *args.fused_head,
                      "--early-release", *args.early_release,
                      "--attention-release", *args.attention_release,
                      "--silu-block", *map(str, args.silu_block),
                      "--compile-tuning", *args.compile_tuning,
                      *(["--tiles-file", *args.tiles_file] if args.tiles_file else []),
                      "--batch", str(args.batch), *traced,
                      *(["--baseline"] if args.baseline else [])], start)
    return write_summary(path, summary, start)


if __name__ == "__main__":
    raise SystemExit(main())
