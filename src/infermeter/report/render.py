"""Text formats of a report: terminal (rich when importable, else plain), markdown, CSV.

Markdown and CSV hold only the tables' cells, the captions and the numbered notes: no time of
day, no absolute paths beyond those given on the command line, so the same Results always give
byte-identical files.
"""

from __future__ import annotations

import csv
import io
import textwrap

from infermeter.report.tables import Report, Table
from infermeter.textable import render_table

TITLE = "infermeter report"


def summary_line(report: Report) -> str:
    return f"{len(report.columns)} column(s): one per device × model × tp."


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in table.header) + " |",
             "|" + " --- |" * len(table.header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def render_markdown(report: Report) -> str:
    parts = [f"# {TITLE}", summary_line(report)]
    for table in report.tables:
        parts += [f"## {table.title}", table.caption, markdown_table(table)]
    if report.notes:
        parts += ["## Notes", "\n".join(f"{i}. {_md_cell(n)}"
                                        for i, n in enumerate(report.notes, start=1))]
    return "\n\n".join(parts) + "\n"


def render_csv(report: Report) -> str:
    """One CSV: per table a header row (table key, row header, column labels), then its rows;
    the notes last as rows ("notes", number, text)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for table in report.tables:
        writer.writerow([table.key] + table.header)
        writer.writerows([table.key] + row for row in table.rows)
    writer.writerows(["notes", i, note] for i, note in enumerate(report.notes, start=1))
    return buffer.getvalue()


def _notes_text(report: Report, width: int) -> str:
    lines = []
    for i, note in enumerate(report.notes, start=1):
        lines += textwrap.wrap(note, width, initial_indent=f"{i:>3}. ", subsequent_indent="     ")
    return "\n".join(lines)


def render_plain(report: Report, width: int = 120) -> str:
    parts = [TITLE, summary_line(report)]
    for table in report.tables:
        parts += [f"== {table.title} ==", render_table(table.header, table.rows),
                  textwrap.fill(table.caption, width)]
    if report.notes:
        parts += ["Notes:", _notes_text(report, width)]
    return "\n\n".join(parts) + "\n"


def render_rich(report: Report, width: int = 160) -> str:
    """rich tables, rendered to text without colour codes (also right for --output files)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table as RichTable

    out = io.StringIO()
    console = Console(file=out, width=width, color_system=None, force_terminal=False,
                      highlight=False, emoji=False, markup=False)
    console.print(TITLE)
    console.print(summary_line(report))
    for table in report.tables:
        rich_table = RichTable(title=table.title, caption=table.caption, box=box.SIMPLE_HEAD,
                               caption_justify="left", show_lines=False)
        for header in table.header:
            rich_table.add_column(header, overflow="fold")
        for row in table.rows:
            rich_table.add_row(*row)
        console.print(rich_table)
    if report.notes:
        console.print("Notes:")
        console.print(_notes_text(report, width - 2))
    return out.getvalue()


def render_terminal(report: Report, width: int = 160) -> str:
    try:
        import rich  # noqa: F401  (optional: the `report` extra)
    except ImportError:
        return render_plain(report, min(width, 120))
    return render_rich(report, width)
