"""The report's plots as PNG bytes (matplotlib, imported only when a plot is made).

Figures are built with matplotlib's object API on an explicit Agg canvas (FigureCanvasAgg):
no pyplot, no global backend switch, no display needed, nothing changed for the caller's own
matplotlib use. PNGs are written without the "Software" metadata field, so the same Results and
the same matplotlib version give the same bytes.

- copy: per column, every one-way case's GB/s (left) and paged GB/s against block size (right),
  the link peak drawn on both;
- tpot: TPOT p50 (p10-p90 bars) against context, with the bandwidth bound
  bytes_per_decode_step / hbm_gbps_measured as a dashed line of the same colour;
- batch: decode tok/s against batch size;
- headline: one bar chart across the columns for the reference figures;
- breakdown: where one decode step's time goes (`--trace`), a stacked bar per column.
"""

from __future__ import annotations

import io
import re
import textwrap
from dataclasses import dataclass
from typing import Any

from infermeter.report.format import count
from infermeter.report.load import Record
from infermeter.report.select import Column, batch_size, context, num, pick_copy, pick_traced, tpot
from infermeter.report.tables import reference_numbers


@dataclass(frozen=True)
class Plot:
    name: str  # file name, e.g. "copy-nvidia-h200-llama-2-7b.png"
    title: str
    png: bytes


def new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Any) -> bytes:
    buffer = io.BytesIO()
    # bbox_inches="tight" keeps legends placed outside the axes inside the image
    fig.savefig(buffer, format="png", metadata={"Software": None}, bbox_inches="tight")
    return buffer.getvalue()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "column"


def _case_label(case: dict[str, Any]) -> str:
    layout = case.get("layout")
    if layout == "paged":
        layout = f"paged/{case.get('block_tokens')}"
    return f"{layout} {case.get('host_memory')} {case.get('method')}"


def _case_order(case: dict[str, Any]) -> tuple:
    """engine, contiguous, paged by block size; then seed, pageable, pinned; then method."""
    layouts, hosts = ("engine", "contiguous", "paged"), ("seed", "pageable", "pinned")
    layout, host = case.get("layout"), case.get("host_memory")
    return (layouts.index(layout) if layout in layouts else 9, num(case.get("block_tokens")) or 0,
            hosts.index(host) if host in hosts else 9, str(case.get("method")))


def _one_way(records: list[Record]) -> list[dict[str, Any]]:
    cases = [c for r in records for c in r.metrics.get("cases") or []
             if isinstance(c, dict) and c.get("direction") in ("h2d", "d2h") and num(c.get("gbps"))]
    return sorted(cases, key=_case_order)


def _draw_cases(ax: Any, cases: list[dict[str, Any]], peak: float | None) -> None:
    labels = list(dict.fromkeys(_case_label(c) for c in cases))  # cases come sorted
    for offset, direction in ((-0.2, "h2d"), (0.2, "d2h")):
        values = {_case_label(c): num(c["gbps"]) for c in cases if c["direction"] == direction}
        ys = [i + offset for i, label in enumerate(labels) if label in values]
        ax.barh(ys, [values[label] for label in labels if label in values], height=0.4,
                label=direction)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    if peak:
        ax.axvline(peak, color="black", linestyle="--", label=f"link peak {peak:.1f} GB/s")
    ax.set_xlabel("GB/s (1e9 bytes/s), one way")


def _draw_blocks(ax: Any, cases: list[dict[str, Any]], peak: float | None) -> None:
    paged = [c for c in cases if c.get("layout") == "paged" and c.get("host_memory") == "pinned"
             and num(c.get("block_tokens"))]
    series: dict[str, dict[str, dict[float, float]]] = {}
    for c in paged:
        points = series.setdefault(str(c.get("method")), {}).setdefault(c["direction"], {})
        block = num(c["block_tokens"])
        points[block] = max(points.get(block, 0.0), num(c["gbps"]))
    for index, (method, directions) in enumerate(sorted(series.items())):
        for direction, style, marker in (("h2d", "-", "o"), ("d2h", "--", "s")):
            points = directions.get(direction, {})
            xs = sorted(points)
            if xs:  # one colour per method; h2d solid circles, d2h dashed squares
                ax.plot(xs, [points[x] for x in xs], color=f"C{index}", linestyle=style,
                        marker=marker, markersize=5, label=f"{method} {direction}")
    if not series:
        ax.text(0.5, 0.5, "no paged pinned cases", ha="center", transform=ax.transAxes)
    else:
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7, loc="lower right")
    if peak:
        ax.axhline(peak, color="black", linestyle="--")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("paged block size (tokens)")
    ax.set_ylabel("GB/s, pinned host memory")


def plot_copy(column: Column) -> Plot | None:
    pick = pick_copy(column)
    if not pick or pick.host != "pinned":  # its axes are pinned host memory's
        return None
    same = [r for r in column.copies if num(r.metrics.get("kv_cache_bytes")) == pick.kv_bytes]
    cases, peak = _one_way(same), num(pick.record.metrics.get("link_peak_gbps"))
    n_labels = len({_case_label(c) for c in cases})
    height = max(3.5, 1.8 + 0.28 * n_labels)
    fig = new_figure(12, height)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    _draw_cases(left, cases, peak)
    _draw_blocks(right, cases, peak)
    title = f"KV-cache copy, {column.key.label}: {pick.record.config.get('batch_size')}×" \
            f"{pick.record.config.get('seq_len')} tokens"
    fig.suptitle(title, fontsize=10)
    # the bar legend goes under the figure: the bars fill the axes up to the link peak
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1))
    return Plot(f"copy-{slug(column.key.label)}.png", title, png_bytes(fig))


def _series(columns: list[Column], x_of: Any, group_of: Any, y_of: Any) -> dict:
    """{(column label, group): {x: record}} over records with an x and a y."""
    out: dict[tuple[str, str], dict[float, Record]] = {}
    for column in columns:
        for record in sorted(column.generates, key=lambda r: r.source):
            x, y = x_of(record), y_of(record)
            if x is not None and y is not None:
                out.setdefault((column.key.label, group_of(record)), {})[x] = record
    return dict(sorted(out.items()))


def _bound_ms(record: Record) -> float | None:
    step = num(record.metrics.get("bytes_per_decode_step"))
    hbm = num(record.metrics.get("hbm_gbps_measured"))
    return step / (hbm * 1e9) * 1e3 if step and hbm else None


def plot_tpot(columns: list[Column]) -> Plot | None:
    from matplotlib.lines import Line2D

    series = _series(columns, context, lambda r: f"batch {batch_size(r):.0f}, "
                     f"{r.config.get('mode', '?')}", lambda r: tpot(r, "p50"))
    if not series:
        return None
    fig = new_figure(11, 5.5)
    ax = fig.subplots()
    for index, ((label, group), points) in enumerate(series.items()):
        xs, color = sorted(points), f"C{index % 10}"
        p50 = [tpot(points[x], "p50") for x in xs]
        low = [p - (tpot(points[x], "p10") or p) for x, p in zip(xs, p50)]
        high = [(tpot(points[x], "p90") or p) - p for x, p in zip(xs, p50)]
        ax.errorbar(xs, p50, yerr=[low, high], marker="o", capsize=3, color=color,
                    label=f"{label}, {group}")
        bound = [(x, b) for x in xs if (b := _bound_ms(points[x])) is not None]
        if bound:  # a tick mark too, so a single context still shows its bound
            ax.plot(*zip(*bound), linestyle="--", marker="_", markersize=14, color=color)
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="gray", linestyle="--", marker="_", markersize=14,
                          label="bound: bytes per decode step / measured HBM GB/s"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (KV tokens)")
    ax.set_ylabel("TPOT, ms per decode step (p50, p10-p90)")
    ax.set_ylim(bottom=0)
    title = "TPOT against context, with the HBM bandwidth bound"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return Plot("tpot-context.png", title, png_bytes(fig))


def plot_batch(columns: list[Column]) -> Plot | None:
    series = _series(columns, batch_size, lambda r: f"context {count(context(r))}, "
                     f"{r.config.get('mode', '?')}",
                     lambda r: num(r.metrics.get("decode_tok_per_s")))
    if not series:
        return None
    fig = new_figure(11, 5.5)
    ax = fig.subplots()
    for (label, group), points in series.items():
        xs = sorted(points)
        ax.plot(xs, [num(points[x].metrics["decode_tok_per_s"]) for x in xs], marker="o",
                label=f"{label}, {group}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tok/s (prefill excluded)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    title = "Decode throughput against batch size"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return Plot("decode-batch.png", title, png_bytes(fig))


HEADLINES = (("h2d_gbps", "Moving bandwidth, htod (GB/s)"),
             ("tok_per_s", "Token generation speed (tok/s)"),
             ("tpot_ms", "TPOT p50 (ms)"), ("ttft_ms", "TTFT (ms)"))


def plot_headline(columns: list[Column]) -> Plot:
    numbers = [reference_numbers(c) for c in columns]
    labels = ["\n".join(textwrap.fill(part, 18) for part in c.key.label.split(" · "))
              for c in columns]
    fig = new_figure(max(8, 2.2 * len(columns)), 7)
    for ax, (key, name) in zip(fig.subplots(2, 2).flat, HEADLINES):
        values = [n.get(key) for n in numbers]
        ax.bar(range(len(labels)), [v or 0 for v in values])
        for i, v in enumerate(values):
            ax.annotate("-" if v is None else f"{v:,.3g}", (i, v or 0), ha="center",
                        va="bottom", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(name, fontsize=9)
    title = "Headline figures across devices ('-': not measured)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return Plot("headline.png", title, png_bytes(fig))


def plot_breakdown(columns: list[Column]) -> Plot | None:
    """One horizontal bar per column with a traced step: its categories' ms, stacked in the
    breakdown's own order (measure/breakdown.py CATEGORIES), idle gaps last."""
    from infermeter.measure.breakdown import CATEGORIES

    bars = [(c, r) for c in columns if (r := pick_traced(c)) is not None]
    if not bars:
        return None
    fig = new_figure(11, 1.2 + 0.7 * len(bars))
    ax = fig.subplots()
    labels = [f"{c.key.label}\n{r.config.get('mode', '?')}, batch {count(batch_size(r))}"
              for c, r in bars]
    ms = [{row.get("name"): num(row.get("time_ms")) or 0.0
           for row in record.metrics["breakdown"]["categories"]} for _, record in bars]
    lefts = [0.0] * len(bars)  # where each bar's next segment starts
    for category in CATEGORIES:
        widths = [times.get(category, 0.0) for times in ms]
        if any(widths):
            ax.barh(range(len(bars)), widths, left=lefts, label=category)
            lefts = [left + width for left, width in zip(lefts, widths)]
    ax.set_yticks(range(len(bars)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms in one decode step (the median traced step)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    title = "Where one decode step's GPU time goes (--trace)"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return Plot("decode-step-breakdown.png", title, png_bytes(fig))


def make_plots(columns: list[Column]) -> list[Plot]:
    plots = [plot_copy(c) for c in columns]
    plots += [plot_tpot(columns), plot_batch(columns), plot_headline(columns),
              plot_breakdown(columns)]
    return [p for p in plots if p is not None]
