"""Command line: parse, call, print. No measuring or arithmetic here.

Every error a user can cause ends as one line on stderr (`infermeter: error: ...`) and exit 2;
tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from infermeter import __version__
from infermeter.commands.common import Parser
from infermeter.commands.copy import add_copy_parser
from infermeter.commands.generate import add_generate_parser
from infermeter.commands.kv import add_kv_parser, add_presets_parser
from infermeter.commands.offload import add_offload_parser
from infermeter.commands.report import add_report_parser
from infermeter.commands.run import add_run_parser
from infermeter.commands.trace import add_trace_parser
from infermeter.errors import InfermeterError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="infermeter", description="Measure what LLM inference costs on this "
                     "machine: KV-cache size, KV-cache moving speed, generation speed.")
    parser.add_argument("--version", action="version", version=f"infermeter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_kv_parser(sub)
    add_copy_parser(sub)
    add_generate_parser(sub)
    add_offload_parser(sub)
    add_presets_parser(sub)
    add_report_parser(sub)
    add_run_parser(sub)
    add_trace_parser(sub)
    parser.set_defaults(commands=tuple(sub.choices))  # named when none is given
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # A shell starts a background job (`nohup infermeter run &`) with SIGINT ignored, and Python
    # keeps an ignored SIGINT as it found it: Ctrl-C / kill -INT would then do nothing. Take it
    # back, so an interrupt always ends a command the clean way (KeyboardInterrupt below).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `--tp N` re-runs per rank
    if args.command in ("kv", "presets", "report"):  # under torchrun: host-only, rank 0 answers
        from infermeter.launch import is_rank_zero

        if not is_rank_zero():
            return 0
    if not getattr(args, "handler", None):  # no command: the help, then what was missing
        parser.print_help()
        print(f"infermeter: error: give a command ({', '.join(args.commands)})",
              file=sys.stderr)
        return 2
    try:
        return args.handler(args)
    except InfermeterError as err:
        from infermeter.launch import report_error

        report_error(str(err))  # stderr; a torchrun rank started by `--tp` tells the launcher
        return 2
    except KeyboardInterrupt:
        print("infermeter: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `infermeter presets | head`
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
