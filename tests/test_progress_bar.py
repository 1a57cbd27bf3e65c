"""`infermeter generate`'s progress bar (generate/table.py): drawn by rich on a terminal's
stderr, one step per warm-up and per timed run; off with --json, off when stderr is not a
terminal, and a plain install without rich runs the same command with no bar."""

from __future__ import annotations

import io
import json
import re
import sys

import pytest

from infermeter.cli import main
from infermeter.generate.job import run_generate
from infermeter.generate.request import build_request
from infermeter.generate.table import ProgressBar, progress_bar

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ARGS = ["generate", "--model", "debug", "--device", "cpu", "--max-new-tokens", "3",
        "--repeats", "2", "--warmup", "0", "--no-roofline"]


class Terminal(io.StringIO):
    """stderr that says it is a terminal (what progress_bar and rich both ask)."""

    def isatty(self) -> bool:
        return True


def use_terminal(monkeypatch) -> Terminal:
    """sys.stderr becomes a terminal; rich's own overrides of that guess are cleared. Called in
    the test itself: pytest's capturing sets sys.stderr again after the fixtures."""
    for name in ("TTY_COMPATIBLE", "FORCE_COLOR", "NO_COLOR", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("COLUMNS", "120")
    stderr = Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    return stderr


def test_the_bar_draws_on_a_terminal_and_advances_once_per_run(monkeypatch):
    pytest.importorskip("rich")
    terminal = use_terminal(monkeypatch)
    request = build_request(source="random:debug", device="cpu", max_new_tokens=3, repeats=3,
                              warmup=0, roofline=False, batch_sizes=(1, 2), prompt_lens=(4,))
    with progress_bar(enabled=True) as bar:
        assert isinstance(bar, ProgressBar)
        run_generate(request, {"device_name": "cpu"}, progress=bar)
        (task,) = bar.bar.tasks
        # 2 cases x (warm-up + 3 runs), every step taken, the label the last run's
        assert task.total == 8 and task.completed == 8
        assert task.description == "batch 2, prompt 4, eager: run 3/3"
    text = ANSI.sub("", terminal.getvalue())
    assert "generate" in text and "8/8" in text and "run 3/3" in text


def test_advance_before_start_is_ignored():
    class Bar:
        def update(self, *args, **kwargs):
            raise AssertionError("no task yet")

    ProgressBar(Bar()).advance("warm-up")


@pytest.mark.parametrize("enabled, stderr", [(False, Terminal()), (True, io.StringIO())],
                         ids=["disabled", "not-a-terminal"])
def test_no_bar_when_disabled_or_not_on_a_terminal(enabled, stderr, monkeypatch):
    monkeypatch.setattr(sys, "stderr", stderr)
    with progress_bar(enabled=enabled) as bar:
        assert bar is None
    assert stderr.getvalue() == ""


def test_the_command_draws_the_bar_on_stderr_but_not_with_json(capsys, monkeypatch):
    pytest.importorskip("rich")
    terminal = use_terminal(monkeypatch)
    assert main(ARGS) == 0
    assert "batch" in capsys.readouterr().out  # the table on stdout
    assert "3/3" in ANSI.sub("", terminal.getvalue())  # the bar: warm-up + 2 runs
    terminal.seek(0)
    terminal.truncate()
    assert main([*ARGS, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "generate"
    assert terminal.getvalue() == ""  # --json: stdout is for machines, stderr stays quiet


def test_without_rich_the_command_runs_with_no_bar(capsys, monkeypatch):
    terminal = use_terminal(monkeypatch)
    for name in ("rich", "rich.console", "rich.progress"):
        monkeypatch.setitem(sys.modules, name, None)  # `import rich...` raises ImportError
    with pytest.raises(ImportError):
        import rich.progress  # noqa: F401
    assert main(ARGS) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:2] == ["batch", "prompt"] for line in lines)
    assert terminal.getvalue() == ""
