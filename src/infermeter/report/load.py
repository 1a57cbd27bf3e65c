"""Read Results for `infermeter report`: files, folders and JSONL, leniently.

`results.read_results` is strict (one bad line fails the file, another schema is refused), which
is right for a tool reading its own output back. A report joins files from many machines and
versions, so here every file and line stands alone: what is not a Result is skipped with a
warning naming it, and a Result of another schema or with fields missing is kept with a note
saying so, and rendered as far as its fields allow.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infermeter.errors import InfermeterError
from infermeter.measure.result import KINDS, REQUIRED_FIELDS, SCHEMA_VERSION

SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class Record:
    """One Result as the report sees it: its parts, where it came from, what was off about it."""

    kind: str
    model: dict[str, Any]
    config: dict[str, Any]
    env: dict[str, Any]
    metrics: dict[str, Any]
    warnings: tuple[str, ...]
    source: str  # "path" or "path:line"
    notes: tuple[str, ...] = ()  # schema or missing-field notes, shown in the report


@dataclass
class Loaded:
    records: list[Record] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one line each: "<where>: <why>"
    files: int = 0


def collect_files(paths: Iterable[str | Path], loaded: Loaded) -> list[Path]:
    """Files named, plus *.json / *.jsonl under folders (recursive, sorted, hidden skipped)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = [p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file()
                     and not any(part.startswith(".") for part in p.relative_to(path).parts)]
            files += sorted(found)
        elif path.is_file():
            files.append(path)
        else:
            loaded.skipped.append(f"{path}: no such file or folder")
    return list(dict.fromkeys(files))  # a file named twice (folder + file) is read once


def load_records(paths: Iterable[str | Path], root: Path | None = None) -> Loaded:
    """The Results in `paths` (files, or folders searched); each Record's source names its file
    and line, relative to `root` where given (a report written beside its Results names them
    so wherever the folder goes)."""
    loaded = Loaded()
    base = root.resolve() if root is not None else None
    for path in collect_files(paths, loaded):
        loaded.files += 1
        full = path.resolve()
        inside = base is not None and full.is_relative_to(base)
        _load_file(path, loaded, str(full.relative_to(base)) if inside else str(path))
    return loaded


def _load_file(path: Path, loaded: Loaded, name: str) -> None:
    """Read `path`, naming it `name` in every source and skip line."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        loaded.skipped.append(f"{name}: cannot read ({type(err).__name__}: {err})")
        return
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        data = None  # not one JSON document: read it as JSONL, line by line
    if data is not None:
        items = data if isinstance(data, list) else [data]
        if not any(isinstance(item, dict) for item in items):  # one line for the whole file
            _add(data, name, loaded)
            return
        suffix = len(items) > 1
        wheres = [f"{name}[{index}]" if suffix else name
                  for index in range(1, len(items) + 1)]
        records = [to_record(item, where) for item, where in zip(items, wheres)]
        if suffix and all(isinstance(r, str) for r in records):  # e.g. a script's own log
            loaded.skipped.append(f"{name}: not infermeter Results (a list of {len(items)} "
                                  f"items, none a Result)")
            return
        for record, where in zip(records, wheres):
            _keep(record, where, loaded)
        return
    # bytes, line by line: one line that is not UTF-8 (a log line, a truncated write) is skipped
    # alone, not the whole file with it
    lines = [(n, line) for n, line in enumerate(raw.splitlines(), start=1) if line.strip()]
    if not lines:
        loaded.skipped.append(f"{name}: empty")
        return
    kept, skipped = len(loaded.records), len(loaded.skipped)
    for number, line in lines:
        try:
            item = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            loaded.skipped.append(f"{name}:{number}: not UTF-8 text")
            continue
        except json.JSONDecodeError as err:
            loaded.skipped.append(f"{name}:{number}: not JSON ({err.msg})")
            continue
        _add(item, f"{name}:{number}", loaded)
    if len(lines) > 1 and len(loaded.records) == kept:  # no line a Result (a log, a text file):
        first = loaded.skipped[skipped].removeprefix(f"{name}:")  # one warning, not one a line
        del loaded.skipped[skipped:]
        loaded.skipped.append(f"{name}: not infermeter Results ({len(lines)} lines, none a "
                              f"Result; line {first})")


def _add(item: Any, where: str, loaded: Loaded) -> None:
    _keep(to_record(item, where), where, loaded)


def _keep(record: Record | str, where: str, loaded: Loaded) -> None:
    """A Record joins the report; a reason (to_record's string) becomes a skip warning."""
    if isinstance(record, str):
        loaded.skipped.append(f"{where}: {record}")
    else:
        loaded.records.append(record)


def to_record(item: Any, where: str) -> Record | str:
    """A Record, or the reason (a string) why `item` is not a Result at all."""
    if not isinstance(item, dict):
        return f"not an infermeter Result (a JSON {type(item).__name__}, not an object)"
    kind = item.get("kind")
    if kind not in KINDS or not isinstance(item.get("metrics"), dict):
        return (f"not an infermeter Result (kind {kind!r}, metrics "
                f"{'present' if 'metrics' in item else 'missing'})")
    notes = []
    schema = item.get("schema")
    if schema != SCHEMA_VERSION:
        notes.append(f"schema {schema!r}, this infermeter writes {SCHEMA_VERSION}: read by "
                     "field name, so numbers under other names are missing")
    missing = [name for name in REQUIRED_FIELDS if name not in item]
    if missing:
        notes.append(f"fields missing: {', '.join(missing)}")

    def part(name: str) -> dict[str, Any]:
        value = item.get(name)
        return value if isinstance(value, dict) else {}

    raw_warnings = item.get("warnings")
    warnings = tuple(str(w) for w in raw_warnings) if isinstance(raw_warnings, list) else ()
    return Record(kind=kind, model=part("model"), config=part("config"), env=part("env"),
                  metrics=item["metrics"], warnings=warnings, source=where, notes=tuple(notes))


def require_records(paths: list[str], loaded: Loaded) -> None:
    """No Results at all is a user error: one line naming what was read."""
    if loaded.records:
        return
    named = ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
    raise InfermeterError(f"no infermeter Results in {named} ({loaded.files} file(s) read, "
                          f"{len(loaded.skipped)} skipped)")
