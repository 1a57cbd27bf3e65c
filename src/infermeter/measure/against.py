"""Two traced decode steps side by side (`infermeter trace FILE --against OTHER`): the step's
span, kernels and gaps in each, and a layer's kernels position by position, so a change between
two builds or settings of one model shows where it lands: in a kernel's own time, in what it
adds to the step, or in when it starts; and a kernel launched otherwise in the two (another
grid, block, register count or shared memory: inductor's tuning picks, another build) is
listed under the table.

Both are gaps.py's figures (step_gaps), each trace's own. A layer's kernels are compared only
where both traces have them with the same number a layer (the same step, built twice); a row
whose kernel names differ keeps both names. Otherwise one note says why, and the step lines
stay.
"""

from __future__ import annotations

from typing import Any


def against(this: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """this, other: step_gaps of two traces -> {"step": {figure: [this, other]} for span_ms,
    busy_ms, gaps_ms, kernels, early_starts, median_start_us; "rows": per layer position
    {position, name, other_name, median_us, adds_us, starts_us, launch: [this, other]} or
    None; "note": why there are no rows, or None}."""
    step = {key: [this.get(key), other.get(key)] for key in ("span_ms", "busy_ms", "gaps_ms",
                                                               "kernels", "early_starts",
                                                               "median_start_us")}
    mine, theirs = this.get("layer_kernels"), other.get("layer_kernels")
    if not mine or not theirs:
        which = "either trace" if not mine and not theirs else \
            "this trace" if not mine else "the other trace"
        return {"step": step, "rows": None,
                "note": f"a layer's kernels: none in {which} (no layers found)"}
    if len(mine) != len(theirs):
        return {"step": step, "rows": None,
                "note": f"a layer's kernels not compared: {len(mine)} a layer here, "
                        f"{len(theirs)} in the other trace"}
    rows = [{"position": a["position"], "name": a["name"], "other_name": b["name"],
             **{key: [a.get(key), b.get(key)]
                for key in ("median_us", "adds_us", "starts_us", "launch")}}
            for a, b in zip(mine, theirs, strict=True)]
    return {"step": step, "rows": rows, "note": None}


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _change(pair: list[float | None]) -> str:
    return "-" if None in pair else f"{pair[1] - pair[0]:+.2f}"


def render_against(compared: dict[str, Any], other_file: str) -> str:
    """The step's figures here and there, then a layer's kernels: each figure here, in the
    other trace, and the other's less this one's."""
    from infermeter.textable import render_table

    step = compared["step"]
    lines = [f"Against {other_file}: step {_ms(step['span_ms'])} ms, kernels "
             f"{_ms(step['busy_ms'])} ms, gaps {_ms(step['gaps_ms'])} ms (here, there); "
             f"{step['kernels'][0]} and {step['kernels'][1]} kernels"]
    if None not in step["early_starts"]:  # traces read before the starts were counted lack them
        lines.append(f"Kernels started before the one ahead ended: {step['early_starts'][0]} "
                     f"and {step['early_starts'][1]}; median start "
                     f"{_us(step['median_start_us'][0])} and {_us(step['median_start_us'][1])} "
                     "us (here, there)")
    if compared["rows"] is None:
        return "\n".join([*lines, compared["note"]])
    rows = [(r["position"], r["name"][:48] if r["name"] == r["other_name"]
             else f"{r['name'][:22]} | there {r['other_name'][:18]}",
             *(cell for key in ("median_us", "adds_us", "starts_us")
               for cell in (_us(r[key][0]), _us(r[key][1]), _change(r[key]))))
            for r in compared["rows"]]
    header = ("#", "kernel", "median us", "there", "change", "adds us", "there", "change",
              "starts us", "there", "change")
    lines += ["A layer's kernels here and there (change: there less here):",
              render_table(header, rows)]
    launched = [r for r in compared["rows"] if None not in (r.get("launch") or [None])
                and r["launch"][0] != r["launch"][1]]
    if launched:  # inductor's tuning picks, another build: the same kernel launched otherwise
        lines.append("Launched otherwise (here; there):")
        lines += [f"{r['position']:>2}  {r['name'][:48]}: {_launch(r['launch'][0])}; "
                  f"{_launch(r['launch'][1])}" for r in launched]
    return "\n".join(lines)


def _launch(shape: dict[str, Any]) -> str:
    """grid 1x11x1, block 128x1x1, 32 registers, 0 B shared (the fields the trace has)."""
    def dims(value: Any) -> str:
        return "x".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    parts = [f"grid {dims(shape['grid'])}" if "grid" in shape else "",
             f"block {dims(shape['block'])}" if "block" in shape else "",
             f"{shape['registers']} registers" if "registers" in shape else "",
             f"{shape['shared_bytes']} B shared" if "shared_bytes" in shape else ""]
    return ", ".join(filter(None, parts))


def _ms(pair: list[float | None]) -> str:
    return " and ".join("-" if v is None else f"{v:.4f}" for v in pair)
