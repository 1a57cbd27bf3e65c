"""Why a copy is slow, in plain words, from the measured cases (pure Python; tested with
synthetic numbers).

Every comparison is within one run: pageable and seed against pinned, per-tensor and paged blocks
against one contiguous copy, both directions against one, contiguous pinned against the link peak
that NVML reports. `targets` gives the four ratios the benchmark is judged by.
"""

from __future__ import annotations

from typing import Any

from infermeter.units import format_bytes

LINK_GOAL_PCT = 85.0
GOALS = {"engine": 0.98, "paged": 0.95, "both": 1.8, "link_pct": LINK_GOAL_PCT}
Case = dict[str, Any]


def best(cases: list[Case], **match: Any) -> Case | None:
    """The fastest case whose fields equal `match` (None if none matches)."""
    found = [c for c in cases if all(c.get(k) == v for k, v in match.items())]
    return max(found, key=lambda c: c["gbps"], default=None)


def _layout_name(case: Case) -> str:
    if case["layout"] == "paged":
        tokens = case["block_tokens"]
        return f"paged blocks of {tokens} token{'s' if tokens != 1 else ''}"
    return f"{case['layout']} layout"


def _host_cost(cases: list[Case], direction: str) -> list[str]:
    """Pageable and seed-way memory against pinned, on the same layout (the engine's first)."""
    lines = []
    for host, why in (("pageable", ("the driver copies through its own small pinned buffer, "
                                    "piece after piece, instead of one DMA from your pages")),
                      ("seed", ("every .cpu()/.cuda() allocates fresh pageable memory, which "
                                "is faulted in and then staged like pageable memory"))):
        slow = best(cases, host_memory=host, direction=direction, layout="engine") or \
            best(cases, host_memory=host, direction=direction)
        if slow is None or slow["gbps"] <= 0:
            continue
        pinned = best(cases, host_memory="pinned", direction=direction, layout=slow["layout"],
                      block_tokens=slow["block_tokens"])
        if pinned is None:
            continue
        label = "pageable memory" if host == "pageable" else \
            "allocation in every copy (the seed way)"
        lines.append(f"{direction}: {label}: {pinned['gbps'] / slow['gbps']:.1f}x slower than "
                     f"pinned ({slow['gbps']:.1f} vs {pinned['gbps']:.1f} GB/s, "
                     f"{_layout_name(slow)}): {why}")
    return lines


def _layout_cost(cases: list[Case], direction: str, ref: Case) -> list[str]:
    lines = []
    variants = dict.fromkeys((c["layout"], c["block_tokens"]) for c in cases
                             if c["layout"] != "contiguous")
    for layout, block in variants:
        sel = {"layout": layout, "block_tokens": block, "host_memory": "pinned",
               "direction": direction}
        per = best(cases, method="per-tensor", **sel)
        top = best(cases, **sel)
        if top is None:
            continue
        pieces = f"{top['pieces']:,} pieces of {format_bytes(top['bytes'] / top['pieces'])}"
        text = f"{direction}: {_layout_name(top)} ({pieces}):"
        if per is not None:
            text += f" one copy per piece reaches {per['gbps'] / ref['gbps']:.0%} of one " \
                    f"contiguous copy;"
        text += f" best {top['method']} {top['gbps'] / ref['gbps']:.1%} ({top['gbps']:.1f} GB/s)"
        if per is not None and per["gbps"] < 0.9 * ref["gbps"] <= top["gbps"]:
            text += ": small pieces cost the copy engine set-up time; batching them wins it back"
        lines.append(text)
    return lines


def _both(cases: list[Case], refs: dict[str, Case]) -> tuple[list[str], float | None]:
    both = best(cases, host_memory="pinned", direction="both", layout="contiguous") or \
        best(cases, host_memory="pinned", direction="both")
    if both is None or len(refs) < 2:
        return [], None
    one_way = (refs["d2h"]["gbps"] + refs["h2d"]["gbps"]) / 2
    speedup = both["gbps"] / one_way
    text = (f"both directions at once ({_layout_name(both)}, {both['method']}): "
            f"{both['gbps']:.1f} GB/s together, {speedup:.2f}x one way ({one_way:.1f} GB/s)")
    if speedup < 1.5:
        text += ": the link is full duplex, so the host side (memory bandwidth, root complex, " \
                "read-request credits) limits the return traffic"
    return [text], speedup


def _link(refs: dict[str, Case], link: dict[str, Any]) -> list[str]:
    peak = link.get("peak_gbps")
    if not peak:
        return ["link peak unknown (no NVML): install nvidia-ml-py to compare with it"]
    name = (f"NVLink-C2C x{link.get('c2c_links')}" if link.get("kind") == "nvlink-c2c"
            else f"PCIe Gen{link.get('gen')} x{link.get('width')}")
    lines = []
    for direction, ref in refs.items():
        pct = 100 * ref["gbps"] / peak
        text = (f"{direction}: contiguous pinned {ref['gbps']:.1f} GB/s = {pct:.0f}% of the "
                f"{name} peak ({peak:.1f} GB/s per direction)")
        if pct < LINK_GOAL_PCT:
            text += "; below 85%, possible causes: " + "; ".join(_slow_link_causes(link))
        lines.append(text)
    return lines


def _slow_link_causes(link: dict[str, Any]) -> list[str]:
    causes = []
    gen, width = link.get("gen_current"), link.get("width_current")
    if gen and width and (gen < (link.get("gen") or 0) or width < (link.get("width") or 0)):
        causes.append(f"the link ran at Gen{gen} x{width} during the copy, below its "
                      f"Gen{link.get('gen')} x{link.get('width')} maximum (trained down: "
                      f"reseat the card or check the slot and BIOS settings)")
    node = link.get("numa_node")
    if link.get("process_on_gpu_node") is False:
        causes.append(f"this process runs on CPUs outside the GPU's NUMA node {node}, so "
                      f"pinned buffers may sit in remote memory (numactl --cpunodebind={node} "
                      f"--membind={node})")
    elif node is not None and (link.get("host_numa_nodes") or 1) > 1:
        causes.append(f"host memory on another NUMA node than the GPU's (node {node})")
    causes += ["an IOMMU translating every DMA address", ("other traffic on the same PCIe "
               "switch or root port"), "a virtual machine's passthrough overhead"]
    return causes


def targets(cases: list[Case]) -> dict[str, Any]:
    """The four figures of merit, against the same run's best contiguous pinned copy."""
    refs = {d: best(cases, layout="contiguous", host_memory="pinned", direction=d)
            for d in ("d2h", "h2d")}
    out: dict[str, Any] = {"goals": GOALS, "engine_vs_contiguous": {}, "paged_vs_contiguous": {},
                           "contiguous_link_pct": {}}
    for d, ref in refs.items():
        if ref is None:
            continue
        engine = best(cases, layout="engine", host_memory="pinned", direction=d)
        if engine:
            out["engine_vs_contiguous"][d] = engine["gbps"] / ref["gbps"]
        for block in sorted({c["block_tokens"] for c in cases if c["layout"] == "paged"}):
            paged = best(cases, layout="paged", block_tokens=block, host_memory="pinned",
                         direction=d)
            if paged:
                out["paged_vs_contiguous"].setdefault(str(block), {})[d] = \
                    paged["gbps"] / ref["gbps"]
        out["contiguous_link_pct"][d] = ref.get("link_pct")
    found = {d: r for d, r in refs.items() if r is not None}
    out["both_vs_one_way"] = _both(cases, found)[1]
    return out


def diagnose(cases: list[Case], link: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(diagnosis lines, warnings) for the measured `cases` and the link facts."""
    lines: list[str] = []
    refs = {d: r for d in ("d2h", "h2d")
            if (r := best(cases, layout="contiguous", host_memory="pinned", direction=d))}
    for direction in ("d2h", "h2d"):
        lines += _host_cost(cases, direction)
    for direction, ref in refs.items():
        lines += _layout_cost(cases, direction, ref)
    lines += _both(cases, refs)[0]
    if refs:
        lines += _link(refs, link)
    return lines, _warnings(cases, link)


def _warnings(cases: list[Case], link: dict[str, Any]) -> list[str]:
    notes, late = [], []
    for c in cases:
        label = f"{_layout_name(c)} {c['host_memory']} {c['direction']} {c['method']}"
        if c["host_memory"] == "pinned" and c.get("host_pinned") is False:
            notes.append(f"{label}: asked for pinned memory but ran on pageable memory")
        peak = link.get("peak_gbps")
        ways = 2 if c["direction"] == "both" else 1
        if peak and c["gbps"] > 1.02 * peak * ways:
            notes.append(f"{label}: {c['gbps']:.1f} GB/s is above the link peak "
                         f"({peak * ways:.1f}): the link reading or the timing is wrong")
        if c.get("late_samples"):
            late.append(f"{label} ({c['late_samples']}/{c.get('stats', {}).get('n', '?')})")
        cov = c.get("stats", {}).get("cov", 0.0)
        if cov > 0.05:
            notes.append(f"{label}: noisy, cov {cov:.1%} > 5%")
    if late:
        notes.append("the host took longer to queue the copies than the spin hold in: "
                     + ", ".join(late) + "; those samples include enqueue time (the driver's "
                     "queue of pending copies fills up), as a real copy of that many pieces would")
    return notes
