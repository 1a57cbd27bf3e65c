"""The report's decode-step table: how far one traced decode step is from its bytes, per column,
from `metrics.breakdown.step_gaps` (measure/gaps.py; generate --trace on a GPU).

A column shows here only when one of its generate Results carries step gaps (a CPU trace has
none); the Result is picked as the breakdown plot picks it (select.pick_traced: batch 1 and the
compiled mode first), so the table and the plot describe the same run.
"""

from __future__ import annotations

from typing import Any

from infermeter.report import format as fmt
from infermeter.report.load import Record
from infermeter.report.select import Column, batch_size, context, num, pick_traced
from infermeter.report.tables import Table

ROWS = ("Traced run", "Step (kernels + gaps)", "Gaps", "Kernels per step", "Started early (PDL)",
        "Bytes-bound time", "Largest gap", "Median of the traced steps")

CAPTION = (
    "One decode step per column, from its traced generate Result (`--trace` on a GPU; batch 1 "
    "and the compiled mode first): the median traced step's span, first kernel start to last "
    "kernel end, = time in kernels (their union over the GPU's streams) + the gaps when no "
    "kernel runs (launch overhead, host stalls, syncs). Kernels: the step's GPU work items "
    "(kernels, memcpys, memsets). Bytes-bound time: the bytes one step must read (weights + KV, "
    "as MBU counts them) at the HBM bandwidth measured in the same run, '-' where the trace "
    "lacks either; step/bound says how far the step is from it. Started early: the kernels "
    "that started before the one ahead ended (PDL's early launch), of those with one ahead, and "
    "the median start after the one ahead ends ('-' in Results traced before it was counted). "
    "Columns without a GPU trace are left out.")


def _ms(value: float | None) -> str:
    """Milliseconds to the microsecond: a small model's step is well under one ms."""
    return fmt.MISSING if value is None else f"{value:,.3f} ms"


def _gaps(record: Record) -> dict[str, Any]:
    return record.metrics["breakdown"]["step_gaps"]


def _split(figures: dict[str, Any]) -> str:
    span, busy, gaps = (num(figures.get(k)) for k in ("span_ms", "busy_ms", "gaps_ms"))
    if span is None:
        return fmt.MISSING
    return f"{_ms(span)} = {_ms(busy)} + {_ms(gaps)}"


def _kernels(g: dict[str, Any]) -> str:
    kernels, streams = num(g.get("kernels")), num(g.get("streams"))
    cell = fmt.count(kernels) + (f" on {streams:.0f} stream(s)" if streams else "")
    layers = [row for row in g.get("layers") or [] if isinstance(row, dict)]
    per_layer = [num(row.get("kernels")) or 0 for row in layers]
    if per_layer:
        cell += f"; {sum(per_layer) / len(per_layer):.1f} a layer over {len(per_layer)} layers"
        if g.get("layers_from") == "kernel pattern":  # a compiled step: no layer ranges
            cell += " (layers found by the kernel pattern)"
    return cell


def _early(g: dict[str, Any]) -> str:
    early, counted = num(g.get("early_starts")), num(g.get("starts_counted"))
    median = num(g.get("median_start_us"))
    if early is None or not counted:
        return fmt.MISSING
    return (f"{fmt.count(early)} of {fmt.count(counted)} kernels"
            + (f"; median start {median:+,.2f} µs" if median is not None else ""))


def _bound(g: dict[str, Any]) -> str:
    bound, span = num(g.get("bytes_bound_ms")), num(g.get("span_ms"))
    if bound is None:
        return fmt.MISSING
    return (f"{_ms(bound)} ({fmt.size(num(g.get('bytes_per_step')))} at "
            f"{fmt.gbps(num(g.get('hbm_gbps')))}); step/bound "
            + (f"{span / bound:.2f}" if span and bound > 0 else fmt.MISSING))


def _largest(g: dict[str, Any]) -> str:
    gaps = [row for row in g.get("largest_gaps") or [] if isinstance(row, dict)]
    if not gaps or num(gaps[0].get("gap_us")) is None:
        return fmt.MISSING
    top = gaps[0]
    where = f" in layer {top['layer']}" if top.get("layer") is not None else ""
    return f"{num(top['gap_us']):,.1f} µs{where}, after {str(top.get('before'))[:40]}"


def cells(record: Record) -> list[str]:
    g = _gaps(record)
    cfg = record.config
    steps = [s for s in g.get("steps") or [] if isinstance(s, dict)]
    run = ", ".join([str(cfg.get("mode") or "?"), f"batch {fmt.count(batch_size(record))}",
                     f"context {fmt.count(context(record))}"])
    pct, count, mean = (num(g.get(k)) for k in ("gaps_pct", "gap_count", "mean_gap_us"))
    gaps = fmt.MISSING if pct is None else f"{fmt.pct(pct)} of the step" + (
        f" ({fmt.count(count)} gaps, mean {mean:,.1f} µs)" if count and mean is not None else "")
    median = g.get("median_of_steps") if isinstance(g.get("median_of_steps"), dict) else {}
    return [run, _split(g), gaps, _kernels(g), _early(g), _bound(g), _largest(g),
            (_split(median) + f", {fmt.count(num(median.get('kernels')))} kernels "
             f"({len(steps)} steps)") if median else fmt.MISSING]


def traced(columns: list[Column]) -> list[tuple[Column, Record]]:
    """(column, its traced Result with step gaps), for the columns that have one."""
    found = [(c, pick_traced(c, "step_gaps")) for c in columns if c.seed is None]
    return [(c, r) for c, r in found if r is not None and isinstance(_gaps(r), dict)]


def step_gaps_table(columns: list[Column]) -> Table | None:
    shown = traced(columns)
    if not shown:
        return None
    per_column = [cells(record) for _, record in shown]
    rows = [[label] + [col[i] for col in per_column] for i, label in enumerate(ROWS)]
    return Table("step-gaps", "Decode step: kernels and gaps (--trace)", CAPTION,
                 ["Device"] + [c.key.label for c, _ in shown], rows)


def step_gaps_notes(columns: list[Column]) -> list[str]:
    return [f"{column.key.label}: decode-step gaps from {record.source}"
            for column, record in traced(columns)]
