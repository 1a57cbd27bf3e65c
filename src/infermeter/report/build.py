"""`infermeter report`: many Results -> tables (terminal, markdown, CSV, HTML) and PNG plots.

Reads Results only, never a live model (docs/design.md). The parts:

  report_load    files, folders and JSONL -> Records; bad files skipped with a warning
  report_select  columns (device x model x tp) and their representative Results and cases
  report_derive  reload-vs-recompute break-even, plausibility checks
  report_tables  the tables and notes as plain strings
  report_step_gaps  the decode step's kernels and gaps (--trace on a GPU)
  report_offload the offload Results' tables; report_offload_plot  their TTFT-vs-prefix plots
  report_render  terminal / markdown / CSV;  report_html  the HTML page;  report_plots  PNGs
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from infermeter.errors import InfermeterError
from infermeter.measure.result import atomic_write
from infermeter.report.baseline import seed_column
from infermeter.report.derive import break_even_missing, column_warnings
from infermeter.report.load import Record, load_records, require_records
from infermeter.report.offload import offload_notes, offload_tables
from infermeter.report.select import (
    COLUMN_KINDS,
    Column,
    column_key,
    group_columns,
    times_generation,
)
from infermeter.report.step_gaps import step_gaps_notes, step_gaps_table
from infermeter.report.tables import (
    EXTENDED_CAPTION,
    EXTENDED_ROWS,
    REFERENCE_CAPTION,
    REFERENCE_ROWS,
    Report,
    Table,
    breakeven_table,
    column_sources,
    extended_cells,
    reference_cells,
    unused_notes,
)

FORMATS = ("terminal", "markdown", "csv", "html")
_SUFFIX_FORMATS = {".md": "markdown", ".markdown": "markdown", ".csv": "csv", ".html": "html",
                   ".htm": "html", ".txt": "terminal"}
PLOTS_NEED = "plots need matplotlib: pip install 'infermeter[report]'"


def choose_format(fmt: str | None, output: str | None) -> str:
    """--format if given; else from --output's suffix (.md, .csv, .html, .txt: terminal text),
    where any other suffix is an error rather than a guess; else (printing) terminal."""
    if fmt:
        return fmt
    if not output:
        return "terminal"
    suffix = Path(output).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise InfermeterError(
            f"--output {output}: cannot tell the report format from "
            f"{f'the suffix {suffix!r}' if suffix else 'a name without a suffix'}; name the file "
            ".md, .csv, .html or .txt (terminal text), or give --format")
    return _SUFFIX_FORMATS[suffix]


def check_plots_folder(folder: str) -> None:
    """--plots can be written (matplotlib installed, not an existing file): asked before the
    report is made, so a bad --plots prints no report first."""
    if not _plots_available():
        raise InfermeterError(PLOTS_NEED)
    if Path(folder).exists() and not Path(folder).is_dir():
        raise InfermeterError(f"--plots {folder}: a file, not a folder")


def build_report(paths: Sequence[str], with_seed: bool = False,
                 warn: Callable[[str], None] | None = None, root: Path | None = None) -> Report:
    """The report; `warn` gets one line per skipped input (naming it and why), before the
    error that no Results at all were found, so the user sees why. root: the notes name the
    Results' files relative to it (load.load_records)."""
    loaded = load_records(paths, root)
    for line in loaded.skipped if warn else []:
        warn(line)
    require_records(list(paths), loaded)
    columns, kvs = group_columns(loaded.records)
    # A machine and model with nothing to show (only untimed generate Results: a sweep's
    # start-to-exit log, an out-of-memory case; or prefill-only ones, TTFT runs) gets no
    # column of dashes, only its notes.
    empty = [c for c in columns if not c.copies and not any(map(times_generation, c.generates))]
    columns = [c for c in columns if c not in empty]
    if with_seed:
        columns.insert(0, seed_column())
    return assemble(columns, loaded.records, kvs, empty)


def _warning_ref(warnings: list[str], first: int) -> str:
    if not warnings:
        return "none"
    if len(warnings) == 1:
        return f"1 (note {first})"
    return f"{len(warnings)} (notes {first}-{first + len(warnings) - 1})"


def assemble(columns: list[Column], records: list[Record], kvs: list[Record],
             empty: Sequence[Column] = ()) -> Report:
    notes = [column_sources(c) for c in columns]
    refs = []
    for column in columns:
        warnings = column_warnings(column) if column.seed is None else []
        refs.append(_warning_ref(warnings, len(notes) + 1))
        notes += [f"{column.key.label}: {w}" for w in warnings]
    notes += [f"{r.source}: {note}" for r in sorted(records, key=lambda r: r.source)
              for note in r.notes]
    notes += unused_notes(columns, empty)
    notes += [f"{r.source}: {r.kind} Result of {r.model.get('name')}, not in these tables "
              f"(`infermeter {r.kind}` prints its own)" for r in records
              if r.kind not in (*COLUMN_KINDS, "kv", "offload")]
    notes += offload_notes(records)
    notes += step_gaps_notes(columns)
    named = {(c.key.model, c.key.tp) for c in columns}
    notes += [f"{r.source}: kv Result of {r.model.get('name')} (analytic), no measured column "
              "of that model and tp to size" for r in kvs
              if (column_key(r).model, column_key(r).tp) not in named]
    labels = [c.key.label for c in columns]
    reference = Table("reference", "Reference table", REFERENCE_CAPTION, ["Device"] + labels,
                      _rows(REFERENCE_ROWS, [reference_cells(c) for c in columns]))
    extended = Table("extended", "Extended table", EXTENDED_CAPTION, ["Device"] + labels,
                     _rows(EXTENDED_ROWS, [extended_cells(c, ref)
                                           for c, ref in zip(columns, refs)]))
    tables = [reference, extended]
    if (gaps := step_gaps_table(columns)) is not None:
        tables.append(gaps)
    if (derived := breakeven_table(columns)) is not None:
        tables.append(derived)
    else:
        why = [f"{c.key.label}: {reason}" for c in columns
               if c.seed is None and (reason := break_even_missing(c))]
        notes.append("Reload vs recompute: no break-even was derived; "
                     + ("; ".join(why) or "no measured column"))
    tables += offload_tables(records)
    return Report(tables, notes, columns, [r for r in records if r.kind == "offload"])


def _rows(labels: Sequence[str], cells: list[list[str]]) -> list[list[str]]:
    return [[label] + [column[i] for column in cells] for i, label in enumerate(labels)]


def _plots_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def all_plots(report: Report) -> list:
    """The columns' plots, then one per offload Result (report_plots, report_offload_plot)."""
    from infermeter.report.offload_plot import offload_plots
    from infermeter.report.plots import make_plots

    return make_plots(report.columns) + offload_plots(report.offloads)


def html_page(report: Report) -> str:
    from infermeter.report.html import render_html

    if not _plots_available():
        return render_html(report, [], PLOTS_NEED)
    return render_html(report, all_plots(report))


def render(report: Report, fmt: str, width: int = 160) -> str:
    from infermeter.report import render as text

    if fmt == "markdown":
        return text.render_markdown(report)
    if fmt == "csv":
        return text.render_csv(report)
    if fmt == "html":
        return html_page(report)
    if fmt == "terminal":
        return text.render_terminal(report, width)
    raise InfermeterError(f"unknown report format {fmt!r}; use one of {', '.join(FORMATS)}")


def write_plots(report: Report, folder: str) -> list[Path]:
    """Every plot as a PNG file in `folder` (created if missing), each written atomically."""
    if not _plots_available():
        raise InfermeterError(PLOTS_NEED)
    target = Path(folder)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InfermeterError(f"{folder}: cannot create the plots folder ({err})") from None
    written = []
    for plot in all_plots(report):
        atomic_write(target / plot.name, plot.png)
        written.append(target / plot.name)
    return written
