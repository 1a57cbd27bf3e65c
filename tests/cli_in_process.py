"""Run the CLI inside the test's own process, answering as `python -m infermeter` would.

A subprocess per call costs a Python start, a torch import and a cold torch.compile each; the
tests that are about the process itself (a traceback never reaching the user, signals, torchrun,
`python -m`) still start one.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
import warnings

from infermeter.cli import main


@contextlib.contextmanager
def _python_warnings(stderr: io.StringIO):
    """Warnings as a fresh interpreter shows them: its default filters, printed to stderr (pytest
    would otherwise collect them, and a stray warning line would pass unseen)."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for category in (ResourceWarning, ImportWarning, PendingDeprecationWarning,
                         DeprecationWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")

        def show(message, category, filename, lineno, file=None, line=None):
            stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

        warnings.showwarning = show
        yield


def run_cli(*argv: str, cwd: str | os.PathLike | None = None, env: dict | None = None,
            merge_stderr: bool = False) -> subprocess.CompletedProcess:
    """main(argv) with stdout and stderr captured: a CompletedProcess with the exit code (a
    SystemExit's as Python reports it, 1 and the traceback on stderr for an uncaught error).
    env: variables set for the call only; merge_stderr: stderr goes into stdout (stderr=STDOUT)."""
    out = io.StringIO()
    err = out if merge_stderr else io.StringIO()
    with contextlib.ExitStack() as stack:
        if cwd is not None:
            stack.enter_context(contextlib.chdir(cwd))
        if env:
            saved = {name: os.environ.get(name) for name in env}
            stack.callback(_restore_environ, saved)
            os.environ.update(env)
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        stack.enter_context(_python_warnings(err))
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = exit_.code
            if code is None:
                code = 0
            elif not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
        except Exception:
            traceback.print_exc(file=sys.stderr)
            code = 1
    return subprocess.CompletedProcess(["infermeter", *argv], code, out.getvalue(),
                                       None if merge_stderr else err.getvalue())


def _restore_environ(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
