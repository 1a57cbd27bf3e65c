"""The standard `infermeter copy` sweep on one GPU: writes results/copy-<device>.jsonl.

    python benchmarks/copy_sweep.py [--quick] [--results DIR]

Runs (each one Result):
  seed        llama-2-7b, batch 1 x 512 tokens fp16 (the reference scripts' 256 MiB cache):
              every layout, host memory, direction and method; paged blocks of 16, 64, 256
  seed-1tok   the same cache in 1-token paged blocks (32,768 pieces of 8 KiB), pinned only
  large       llama-3.1-8b, batch 8 x 4096 tokens bf16 (4 GiB), pinned: every layout and method,
              paged blocks of 256 tokens
  large-paged16  the same cache in 16-token blocks (131,072 pieces of 32 KiB) with the staged
              and mapped methods only: one copy per block would take about a second per sample
  large-host  the 4 GiB engine-layout cache from seed-way and pageable memory
Prints a summary with the four target ratios of the issue (engine and paged layouts against
contiguous pinned, both directions against one, contiguous pinned against the link peak), each
against the best contiguous pinned copy of the same cache in the same sweep. When $OUT is set,
the JSONL and the printed summary are also written there. About 3 minutes on an H100 or H200
(PCIe Gen5).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from infermeter.copy.diagnosis import GOALS, diagnose, targets
from infermeter.copy.job import CopyRequest, run_copy
from infermeter.measure.env import capture_env, device_slug
from infermeter.measure.result import Result, atomic_write
from infermeter.specs.presets import PRESETS
from infermeter.textable import render_table

BATCHED = ("staged", "mapped")  # one copy per block of 131,072 takes ~1 s a sample


def sweep(quick: bool) -> list[tuple[str, CopyRequest]]:
    small, big = PRESETS["llama-2-7b"], PRESETS["llama-3.1-8b"]
    big_batch, big_seq = (2, 2048) if quick else (8, 4096)
    reps = 3 if quick else 10
    return [
        ("seed", CopyRequest(small, (1,), (512,), "fp16", block_tokens=(16, 64, 256),
                             repeats=reps)),
        ("seed-1tok", CopyRequest(small, (1,), (512,), "fp16", layouts=("paged",),
                                  hosts=("pinned",), block_tokens=(1,), repeats=3, warmup=1)),
        ("large", CopyRequest(big, (big_batch,), (big_seq,), "bf16", hosts=("pinned",),
                              layouts=("engine", "contiguous", "paged"), block_tokens=(256,),
                              repeats=5, warmup=1)),
        ("large-paged16", CopyRequest(big, (big_batch,), (big_seq,), "bf16", hosts=("pinned",),
                                      layouts=("paged",), block_tokens=(16,), methods=BATCHED,
                                      repeats=5, warmup=1)),
        ("large-host", CopyRequest(big, (big_batch,), (big_seq,), "bf16",
                                   hosts=("seed", "pageable"), layouts=("engine",),
                                   directions=("d2h", "h2d"), methods=("per-tensor", "staged"),
                                   repeats=3, warmup=1)),
    ]


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}%" if pct else f"{value:.3f}"


def _by_cache(results: list[tuple[str, Result]]) -> dict[str, list[dict]]:
    """Cases of all runs over the same cache (model, batch, seq_len), so that e.g. the 1-token
    blocks are compared with the contiguous copy of that cache measured in another run."""
    groups: dict[str, list[dict]] = {}
    for _, result in results:
        c = result.config
        key = f"{result.model['name']} {c['batch_size']}x{c['seq_len']}"
        groups.setdefault(key, []).extend(result.metrics["cases"])
    return groups


def diagnoses(results: list[tuple[str, Result]]) -> str:
    """The plain-words diagnosis per cache, over the cases of all runs of that cache."""
    link = results[0][1].metrics["link"]
    lines = []
    for key, cases in _by_cache(results).items():
        lines.append(f"== {key} ==")
        lines += [f"- {line}" for line in diagnose(cases, link)[0]]
    return "\n".join(lines)


def summary(results: list[tuple[str, Result]]) -> str:
    rows = []
    for key, cases in _by_cache(results).items():
        t = targets(cases)
        blocks = sorted(t["paged_vs_contiguous"], key=int)
        for d in ("d2h", "h2d"):
            paged = " ".join(f"{b}:{t['paged_vs_contiguous'][b].get(d, 0):.3f}" for b in blocks)
            rows.append([key, d, _fmt(t["engine_vs_contiguous"].get(d)), paged or "-",
                         _fmt(t["both_vs_one_way"]) if d == "d2h" else "",
                         _fmt(t["contiguous_link_pct"].get(d), pct=True)])
    goals = (f"goals: engine >= {GOALS['engine']}, paged/16 >= {GOALS['paged']}, both >= "
             f"{GOALS['both']}x one way, contiguous pinned >= {GOALS['link_pct']:.0f}% of link "
             f"(all against the same cache's best contiguous pinned copy, best method each)")
    lines = [render_table(["cache", "dir", "engine/contig", "paged/contig by block tokens",
                           "both/one-way", "contig % link"], rows), goals, "",
             "fastest method per cache, layout and direction (pinned host memory):"]
    winners: dict[tuple, dict] = {}
    for key, cases in _by_cache(results).items():
        for c in cases:
            if c["host_memory"] != "pinned":
                continue
            slot = (key, c["layout"], c["block_tokens"], c["direction"])
            if slot not in winners or c["gbps"] > winners[slot]["gbps"]:
                winners[slot] = c
    lines.append(render_table(["cache", "layout", "dir", "method", "GB/s", "% link"], [
        [k[0], f"{k[1]}/{k[2]}" if k[2] else k[1], k[3], c["method"], f"{c['gbps']:.1f}",
         _fmt(c.get("link_pct"), pct=True)] for k, c in winners.items()]))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller large case, fewer repeats")
    parser.add_argument("--results", default=str(Path(__file__).resolve().parents[1] / "results"))
    args = parser.parse_args()
    env = capture_env()
    slug = device_slug(env)
    done: list[tuple[str, Result]] = []
    t0 = time.perf_counter()
    for name, request in sweep(args.quick):
        t1 = time.perf_counter()
        (result,) = run_copy(request, env=env)
        result.config["run"] = name
        done.append((name, result))
        print(f"[{time.perf_counter() - t0:6.1f} s] {name}: {len(result.metrics['cases'])} cases "
              f"in {time.perf_counter() - t1:.1f} s", file=sys.stderr, flush=True)
    text = diagnoses(done) + "\n\n" + summary(done)
    print(text)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    folders = [Path(args.results)] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"copy-{slug}.jsonl"
        old = path.read_text() if path.exists() else ""
        lines = "".join(result.to_json() + "\n" for _, result in done)
        atomic_write(path, (old + lines).encode())  # appended: earlier runs' Results stay
        (folder / f"copy-{slug}-summary.txt").write_text(text + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
