"""Numbers the report derives from Results: reload-vs-recompute break-even, plausibility checks.

Break-even. When a sequence's KV cache has been offloaded to host memory and the sequence comes
back, its cache can be reloaded over the link or recomputed by a prefill of its tokens. For a
context of n tokens on one device x model x tp:

- reload(n) = n x KV bytes per token / the measured host-to-device GB/s of the column's
  representative pinned copy (report_select). A copy of a few MiB reaches less than the large
  copy measured, so short contexts reload somewhat slower than this.
- prefill(n) = the measured batch-1 TTFT at prompt length n (prefill of the prompt to the first
  token: the work a recompute repeats; the median of the fastest mode measured at that length)
  where a generate Result has that prompt length; between measured lengths linear between the
  two nearest, below the shortest linear through (0, 0), beyond the longest linear at that
  prompt's prefill throughput. Each row says which. Attention's cost grows with n^2, so a long
  prefill is slower than an extrapolated line: it understates recompute, never reload's advantage.

The rows are the grid 512, 1k, ..., 32k tokens and every measured prompt length, up to the
model's context (max_positions: no sequence of that model is longer, so no row past it says
anything). Reloading "wins from" the shortest row from which reload is faster at that and every
longer row.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from infermeter.report.load import Record
from infermeter.report.select import (
    Column,
    CopyPick,
    batch_size,
    has_timing,
    num,
    pick_copy,
    tpot,
)

CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
NOISY_COV = 0.05  # docs/design.md: flag results whose coefficient of variation is above 5%
FEW_COPY_SAMPLES = 5
FEW_TPOT_SAMPLES = 10


@dataclass(frozen=True)
class BreakEvenRow:
    context: int
    reload_ms: float
    prefill_ms: float
    how: str  # "measured", or how the prefill time was interpolated or extrapolated

    @property
    def measured(self) -> bool:
        return self.how == "measured"

    @property
    def winner(self) -> str:
        return "reload" if self.reload_ms < self.prefill_ms else "recompute"


@dataclass(frozen=True)
class BreakEven:
    reload_gbps: float
    kv_bytes_per_token: float
    prefill_points: tuple[tuple[float, float], ...]  # (prompt tokens, TTFT ms), sorted
    rows: tuple[BreakEvenRow, ...]  # by context
    wins_from: int | None  # None: recompute is faster at the longest row
    # (prompt tokens, prefill path) per prefill point: which engine path the times come from
    prefill_paths: tuple[tuple[float, str], ...] = ()


def prefill_path(record: Record) -> str:
    """The prefill path a generate Result says it ran: "compiled, bucketed, 2,048-token chunks",
    "compiled, exact, eager layers", "eager"; older Results that do not record it say so."""
    cfg = record.config
    mode = str(cfg.get("mode"))
    if "prefill" not in cfg:
        return f"{mode}, prefill path not recorded"
    parts = [mode]
    if mode == "compiled":  # compiled mode prefills bucketed graphs, a layer graph or eager layers
        parts.append("bucketed" if cfg["prefill"] == "bucketed" else
                     "exact, compiled layers" if cfg.get("compile_prefill") else
                     "exact, eager layers")
    chunk = num(cfg.get("prefill_chunk"))
    if chunk:
        parts.append(f"{chunk:,.0f}-token chunks")
    return ", ".join(parts)


def _prefill_choices(records: list[Record]) -> list[tuple[float, float, str]]:
    """Batch-1 (prompt tokens, prefill ms, prefill path): per prompt length the median TTFT of
    each mode, and of those the fastest (a recompute runs the fastest prefill the engine has)."""
    by_len: dict[float, dict[str, list[tuple[float, str]]]] = {}
    for record in records:
        tokens = num(record.config.get("prompt_len"))
        if batch_size(record) != 1 or not tokens:
            continue
        ms = num(record.metrics.get("ttft_ms"))
        rate = num(record.metrics.get("prefill_tok_per_s"))
        if ms is None and rate:
            ms = tokens / rate * 1e3
        if ms and ms > 0:
            mode = str(record.config.get("mode"))
            by_len.setdefault(tokens, {}).setdefault(mode, []).append((ms, prefill_path(record)))
    out = []
    for n, modes in sorted(by_len.items()):
        ms, runs = min(((statistics.median(ms for ms, _ in runs), runs)
                        for runs in modes.values()), key=lambda t: t[0])
        out.append((n, ms, " / ".join(sorted({path for _, path in runs}))))
    return out


def prefill_points(records: list[Record]) -> tuple[tuple[float, float], ...]:
    """Batch-1 (prompt tokens, prefill ms), the fastest mode's median TTFT per prompt length."""
    return tuple((n, ms) for n, ms, _ in _prefill_choices(records))


def prefill_paths(records: list[Record]) -> tuple[tuple[float, str], ...]:
    """Batch-1 (prompt tokens, the prefill path of the Results behind that prefill point)."""
    return tuple((n, path) for n, _, path in _prefill_choices(records))


def _tokens(n: float) -> str:
    return f"{n:,.0f}-token"


def prefill_estimate(points: tuple[tuple[float, float], ...], n: float) -> tuple[float, str]:
    """(prefill ms at n tokens, "measured" or how it was estimated from the measured points)."""
    previous: tuple[float, float] | None = None
    for tokens, ms in points:
        if n == tokens:
            return ms, "measured"
        if n < tokens:
            if previous is None:
                return ms * n / tokens, (f"extrapolated: linear in tokens from the "
                                         f"{_tokens(tokens)} measurement")
            (t0, m0), span = previous, tokens - previous[0]
            return m0 + (ms - m0) * (n - t0) / span, (
                f"interpolated: linear between the {_tokens(t0)} and {_tokens(tokens)} "
                "measurements")
        previous = (tokens, ms)
    tokens, ms = points[-1]
    return ms * n / tokens, f"extrapolated: linear in tokens from the {_tokens(tokens)} measurement"


def prefill_ms(points: tuple[tuple[float, float], ...], n: float) -> float:
    return prefill_estimate(points, n)[0]


def break_even_missing(column: Column) -> str | None:
    """Why the column has no break-even, in a few words; None where it has one."""
    pick = pick_copy(column)
    if not column.copies:
        return "no copy Result"
    if pick is None:
        return "no timed copy case"
    if pick.host != "pinned":
        return (f"its copies are from {pick.host} host memory only (a CPU run has no pinned "
                "memory) and reload is figured from pinned memory")
    if not pick.h2d:
        return "no host-to-device copy case"
    if not pick.kv_bytes or not pick.tokens:
        return "its copy Result does not say the cache size"
    if not prefill_points(column.generates):
        return "no batch-1 generate Result with a prompt length and TTFT"
    return None


def max_positions(column: Column) -> int | None:
    """The longest sequence the column's model holds, from its Results: a generate Result's
    config.max_positions (what it ran with: --max-positions may raise a random model's), else
    a Result's model.max_seq_len; the largest where they differ, None where no Result says."""
    found = []
    for record in (*column.generates, *column.copies, *column.kvs):
        for value in (record.config.get("max_positions"), record.model.get("max_seq_len")):
            n = num(value)
            if n and n > 0:
                found.append(int(n))
    return max(found, default=None)


def _within(contexts: set[int], limit: int | None) -> tuple[int, ...]:
    return tuple(sorted(n for n in contexts if limit is None or n <= limit))


def break_even_contexts(columns: list[Column]) -> tuple[int, ...]:
    """The grid and every batch-1 prompt length measured in any of the columns, up to the
    longest context of their models (a column's own rows stop at its model's: break_even)."""
    measured = {int(n) for c in columns for n, _ in prefill_points(c.generates) if n == int(n)}
    limits = [max_positions(c) for c in columns]
    limit = None if not limits or None in limits else max(limits)
    return _within(set(CONTEXTS) | measured, limit)


def break_even(column: Column, contexts: tuple[int, ...] | None = None) -> BreakEven | None:
    """The column's reload and prefill times at `contexts` (default: the grid and the column's
    own measured prompt lengths), those past its model's context (max_positions) left out."""
    pick, points = pick_copy(column), prefill_points(column.generates)
    if pick is None or pick.h2d is None or break_even_missing(column) is not None:
        return None
    gbps, per_token = num(pick.h2d["gbps"]), pick.kv_bytes / pick.tokens
    wanted = _within(set(contexts or break_even_contexts([column])), max_positions(column))
    if not wanted:
        return None
    rows = tuple(BreakEvenRow(n, n * per_token / (gbps * 1e9) * 1e3, *prefill_estimate(points, n))
                 for n in wanted)
    wins_from = None
    for row in reversed(rows):
        if row.winner != "reload":
            break
        wins_from = row.context
    return BreakEven(gbps, per_token, points, rows, wins_from, prefill_paths(column.generates))


def _copy_checks(pick: CopyPick) -> list[str]:
    out = []
    for direction, case in (("h2d", pick.h2d), ("d2h", pick.d2h)):
        if not case:
            continue
        name = f"copy {direction} {case.get('layout')} {case.get('method')}"
        pct, stats = num(case.get("link_pct")), case.get("stats") or {}
        if pct is not None and pct > 100:
            out.append(f"{name}: {pct:.0f}% of the link peak, more than the link carries")
        if case.get("host_memory") == "pinned" and case.get("host_pinned") is False:
            out.append(f"{name}: asked for pinned host memory, got pageable")
        cov, n = num(stats.get("cov")), num(stats.get("n"))
        if cov is not None and cov > NOISY_COV:
            out.append(f"{name}: noisy, cov {cov:.1%} > {NOISY_COV:.0%}")
        if n is not None and n < FEW_COPY_SAMPLES:
            out.append(f"{name}: only {n:.0f} samples")
    return out


def _generate_checks(record: Record) -> list[str]:
    """Checks a generate Result may not have made itself (older or other writers)."""
    m, out, own = record.metrics, [], " ".join(record.warnings)
    for name, label in (("mbu_pct", "MBU"), ("mfu_pct", "MFU")):
        pct = num(m.get(name))
        if pct is not None and pct > 100 and label not in own:
            out.append(f"{label} {pct:.0f}% > 100%, above the measured roofline")
    step, hbm, rate = (num(m.get(k)) for k in ("bytes_per_decode_step", "hbm_gbps_measured",
                                                "decode_tok_per_s"))
    batch = batch_size(record) or 1
    if step and hbm and rate and rate > batch * hbm * 1e9 / step * 1.001:
        out.append(f"{rate:,.0f} decode tok/s is above the HBM roofline "
                   f"({batch * hbm * 1e9 / step:,.0f} tok/s at {hbm:,.0f} GB/s)")
    # Per-step TPOT spread is not checked: steps differ by design (the context grows); the
    # Result's writer checks the per-run decode time instead.
    stats = m.get("tpot_ms") if isinstance(m.get("tpot_ms"), dict) else {}
    n = num(stats.get("n"))
    if n is not None and n < FEW_TPOT_SAMPLES:
        out.append(f"TPOT from only {n:.0f} decode steps")
    prefill_only = bool(record.config.get("prefill_ladder"))  # `infermeter run` times TTFT only
    if tpot(record, "p50") is None and num(m.get("decode_tok_per_s")) is None \
            and not prefill_only:
        out.append("no decode timing in this Result")
    return out


def _setting(record: Record) -> str:
    cfg = record.config
    if record.kind == "copy":
        return f"copy {cfg.get('batch_size', '?')}×{cfg.get('seq_len', '?')}"
    parts = [f"{label} {cfg[key]}" for key, label in (("batch_size", "batch"),
             ("context", "context"), ("prompt_len", "prompt")) if cfg.get(key) is not None]
    if cfg.get("context") is not None and cfg.get("prompt_len") == cfg.get("context"):
        parts.pop()  # a --context set: its prompt is the context
    parts += [str(cfg["mode"])] if cfg.get("mode") else []
    return f"generate {', '.join(parts)}".strip()


def column_warnings(column: Column) -> list[str]:
    """Every Result's own warnings and the report's plausibility checks, each once.

    The checks cover every timed generate Result of the column (a broken run anywhere in a sweep
    is worth seeing) and the copy cases the tables show.
    """
    out: list[str] = []
    for record in column.copies:
        out += [f"{_setting(record)}: {w}" for w in record.warnings]
    if (pick := pick_copy(column)) is not None:
        out += [f"{_setting(pick.record)}: {w}" for w in _copy_checks(pick)]
    for record in column.generates:
        if has_timing(record):
            checks = list(record.warnings) + _generate_checks(record)
            out += [f"{_setting(record)}: {w}" for w in checks]
    return list(dict.fromkeys(out))
