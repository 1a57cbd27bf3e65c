"""The report's offload tables: what `infermeter offload` (or `infermeter run`'s offload stage)
measured, one row per case, from the Results alone.

- offload: TTFT of (a) serial reload + suffix prefill, (b) layer-wise reload under the suffix's
  forward, (c) recompute, per Result, suffix and prefix length;
- offload-breakeven: the measured break-even prefix length per Result, suffix, host copy (whole,
  or paged per block size) and reload way (the Result's own `metrics.break_even` and
  `metrics.paged_break_even`: interpolated between measured prefix lengths, never extrapolated);
- offload-paged: TTFT of (a) and (b) from a paged host copy per block size (--block-size) and
  copy way (--paged-copy: dma, or mapped; a Result without the key: dma);
- offload-traffic: decode TPOT under background copies, the slowdown and the copies' GB/s, per
  direction and method (Results made with --traffic);
- offload-decode: the offloaded decode's tok/s against the device decode and the link's bound
  (Results made with --offloaded-decode).

A table with nothing to show is left out; no offload Result leaves out all five.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from infermeter.offload.table import TIMING_NOTE
from infermeter.report import format as fmt
from infermeter.report.load import Record
from infermeter.report.select import column_key, num
from infermeter.report.tables import Table

WAYS = (("serial", "(a) serial"), ("layerwise", "(b) layerwise"), ("recompute", "(c) recompute"))

TTFT_CAPTION = (
    "A request whose first `prefix` tokens' KV cache sits in host memory (pinned on a GPU, a "
    "second CPU buffer on the CPU) and `suffix` new tokens follow: TTFT (to the first greedy "
    "token, medians) with (a) every layer's K/V reloaded, then the suffix prefilled, (b) the "
    "reload layer by layer on a copy stream while the suffix's forward runs, (c) the whole "
    "prefix + suffix recomputed by a prefill. (b)/bound: (b) over the larger of the reload "
    "alone and the suffix prefill alone (1.00: a perfect overlap). Same tokens: the three ways' "
    "greedy tokens agree.")
BREAKEVEN_CAPTION = (
    "The prefix length from which reloading beats recomputing, per suffix length: linearly "
    "interpolated between the two measured prefix lengths where the gain last turns positive; "
    "outside the measured lengths nothing is extrapolated (below: reload wins at every "
    "measured prefix; above: recompute is as fast or faster at every one).")
PAGED_CAPTION = (
    "The same requests with the prefix's KV kept as a paged server keeps it (`--block-size`): "
    "blocks of `block` tokens scattered through a host pool, reloaded by `copy`: dma, one DMA "
    "per block of K or V (every KV head at once), or mapped, one SM gather kernel per layer's "
    "K or V reading the pool through its mapping into the GPU (`copies` a reload), (a) "
    "serially or (b) layer by layer under the suffix's forward; (c) is the case's recompute. "
    "Medians; same tokens: recompute's greedy tokens.")
TRAFFIC_CAPTION = (
    "Decode of a running batch alone and while background copies move bytes at full speed "
    "(d2h: offloading, h2d: reloading, both), by the method named (dma: copy engines; mapped: "
    "an SM copy kernel reading or writing pinned host memory mapped into the GPU, competing "
    "with the decode for SMs too; cpu thread: the CPU pipeline, no GPU figure). TPOT medians "
    "per window; copy GB/s (1e9 bytes/s) alone and meanwhile. Same tokens: the decode under "
    "copies kept the tokens of the decode alone.")
DECODE_CAPTION = (
    "Offloaded decode: the KV cache in host memory, every layer's K/V streamed in ahead of its "
    "attention each step (double-buffered), against the same eager decode with the cache on "
    "the device. Link bound: batch × the host-to-device GB/s measured alone in the same run / "
    "the bytes streamed a step.")


def offload_labels(records: Sequence[Record]) -> list[tuple[str, Record]]:
    """(label, Record) per offload Result, by source: device · model, batch; a label two
    Results share gets #2, #3 in source order, so every row and plot names one Result."""
    labelled, seen = [], {}
    for record in sorted((r for r in records if r.kind == "offload"), key=lambda r: r.source):
        batch = record.config.get("batch_size")
        label = column_key(record).label + (f", batch {batch}" if batch is not None else "")
        seen[label] = seen.get(label, 0) + 1
        labelled.append((label if seen[label] == 1 else f"{label} #{seen[label]}", record))
    return labelled


def cases(record: Record) -> list[dict[str, Any]]:
    """The Result's (suffix, prefix) cases with numeric lengths, sorted by suffix then prefix."""
    found = [c for c in record.metrics.get("cases") or [] if isinstance(c, dict)
             and num(c.get("prefix_len")) is not None and num(c.get("suffix_len")) is not None]
    return sorted(found, key=lambda c: (num(c["suffix_len"]), num(c["prefix_len"])))


def ttft(case: dict[str, Any], way: str) -> float | None:
    times = case.get("ttft_ms")
    return num(times.get(way)) if isinstance(times, dict) else None


def break_evens(record: Record) -> list[dict[str, Any]]:
    return [row for row in record.metrics.get("break_even") or [] if isinstance(row, dict)]


def _break_even(record: Record, suffix: float, way: str) -> dict[str, Any]:
    found = [row for row in break_evens(record)
             if num(row.get("suffix_len")) == suffix and row.get("way") == way]
    return found[0] if found else {}


def status(record: Record, suffix: float, way: str) -> str | None:
    """"measured", "below", "above" (offload/breakeven.py), or None where the Result has none."""
    return _break_even(record, suffix, way).get("status")


def crossover(record: Record, suffix: float, way: str) -> float | None:
    """The measured break-even prefix length of one suffix and reload way, None if not measured
    (the crossing lies outside the measured lengths, or the Result has none)."""
    row = _break_even(record, suffix, way)
    return num(row.get("prefix_len")) if row.get("status") == "measured" else None


def _yes(value: Any) -> str:
    return fmt.MISSING if not isinstance(value, bool) else "yes" if value else "NO"


def ttft_table(labelled: list[tuple[str, Record]]) -> Table | None:
    rows = []
    for label, record in labelled:
        for case in cases(record):
            ratio = num(case.get("layerwise_over_bound"))
            rows.append([label, fmt.count(num(case["suffix_len"])),
                         fmt.count(num(case["prefix_len"])),
                         *[fmt.ms(ttft(case, way)) for way, _ in WAYS],
                         str(case.get("fastest") or fmt.MISSING),
                         fmt.MISSING if ratio is None else f"{ratio:.2f}",
                         _yes(case.get("same_tokens"))])
    if not rows:
        return None
    return Table("offload", "Reload vs recompute, measured (TTFT)", TTFT_CAPTION,
                 ["Result", "Suffix", "Prefix", *[name for _, name in WAYS], "Fastest",
                  "(b)/bound", "Same tokens"], rows)


def describe(row: dict[str, Any] | None) -> str:
    """One break-even cell: '~171 tokens', 'below 64 (reload wins at every measured prefix)'."""
    if row is None:
        return fmt.MISSING
    status, length = row.get("status"), num(row.get("prefix_len"))
    if status == "measured" and length is not None:
        return f"~{length:,.0f} tokens"
    if status == "below":
        return f"below {fmt.count(num(row.get('shortest')))} (reload wins at every measured " \
               "prefix)"
    if status == "above":
        return f"above {fmt.count(num(row.get('longest')))} (recompute as fast or faster at " \
               "every measured prefix)"
    return fmt.MISSING


COPIES = ("dma", "mapped")  # a paged reload's copy ways, in the tables' order


def _copy(row: dict[str, Any]) -> str:
    """A paged row's copy way: older Results had dma only and no `copy` key."""
    return str(row.get("copy") or "dma")


def _host_copy(row: dict[str, Any]) -> str:
    size = num(row.get("block_size"))
    if size is None:
        return "whole"
    copy = _copy(row)
    return f"blocks of {size:,.0f}" + ("" if copy == "dma" else f", {copy}")


def breakeven_table(labelled: list[tuple[str, Record]]) -> Table | None:
    """Per Result, suffix and host copy (the whole prefix, then each paged block size): the
    break-even of each reload way."""
    rows = []
    for label, record in labelled:
        paged = [r for r in record.metrics.get("paged_break_even") or [] if isinstance(r, dict)]
        grouped: dict[tuple[float, float, int], dict[str, dict[str, Any]]] = {}
        for row in break_evens(record) + paged:
            if (suffix := num(row.get("suffix_len"))) is not None:
                key = (suffix, num(row.get("block_size")) or 0,  # 0: the whole copy, first
                       COPIES.index(_copy(row)) if _copy(row) in COPIES else len(COPIES))
                grouped.setdefault(key, {})[str(row.get("way"))] = row
        for key in sorted(grouped):
            ways = grouped[key]
            rows.append([label, fmt.count(key[0]), _host_copy(next(iter(ways.values()))),
                         describe(ways.get("serial")), describe(ways.get("layerwise"))])
    if not rows:
        return None
    return Table("offload-breakeven", "Reload vs recompute, measured break-even",
                 BREAKEVEN_CAPTION, ["Result", "Suffix", "Host copy",
                                     "(a) serial reload wins from",
                                     "(b) layerwise reload wins from"], rows)


def paged_table(labelled: list[tuple[str, Record]]) -> Table | None:
    """The reloads from a paged host copy (--block-size), beside the same case's recompute."""
    rows = []
    for label, record in labelled:
        for case in cases(record):
            for entry in case.get("paged") or []:
                if not isinstance(entry, dict) or num(entry.get("block_size")) is None:
                    continue
                times = entry.get("ttft_ms") if isinstance(entry.get("ttft_ms"), dict) else {}
                rows.append(((num(entry["block_size"]), _copy(entry)), [
                    label, fmt.count(num(entry["block_size"])), _copy(entry),
                    fmt.count(num(case["suffix_len"])), fmt.count(num(case["prefix_len"])),
                    fmt.count(num(entry.get("copies"))), fmt.ms(num(entry.get("reload_ms"))),
                    fmt.ms(num(times.get("serial"))), fmt.ms(num(times.get("layerwise"))),
                    fmt.ms(ttft(case, "recompute")), _yes(entry.get("same_tokens"))]))
    if not rows:
        return None
    ordered = [row for _, row in sorted(rows, key=lambda r: (r[1][0], r[0]))]  # stable in case
    return Table("offload-paged", "Reload vs recompute, paged host copy (TTFT)", PAGED_CAPTION,
                 ["Result", "Block", "Copy", "Suffix", "Prefix", "Copies", "Reload", "(a) serial",
                  "(b) layerwise", "(c) recompute", "Same tokens"], ordered)


def _decode(entry: dict[str, Any]) -> str:
    return f"batch {fmt.count(num(entry.get('batch_size')))} at " \
           f"{fmt.count(num(entry.get('context')))} tokens"


def traffic_table(labelled: list[tuple[str, Record]]) -> Table | None:
    rows = []
    for label, record in labelled:
        for e in record.metrics.get("traffic") or []:
            if not isinstance(e, dict):
                continue
            slowdown = num(e.get("slowdown_pct"))
            rows.append([label, _decode(e), str(e.get("direction")), str(e.get("method")),
                         fmt.ms(num(e.get("tpot_alone_ms"))), fmt.ms(num(e.get("tpot_ms"))),
                         fmt.MISSING if slowdown is None else f"{slowdown:+.1f}%",
                         fmt.gbps(num(e.get("copy_alone_gbps"))),
                         fmt.gbps(num(e.get("copy_gbps"))), _yes(e.get("same_tokens"))])
    if not rows:
        return None
    return Table("offload-traffic", "Decode under copy traffic", TRAFFIC_CAPTION,
                 ["Result", "Decode", "Copies", "Method", "TPOT alone", "TPOT under copies",
                  "Slowdown", "Copies alone", "Copies meanwhile", "Same tokens"], rows)


def decode_table(labelled: list[tuple[str, Record]]) -> Table | None:
    rows = []
    for label, record in labelled:
        e = record.metrics.get("offloaded_decode")
        if not isinstance(e, dict):
            continue
        rows.append([label, _decode(e), fmt.ms(num(e.get("tpot_ms"))),
                     fmt.tok_s(num(e.get("tok_per_s"))),
                     fmt.tok_s(num(e.get("on_device_tok_per_s"))),
                     fmt.gbps(num(e.get("link_gbps"))), fmt.tok_s(num(e.get("bound_tok_per_s"))),
                     fmt.pct(num(e.get("pct_of_bound"))), _yes(e.get("same_tokens"))])
    if not rows:
        return None
    return Table("offload-decode", "Offloaded decode against the link's bound", DECODE_CAPTION,
                 ["Result", "Decode", "TPOT streamed", "Streamed", "KV on the device",
                  "Link h2d (alone)", "Link bound", "% of bound", "Same tokens"], rows)


def offload_tables(records: Sequence[Record]) -> list[Table]:
    """The offload tables that have rows; [] without offload Results."""
    labelled = offload_labels(records)
    tables = [make(labelled) for make in (ttft_table, breakeven_table, paged_table,
                                          traffic_table, decode_table)]
    return [t for t in tables if t is not None]


def offload_notes(records: Sequence[Record]) -> list[str]:
    """Where each labelled Result came from, with its warnings; its timing notes (noisy, few
    samples: offload/table.py's TIMING_NOTE) counted, not listed."""
    notes = []
    for label, record in offload_labels(records):
        timing = [w for w in record.warnings if TIMING_NOTE.search(w)]
        notes.append(f"{record.source}: offload Result, '{label}' in the offload tables" + (
            f"; {len(timing)} timings noisy or with few samples (listed in the Result)"
            if timing else ""))
        notes += [f"{label}: {w}" for w in record.warnings if w not in timing]
    return notes
