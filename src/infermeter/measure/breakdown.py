"""Where one decode step's time goes, read from a Chrome/Perfetto trace (torch.profiler export).

Method (docs/trace.md, "Where the time goes"):
1. Steps: every `im/decode_step` range (trace_capture.py) is one decode step. The breakdown is of
   the median step by span (the steps of one capture differ by a context token only). A trace
   without such ranges (someone else's) is read as one window: the whole trace.
2. Work items: on a GPU trace, the device kernels, memcpys and memsets (cat kernel / gpu_memcpy /
   gpu_memset) of the step, found through their launch: the CUDA runtime call with the same
   `correlation` lies inside the step's range. A trace with no device events is a CPU trace: the
   work items are the leaf aten ops (cpu_op events that contain no other op) on the step's thread,
   and every figure is CPU op time, labelled so.
3. Category: the innermost `im/<label>` range around the launch (GPU) or the op (CPU). nvtx.py
   puts those ranges around each projection module in eager mode (qkv = wq+wk+wv, o = wo,
   gate_up = w1+w3, down = w2, lm_head = output; an MoE block whole: "MoE experts", its router,
   its experts' products and activation, no GB/s), the norms, attention and the model; work in the
   step outside the model is sampling. Inside attention, elementwise work (mul, cat, neg...) is
   rotary. Without labels (compiled mode: one fused graph; foreign traces) the kernel name decides
   (gemm -> matmul, flash / sdpa -> attention, nccl -> all-reduce, ...; in an MoE model an
   inductor kernel that gathers rows by index into a batched product, and expert_gemv.py's
   kernels, -> MoE experts). All-reduce is always recognised by name first: under tp it runs
   inside the o / down ranges (a forward hook).
4. Gaps: the step's span (first item start -> last item end) minus the union of its items is
   idle time: on a GPU, launch overhead and host stalls between kernels; on a CPU, framework
   overhead outside the leaf ops. Shares are of that span.
5. Matmul bandwidth: the weight bytes one step reads per projection (written into the trace by
   trace_capture.py under "infermeter"."weight_bytes") / that projection's time.
6. Copies: every memcpy (GPU) or leaf aten::copy_ (CPU) with its bytes, grouped by the enclosing
   `im/copy ...` range and size: count, bytes, total and median time, and GB/s = bytes / median
   time (GB = 1e9 bytes; the median, so one page-faulting first copy does not rule the figure).
7. Bubbles (GPU traces, gaps.py): the same step's kernels against the idle time between them,
   per step and per `im/layer N` range (placed by launch, as in 2), against the step's bytes;
   a step without layer ranges (compiled) is split into layers by its kernel pattern.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from infermeter.errors import InfermeterError
from infermeter.measure.gaps import render_gaps, step_gaps
from infermeter.specs.presets import PRESETS

PREFIX = "im/"  # nvtx.PREFIX: the ranges infermeter opens
STEP = PREFIX + "decode_step"
_LAYER = re.compile(r"layer \d+")  # nvtx.py's per-block ranges: im/layer 0, im/layer 1, ...
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
PROJECTIONS = ("qkv", "o", "gate_up", "down", "lm_head")
CATEGORIES = tuple(f"matmul {p}" for p in PROJECTIONS) + (
    "matmul (unattributed)", "MoE experts", "attention", "norms & rotary", "sampling", "all-reduce",
    "memcpy / memset", "other (residual, activation, embedding)", "gaps (idle)")
# NCCL's kernels, c10d's ops, and peer_all_reduce.py's (whose fused kernel also does the residual
# add and the norm after the all-reduce: counted here, as the all-reduce is most of its time)
_ALLREDUCE = re.compile(r"nccl|all_?reduce|c10d::|_peer_", re.I)
# the last two: decode_kernel.py's split-KV attention and its combine
_ATTENTION = re.compile(r"scaled_dot_product|flash|fmha|attention|sdpa|bmm|split_kv"
                        r"|_combine_kernel", re.I)
# norm_qkv_rope: fused_step.py's norm + wqkv + RoPE kernel, a product first of all
# _layer_kernel (one launch a layer, removed 2026-12-06; in older traces) counts as products
_MATMUL = re.compile(r"gemm|gemv|nvjet|cutlass|xmma|cublas|aten::(mm|addmm|matmul|linear)$"
                     r"|splitk|norm_qkv_rope|_layer_kernel", re.I)
# expert_gemv.py's, router_topk.py's, and _moe_kernel (one launch of an MoE block, removed
# 2026-12-06; in older traces)
_EXPERTS = re.compile(r"_experts_(swiglu|down|route)|_moe_kernel", re.I)
_CACHE_WRITE = re.compile(r"index_(copy|put)")
_ROTARY = re.compile(r"mul|neg|cat|stack|rope|rotary|complex|sub", re.I)
_NORM = re.compile(r"norm|rsqrt", re.I)
_SAMPLING = re.compile(r"argmax|topk|sort|multinomial|cumsum|gumbel", re.I)
_ELEMENT_BYTES = {"float": 4, "c10::Half": 2, "c10::BFloat16": 2, "double": 8, "long int": 8,
                  "int": 4, "bool": 1, "unsigned char": 1, "signed char": 1, "short int": 2}


def load_trace(path: str | Path) -> dict[str, Any]:
    """A Chrome trace JSON (object with traceEvents, or a bare event list), plain or gzipped
    (`.gz`, as results/ keeps them); clear error if not."""
    import gzip

    try:
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip's magic bytes, whatever the file is called
            raw = gzip.decompress(raw)
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise InfermeterError(f"trace file {path} does not exist") from None
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InfermeterError(f"cannot read trace {path}: {err}") from None
    if isinstance(data, list):
        data = {"traceEvents": data}
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise InfermeterError(f"{path} is not a Chrome trace (no traceEvents list)")
    return data


def _spans(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """Complete ('X') events with finite numeric ts and dur >= 0 and a pid and tid that are an
    int, a string or absent (ops are grouped by thread: an object or list there is no key);
    anything else is skipped, as a malformed event of a foreign trace."""
    out = []
    for e in trace["traceEvents"]:
        if isinstance(e, dict) and e.get("ph") == "X" and isinstance(e.get("ts"), (int, float)) \
                and isinstance(e.get("dur"), (int, float)) and math.isfinite(e["ts"]) \
                and math.isfinite(e["dur"]) and e["dur"] >= 0 \
                and all(isinstance(e.get(key), (int, str, type(None))) for key in ("pid", "tid")):
            out.append(e if isinstance(e.get("args", {}), dict) else {**e, "args": {}})
    return out


def _innermost(points: list[float], ranges: list[tuple[float, float, str]]) -> list[str | None]:
    """For each time point, the label of the innermost (nested) range holding it: one sweep."""
    items = [(ts, 0, -end, end, label) for ts, end, label in ranges]
    items += [(t, 1, 0.0, 0.0, i) for i, t in enumerate(points)]
    items.sort(key=lambda item: item[:3])
    stack: list[tuple[float, str]] = []
    found: list[str | None] = [None] * len(points)
    for ts, kind, _, end, what in items:
        while stack and stack[-1][0] <= ts:
            stack.pop()
        if kind == 0:
            stack.append((end, what))
        else:
            found[what] = stack[-1][1] if stack else None
    return found


def _category(name: str, label: str | None, cat: str, moe: bool = False) -> str:
    if _ALLREDUCE.search(name):
        return "all-reduce"
    if cat in ("gpu_memcpy", "gpu_memset"):
        return "memcpy / memset"
    if label in PROJECTIONS:
        return f"matmul {label}"
    if label == "experts":  # an MoE block: router, expert products and their activation
        return "MoE experts"
    if label == "norm":
        return "norms & rotary"
    if label == "attention":
        return "norms & rotary" if _ROTARY.search(name) and not _ATTENTION.search(name) \
            else "attention"
    if label in ("model", "embedding"):
        return "other (residual, activation, embedding)"
    if label == "outside":
        return "sampling"
    return _by_name(name, moe)


def _inductor_category(name: str, moe: bool = False) -> str | None:
    """An inductor Triton kernel: its name lists the ops it fused, e.g.
    triton_red_fused__to_copy_add_mean_mm_mul_pow_rsqrt_t_view_17 (an RMSNorm fused into a
    matrix-vector product). A reduction that holds an `mm` or the engine's `gemv` op (the
    residual add and the next norm fused into the product's reduction) reads a weight matrix:
    the matmul is its cost. Else bmm / softmax / the KV-cache write (index_copy) are attention.
    In an MoE model a batched product fed by an index (the stacked experts' rows gathered by
    the routing ids, moe.py's gathered path), and no cache write, is the experts'."""
    match = re.match(r"triton_(red|per|poi)_fused_(.*?)(_\d+)?$", name)
    if match is None:
        return None
    ops = set(match.group(2).split("_"))
    if moe and {"bmm", "index"} <= ops and not _CACHE_WRITE.search(match.group(2)):
        return "MoE experts"
    if match.group(1) != "poi" and ops & {"mm", "addmm", "gemv"}:
        return "matmul (unattributed)"
    # before the cache write's index_copy: the recorded step's argmax kernel also writes the
    # token into its history row by index_copy (held_step.py)
    if ops & {"argmax", "topk", "sort", "cumsum"}:
        return "sampling"
    if ops & {"bmm", "softmax", "sdpa"} or "index_copy" in match.group(2) or \
            "scaled_dot_product" in match.group(2):
        return "attention"
    if ops & {"mean", "rsqrt"}:
        return "norms & rotary"
    return "other (residual, activation, embedding)"


def _by_name(name: str, moe: bool = False) -> str:
    """No label (compiled graphs, foreign traces): the kernel's name is all there is (and, for
    the expert products, whether the traced model is an MoE one)."""
    if _ALLREDUCE.search(name):
        return "all-reduce"
    if _EXPERTS.search(name):
        return "MoE experts"
    fused = _inductor_category(name, moe)
    if fused is not None:
        return fused
    for pattern, category in ((_ATTENTION, "attention"), (_MATMUL, "matmul (unattributed)"),
                              (_NORM, "norms & rotary"), (_SAMPLING, "sampling")):
        if pattern.search(name):
            return category
    return "other (residual, activation, embedding)"


def _self_times(spans: list[dict[str, Any]]) -> list[tuple[dict[str, Any], float]]:
    """Every cpu_op with its self time: its duration less its direct children's (aten::mm has
    resolve_conj children, so leaves alone would lose the matmul)."""
    by_thread: dict[Any, list[dict[str, Any]]] = {}
    for e in spans:
        if e.get("cat") == "cpu_op":
            by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    out = []
    for ops in by_thread.values():
        ops.sort(key=lambda e: (e["ts"], -e["dur"]))
        own = [float(op["dur"]) for op in ops]
        stack: list[int] = []
        for k, op in enumerate(ops):
            while stack and ops[stack[-1]]["ts"] + ops[stack[-1]]["dur"] <= op["ts"]:
                stack.pop()
            if stack:
                own[stack[-1]] -= op["dur"]
            stack.append(k)
        out += [(op, max(t, 0.0)) for op, t in zip(ops, own)]
    return out


def _work_items(spans: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Each item: start, end, name, cat and `at` (the host time that places it in a range)."""
    device = [e for e in spans if e.get("cat") in DEVICE_CATS]
    if device:
        launches = {e.get("args", {}).get("correlation"): e["ts"] for e in spans
                    if e.get("cat") in ("cuda_runtime", "cuda_driver")}
        items = [{"start": e["ts"], "end": e["ts"] + e["dur"], "time": e["dur"],
                  "name": str(e.get("name", "")), "cat": e["cat"], "args": e.get("args", {}),
                  "at": launches.get(e.get("args", {}).get("correlation")),
                  "device": e.get("pid"),
                  "stream": str(e.get("args", {}).get("stream", e.get("tid")))}
                 for e in device]
        return items, "gpu"
    items = [{"start": e["ts"], "end": e["ts"] + e["dur"], "time": own,
              "name": str(e.get("name", "")), "cat": "cpu_op", "at": e["ts"],
              "args": e.get("args", {})} for e, own in _self_times(spans)]
    return items, "cpu"


def _ranges(spans: list[dict[str, Any]]) -> list[tuple[float, float, str]]:
    out = []
    for e in spans:
        name = str(e.get("name", ""))
        if name.startswith(PREFIX) and e.get("cat") != "gpu_user_annotation":
            label = "outside" if name == STEP else name[len(PREFIX):]
            out.append((e["ts"], e["ts"] + e["dur"], label))
    return out


def _union_us(items: list[dict[str, Any]]) -> float:
    busy, end = 0.0, float("-inf")
    for item in sorted(items, key=lambda i: i["start"]):
        start = max(item["start"], end)
        if item["end"] > start:
            busy += item["end"] - start
        end = max(end, item["end"])
    return busy


def _step_table(items: list[dict[str, Any]], weights: dict[str, float]) -> dict[str, Any]:
    span_us = max(i["end"] for i in items) - min(i["start"] for i in items)
    times = dict.fromkeys(CATEGORIES, 0.0)
    for item in items:
        times[item["category"]] += item["time"]
    times["gaps (idle)"] = span_us - _union_us(items)
    rows = []
    for name, us in times.items():
        if us <= 0:
            continue
        projection = name[len("matmul "):] if name.startswith("matmul ") else None
        weight = weights.get(projection) if projection else None
        if projection == "(unattributed)" and not any(
                times.get(f"matmul {p}") for p in PROJECTIONS):
            weight = sum(weights.values()) or None  # compiled: every projection's bytes
        gbps = weight / (us * 1e-6) / 1e9 if weight else None
        rows.append({"name": name, "time_ms": us / 1e3,
                     "share_pct": 100 * us / span_us if span_us else None,
                     "weight_bytes": weight, "gbps": gbps})
    return {"step_ms": span_us / 1e3, "busy_ms": (span_us - times["gaps (idle)"]) / 1e3,
            "idle_ms": times["gaps (idle)"] / 1e3,
            "idle_pct": 100 * times["gaps (idle)"] / span_us if span_us else None,
            "categories": rows}


def _model_facts(meta: dict[str, Any]) -> tuple[int | None, bool]:
    """(layer count, MoE or not) of the traced model: the trace's metadata (trace.py writes
    both), else the preset of its name (older traces), else (None, False)."""
    preset = PRESETS.get(str(meta.get("model")))
    n_layers = meta.get("n_layers")
    if not (isinstance(n_layers, int) and n_layers > 0):
        n_layers = preset.n_layers if preset is not None else None
    moe = meta.get("moe")
    if not isinstance(moe, bool):
        moe = preset is not None and preset.is_moe
    return n_layers, moe


def breakdown(trace: dict[str, Any]) -> dict[str, Any]:
    """The breakdown of one decode step (see the module docstring) and the trace's copies."""
    meta = trace.get("infermeter") if isinstance(trace.get("infermeter"), dict) else {}
    n_layers, moe = _model_facts(meta)
    spans = _spans(trace)
    items, source = _work_items(spans)
    ranges = _ranges(spans)
    layers = [r for r in ranges if _LAYER.fullmatch(r[2])]  # not categories: their own figures
    ranges = [r for r in ranges if not _LAYER.fullmatch(r[2])]
    steps = sorted((r for r in ranges if r[2] == "outside"), key=lambda r: r[0])
    if not any(r[2] == "model" for r in ranges):  # compiled: no layer ranges, so "outside the
        ranges = [r for r in ranges if r[2] != "outside"]  # model" says nothing: go by name
    labels = _innermost([i["at"] if i["at"] is not None else i["start"] for i in items], ranges)
    step_of = _innermost([i["at"] if i["at"] is not None else -1.0 for i in items],
                         [(a, b, str(k)) for k, (a, b, _) in enumerate(steps)])
    for item, label in zip(items, labels):
        item["category"] = _category(item["name"], label, item["cat"], moe)
    in_layer = _innermost([i["at"] if i["at"] is not None else -1.0 for i in items], layers)
    for item, layer in zip(items, in_layer):
        item["layer"] = int(layer.split()[1]) if layer else None
    out: dict[str, Any] = {
        "source": "gpu kernels" if source == "gpu" else "cpu ops (CPU op time, not GPU time)",
        "steps_traced": len(steps), "copies": copies(items, ranges, source)}
    per_step: dict[str, list[dict[str, Any]]] = {}
    for item, step in zip(items, step_of):
        if step is not None or not steps:  # no step ranges: the whole trace is the window
            per_step.setdefault(step or "all", []).append(item)
    if not per_step:
        return {**out, "step": None, "categories": []}
    tables = [_step_table(group, meta.get("weight_bytes") or {}) for group in per_step.values()]
    spans_ms = [t["step_ms"] for t in tables]
    pick = min(range(len(tables)),
               key=lambda k: abs(spans_ms[k] - statistics.median_low(spans_ms)))
    window = "decode step (median of the traced steps)" if steps else "whole trace"
    # bubbles against kernels: a GPU figure only (CPU ops nest; their union is the span), of
    # decode steps or of a foreign trace, not of a copy run (its gaps are the case loop's)
    gaps = step_gaps(list(per_step.values()), pick, meta, n_layers) \
        if source == "gpu" and (steps or not out["copies"]) else None
    return {**out, "window": window, "step_ms_all": spans_ms, **tables[pick],
            "model": meta.get("model"), "mode": meta.get("mode"), "step_gaps": gaps}


def _copy_bytes(item: dict[str, Any]) -> int | None:
    """A memcpy's bytes (kineto's `bytes` arg), or a CPU copy_'s from its recorded shape."""
    args = item["args"]
    if isinstance(args.get("bytes"), (int, float)):
        return int(args["bytes"])
    dims, types = args.get("Input Dims"), args.get("Input type")
    if not (isinstance(dims, list) and dims and isinstance(types, list) and types):
        return None
    size = _ELEMENT_BYTES.get(str(types[0]))
    if size is None or not isinstance(dims[0], list):
        return None
    numel = 1
    for d in dims[0]:
        numel *= int(d)
    return numel * size


def copies(items: list[dict[str, Any]], ranges: list[tuple[float, float, str]],
           source: str) -> list[dict[str, Any]]:
    """Copies grouped by (enclosing `im/copy ...` range, kind, bytes): count, time, GB/s."""
    wanted = [i for i in items if (i["cat"] == "gpu_memcpy" if source == "gpu"
                                   else i["name"] == "aten::copy_")]
    case_ranges = [r for r in ranges if r[2].startswith("copy")]
    cases = _innermost([i["at"] if i["at"] is not None else i["start"] for i in wanted],
                       case_ranges)
    groups: dict[tuple[str, str, int], list[float]] = {}
    for item, case in zip(wanted, cases):
        nbytes = _copy_bytes(item)
        if nbytes:
            key = (case[len("copy "):] if case else "-", item["name"], nbytes)
            groups.setdefault(key, []).append(item["end"] - item["start"])  # copy's own span
    rows = []
    for (case, name, nbytes), durations in groups.items():
        median_us = statistics.median(durations)  # GB/s of the median copy: a first touch
        rows.append({"case": case, "name": name, "bytes": nbytes, "count": len(durations),
                     "time_ms": sum(durations) / 1e3, "median_ms": median_us / 1e3,
                     "gbps": nbytes / (median_us * 1e-6) / 1e9 if median_us > 0 else None})
    return rows


def summarize_trace(path: str | Path) -> dict[str, Any]:
    return breakdown(load_trace(path))


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def render_breakdown(result: dict[str, Any], max_copy_rows: int = 20) -> str:
    """The terminal tables: one decode step's categories, then the copies."""
    from infermeter.textable import render_table

    parts = []
    steps, copied = result.get("steps_traced"), result.get("copies")
    # A decode trace shows its step (its copies are the engine's small state copies); a trace
    # without steps (a copy run) shows its copies, or, with none, the whole-trace categories.
    if result.get("categories") and (steps or not copied):
        head = (f"Where one decode step goes ({result['source']}; {result['window']}, "
                f"{result['steps_traced']} traced): {_num(result['step_ms'])} ms, idle "
                f"{_num(result['idle_pct'])}%")
        rows = [(r["name"], f"{r['time_ms']:.4f}", _num(r["share_pct"]),
                 _num(r["weight_bytes"] / 2**20 if r["weight_bytes"] else None),
                 _num(r["gbps"])) for r in result["categories"]]
        parts.append(head + "\n" + render_table(
            ("category", "time ms", "share %", "weights MiB", "GB/s"), rows))
        if result.get("step_gaps"):
            parts.append(render_gaps(result["step_gaps"]))
    if copied and not steps:
        rows = [(c["case"], c["name"][:40], c["bytes"], c["count"], _num(c["median_ms"]),
                 _num(c["gbps"])) for c in result["copies"][:max_copy_rows]]
        more = len(result["copies"]) - max_copy_rows
        table = render_table(("case", "copy", "bytes", "n", "median ms", "GB/s"), rows)
        parts.append("Copies:\n" + table + (f"\n... {more} more" if more > 0 else ""))
    return "\n\n".join(parts) or "no kernels, ops or copies found in the trace"
