"""The standard `infermeter generate` set on one GPU: writes results/generate-<device>.jsonl.

    python benchmarks/generation_sweep.py [--parts seed prefill context] [--results DIR]
    python benchmarks/generation_sweep.py --summary-only
    python benchmarks/generation_sweep.py --merge PATH/generate-<device>.jsonl

Parts (Llama-2-7B, random fp16 weights; one Result per case, appended as soon as it is done, so a
command that runs out of time keeps every finished case; a part run again is appended, its
earlier Results stay, and the summary reads each part's latest run):
  seed     batch 1 and 32, an 80-token prompt + 432 new tokens in a 512-token cache (the reference
           scripts' 432 tokens and cache): compiled (5 timed runs after 1 untimed) and eager (2
           timed runs after the warm-up: a run takes 10-15 s there)
  seed1    the seed part's batch-1 compiled case alone (its run label stays seed1)
  seed1-pdl, seed1-no-pdl  the same with --pdl / --no-pdl (programmatic dependent launch,
           engine/kernels/pdl.py; seed1 takes the default: on where it can run): run two in one
           command to compare on one machine
  hf       the same prompts in transformers' generate with its static cache (2 timed runs), as
           it runs by default (recent versions compile it) and with its compilation off
  prefill  batch 1, a 2048-token prompt, 16 new tokens: TTFT and MFU of the eager prefill, and
           of the compiled mode with --compile-prefill (the prefill's layers compiled too)
  kernel   the seed part's compiled cases with --decode-attention triton (decode_kernel.py), and
  gemv     its batch-1 compiled case with --matvec-kernel triton (gemv_kernel.py): comparisons
           made (2026-11-26) when these were not the defaults; the summary labels their rows
           by what they ran (the Results' matvec_kernel and decode_attention)
  context  batch 1, TPOT after 512, 2048 and 8192 tokens of KV, compiled, each in a cache of
           exactly context + 64 tokens (64 new tokens). The random model's positions are raised
           to 8256 (Llama-2's 4096 would refuse 8k; the cost of a step does not depend on it).
--merge FILE appends the Results found in FILE (a sweep's JSONL brought back from a GPU
machine) to the file in results/, then prints the summary.
Then prints one table of every case in the file, TPOT against context, and, last, the issue's
targets with the ratios measured here. When $OUT is set, the JSONL and the summary go there too.
Rough budget on an H100: seed 4 min, hf 2-4 min, prefill 1 min, context 4 min (a compile is
about a minute): run the parts as separate commands where one command may take 10 minutes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sweep_common import fmt, latest_of_each, run_parts, write_summary

from infermeter.generate.job import run_generate
from infermeter.generate.request import GenerateRequest, build_request
from infermeter.measure.env import capture_env, device_slug
from infermeter.measure.result import Result, append_jsonl, read_results
from infermeter.textable import render_table

MODEL, DTYPE = "llama-2-7b", "fp16"
CONTEXTS, CONTEXT_STEPS = (512, 2048, 8192), 64
PARTS = ("seed", "seed1", "seed1-pdl", "seed1-no-pdl", "hf", "prefill",
         "context", "kernel", "gemv")
GOALS = {"mbu_pct": 85.0, "vs_hf": 10.0, "batch32": 20.0, "mfu_pct": 50.0, "warmup_s": 90.0}


def part_requests(part: str) -> list[GenerateRequest]:
    base = {"source": f"random:{MODEL}", "device": "cuda", "dtype": DTYPE}
    seed = {**base, "batch_sizes": (1, 32), "prompt_lens": (80,), "max_new_tokens": 432,
            "max_seq_len": 512}
    if part == "seed":
        return [build_request(**seed, modes=("compiled",), repeats=5, warmup=1),
                build_request(**seed, modes=("eager",), repeats=2, warmup=0)]
    if part == "seed1":  # the seed's batch-1 compiled case alone (a quick re-measure)
        return [build_request(**{**seed, "batch_sizes": (1,)}, modes=("compiled",),
                                repeats=5, warmup=1)]
    if part in ("seed1-pdl", "seed1-no-pdl"):
        return [build_request(**{**seed, "batch_sizes": (1,)}, modes=("compiled",),
                                repeats=5, warmup=1, pdl=part == "seed1-pdl")]
    if part == "kernel":  # the seed's compiled cases with the Triton split-KV decode attention
        return [build_request(**seed, modes=("compiled",), repeats=5, warmup=1,
                                decode_attention="triton")]
    if part == "gemv":  # the seed's batch-1 compiled case with the Triton GEMV (gemv_kernel.py)
        return [build_request(**{**seed, "batch_sizes": (1,)}, modes=("compiled",),
                                repeats=5, warmup=1, matvec_kernel="triton")]
    if part == "hf":  # transformers' generate as it runs by default (it may compile), and eager
        return [build_request(**seed, modes=("hf", "hf-eager"), repeats=2, warmup=0)]
    if part == "prefill":
        prefill = {**base, "prompt_lens": (2048,), "max_new_tokens": 16, "repeats": 5,
                   "warmup": 1}
        return [build_request(**prefill, modes=("eager",)),
                build_request(**prefill, modes=("compiled",), compile_prefill=True)]
    if part == "context":
        return [build_request(**base, contexts=(c,), max_new_tokens=CONTEXT_STEPS,
                                max_seq_len=c + CONTEXT_STEPS, max_positions=max(CONTEXTS)
                                + CONTEXT_STEPS, modes=("compiled",), repeats=5, warmup=1)
                for c in CONTEXTS]
    raise SystemExit(f"unknown part {part!r}")


def table(results: list[Result]) -> str:
    rows = []
    for r in results:
        m, c = r.metrics, r.config
        span = m.get("decode_context_range")
        rows.append([c.get("run", "-"), c["batch_size"], c["prompt_len"],
                     f"{span[0]}-{span[1]}" if span else "-", c["mode"], fmt(m["ttft_ms"], ".2f"),
                     fmt((m["tpot_ms"] or {}).get("p50"), ".3f"), fmt(m["decode_tok_per_s"]),
                     fmt(m["token_generation_speed"]), fmt(m["mbu_pct"]), fmt(m["mfu_pct"]),
                     fmt(m["warmup_s"]), "oom" if m.get("oom") else len(r.warnings)])
    return render_table(["run", "batch", "prompt", "KV tokens", "mode", "TTFT ms", "TPOT ms",
                         "decode tok/s", "tok/s (seed)", "MBU %", "MFU %", "warm-up s",
                         "warnings"], rows)


def find(results: list[Result], run: str, mode: str, batch: int = 1) -> Result | None:
    hits = [r for r in results if r.config.get("run") == run and r.config["mode"] == mode
            and r.config["batch_size"] == batch and not r.metrics.get("oom")]
    return hits[-1] if hits else None


def _ratio(a: Result | None, b: Result | None) -> float | None:
    if a is None or b is None or not b.metrics["decode_tok_per_s"]:
        return None
    return a.metrics["decode_tok_per_s"] / b.metrics["decode_tok_per_s"]


def kernels(result: Result) -> str:
    """What a compiled Result's step ran: its matrix-vector products and decode attention."""
    cfg = result.config
    return (f"products {cfg.get('matvec_kernel') or 'inductor'}, "
            f"attention {cfg.get('decode_attention') or '-'}"
            + (", PDL" if cfg.get("pdl") else ""))


def targets(results: list[Result]) -> str:
    """The issue's targets, each with the figure measured here (ratios within this file)."""
    b1, b32 = find(results, "seed", "compiled"), find(results, "seed", "compiled", 32)
    hf, prefill = find(results, "hf", "hf"), find(results, "prefill", "eager")
    prefill_compiled = find(results, "prefill", "compiled")
    hf_how = "compiled by transformers" if hf and hf.config.get("hf_compiled") else "eager"
    rows = [
        ("batch 1 decode MBU (512-token cache)", b1 and b1.metrics["mbu_pct"], "%",
         GOALS["mbu_pct"], ">="),
        (f"batch 1 decode vs hf ({hf_how})", _ratio(b1, hf), "x", GOALS["vs_hf"], ">="),
        ("batch 1 decode vs hf-eager", _ratio(b1, find(results, "hf", "hf-eager")), "x",
         GOALS["vs_hf"], ">="),
        ("batch 32 vs batch 1 decode tok/s", _ratio(b32, b1), "x", GOALS["batch32"], ">="),
        ("prefill 2048 tokens MFU (eager)", prefill and prefill.metrics["mfu_pct"], "%",
         GOALS["mfu_pct"], ">="),
        ("prefill 2048 tokens MFU (--compile-prefill)",
         prefill_compiled and prefill_compiled.metrics["mfu_pct"], "%", GOALS["mfu_pct"], ">="),
        ("compile + capture warm-up (batch 1)", b1 and b1.metrics["warmup_s"], "s",
         GOALS["warmup_s"], "<"),
    ]
    k1, k32 = find(results, "kernel", "compiled"), find(results, "kernel", "compiled", 32)
    if k1:  # the comparison parts, labelled by what they ran
        rows[1:1] = [(f"batch 1 decode MBU, part kernel ({kernels(k1)})", k1.metrics["mbu_pct"],
                      "%", GOALS["mbu_pct"], ">=")]
        rows.append((f"batch 32 vs batch 1, part kernel ({kernels(k1)})", _ratio(k32, k1), "x",
                     GOALS["batch32"], ">="))
    seed1 = find(results, "seed1", "compiled")
    if seed1:  # the seed's batch-1 case run again alone, with the code of its own run
        rows.insert(1, ("batch 1 decode MBU, part seed1 (re-measured alone)",
                        seed1.metrics["mbu_pct"], "%", GOALS["mbu_pct"], ">="))
    for part in ("seed1-no-pdl", "seed1-pdl", "gemv"):  # each inserted above the one before
        found = find(results, part, "compiled")
        if found:
            rows.insert(1, (f"batch 1 decode MBU, part {part} ({kernels(found)})",
                            found.metrics["mbu_pct"], "%", GOALS["mbu_pct"], ">="))
    lines = ["targets (issue 5), measured in this file:"]
    for name, value, unit, goal, op in rows:
        met = value is not None and (value >= goal if op == ">=" else value < goal)
        verdict = "-" if value is None else ("met" if met else "MISSED")
        lines.append(f"  {name}: {fmt(value)} {unit} (target {op} {goal:g} {unit}) {verdict}")
    if b1:
        lines.append(f"  batch 1 compiled: {b1.metrics['decode_tok_per_s']:.1f} tok/s of a "
                     f"{fmt(b1.metrics['decode_tok_per_s_roofline'])} tok/s HBM bound "
                     f"({b1.metrics['hbm_gbps_measured']:.0f} GB/s measured)")
    return "\n".join(lines)


def context_lines(results: list[Result]) -> str:
    rows = [r for r in results if r.config.get("run") == "context" and not r.metrics.get("oom")]
    return "\n".join(f"TPOT after {r.config['context']} tokens of KV: "
                     f"{r.metrics['tpot_ms']['p50']:.3f} ms, MBU {fmt(r.metrics['mbu_pct'])}%"
                     for r in rows)


def latest_runs(results: list[Result]) -> list[Result]:
    """Each part's Results from its latest run only (a part run again keeps its earlier ones)."""
    return latest_of_each(results, lambda r: str(r.config.get("run")))


def summary(results: list[Result]) -> str:
    """One table of every case of each part's latest run, TPOT against context, the targets."""
    results = latest_runs(results)
    return "\n\n".join(filter(None, [table(results), context_lines(results), targets(results)]))


def merge_parts(source: Path, path: Path) -> list[str]:
    """Append to `path` the Results `source` brings that it does not hold yet (a file merged
    twice adds nothing); earlier runs of the same parts stay. Returns the parts brought."""
    new = read_results(source)
    held = {r.to_json() for r in read_results(path)} if path.exists() else set()
    append_jsonl(path, [r for r in new if r.to_json() not in held])
    return list(dict.fromkeys(r.config.get("run") for r in new))


def merged_slug(source: Path) -> str | None:
    """The device a sweep file was measured on (its first Result's), for --merge's target."""
    results = read_results(source)
    return device_slug(results[0].env) if results else None


def run_part(part: str, path: Path, env: dict) -> None:
    def save(result: Result) -> None:
        result.config["run"] = part
        append_jsonl(path, [result])
        m = result.metrics
        print(f"  {part}: batch {result.config['batch_size']} {result.config['mode']}: "
              f"decode {fmt(m['decode_tok_per_s'])} tok/s, MBU {fmt(m['mbu_pct'])}%, "
              f"MFU {fmt(m['mfu_pct'])}%, warm-up {fmt(m['warmup_s'])} s", flush=True)

    for request in part_requests(part):
        run_generate(request, env, on_result=save)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "results"))
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--merge", type=Path, metavar="JSONL",
                        help="take the parts in this sweep file into results/ (no GPU needed)")
    parser.add_argument("--slug", help="summarise results/generate-SLUG.jsonl (default: this "
                        "machine's device), e.g. nvidia-h100-80gb-hbm3 on a machine without it")
    args = parser.parse_args()
    env = capture_env()
    if args.merge and not args.merge.is_file():
        print(f"error: {args.merge} is not a file", file=sys.stderr)
        return 2
    # --merge files into the file of the device that measured them, not this machine's
    slug = args.slug or (args.merge and merged_slug(args.merge)) or device_slug(env)
    path = Path(args.results) / f"generate-{slug}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.merge:
        print(f"merged parts {merge_parts(args.merge, path)} into {path}", file=sys.stderr)
    run_parts([] if args.summary_only or args.merge else args.parts, run_part, path, env, start)
    return write_summary(path, summary, start)


if __name__ == "__main__":
    raise SystemExit(main())
