"""`infermeter trace FILE`: where one decode step's time goes, from an existing trace."""

from __future__ import annotations

import argparse


def add_trace_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="summarise a --trace file: where a decode step's time goes",
                       description="Read a Chrome/Perfetto JSON trace (from --trace, or any "
                       "torch.profiler export) and print one decode step's time by category "
                       "(matmuls per projection, attention, norms and rotary, sampling, "
                       "all-reduce, idle gaps), then, for a GPU trace, the step's time in "
                       "kernels against the gaps between them, per layer (from the trace's layer "
                       "ranges, or a compiled step's repeating kernel pattern), and its "
                       "bytes-bound time; or, for a copy "
                       "trace, each copy's size and GB/s.")
    p.add_argument("file", metavar="FILE",
                   help="trace JSON, plain or gzipped (e.g. trace-rank0.json, trace.json.gz)")
    p.add_argument("--json", action="store_true", help="print the breakdown as one JSON object")
    p.add_argument("--against", metavar="OTHER",
                   help="a second decode trace (another build or setting of the same step): "
                   "the two steps' figures and a layer's kernels side by side")
    p.set_defaults(handler=_run_trace)


def _run_trace(args: argparse.Namespace) -> int:
    import json

    from infermeter.errors import InfermeterError
    from infermeter.measure.breakdown import render_breakdown, summarize_trace

    found = summarize_trace(args.file)  # a bad file: InfermeterError -> one line, exit 2
    if not found.get("categories") and not found.get("copies"):
        raise InfermeterError(f"{args.file}: no kernels, ops or copies in this trace (no complete "
                              "'X' events with numeric ts and dur, and a pid and tid, if any, "
                              "of an int or a string): not a profile of a run")
    if args.against:
        from infermeter.measure.against import against, render_against

        other = summarize_trace(args.against)
        if not found.get("step_gaps") or not other.get("step_gaps"):
            which = args.file if not found.get("step_gaps") else args.against
            raise InfermeterError(f"--against: {which} has no GPU decode step to compare")
        found["against"] = {"file": args.against,
                            **against(found["step_gaps"], other["step_gaps"])}
    if args.json:
        print(json.dumps(found))
        return 0
    text = render_breakdown(found)
    if args.against:
        text += "\n\n" + render_against(found["against"], args.against)
    print(text)
    return 0
