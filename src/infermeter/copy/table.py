"""What `infermeter copy` prints: the case table, the plan (without a GPU), a progress bar."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from infermeter.textable import render_table
from infermeter.units import format_bytes


def _layout(case: dict[str, Any]) -> str:
    return f"paged/{case['block_tokens']}" if case["layout"] == "paged" else case["layout"]


def render_cases(metrics: dict[str, Any]) -> str:
    """One row per case; under tensor parallelism (rows with `per_rank`, from
    bench.copy_ranks.merge_ranks) bytes are one rank's shard, time, p10-p90, GB/s and % link the
    slowest rank's, then every rank's GB/s and the total."""
    ranks = any("per_rank" in c for c in metrics["cases"])
    header = ["layout", "host", "dir", "method", "pieces", "bytes", "time ms", "p10-p90 ms",
              "GB/s", "% link"]
    if ranks:
        header[5:] = ["bytes a rank", "slowest ms", "p10-p90 ms", "slowest GB/s", "% link",
                      "GB/s per rank", "total GB/s"]
    rows = []
    for c in metrics["cases"]:
        stats = c["stats"]
        pct = f"{c['link_pct']:.0f}%" if c.get("link_pct") is not None else "-"
        row = [_layout(c), c["host_memory"], c["direction"], c["method"],
               f"{c['pieces']:,}", format_bytes(c["bytes"]),
               f"{c['moving_time_ms']:.2f}", f"{stats['p10']:.2f}-{stats['p90']:.2f}",
               f"{c['gbps']:.1f}", pct]
        if ranks:
            total = c.get("total_gbps")
            row += [" / ".join(f"{r['gbps']:.1f}" for r in c.get("per_rank", [])) or "-",
                    "-" if total is None else f"{total:.1f}"]
        rows.append(row)
    return render_table(header, rows)


def _rank_lines(result: Any) -> list[str]:
    """Under tensor parallelism: what the columns mean, and each rank's link."""
    per_rank = result.metrics.get("per_rank")
    if not per_rank:
        return []
    lines = [f"tp {len(per_rank)}: every rank moves its own KV shard, all ranks starting each "
             "case together; slowest = the rank that took longest; total GB/s = every rank's "
             "bytes / the slowest rank's time"]
    if result.config["device"] != "cpu":
        lines += [f"link rank {rank}: {m.get('link_description')}; GPU NUMA node "
                  f"{'n/a' if m.get('numa_node') is None else m['numa_node']}"
                  for rank, m in enumerate(per_rank)]
    return lines


def render_copy(result: Any) -> str:
    """The terminal view of one copy Result: header, table, link, derived times, diagnosis."""
    m, cfg, model = result.metrics, result.config, result.model
    link = m["link"]
    shard = " a rank" if m.get("per_rank") else ""
    lines = [(f"{model['name']}: batch {cfg['batch_size']} x {cfg['seq_len']} tokens, KV "
             f"{cfg['kv_dtype']} = {m['kv_cache_bytes']:,} bytes{shard} "
             f"({format_bytes(m['kv_cache_bytes'])}) on {result.env.get('device_name')}; "
             f"GB = 1e9 bytes, time = {'the shard' if shard else 'the whole cache'} one way "
             f"(both: both ways at once)")]
    lines += _rank_lines(result)
    if m["cases"]:
        lines.append(render_cases(m))
    if m["skipped"]:
        reasons = Counter(s["reason"] for s in m["skipped"])
        lines.append(f"skipped {len(m['skipped'])} cases: "
                     + "; ".join(f"{n} x {why}" for why, n in reasons.items()))
    if cfg["device"] == "cpu":
        lines.append("link: none (--device cpu times host-to-host memcpy)")
    else:
        node = link.get("numa_node")
        lines.append(f"link: {m['link_description']}; GPU NUMA node "
                     f"{'n/a' if node is None else node}, host NUMA nodes "
                     f"{link.get('host_numa_nodes') or 'n/a'}")
    for key, what in (("offload_ms", "offload"), ("reload_ms", "reload")):
        if m.get(key) is not None:
            lines.append(f"{what} one sequence of {m['offload_tokens']} tokens "
                         f"({format_bytes(m['offload_bytes'])}): {m[key]:.2f} ms at the GB/s "
                         f"of {m[key[:-3] + '_method']}")
    lines += [f"- {line}" for line in m["diagnosis"]]
    lines += [f"warning: {note}" for note in result.warnings]
    return "\n".join(lines)


def render_plan(rows: list[dict[str, Any]], n_cases: int, n_runnable: int) -> str:
    """Without a GPU: what would be moved, per layout."""
    header = ["model", "batch", "seq_len", "layout", "tensors/pieces", "piece", "bytes",
              "device memory"]
    table = [[r["model"], r["batch_size"], r["seq_len"], r["layout"], f"{r['pieces']:,}",
              format_bytes(r["bytes"] / r["pieces"]), f"{r['bytes']:,}",
              format_bytes(r["allocated_bytes"])] for r in rows]
    return (render_table(header, table) + f"\n{n_runnable} cases would be timed on a GPU "
            f"({n_cases} layout x host memory x direction x method combinations, less those that "
            f"do not apply, such as the seed way with a batched method)")


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool) -> Iterator[Callable[[str], None]]:
    """A rich progress bar on stderr (when rich is installed and stderr is a terminal), or
    nothing; yields the callback a runner calls after each case with its label."""
    if not enabled or not sys.stderr.isatty():
        yield lambda label: None
        return
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    except ImportError:
        yield lambda label: None
        return
    columns = (TextColumn("copy"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=total)
        yield lambda label: bar.update(task, advance=1, description=label)
