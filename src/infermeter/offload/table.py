"""The terminal view of an `offload` Result: one row per (suffix, prefix) case, then the
break-even prefix length per suffix length and reload way."""

from __future__ import annotations

import re
from typing import Any

from infermeter.measure.result import Result
from infermeter.textable import render_table
from infermeter.units import format_bytes

HEADER = ["suffix", "prefix", "KV", "reload", "suffix fwd", "(a) serial", "(b) layerwise",
          "(c) recompute", "fastest", "(b)/bound", "same tokens"]
# Stats.warnings' two lines: counted in the table's view, listed whole in the Result.
TIMING_NOTE = re.compile(r": (noisy, cov |only \d+ samples$)")


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def describe_break_even(row: dict[str, Any]) -> str:
    if row["status"] == "measured":
        return f"reload wins from a prefix of ~{row['prefix_len']:.0f} tokens"
    if row["status"] == "below":
        return f"reload wins at every measured prefix ({row['shortest']}..{row['longest']})"
    return f"recompute is as fast or faster at every measured prefix up to {row['longest']}"


def render_offload(result: Result) -> str:
    metrics = result.metrics
    rows = []
    for case in metrics["cases"]:
        ttft = case["ttft_ms"]
        ratio = case["layerwise_over_bound"]
        rows.append([case["suffix_len"], case["prefix_len"], format_bytes(case["reload_bytes"]),
                     _ms(case["reload_ms"]), _ms(case["suffix_prefill_ms"]),
                     _ms(ttft["serial"]), _ms(ttft["layerwise"]), _ms(ttft["recompute"]),
                     case["fastest"], "-" if ratio is None else f"{ratio:.2f}",
                     "yes" if case["same_tokens"] else "NO"])
    config = result.config
    lines = [f"{result.model.get('name')} on {config['device']}, batch {config['batch_size']}, "
             f"{config['dtype']} weights, {config['kv_dtype']} KV, prefix KV in "
             f"{config['host_memory']} host memory; medians of {config['repeats']} runs in ms "
             f"({config['timer']}), TTFT for (a), (b), (c)",
             render_table(HEADER, rows),
             "reload, suffix fwd: each alone; bound: the larger of the two, what a perfect "
             "overlap reaches"]
    for row in metrics["break_even"]:
        way = "(a) serial" if row["way"] == "serial" else "(b) layerwise"
        lines.append(f"suffix {row['suffix_len']}, {way}: {describe_break_even(row)}")
    if metrics.get("paged_break_even"):
        lines += ["", render_paged(metrics)]
    if metrics.get("traffic"):
        lines += ["", render_traffic(metrics["traffic"], config)]
    if metrics.get("offloaded_decode"):
        lines += ["", render_offloaded(metrics["offloaded_decode"])]
    timing = [note for note in result.warnings if TIMING_NOTE.search(note)]
    lines += [f"warning: {note}" for note in result.warnings if note not in timing]
    if timing:
        lines.append(f"warning: {len(timing)} timings noisy or with few samples (--json lists "
                     "them)")
    return "\n".join(lines)


def render_traffic(entries: list[dict[str, Any]], config: dict[str, Any]) -> str:
    rows = [[e["direction"], e["method"], _ms(e["tpot_alone_ms"]), _ms(e["tpot_ms"]),
             f"{e['slowdown_pct']:+.1f}%", f"{e['copy_alone_gbps']:.1f}", f"{e['copy_gbps']:.1f}",
             "yes" if e["same_tokens"] else "NO"] for e in entries]
    head = (f"decode under copy traffic: batch {config['batch_size']} at {config['context']} "
            f"tokens, TPOT medians over windows of {config['decode_steps']} steps (ms), copies "
            "in GB/s (dma: copy engines; mapped: an SM copy kernel on mapped pinned memory)")
    return "\n".join([head, render_table(["copies", "method", "TPOT alone", "TPOT", "slowdown",
                                           "copies alone", "copies meanwhile", "same tokens"],
                                          rows)])


SAME = {True: "yes", False: "NO", None: "not compared"}


def render_offloaded(entry: dict[str, Any]) -> str:
    bound = entry["bound_tok_per_s"]
    on_device = entry["on_device_tok_per_s"]  # None: the whole cache does not fit
    rows = [["KV on the device", _ms(entry["on_device_tpot_ms"]),
             "does not fit" if on_device is None else f"{on_device:.1f}", "-"],
            ["KV streamed from host", _ms(entry["tpot_ms"]), f"{entry['tok_per_s']:.1f}",
             "-" if bound is None else f"{entry['pct_of_bound']:.0f}% of {bound:.1f}"]]
    head = (f"offloaded decode: batch {entry['batch_size']} at {entry['context']} tokens, "
            f"{format_bytes(entry['bytes_per_step'])} streamed a step at "
            f"{entry['link_gbps']:.1f} GB/s host-to-device (measured alone); eager both ways; "
            f"same tokens: {SAME[entry['same_tokens']]}")
    copies = entry.get("copies_alone_ms")  # absent from older Results
    if copies is not None:
        rows.append(["a step's copies alone", _ms(copies), "-",
                     f"{entry['copies_gbps']:.1f} GB/s; the step at {entry['pct_of_copies']:.0f}%"
                     " of them"])
    lines = [head, render_table(["decode", "TPOT ms", "tokens/s", "link bound"], rows)]
    if entry.get("trace"):
        lines.append(f"profiler trace: {entry['trace']}")
    return "\n".join(lines)


def paged_copy_of(entry: dict[str, Any]) -> str:
    """A paged entry's or break-even row's copy way; older Results had dma only and no key."""
    return entry.get("copy", "dma")


def render_paged(metrics: dict[str, Any]) -> str:
    """The paged reloads: per block size, copy way, suffix and prefix, beside the same case's
    recompute."""
    rows = []
    for case in metrics["cases"]:
        for entry in case.get("paged", ()):
            ratio = entry["layerwise_over_bound"]
            rows.append([entry["block_size"], paged_copy_of(entry), case["suffix_len"],
                         case["prefix_len"], entry["copies"], _ms(entry["reload_ms"]),
                         _ms(entry["ttft_ms"]["serial"]), _ms(entry["ttft_ms"]["layerwise"]),
                         _ms(case["ttft_ms"]["recompute"]),
                         "-" if ratio is None else f"{ratio:.2f}",
                         "yes" if entry["same_tokens"] else "NO"])
    rows.sort(key=lambda row: row[:4])
    lines = ["paged host copy: the prefix in blocks scattered through a pool, reloaded by dma "
             "(copies: one DMA per block of K or V) or mapped (copies: one SM gather kernel per "
             "layer's K or V, through the pool's device mapping), medians in ms",
             render_table(["block", "copy", "suffix", "prefix", "copies", "reload",
                           "(a) serial", "(b) layerwise", "(c) recompute", "(b)/bound",
                           "same tokens"], rows)]
    for row in metrics["paged_break_even"]:
        way = "(a) serial" if row["way"] == "serial" else "(b) layerwise"
        lines.append(f"suffix {row['suffix_len']}, blocks of {row['block_size']} by "
                     f"{paged_copy_of(row)}, {way}: {describe_break_even(row)}")
    return "\n".join(lines)
