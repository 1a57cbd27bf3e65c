"""The Result schema (v1) and its JSON / JSONL reading and writing.

A Result is what every measuring command produces (docs/design.md, "Result schema"):
  {"schema": 1, "kind": "kv" | "copy" | "generate" | "offload", "model": {...}, "config": {...},
   "env": {...}, "metrics": {...}, "samples": {...}, "warnings": [...]}
plus `output_token_ids` for generate Results.

Writes are atomic: the new content goes to a temporary file in the same folder, which is then
renamed over the target, so a crash or a full disk never leaves a half-written file, and
appending a line never corrupts the lines already there.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infermeter.errors import InfermeterError

SCHEMA_VERSION = 1
KINDS = ("kv", "copy", "generate", "offload")
REQUIRED_FIELDS = ("schema", "kind", "model", "config", "env", "metrics", "samples", "warnings")


@dataclass
class Result:
    kind: str
    model: dict[str, Any]
    config: dict[str, Any]
    env: dict[str, Any]
    metrics: dict[str, Any]
    samples: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    output_token_ids: list[list[int]] | None = None
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Result kind must be one of {KINDS}, got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        out = {"schema": self.schema, **asdict(self)}
        if self.output_token_ids is None:
            del out["output_token_ids"]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "result") -> Result:
        missing = [name for name in REQUIRED_FIELDS if name not in data]
        if missing:
            raise InfermeterError(f"{where}: not an infermeter Result (missing {missing})")
        if data["schema"] != SCHEMA_VERSION:
            raise InfermeterError(f"{where}: Result schema {data['schema']!r} is not supported "
                                  f"(this infermeter reads schema {SCHEMA_VERSION})")
        if data["kind"] not in KINDS:
            raise InfermeterError(f"{where}: unknown Result kind {data['kind']!r}")
        return cls(kind=data["kind"], model=data["model"], config=data["config"],
                   env=data["env"], metrics=data["metrics"], samples=data["samples"],
                   warnings=list(data["warnings"]),
                   output_token_ids=data.get("output_token_ids"))


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write via a temp file in the same folder + rename: never a half-written file.

    A folder that is missing or not writable, or a full disk, is the user's to fix: one
    InfermeterError line, and the temp file is gone.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise InfermeterError(f"{path}: folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as err:
        raise InfermeterError(f"{path}: cannot write there ({err.strerror or err})") from None
    umask = os.umask(0)  # mkstemp makes 0600 files; ours get the usual 0666 minus the umask
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise InfermeterError(f"{path}: cannot write it ({err.strerror or err})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, result: Result) -> None:
    """One Result as a pretty JSON file (replacing any file there)."""
    text = json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n"
    atomic_write(path, text.encode())


def check_output(path: str | Path, names: str = "a JSONL file") -> None:
    """--output can take a file written at the end (its folder exists and takes a new file, it
    is no folder itself): asked before a measurement, so a typo does not cost the minutes of
    timing that come first. names: what --output is for that command (report's: the report
    file)."""
    path = Path(path)
    if path.is_dir():
        raise InfermeterError(f"{path}: a folder; --output names {names}")
    if not path.parent.is_dir():
        raise InfermeterError(f"{path}: folder {path.parent} does not exist")
    # the write is atomic_write's: a temp file in the folder, then a rename; so try that file
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
    except OSError as err:
        raise InfermeterError(f"{path}: cannot write in folder {path.parent} "
                              f"({err.strerror or err})") from None
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)


def check_appendable(path: str | Path) -> None:
    """check_output for a JSONL file that Results are appended to: a file already there must
    hold Results lines (JSON objects), so that appending neither fails after the measurement
    (a binary file) nor mixes Results into another file's text."""
    check_output(path)
    path = Path(path)
    if not path.exists():
        return
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InfermeterError(f"{path}: cannot append Results to it ({err})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            item = None
        if not isinstance(item, dict):
            raise InfermeterError(f"{path}: line {number} is not a JSON object; --output "
                                  "appends Results to a JSONL file of Results")


def append_jsonl(path: Path, results: list[Result]) -> None:
    """Append Results as lines to a JSONL file, rewriting it atomically."""
    path = Path(path)
    old = ""
    if path.exists():
        try:
            old = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise InfermeterError(f"{path}: cannot append to it ({err})") from None
        if old and not old.endswith("\n"):
            old += "\n"
    new = "".join(result.to_json() + "\n" for result in results)
    atomic_write(path, (old + new).encode())


def read_results(path: Path) -> list[Result]:
    """Results from a .json file (one object or a list) or a .jsonl file (one per line)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InfermeterError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InfermeterError(f"{path}: cannot read ({err})") from None
    stripped = text.lstrip()
    if stripped.startswith("[") or (stripped.startswith("{") and "\n{" not in text.strip()):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InfermeterError(f"{path}: not valid JSON ({err})") from None
        items = data if isinstance(data, list) else [data]
        return [_result(item, f"{path}") for item in items]
    results = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise InfermeterError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        results.append(_result(item, f"{path}:{number}"))
    return results


def _result(item: Any, where: str) -> Result:
    if not isinstance(item, dict):
        raise InfermeterError(f"{where}: expected a JSON object")
    return Result.from_dict(item, where)
