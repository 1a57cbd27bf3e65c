"""The report's tables as plain data (title, caption, header, rows of strings) and its notes.

Renderers (report_render, report_html) only lay these out, so every format shows the same cells.
Columns are sorted by device, model and tp, rows are fixed, and no cell holds a time of day, so the
same Results always give the same tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from infermeter.measure.compiler import graphs_built
from infermeter.report import baseline
from infermeter.report import format as fmt
from infermeter.report.derive import BreakEven, break_even, break_even_contexts, max_positions
from infermeter.report.load import Record
from infermeter.report.select import (
    Column,
    CopyPick,
    batch_size,
    context,
    has_timing,
    num,
    pick_copy,
    pick_generate,
    pick_kv,
    tpot,
)

REFERENCE_ROWS = ("KV Cache Size", "Moving Time (htod, dtoh)", "Moving Bandwidth",
                  "Total Tokens", "Token Generation Time", "Token Generation Speed")

REFERENCE_CAPTION = (
    "One column per device × model × tp. Moving: of the column's copy Results the one nearest "
    "batch 1 × 512 tokens, and in it the pinned-host case of the engine layout (per-layer K and V "
    "tensors, as the engine holds them and the seed moved them) with the fastest method, each "
    "direction (the contiguous layout, then paged, where a Result has no engine layout); time to "
    "move the whole cache one way, htod then dtoh. A column without any pinned case (a CPU run) "
    "shows its pageable case, then the seed's, with the host memory named in the cell. Tokens: "
    "a batch-1, fixed-length generate Result of more than 2 new tokens (compiled mode first, "
    "then eager; the seed's shape "
    "first: cache nearest 512 tokens, new tokens nearest 432, context nearest 512); Token "
    "Generation Speed = "
    "total tokens / generation time, prefill included, as the seed computed it. MiB = 2^20 bytes, "
    "GB/s = 1e9 bytes/s; '-' = not measured for that column.")

EXTENDED_CAPTION = (
    "The same columns and representative Results as the reference table. Link %: the moving "
    "bandwidth against the link's peak per direction. TTFT: prefill of the prompt to the first "
    "token; TTFT floor: the larger of the prefill's bytes (weights once, K/V written) at the "
    "measured HBM bandwidth and its FLOPs at the measured matmul peak, with the one that sets it; "
    "TPOT: one decode step (median / p90); decode speed excludes prefill; MBU (decode), prefill "
    "MBU, MFU (prefill): against the HBM bandwidth and matmul FLOP/s measured in the same run; "
    "prefill compute-bound from: the shortest prompt whose FLOPs outlast its bytes there. "
    "Warm-up: compile and CUDA-graph capture before the timed runs, in none of the figures "
    "above; 'whole run' for `infermeter run` (its reference prompt and prefill ladder summed); "
    "whether the process compiled afresh or loaded its compiled graphs from the compiler's "
    "cache, which can change a step's speed. "
    "Warnings: the "
    "Results' own and the report's plausibility checks, listed in the notes.")

BREAKEVEN_CAPTION = (
    "Reload a sequence's KV cache from pinned host memory, or recompute it with a prefill? "
    "Reload = tokens × KV bytes per token / the column's measured htod GB/s (the copy Result's "
    "engine layout, per-layer K and V). Prefill = the measured batch-1 TTFT (prefill of the "
    "prompt to the first token; the fastest mode's median) at that prompt length, each cell says "
    "'measured'; rows are the grid 512-32,768 tokens and every measured prompt length, up to "
    "the model's context (its max positions; a column of a shorter-context model says '-' past "
    "its own). Where a "
    "column has no Result of that length the cell says how the time was estimated: interpolated "
    "linearly between the two nearest measured lengths, or extrapolated linearly in tokens from "
    "the nearest one (its prefill throughput). Attention makes real long prefills slower than "
    "that line, so an extrapolated recompute is if anything understated. 'Prefill path' names "
    "the path the measured points ran (mode; in compiled mode bucketed graphs or exact lengths; "
    "chunk size) and says 'mixed paths' with the lengths of each where they differ, since a "
    "table's points then do not all measure one engine path. Only columns with both "
    "copy and generate Results.")


@dataclass
class Table:
    key: str
    title: str
    caption: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Report:
    tables: list[Table]
    notes: list[str]
    columns: list[Column] = field(default_factory=list)
    offloads: list[Record] = field(default_factory=list)  # the offload tables' and plots' Results


def _case_label(case: dict[str, Any] | None) -> str:
    if not case:
        return fmt.MISSING
    layout = case.get("layout")
    if layout == "paged":
        layout = f"paged/{case.get('block_tokens')}"
    host = case.get("host_memory")
    return f"{layout} {case.get('method')}" + (f" ({host} host)" if host != "pinned" else "")


def _host_label(cell: str, pick: CopyPick | None) -> str:
    """A moving figure from other than pinned host memory says so (a CPU run has no pinned)."""
    if pick is None or pick.host == "pinned" or cell == fmt.MISSING:
        return cell
    return f"{cell} ({pick.host} host memory)"


def _kv_cell(column: Column, pick: CopyPick | None) -> str:
    if pick and pick.kv_bytes:
        cfg = pick.record.config
        rank = " per rank" if column.key.tp > 1 else ""  # each rank moves its own KV shard
        return f"{fmt.size(pick.kv_bytes)}{rank} ({cfg.get('batch_size')}×{cfg.get('seq_len')})"
    kv = pick_kv(column)
    if kv:
        cfg = kv.config
        return (f"{fmt.size(num(kv.metrics['kv_cache_bytes']))} ({cfg.get('batch_size')}×"
                f"{cfg.get('seq_len')}, analytic)")
    gen = pick_generate(column)
    return fmt.size(num(gen.metrics.get("kv_cache_bytes"))) if gen else fmt.MISSING


def reference_cells(column: Column) -> list[str]:
    if column.seed is not None:
        return baseline.reference_cells()
    pick, gen = pick_copy(column), pick_generate(column)
    h2d, d2h = (pick.h2d, pick.d2h) if pick else (None, None)

    def case(c: dict[str, Any] | None, name: str) -> float | None:
        return num(c.get(name)) if c else None

    m = gen.metrics if gen else {}
    return [_kv_cell(column, pick),
            _host_label(fmt.pair(fmt.ms(case(h2d, "moving_time_ms")),
                                 fmt.ms(case(d2h, "moving_time_ms"))), pick),
            _host_label(fmt.pair(fmt.gbps(case(h2d, "gbps")), fmt.gbps(case(d2h, "gbps"))), pick),
            fmt.count(num(m.get("total_tokens"))), fmt.seconds(num(m.get("generation_time_s"))),
            fmt.tok_s(num(m.get("token_generation_speed")))]


def _generate_setting(gen: Record | None) -> str:
    if not gen:
        return fmt.MISSING
    cfg = gen.config
    parts = [str(cfg[k]) for k in ("mode", "dtype") if cfg.get(k)]
    parts += [f"{label} {cfg[k]}" for k, label in (("batch_size", "batch"), ("prompt_len",
              "prompt"), ("context", "context")) if cfg.get(k) is not None]
    # the kernels the Result says ran (older Results may not say)
    parts += [f"{cfg['decode_attention']} attention"] if cfg.get("decode_attention") else []
    parts += ["Triton GEMV"] if cfg.get("matvec_kernel") == "triton" else []
    parts += [f"{cfg['step_kernels']} step"] if cfg.get("step_kernels") not in (None, "split") \
        else []
    parts += ["PDL"] if cfg.get("pdl") else []
    all_reduce = cfg.get("tp_all_reduce")
    parts += [f"{all_reduce} all-reduce"] if all_reduce not in (None, "nccl") else []
    return ", ".join(parts) or fmt.MISSING


def _best_batch(column: Column) -> str:
    rated = [(num(r.metrics.get("decode_tok_per_s")), batch_size(r) or 0, r.source)
             for r in column.generates if num(r.metrics.get("decode_tok_per_s"))]
    if not rated:
        return fmt.MISSING
    rate, batch, _ = max(rated, key=lambda t: (t[0], -t[1], t[2]))
    return f"{fmt.tok_s(rate)} (batch {batch:.0f})"


def _breakeven_cell(result: BreakEven | None) -> str:
    if result is None:
        return fmt.MISSING
    if result.wins_from is None:
        return f"recompute faster up to {result.rows[-1].context:,} tokens"
    ratios = [r.prefill_ms / r.reload_ms for r in result.rows if r.context >= result.wins_from]
    low, high = f"{min(ratios):.1f}", f"{max(ratios):.1f}"
    span = low if low == high else f"{low}-{high}"
    first, last = result.rows[0].context, result.rows[-1].context
    if result.wins_from == first:
        return f"every context {first:,}-{last:,} tokens (reload {span}× faster)"
    return f"{result.wins_from:,} tokens (reload {span}× faster from there)"


def extended_cells(column: Column, warning_ref: str) -> list[str]:
    if column.seed is not None:
        return [fmt.MISSING] * (len(EXTENDED_ROWS) - 1) + [warning_ref]
    pick, gen = pick_copy(column), pick_generate(column)
    link = pick.record.metrics if pick else {}
    m = gen.metrics if gen else {}
    h2d, d2h = (pick.h2d, pick.d2h) if pick else (None, None)
    p50, p90 = (tpot(gen, "p50"), tpot(gen, "p90")) if gen else (None, None)
    return [
        str(link.get("link_description") or fmt.gbps(num(link.get("link_peak_gbps")))),
        fmt.pair(fmt.pct(num((h2d or {}).get("link_pct"))),
                 fmt.pct(num((d2h or {}).get("link_pct")))),
        fmt.pair(_case_label(h2d), _case_label(d2h)),
        _generate_setting(gen),
        fmt.ms(num(m.get("ttft_ms"))), _ttft_floor(m),
        f"{fmt.ms(p50)} / {fmt.ms(p90)}" if p50 is not None else fmt.MISSING,
        fmt.tok_s(num(m.get("decode_tok_per_s"))),
        _best_batch(column),
        fmt.tok_s(num(m.get("prefill_tok_per_s"))),
        fmt.pct(num(m.get("mbu_pct"))), fmt.pct(num(m.get("prefill_mbu_pct"))),
        fmt.pct(num(m.get("mfu_pct"))), _crossover(gen),
        fmt.gbps(num(m.get("hbm_gbps_measured"))),
        _warmup_cell(m),
        _breakeven_cell(break_even(column)),
        warning_ref]


EXTENDED_ROWS = ("Link", "Link % (htod, dtoh)", "Moving case (htod, dtoh)", "Generate setting",
                 "TTFT", "TTFT floor", "TPOT p50 / p90", "Decode speed",
                 "Decode speed, best batch", "Prefill speed", "MBU", "Prefill MBU", "MFU",
                 "Prefill compute-bound from", "HBM bandwidth measured", "Warm-up (not timed)",
                 "Reload wins from", "Warnings")


def _warmup_cell(m: dict) -> str:
    """`infermeter run`'s whole generate warm-up where the Result carries it (run_warmup_s:
    the reference prompt and the prefill ladder), else the case's own (warmup_s); then how the
    case's process got its compiled step (_compiled_how)."""
    how = _compiled_how(m.get("compiler"))
    total = num(m.get("run_warmup_s"))
    if total is None:
        own = num(m.get("warmup_s"))
        return fmt.MISSING if own is None else \
            f"{fmt.seconds(own)} ({'; '.join(['this case', *how])})"
    parts = m.get("run_warmup_parts") or {}
    reference, ladder = num(parts.get("reference_s")), num(parts.get("prefill_ladder_s"))
    split = [f"reference prompt {fmt.seconds(reference)}"] if reference is not None else []
    split += [f"prefill ladder {fmt.seconds(ladder)}"] if ladder is not None else []
    notes = [" + ".join(split)] if split else []
    return f"{fmt.seconds(total)}, whole run" + \
        (f" ({'; '.join(notes + how)})" if notes or how else "")


def _compiled_how(compiler: Any) -> list[str]:
    """["compiled afresh"] or ["loaded from the compiler's cache"] by the Result's
    metrics.compiler (measure/compiler.py); [] where it has none or compiled nothing. The two
    kinds of process may run one step at different speeds (docs/generate.md, "Comparing two
    runs"), so a column says which it came from."""
    made, loaded = graphs_built(compiler)
    if made:
        return ["compiled afresh"]
    return ["loaded from the compiler's cache"] if loaded else []


def _ttft_floor(m: dict) -> str:
    """The TTFT's roofline floor and the regime that sets it: '3.21 ms (memory)'."""
    floor, bound = num(m.get("ttft_floor_ms")), m.get("prefill_bound")
    return fmt.ms(floor) + (f" ({bound})" if floor is not None and bound else "")


def _crossover(gen: Any) -> str:
    """The prompt length where the Result's prefill turns compute-bound, at its batch."""
    length = num(gen.metrics.get("prefill_crossover_len")) if gen else None
    return fmt.MISSING if length is None else \
        f"{length:,.0f} tokens (batch {batch_size(gen) or 1:.0f})"


def _transpose(columns: list[Column], cells: list[list[str]], labels: tuple[str, ...]) \
        -> list[list[str]]:
    return [[label] + [col[i] for col in cells] for i, label in enumerate(labels)]


def _prefill_path_cell(result: BreakEven) -> str:
    """The path behind the measured prefill points: one path, or each path with its lengths
    ("mixed paths: eager (80); compiled, bucketed (512, 2,048)") where they differ."""
    by_path: dict[str, list[str]] = {}
    for n, path in result.prefill_paths:
        by_path.setdefault(path, []).append(f"{n:,.0f}")
    if len(by_path) <= 1:
        return next(iter(by_path), fmt.MISSING)
    return "mixed paths: " + "; ".join(f"{path} ({', '.join(lengths)})"
                                       for path, lengths in by_path.items())


def breakeven_table(columns: list[Column]) -> Table | None:
    usable = [c for c in columns if c.seed is None and break_even(c)]
    contexts = break_even_contexts(usable)
    derived = [(c, b) for c in usable if (b := break_even(c, contexts))]
    if not derived:
        return None
    rows = [["KV per token, htod"] + [f"{fmt.size(b.kv_bytes_per_token)} at "
                                      f"{fmt.gbps(b.reload_gbps)}" for _, b in derived]]
    rows.append(["Prefill points (tokens: TTFT)"] + [", ".join(
        f"{n:,.0f}: {fmt.ms(t)}" for n, t in b.prefill_points) for _, b in derived])
    rows.append(["Prefill path of the points"] + [_prefill_path_cell(b) for _, b in derived])
    for n in contexts:  # a column's rows stop at its model's context (derive.max_positions)
        cells = []
        for c, b in derived:
            row = next((r for r in b.rows if r.context == n), None)
            cells.append(f"- (past the model's {max_positions(c):,} positions)" if row is None
                         else f"{fmt.ms(row.reload_ms)} vs {fmt.ms(row.prefill_ms)}: "
                         f"{row.winner} ({row.how})")
        rows.append([f"{n:,} tokens (reload vs prefill)"] + cells)
    return Table("breakeven", "Reload vs recompute", BREAKEVEN_CAPTION,
                 ["Context"] + [c.key.label for c, _ in derived], rows)


def column_sources(column: Column) -> str:
    if column.seed is not None:
        return f"{column.key.label}: {column.seed['source']}"
    pick, gen = pick_copy(column), pick_generate(column)
    parts = []
    if pick:
        parts.append(f"moving from {pick.record.source}")
    if gen:
        parts.append(f"tokens from {gen.source} (context {fmt.count(context(gen))})")
    none = "no usable copy Result, no generate Result timing generation"
    return f"{column.key.label}: " + ("; ".join(parts) or none)


def unused_notes(columns: list[Column], dropped: Sequence[Column] = ()) -> list[str]:
    """A note for each generate Result the tables leave out: untimed ones, and the timed
    prefill-only ones (TTFT runs) of a `dropped` column (one with nothing else to show; in a
    shown column they feed the prefill and reload-vs-recompute rows)."""
    out = []
    for column in [*columns, *dropped]:
        for record in column.generates:
            if has_timing(record):
                if column in dropped:  # TTFT runs only: their prefill is their figure
                    out.append(f"{record.source}: a prefill-only generate Result "
                               f"({record.config.get('max_new_tokens')} new tokens) of a "
                               "machine and model with no generation timed, not in the tables")
                continue
            what = record.config.get("benchmark")
            why = (" (out of memory)" if record.metrics.get("oom") is True
                   else f" (benchmark {what})" if what else "")
            out.append(f"{record.source}: a generate Result without timing metrics{why}, "
                       "not in the tables")
    return out


def reference_numbers(column: Column) -> dict[str, float | None]:
    """The headline figures as numbers (for the bar chart), None where not measured."""
    if column.seed is not None:
        return baseline.headline_numbers()
    pick, gen = pick_copy(column), pick_generate(column)
    m = gen.metrics if gen else {}
    pinned = pick if pick and pick.host == "pinned" else None  # the chart's bars are pinned
    return {"h2d_gbps": num(pinned.h2d.get("gbps")) if pinned and pinned.h2d else None,
            "tok_per_s": num(m.get("token_generation_speed")),
            "tpot_ms": tpot(gen, "p50") if gen else None, "ttft_ms": num(m.get("ttft_ms"))}
