"""Cell formatting for report tables: fixed rules, so the same numbers always print the same.

Units follow the seed table and docs/design.md: capacities in MiB/GiB (2^20 / 2^30; the seed's
"256 MB" is 256 MiB), times in ms or s, bandwidth in GB/s with GB = 1e9 bytes, rates in tok/s. A
value that was not measured prints as "-".
"""

from __future__ import annotations

from infermeter.units import format_bytes

MISSING = "-"


def ms(value: float | None) -> str:
    if value is None:
        return MISSING
    if 0 < value < 0.01:  # a tiny CPU copy: two significant digits, not "0.00 ms"
        return f"{value:.2g} ms"
    if value < 10:
        return f"{value:.2f} ms"
    return f"{value:.1f} ms" if value < 100 else f"{value:,.0f} ms"


def seconds(value: float | None) -> str:
    return MISSING if value is None else f"{value:,.2f} s"


def gbps(value: float | None) -> str:
    return MISSING if value is None else f"{value:,.1f} GB/s"


def tok_s(value: float | None) -> str:
    if value is None:
        return MISSING
    return f"{value:.1f} tok/s" if value < 100 else f"{value:,.0f} tok/s"


def pct(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}%"


def count(value: float | None) -> str:
    return MISSING if value is None else f"{value:,.0f}"


def size(value: float | None) -> str:
    return MISSING if value is None else format_bytes(value)


def pair(first: str, second: str) -> str:
    """Two values of one row (htod, dtoh): '4.88 ms, 4.87 ms'; one missing side prints '-'."""
    if first == MISSING and second == MISSING:
        return MISSING
    return f"{first}, {second}"
