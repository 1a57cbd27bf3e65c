"""Torch against Triton experts (--moe-kernel: engine/kernels/expert_gemv.py gathered,
expert_gemm.py grouped) in MoE decode, on one GPU: the measurement the default waits for (issue 25).

    python benchmarks/moe_kernel_ab.py [--models qwen3-30b-a3b mixtral-8x7b] [--rounds 2]
        [--kernels triton] [--batches 1]
    python benchmarks/moe_kernel_ab.py --summary-only

Each model runs in a process of its own (a fresh CUDA context and dynamo cache; one model's failure
leaves the others), which times "torch" then "triton", --rounds times over (ABAB...: drift shows as
a difference between rounds), each kind one `infermeter generate` request over BATCHES (its own
loop, random bf16 weights loaded once a request and freed before the next: Mixtral-8x7B's 93 GB fit
one H200 once): compiled, an 80-token prompt and 432 new tokens in a 512-token cache
(generation_sweep.py's seed case), REPEATS timed runs after one untimed, the HBM bandwidth measured
in the same run for MBU. Batches 1 and 4 take the gathered path (batch x k <= E: Qwen3-30B-A3B
4 x 8 of 128, Mixtral 4 x 2 of 8), batch 32 the grouped one (256 pairs of 128, 64 of 8: the torch
step runs every expert on every token, the Triton one kernels/expert_gemm.py's grouped kernels, and
its prefill stays compiled and bucketed with Triton only); MBU is on the active weights: the
experts each decode step's routing touched, counted after the timed runs (docs/design.md, "MoE
bytes per decode step"); at batch 4 the torch path reads an expert once per token that chose it,
the Triton kernels once. gpt-oss-20b (bf16 experts, 4 of 32): Triton's gathered kernels at
batches 1 and 4, its grouped ones at 32 (they take its biases and clamped SwiGLU), and its
prefill bucketed with Triton only, as the other two. Every Result is
appended to results/moe-kernel-<device>.jsonl as soon as it is done (config.ab: the kernel asked for
and the round; config.moe_kernel: what ran), and $OUT gets a copy. The summary
(results/moe-kernel-<device>-summary.txt) gives, for each model's latest run, batch and kernel: TPOT
p50 over every step, the median and range of the per-run TPOTs (a run's decode time over its steps),
MBU, the experts a layer's step read, decode tok/s and the warm-up; then triton / torch per model
and batch, and whether the per-run ranges are apart; then issue 25's MBU targets on active
weights at batch 1 (MBU_GOALS) beside each kernel's median MBU, met or MISSED.
Each compiled case compiles afresh (Qwen3-30B-A3B: over two minutes a batch on an H100 on
2026-12-05), so a 10-minute command holds about three cases: --kernels and --batches pick them
(the targets: `--kernels triton --batches 1`).
"""

from __future__ import annotations

import time
from pathlib import Path

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

from infermeter.generate.request import GenerateRequest, build_request
from infermeter.measure.result import Result
from infermeter.textable import render_table

MODELS = {"qwen3-30b-a3b": "bf16", "mixtral-8x7b": "bf16", "gpt-oss-20b": "bf16"}
# engine/moe.MOE_KERNELS' two named kinds (its default, "auto", picks between them by batch:
# what this A/B measures)
KINDS = ("torch", "triton")
# issue 25's targets: decode MBU on the active weights at batch 1
MBU_GOALS = {"mixtral-8x7b": 75.0, "qwen3-30b-a3b": 60.0}
BATCHES = (1, 4, 32)  # gathered, gathered, grouped (batch x k past E)
PROMPT_LEN, NEW_TOKENS, CACHE, REPEATS = 80, 432, 512, 5


def ab_request(model: str, kind: str, source: str | None = None,
               batches: tuple[int, ...] = BATCHES, **overrides) -> GenerateRequest:
    """One request of the A/B: `model`'s random weights (or `source`) at each of BATCHES,
    compiled, with `kind` experts. overrides (device, dtype, modes, max_new_tokens, repeats,
    roofline) are for the CPU check."""
    options = {"device": "cuda", "dtype": MODELS.get(model), "modes": ("compiled",),
               "batch_sizes": batches, "prompt_lens": (PROMPT_LEN,),
               "max_new_tokens": NEW_TOKENS, "max_seq_len": CACHE, "repeats": REPEATS,
               "warmup": 1, **overrides}
    return build_request(source or f"random:{model}", moe_kernel=kind, **options)


def run_model(model: str, rounds: int, path: Path, env: dict, source: str | None = None,
              kinds: tuple[str, ...] = KINDS, batches: tuple[int, ...] = BATCHES,
              **overrides) -> None:
    """`kinds` in order (torch then triton), `rounds` times, each at `batches`, each Result (a
    batch's) appended to `path` once done."""
    for round_ in range(rounds):
        for kind in kinds:
            # each request gives its weights' memory back before the next one's fit check
            # (Mixtral's 93 GB do not fit twice)
            request = ab_request(model, kind, source, batches, **overrides)
            run_ab_case(request, env, path, model, kind, round_, "kernel", "moe_kernel")


def summary(results: list[Result]) -> str:
    """The table of each model's latest A/B, triton / torch per model and batch, then issue
    25's MBU targets (batch 1, active weights) beside each kernel's median MBU."""
    rows, lines = [], []
    by_case: dict[tuple[str, int], dict[str, list[float]]] = {}
    latest = latest_of_each([r for r in results if "ab" in r.config], lambda r: r.model["name"])
    for r in latest:
        m, kind, name = r.metrics, r.config["ab"]["kernel"], r.model["name"]
        batch = r.config.get("batch_size")
        runs = run_tpots(r)
        by_case.setdefault((name, batch), {}).setdefault(kind, []).extend(runs)
        rows.append([name, r.config.get("dtype", "-"), batch, kind,
                     r.config.get("moe_kernel") or "-", r.config["ab"]["round"],
                     fmt((m.get("tpot_ms") or {}).get("p50"), ".4f"), *run_tpot_cells(runs),
                     fmt(m.get("mbu_pct")), fmt(m.get("moe_experts_per_step")),
                     fmt(m.get("decode_tok_per_s")), fmt(m.get("warmup_s")), len(r.warnings)])
    for (name, batch), kinds in by_case.items():
        lines.append(ab_line(f"{name} batch {batch}", kinds, "torch", "triton"))
    table = render_table(["model", "dtype", "batch", "kernel", "ran", "round", "TPOT p50 ms",
                          "run TPOT median", "run TPOT range", "MBU %", "experts/layer",
                          "decode tok/s", "warm-up s", "warnings"], rows)
    targets = mbu_targets(latest, MBU_GOALS, 25, lambda r: r.config["ab"]["kernel"])
    return "\n\n".join([table, "\n".join(lines), targets])


def arguments():
    parser = ab_arguments(__doc__, list(MODELS), 2, "torch, triton", "moe-kernel")
    parser.add_argument("--kernels", nargs="+", choices=KINDS, default=list(KINDS),
                        help="the expert kernels a round times, in this order")
    parser.add_argument("--batches", nargs="+", type=int, choices=BATCHES, default=list(BATCHES))
    return parser


def main() -> int:
    args = arguments().parse_args()
    env, slug, path = ab_file(args)
    kinds, batches = tuple(args.kernels), tuple(sorted(set(args.batches)))
    if args.one:
        run_model(args.one, args.rounds, path, env, kinds=kinds, batches=batches)
        return 0
    start = time.perf_counter()
    run_in_processes(__file__, [] if args.summary_only else args.models,
                     ["--rounds", str(args.rounds), "--results", args.results, "--name", args.name,
                      "--slug", slug,
                      "--kernels", *kinds, "--batches", *map(str, batches)], start)
    return write_summary(path, summary, start)


if __name__ == "__main__":
    raise SystemExit(main())
