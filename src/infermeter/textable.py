"""Plain-text tables for the terminal: no dependency, aligned columns, numbers right-aligned."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _is_number(text: str) -> bool:
    stripped = text.replace(",", "").replace(".", "", 1).replace("%", "").strip()
    return stripped.lstrip("-+").isdigit()


def render_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        parts = [c.rjust(w) if _is_number(c) else c.ljust(w) for c, w in zip(row, widths)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])
