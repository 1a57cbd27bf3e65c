"""`infermeter report`: tables and plots from Results of many machines and models."""

from __future__ import annotations

import argparse
import os
import sys

from infermeter.errors import InfermeterError


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    from infermeter.report.build import FORMATS

    p = sub.add_parser("report", help="tables and plots from Results of many machines and models",
                       description="Join Results (files, folders searched for *.json and "
                       "*.jsonl, JSONL) into the reference table, an extended table, the "
                       "reload-vs-recompute break-even and, in HTML, plots. Inputs that are "
                       "not Results are skipped with a warning.")
    p.add_argument("paths", nargs="+", metavar="RESULT",
                   help="Result files (.json, .jsonl) or folders holding them")
    p.add_argument("--format", choices=FORMATS,
                   help="default: from --output's suffix (.md, .csv, .html, .txt: terminal; "
                   "another suffix is an error), else terminal")
    p.add_argument("--output", metavar="FILE",
                   help="write the report to FILE (atomically) instead of printing it")
    p.add_argument("--plots", metavar="DIR", help="also write every plot as a PNG file in DIR")
    p.add_argument("--with-seed", action="store_true",
                   help="add the seed scripts' published figures as a column for comparison")
    p.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    import shutil

    from infermeter.measure.result import atomic_write, check_output
    from infermeter.report.build import (
        build_report,
        check_plots_folder,
        choose_format,
        render,
        write_plots,
    )

    def warn(line: str) -> None:
        print(f"infermeter report: warning: skipped {line}", file=sys.stderr)

    # bad flags fail before any reading; --output's own check before its suffix's, so that a
    # folder is named as one, not as a name without a suffix
    if args.output:
        check_output(args.output, "the report file")
    fmt = choose_format(args.format, args.output)
    # a mistyped path is an error, not a warning above a report that lacks its Results
    for path in args.paths:
        if not os.path.exists(path):
            raise InfermeterError(f"{path}: no such file or folder")
    if args.output:
        _check_output_is_no_input(args.output, args.paths)
    if args.plots:
        check_plots_folder(args.plots)
    report = build_report(args.paths, with_seed=args.with_seed, warn=warn)
    text = render(report, fmt, width=shutil.get_terminal_size((160, 40)).columns)
    # plots first: a --plots folder that cannot be made fails before the report is printed
    plots = write_plots(report, args.plots) if args.plots else []
    if args.output:
        atomic_write(args.output, text.encode("utf-8"))
        print(f"infermeter report: wrote {args.output} ({fmt})", file=sys.stderr)
    else:
        print(text, end="")
    for path in plots:
        print(f"infermeter report: wrote {path}", file=sys.stderr)
    return 0


def _check_output_is_no_input(output: str, paths: list[str]) -> None:
    """--output may not be one of the Result files read (named, or found in a named folder):
    the report would replace the Results it was made from."""
    from infermeter.report.load import Loaded, collect_files

    if not os.path.exists(output):
        return
    for found in collect_files(paths, Loaded()):
        if os.path.samefile(found, output):
            raise InfermeterError(f"--output {output} is the input {found}: the report would "
                                  "overwrite it; name another file")
