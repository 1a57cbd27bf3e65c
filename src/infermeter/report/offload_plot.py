"""The offload plot: TTFT against prefix length for the three ways, one panel per suffix length,
one PNG per offload Result, with the measured break-even marked (report_plots' figure helpers).
Reloads from a paged host copy (--block-size) are dashed lines, one colour per block size and
copy way (--paged-copy).

Each reload way's crossover is a dotted vertical line in that way's colour at the Result's own
break-even prefix length (metrics.break_even, status "measured"); where the crossing lies
outside the measured lengths the panel says so in words instead (nothing is extrapolated).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from infermeter.report.load import Record
from infermeter.report.offload import WAYS, cases, crossover, offload_labels, status, ttft
from infermeter.report.plots import Plot, new_figure, png_bytes, slug
from infermeter.report.select import num

STYLES = {"serial": ("C0", "o"), "layerwise": ("C1", "s"), "recompute": ("C2", "^")}
PANELS_PER_ROW = 3
UNMARKED = {"below": "reload wins at every measured prefix",
            "above": "recompute as fast or faster at every measured prefix"}


def _paged_ttft(case: dict[str, Any], size: float, copy: str, way: str) -> float | None:
    for entry in case.get("paged") or []:
        if isinstance(entry, dict) and num(entry.get("block_size")) == size \
                and (entry.get("copy") or "dma") == copy and isinstance(entry.get("ttft_ms"), dict):
            return num(entry["ttft_ms"].get(way))
    return None


def _panel(ax: Any, record: Record, suffix: float, rows: list[dict[str, Any]]) -> None:
    xs = [num(c["prefix_len"]) for c in rows]
    for way, name in WAYS:
        color, marker = STYLES[way]
        points = [(x, y) for x, c in zip(xs, rows) if (y := ttft(c, way)) is not None]
        if points:
            ax.plot(*zip(*points), color=color, marker=marker, label=name)
    # paged host copies (an entry without `copy`: dma, as older Results): dashed, a colour per
    # block size and copy way
    sizes = sorted({(num(e.get("block_size")), str(e.get("copy") or "dma"))
                    for c in rows for e in c.get("paged") or []
                    if isinstance(e, dict) and num(e.get("block_size")) is not None})
    for index, (size, copy) in enumerate(sizes):
        by = "" if copy == "dma" else f", {copy}"
        for way, name in WAYS[:2]:
            points = [(x, y) for x, c in zip(xs, rows)
                      if (y := _paged_ttft(c, size, copy, way))]
            if points:
                ax.plot(*zip(*points), color=f"C{3 + index}", marker=STYLES[way][1],
                        linestyle="--" if way == "serial" else "-.", markersize=4,
                        label=f"{name}, blocks of {size:,.0f}{by}")
    unmarked = []
    for way, name in WAYS[:2]:  # the reload ways, each against recompute
        x = crossover(record, suffix, way)
        if x is None:
            unmarked.append(f"{name}: {UNMARKED.get(status(record, suffix, way), 'no break-even')}")
            continue
        ax.axvline(x, color=STYLES[way][0], linestyle=":", gid=f"break-even {way}",
                   label=f"{name} wins from ~{x:,.0f}")
    if unmarked:
        ax.text(0.02, 0.98, "\n".join(unmarked), transform=ax.transAxes, va="top", fontsize=7)
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 8:  # a geometric ladder of prefix lengths
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
    ax.set_xticks(xs, [f"{x:,.0f}" for x in xs], fontsize=7)  # the measured prefix lengths
    ax.set_ylim(bottom=0)
    ax.set_title(f"suffix {suffix:,.0f} tokens", fontsize=9)
    ax.set_xlabel("prefix length (tokens in host memory)")
    ax.set_ylabel("TTFT, ms (median)")
    # under the axes: the lines and the words in the corner keep the plot area
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)


def title(label: str) -> str:
    return f"Reload vs recompute, TTFT against prefix length: {label}"


def offload_figure(label: str, record: Record) -> Any | None:
    """The matplotlib Figure of one offload Result (None without cases): its axes are the
    panels, in suffix order."""
    found = cases(record)
    suffixes = sorted({num(c["suffix_len"]) for c in found})
    if not suffixes:
        return None
    ncols = min(len(suffixes), PANELS_PER_ROW)
    nrows = math.ceil(len(suffixes) / ncols)
    fig = new_figure(4.5 * ncols + 0.5, 4.8 * nrows + 0.6)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax, suffix in zip(axes, suffixes):
        _panel(ax, record, suffix, [c for c in found if num(c["suffix_len"]) == suffix])
    for ax in axes[len(suffixes):]:  # the grid's unused panels
        ax.set_visible(False)
    fig.suptitle(title(label), fontsize=10)
    fig.tight_layout()
    return fig


def offload_plots(records: Sequence[Record]) -> list[Plot]:
    plots = []
    for label, record in offload_labels(records):
        fig = offload_figure(label, record)
        if fig is not None:
            plots.append(Plot(f"offload-{slug(label)}.png", title(label), png_bytes(fig)))
    return plots
