"""The summary of benchmarks/tp_sweep.py: decode scaling, collective share, concurrent copy, runs.

Reads results/tp-<device>.jsonl (generate and copy Results), -comm.json and -runs.json; missing
parts are said to be missing. Targets are issue 6's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from infermeter.textable import render_table

GOALS = {"decode_13b": 1.7, "copy_together": 1.8}


def _load(folder: Path, slug: str) -> tuple[list[dict], dict | None, list[dict] | None]:
    path = folder / f"{slug}.jsonl"
    results = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() \
        else []
    return (results, _payload(folder / f"{slug}-comm.json"),
            _payload(folder / f"{slug}-runs.json"))


def _payload(path: Path) -> Any:
    """The comm figures (a dict) or the runs (a list): from a Result, as tp_sweep.py writes them
    since commit e3d41bd, or the bare JSON that earlier sweeps wrote."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if isinstance(data, dict) and {"kind", "config", "metrics"} <= data.keys():
        metrics = data["metrics"]
        if data["config"].get("benchmark") == "tp_runs":
            return metrics["runs"]
        return {**metrics, "model": data["config"]["model"], "tp": data["config"]["tp"]}
    return data


def _p50(stats: Any) -> float | None:
    return stats.get("p50", stats.get("median")) if isinstance(stats, dict) else stats


def _f(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def _paired_tp1(speed: dict, part: str, model: str, pdl: bool) -> float | None:
    """The tp 1 a tp 2 row is compared with: its own part's (same run, same setting), else the
    plain part's (decode-13b for decode-13b-triton, which runs tp 2 only), with the same PDL."""
    own = (part, model, 1, "-", pdl)
    if own in speed:  # even a failed tp 1 (None): never another run's in its place
        return speed[own]
    return speed.get(("-".join(part.split("-")[:2]), model, 1, "-", pdl))


def decode_section(results: list[dict], comm: dict | None) -> list[str]:
    rows, speed, tpot = [], {}, {}  # keyed (sweep part, model, tp, all-reduce kind, PDL)
    for r in results:
        part = str(r["config"].get("tp_sweep", ""))
        if r["kind"] != "generate" or not part.startswith("dec"):
            continue
        m, tp, model = r["metrics"], r["config"].get("tp", 1), r["model"]["name"]
        reduce = (r["config"].get("tp_all_reduce") or "nccl") if tp > 1 else "-"
        pdl = bool(r["config"].get("pdl"))
        key = (part, model, tp, reduce, pdl)
        speed[key], tpot[key] = m.get("decode_tok_per_s"), _p50(m.get("tpot_ms"))
        ranks = [_f(p.get("decode_tok_per_s")) for p in m.get("per_rank", [])]
        rows.append([part, tp, reduce, "on" if pdl else "-", _f(speed[key]),
                     _f(tpot[key], ".2f"), _f(m.get("ttft_ms"), ".1f"), " / ".join(ranks) or "-",
                     _f(m.get("mbu_pct")), "; ".join(r.get("warnings", []))[:60]])
    lines = ["decode, batch 1, bf16, compiled (tok/s of the slowest rank):",
             render_table(["part", "tp", "all-reduce", "PDL", "decode tok/s", "TPOT p50 ms",
                           "TTFT ms", "per rank tok/s", "MBU %", "warnings"], rows)] if rows else \
        ["decode: not run (parts decode-7b, decode-13b)"]  # the comm line may still follow
    for part, model, tp, reduce, pdl in (key for key in speed if key[2] > 1):  # file order
        one, many = _paired_tp1(speed, part, model, pdl), speed[(part, model, tp, reduce, pdl)]
        if one and many:
            goal = f" (target >= {GOALS['decode_13b']}x)" if "13b" in model and tp == 2 else ""
            how = f" ({reduce} all-reduces{', PDL' if pdl else ''})" if reduce != "nccl" \
                else (" (PDL)" if pdl else "")
            lines.append(f"{model} [{part}]: tp {tp}{how} / tp 1 decode = {many / one:.2f}x{goal}")
    if comm:
        per_step = comm.get("graph_ms_per_step") or comm.get("eager_ms_per_step")
        step = next((t for (_, model, tp, reduce, pdl), t in tpot.items()
                     if (model, tp, reduce, pdl) == (comm["model"], 2, "nccl", False)), None)
        share = f", {100 * per_step / step:.0f}% of its TPOT" if per_step and step else ""
        lines.append(f"collectives of one {comm['model']} tp 2 decode step "
                     f"({comm['all_reduces_per_step']} all-reduces + 2 all-gathers): "
                     f"{_f(comm.get('graph_ms_per_step'), '.3f')} ms in a CUDA graph, "
                     f"{_f(comm.get('eager_ms_per_step'), '.3f')} ms eager{share}")
        if "triton_graph_ms_per_step" in comm or "triton_graph_error" in comm:
            error = comm.get("triton_graph_error")
            same = {True: ", sums equal NCCL's", False: ", sums DIFFER from NCCL's"}.get(
                comm.get("triton_equals_nccl"), "")
            lines.append("  with the peer kernel's all-reduces (triton): "
                         f"{_f(comm.get('triton_graph_ms_per_step'), '.3f')} ms in a CUDA "
                         "graph" + same + (f" ({error})" if error else ""))
        if "one_shot_graph_ms_per_step" in comm or "one_shot_graph_error" in comm:
            error = comm.get("one_shot_graph_error")
            lines.append("  with symmetric-memory one-shot all-reduces: "
                         f"{_f(comm.get('one_shot_graph_ms_per_step'), '.3f')} ms in a CUDA "
                         "graph" + (f" ({error})" if error else ""))
    return lines


def copy_section(results: list[dict]) -> list[str]:
    copies = [r for r in results if r["kind"] == "copy" and r["config"].get("tp_sweep") == "copy"]
    if not copies:
        return ["copy: not run (part copy)"]
    gbps: dict[tuple, dict[str, float]] = {}
    links = {}
    for r in copies:
        phase, rank = r["config"]["phase"], r["config"]["rank"]
        links[rank] = r["metrics"].get("link_description", "?") + (
            f", bus {r['metrics']['link'].get('bus_id')}, NUMA {r['metrics'].get('numa_node')}")
        for case in r["metrics"]["cases"]:
            key = (case["layout"], case["direction"], case["method"])
            gbps.setdefault(key, {})[f"{phase}/{rank}"] = case["gbps"]
    rows = []
    for key, by in gbps.items():
        alone = by.get("alone-0/0")
        together = [v for k, v in by.items() if k.startswith("together/")]
        total = sum(together) if together else None
        rows.append([*key, _f(alone), _f(by.get("alone-1/1")),
                     " + ".join(_f(v) for v in together) or "-", _f(total),
                     _f(total / alone, ".2f") if alone and total else "-"])
    host = copies[0]["config"]["host_memory"][0]
    return [f"KV shard copies, {host} host memory, GB/s (target: together >= "
            f"{GOALS['copy_together']}x one rank alone, or a shared link named):",
            render_table(["layout", "dir", "method", "rank 0 alone", "rank 1 alone",
                          "together", "total", "total / alone"], rows),
            *[f"rank {rank}: {text}" for rank, text in sorted(links.items())]]


def runs_section(runs: list[dict] | None) -> list[str]:
    if runs is None:
        return ["runs: not run (part runs)"]
    ok = [r for r in runs if r["exit_code"] == 0 and r["result_written"]]
    walls = [r["wall_s"] for r in runs]
    return [f"start to exit, `infermeter generate --tp 2` x {len(runs)}: {len(ok)} clean "
            f"(exit 0, Result written), wall {min(walls):.0f}-{max(walls):.0f} s, hung: "
            f"{sum(r['exit_code'] is None for r in runs)}"]


def summarize(folder: Path, slug: str) -> str:
    results, comm, runs = _load(folder, slug)
    return "\n\n".join("\n".join(section) for section in (
        decode_section(results, comm), copy_section(results), runs_section(runs)))
