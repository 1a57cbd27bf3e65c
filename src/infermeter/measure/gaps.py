"""How far a decode step is from its bytes: time in kernels against the bubbles between them,
per step and per layer, from a GPU trace (breakdown.py places the work items; docs/design.md,
"Metric definitions", has the same definitions).

- Kernels: a step's device work items (kernels, memcpys, memsets) on every stream of the traced
  GPU, each placed in the step, and in a layer, by its launch: the CUDA runtime call with the
  same correlation id lies inside the CPU-side `im/decode_step` / `im/layer N` range. Kineto's
  GPU-side copies of those ranges are not used: they are the same ranges, drawn where the
  launched kernels ran.
- span: first kernel start -> last kernel end. busy: the union of the kernel intervals (kernels
  of two streams that overlap count once). gaps (bubbles) = span - busy: the idle intervals,
  when no stream of the GPU runs anything (launch overhead, host stalls, syncs).
- A layer's span is its kernels' first start -> last end; its gaps are the step's idle intervals
  inside that span, its busy time the rest. An idle interval inside no layer's span is "outside
  the layers" (between two layers, or around them: embedding, final norm, head, sampling).
- Layers without ranges (a compiled step replayed as a CUDA graph opens none inside):
  repeat_layers finds them in the step's kernel-name sequence (device items in start order):
  a kernel name that occurs exactly n_layers times at one fixed spacing P, with room for P
  kernels after its last occurrence, starts each layer, and a layer is the P kernels from it
  (of such names, the largest P, then the earliest); the kernels before the first layer
  (embedding, cache bookkeeping) and after the last (final norm, head, sampling) are outside
  the layers. The repeat's first kernel need not be a layer's first op: inductor fuses a
  layer's last residual add with the next layer's norm and product, so a unit may end with the
  next layer's first product (and the last one with the head's). Where no name keeps one
  spacing (a step whose layers run an extra kernel here and there: inductor's small index
  kernels between some of the fused step's layers), a name that occurs exactly n_layers times
  still starts each layer: the most regular such name (the most spacings equal to their most
  common value P; then the largest P, then the earliest), each layer the kernels from one
  occurrence to the next, the last layer at most P kernels. No such name: no per-layer
  figures, and a note says why, rather than a guess.
- A layer's kernels (layer_kernels): of the layers whose kernel count is the most common one
  (ties: the count of the lowest-numbered such layer; a kernel-pattern split gives every layer
  the same count), position k in each layer (its kernels in start order) gives one row: the
  name most of those layers run there (ties: the first layer's), the median of their
  durations, and the median of what each adds to the step: the part of its run that no
  kernel started before it already covers (end - max(start, the latest end before it)). With
  PDL a kernel starts while the one before it runs and waits inside, so its duration counts
  that wait; what it adds does not, and a step's adds sum to its busy time. And the median of
  when it starts: its start less the latest end of the kernels started before it, below 0 where
  it was launched while one still ran (PDL's early launch), above 0 the idle time before it (a
  launch's latency, the most a kernel's dependency costs in a CUDA graph). Layers of another
  count (an MoE layer among dense ones, a layer whose expert loop
  launched more) would shift the positions, so they are left out; layer_kernels_from counts
  the layers used.
  Each row also gives the launch most of those layers ran it with (grid, block, registers a
  thread, shared memory bytes: the trace event's own fields), so two builds of one kernel
  that differ in their launch show it (measure/against.py).
- The step's starts (early_starts, starts_counted, median_start_us): every kernel's start
  less the latest end of the kernels started before it, as in a layer's kernels, over the
  whole step: how many started early (below 0: launched while one still ran, PDL's early
  launch) of those with one before them, and the median. A step whose PDL works shows most
  of its kernels early; a step that lost it, none, every kernel starting a launch's latency
  after the one ahead ends.
- bytes-bound: the bytes one step must read (weights + KV, as the roofline counts them) / the
  HBM bandwidth measured in the same run, both from the trace's "infermeter" metadata; a trace
  without either has no bytes-bound figure.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

TOP_GAPS = 5  # the largest idle intervals listed with the kernels either side


def _busy_intervals(items: list[dict[str, Any]]) -> list[tuple[float, float, Any, Any]]:
    """The union of the items' [start, end) as disjoint intervals in time order, each with its
    first item and the item that ends it (the kernels either side of the idle time around it)."""
    out: list[tuple[float, float, Any, Any]] = []
    for item in sorted(items, key=lambda i: (i["start"], i["end"])):
        if out and item["start"] <= out[-1][1]:
            start, end, first, last = out[-1]
            if item["end"] > end:
                out[-1] = (start, item["end"], first, item)
        else:
            out.append((item["start"], item["end"], item, item))
    return out


def _idle(busy: list[tuple[float, float, Any, Any]]) -> list[tuple[float, float, Any, Any]]:
    """(start, end, kernel before, kernel after) of each idle interval between busy ones."""
    return [(a[1], b[0], a[3], b[2]) for a, b in zip(busy, busy[1:])]


def _figures(items: list[dict[str, Any]]) -> dict[str, Any]:
    busy = _busy_intervals(items)
    span_us = busy[-1][1] - busy[0][0]
    busy_us = sum(end - start for start, end, _, _ in busy)
    return {"span_ms": span_us / 1e3, "busy_ms": busy_us / 1e3,
            "gaps_ms": (span_us - busy_us) / 1e3, "kernels": len(items)}


def _layer_rows(items: list[dict[str, Any]], idle: list[tuple[float, float, Any, Any]]
                ) -> tuple[list[dict[str, Any]], dict[str, Any], list[Any]]:
    """Per layer (by index): kernels, span, busy, gaps; the rest outside the layers; and for
    each idle interval the layer it lies in (None: outside)."""
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for item in items:
        if item.get("layer") is not None:
            by_layer.setdefault(item["layer"], []).append(item)
    spans = {k: (min(i["start"] for i in group), max(i["end"] for i in group))
             for k, group in by_layer.items()}
    # an idle interval lies wholly inside or outside a layer's span (spans end at kernel edges)
    where = [next((k for k, (a, b) in sorted(spans.items()) if a <= start and end <= b), None)
             for start, end, _, _ in idle]
    rows = []
    for k in sorted(by_layer):
        gaps = [end - start for (start, end, _, _), w in zip(idle, where) if w == k]
        span_us = spans[k][1] - spans[k][0]
        rows.append({"layer": k, "kernels": len(by_layer[k]), "span_ms": span_us / 1e3,
                     "busy_ms": (span_us - sum(gaps)) / 1e3, "gaps_ms": sum(gaps) / 1e3,
                     "gap_count": len(gaps)})
    outside = [end - start for (start, end, _, _), w in zip(idle, where) if w is None]
    rest = {"kernels": sum(1 for i in items if i.get("layer") is None),
            "gaps_ms": sum(outside) / 1e3, "gap_count": len(outside)}
    return rows, rest, where


def _adds(items: list[dict[str, Any]]) -> tuple[dict[int, float], dict[int, float]]:
    """What each item adds to the step's busy time (us), keyed by id(item): its end past the
    latest end of the items started before it, from its start at the earliest; and its start
    less that latest end (below 0: it started while one ran), the first item's absent."""
    added, starts, latest = {}, {}, float("-inf")
    for item in sorted(items, key=lambda i: (i["start"], i["end"])):
        added[id(item)] = max(0.0, item["end"] - max(item["start"], latest))
        if latest > float("-inf"):
            starts[id(item)] = item["start"] - latest
        latest = max(latest, item["end"])
    return added, starts


def _step_starts(starts: dict[int, float]) -> dict[str, Any]:
    """From _adds' starts: how many of the step's kernels started early (before the latest end
    of those started before them), of how many have one before them, and the median start (us;
    None alone)."""
    starts = list(starts.values())
    return {"early_starts": sum(1 for v in starts if v < 0), "starts_counted": len(starts),
            "median_start_us": statistics.median(starts) if starts else None}


def _layer_kernels(items: list[dict[str, Any]], added: dict[int, float],
                   starts: dict[int, float]) -> tuple[list[dict[str, Any]] | None, int | None]:
    """Per position in a layer: its kernel name, median duration, median time added to the
    step and median start after the kernels before it (us; None where no layer's kernel there
    has one before it; added and starts: _adds' of the step's items) over the layers of the
    most common kernel count, and how many layers that is; (None, None) without layers."""
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for item in items:
        if item.get("layer") is not None:
            by_layer.setdefault(item["layer"], []).append(item)
    if not by_layer:
        return None, None
    layers = [sorted(by_layer[k], key=lambda i: (i["start"], i["end"])) for k in sorted(by_layer)]
    # most_common keeps first-seen order among ties: the lowest-numbered layer's count wins
    count = Counter(len(layer) for layer in layers).most_common(1)[0][0]
    used = [layer for layer in layers if len(layer) == count]
    rows = [{"position": k,
             "name": Counter(layer[k]["name"] for layer in used).most_common(1)[0][0],
             "median_us": statistics.median(layer[k]["end"] - layer[k]["start"]
                                            for layer in used),
             "adds_us": statistics.median(added[id(layer[k])] for layer in used),
             "starts_us": _median_or_none([starts[id(layer[k])] for layer in used
                                           if id(layer[k]) in starts]),
             "launch": _common_launch([layer[k] for layer in used])}
            for k in range(count)]
    return rows, len(used)


# The trace's fields of a kernel's launch (Kineto's event args) and the names a row gives them
LAUNCH_FIELDS = {"grid": "grid", "block": "block", "registers per thread": "registers",
                 "shared memory": "shared_bytes"}


def launch_shape(item: dict[str, Any]) -> dict[str, Any] | None:
    """A kernel's launch as its trace event records it: grid, block, registers a thread and
    shared memory bytes (the event's "shared memory"), those of them present; None where none
    is (a memcpy, a trace without them)."""
    args = item.get("args") or {}
    shape = {key: args[field] for field, key in LAUNCH_FIELDS.items() if field in args}
    return shape or None


def _common_launch(items: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The launch most of these items (one position in each layer) ran with (ties: the first
    layer's): a kernel's grid is its own in every layer of one model."""
    shapes = [launch_shape(item) for item in items]
    counts = Counter(repr(shape) for shape in shapes)
    top = counts.most_common(1)[0][0]
    return next(shape for shape in shapes if repr(shape) == top)


def repeat_layers(names: list[str], n_layers: int) -> tuple[list[int | None], str] | None:
    """Each item's layer (None: before the first layer or after the last) from the step's
    kernel names in start order, and the name that starts each layer; None where no name occurs
    exactly n_layers (>= 2) times (module docstring: one spacing first, else the most regular
    spacings)."""
    if n_layers < 2:
        return None
    where: dict[str, list[int]] = {}
    for k, name in enumerate(names):
        where.setdefault(name, []).append(k)
    best: tuple[int, int, str] | None = None  # (period, -first position, name)
    for name, at in where.items():
        if len(at) != n_layers:
            continue
        period = at[1] - at[0]
        if any(b - a != period for a, b in zip(at, at[1:])) or at[-1] + period > len(names):
            continue
        if best is None or (period, -at[0]) > best[:2]:
            best = (period, -at[0], name)
    if best is not None:
        period, first = best[0], -best[1]
        layers = [(k - first) // period if first <= k < first + n_layers * period else None
                  for k in range(len(names))]
        return layers, best[2]
    return _uneven_layers(names, where, n_layers)


def _uneven_layers(names: list[str], where: dict[str, list[int]],
                   n_layers: int) -> tuple[list[int | None], str] | None:
    """repeat_layers where no name keeps one spacing: the most regular name of exactly n_layers
    occurrences starts each layer (module docstring), or None."""
    best: tuple[int, int, int, str] | None = None  # (regular spacings, P, -first, name)
    for name, at in where.items():
        if len(at) != n_layers:
            continue
        spacings = Counter(b - a for a, b in zip(at, at[1:]))
        period, regular = spacings.most_common(1)[0]
        if best is None or (regular, period, -at[0]) > best[:3]:
            best = (regular, period, -at[0], name)
    if best is None:
        return None
    period, at = best[1], where[best[3]]
    ends = at[1:] + [min(at[-1] + period, len(names))]
    layers: list[int | None] = [None] * len(names)
    for layer, (start, end) in enumerate(zip(at, ends)):
        layers[start:end] = [layer] * (end - start)
    return layers, best[3]


def _bytes_bound(meta: dict[str, Any]) -> dict[str, Any]:
    nbytes, gbps = meta.get("bytes_per_step"), meta.get("hbm_gbps")
    if not (isinstance(nbytes, (int, float)) and isinstance(gbps, (int, float))
            and nbytes > 0 and gbps > 0):
        return {"bytes_per_step": None, "hbm_gbps": None, "bytes_bound_ms": None}
    return {"bytes_per_step": nbytes, "hbm_gbps": gbps, "bytes_bound_ms": nbytes / gbps / 1e6}


def pattern_layers(items: list[dict[str, Any]], n_layers: int | None) -> dict[str, Any]:
    """Sets each item's layer from the kernel pattern (repeat_layers) of a step without layer
    ranges; how they were found (layers_from, layer_first_kernel) or why not (layers_note)."""
    ordered = sorted(items, key=lambda i: (i["start"], i["end"]))
    found = repeat_layers([i["name"] for i in ordered], n_layers) if n_layers else None
    if found is None:
        why = (f"its {len(items)} kernels do not split into {n_layers} layers (no kernel occurs "
               f"once a layer at one spacing)" if n_layers else "the trace gives no layer count")
        return {"layers_from": None, "layer_first_kernel": None,
                "layers_note": f"Per layer: no layer ranges in this trace and {why}: no "
                               "per-layer figures (--mode eager traces layer ranges)"}
    for item, layer in zip(ordered, found[0]):
        item["layer"] = layer
    return {"layers_from": "kernel pattern", "layer_first_kernel": found[1], "layers_note": None}


def step_gaps(steps: list[list[dict[str, Any]]], pick: int, meta: dict[str, Any],
              n_layers: int | None = None) -> dict[str, Any]:
    """The gap figures of step `pick` (the median step breakdown.py shows), every step's
    totals, and the bytes-bound time. Items: start/end in us, name, stream, layer (int or None;
    all None: the layers come from the kernel pattern of a model of n_layers, if found)."""
    items = steps[pick]
    if any(i.get("layer") is not None for i in items):
        how = {"layers_from": "ranges", "layer_first_kernel": None, "layers_note": None}
    else:
        how = pattern_layers(items, n_layers)
    busy = _busy_intervals(items)
    idle = _idle(busy)
    layers, outside, where = _layer_rows(items, idle)
    gap_us = [end - start for start, end, _, _ in idle]
    ranked = sorted(range(len(idle)), key=lambda k: -gap_us[k])[:TOP_GAPS]
    largest = [{"gap_us": gap_us[k], "before": idle[k][2]["name"], "after": idle[k][3]["name"],
                "layer": where[k]} for k in ranked]
    figures = _figures(items)
    each = [_figures(group) for group in steps]
    added, starts = _adds(items)
    layer_kernels, layer_kernels_from = _layer_kernels(items, added, starts)
    return {**figures,
            "gaps_pct": 100 * figures["gaps_ms"] / figures["span_ms"] if figures["span_ms"]
            else None,
            "streams": len({(str(i.get("device")), i.get("stream")) for i in items}),
            "gap_count": len(idle),
            "mean_gap_us": sum(gap_us) / len(gap_us) if gap_us else None,
            "largest_gaps": largest, **_step_starts(starts),
            "layers": layers, "outside_layers": outside if layers else None,
            "layer_kernels": layer_kernels, "layer_kernels_from": layer_kernels_from,
            "median_of_steps": {key: statistics.median(f[key] for f in each)
                                for key in ("span_ms", "busy_ms", "gaps_ms", "kernels")},
            "steps": each, **how, **_bytes_bound(meta)}


def _median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _render_layer_kernels(gaps: dict[str, Any], max_rows: int) -> str:
    """A layer's kernels one by one: position, name, median us, share of the medians' sum."""
    from infermeter.textable import render_table

    kernels = gaps["layer_kernels"]
    total = sum(r["adds_us"] for r in kernels)
    rows = [(r["position"], r["name"][:60], f"{r['median_us']:.2f}", f"{r['adds_us']:.2f}",
             "-" if r.get("starts_us") is None else f"{r['starts_us']:.2f}",
             _num(100 * r["adds_us"] / total if total else None))
            for r in kernels[:max_rows]]
    more = len(kernels) - max_rows
    return (f"A layer's kernels (median over {gaps['layer_kernels_from']} layers; adds: its "
            "time past the kernels started before it, what it costs the step under PDL; "
            "starts: its start less their latest end, below 0 launched early):\n"
            + render_table(("#", "kernel", "median us", "adds us", "starts us", "share %"),
                           rows)
            + (f"\n... {more} more kernels (--json lists every one)" if more > 0 else ""))


def render_gaps(gaps: dict[str, Any], max_layer_rows: int = 32,
                max_kernel_rows: int = 64) -> str:
    """One line for the step (kernels + gaps against its bytes), its largest gaps, a table
    per layer when the trace has layers (ranges or kernel pattern), and a layer's kernels."""
    from infermeter.textable import render_table

    bound = gaps.get("bytes_bound_ms")
    head = (f"Step {_num(gaps['span_ms'])} ms = kernels {_num(gaps['busy_ms'])} + gaps "
            f"{_num(gaps['gaps_ms'])} ms ({_num(gaps['gaps_pct'])}%)"
            + (f"; bytes alone {_num(bound)} ms ({gaps['bytes_per_step'] / 2**20:,.1f} MiB at "
               f"{gaps['hbm_gbps']:,.0f} GB/s)" if bound is not None else
               "; bytes alone: unknown (no measured bandwidth in the trace)"))
    lines = [head, f"{gaps['kernels']} kernels on {gaps['streams']} stream(s), "
                   f"{gaps['gap_count']} gaps, mean gap {_num(gaps['mean_gap_us'])} us"]
    if gaps.get("starts_counted"):
        lines.append(f"{gaps['early_starts']} of {gaps['starts_counted']} kernels started "
                     "before the one ahead ended (PDL's early launch); median start "
                     f"{gaps['median_start_us']:+.2f} us after the one ahead")
    for g in gaps["largest_gaps"]:
        where = "" if g["layer"] is None else f" (layer {g['layer']})"
        lines.append(f"  gap {_num(g['gap_us'])} us{where}: {g['before'][:48]} -> "
                     f"{g['after'][:48]}")
    layers = gaps.get("layers") or []
    if not layers:
        lines.append(gaps.get("layers_note") or "Per layer: no layer ranges in this trace (a "
                     "compiled step or a trace from elsewhere; --mode eager traces them)")
        return "\n".join(lines)
    rows = [(f"layer {r['layer']}", r["kernels"], f"{r['span_ms']:.4f}", f"{r['busy_ms']:.4f}",
             f"{r['gaps_ms']:.4f}", _num(100 * r["gaps_ms"] / r["span_ms"] if r["span_ms"]
                                         else None)) for r in layers[:max_layer_rows]]
    rest = gaps["outside_layers"]
    rows.append(("outside the layers", rest["kernels"], "-", "-", f"{rest['gaps_ms']:.4f}", "-"))
    more = len(layers) - max_layer_rows
    table = render_table(("layer", "kernels", "span ms", "busy ms", "gaps ms", "gaps %"), rows)
    how = "" if gaps.get("layers_from") != "kernel pattern" else (
        f" (no layer ranges: found by the kernel pattern, each layer from "
        f"{str(gaps['layer_first_kernel'])[:48]})")
    kernels = ("\n" + _render_layer_kernels(gaps, max_kernel_rows)
               if gaps.get("layer_kernels") else "")
    return "\n".join(lines) + f"\nPer layer{how}:\n" + table + (
        f"\n... {more} more layers (--json lists every one)" if more > 0 else "") + kernels
