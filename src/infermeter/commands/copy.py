"""`infermeter copy`: KV-cache moving speed between GPU and host memory."""

from __future__ import annotations

import argparse
import sys

from infermeter.commands.common import add_cache_flags, add_output_flags, positive_int
from infermeter.errors import InfermeterError


def add_copy_parser(sub: argparse._SubParsersAction) -> None:
    from infermeter.copy.cases import DIRECTIONS, HOSTS, LAYOUTS, METHODS

    p = sub.add_parser("copy", help="KV-cache moving speed between GPU and host memory",
                       description="Time moving a model's KV cache between GPU and host memory "
                       "on its real layouts, verify the bytes, and say why it is slow. "
                       "List-valued flags make a sweep.")
    add_cache_flags(p)
    p.add_argument("--layout", nargs="+", choices=LAYOUTS, default=list(LAYOUTS),
                   help="engine: per-layer K and V tensors; contiguous: one buffer; paged: "
                   "blocks of --block-tokens tokens (default: all)")
    p.add_argument("--host", nargs="+", choices=HOSTS, default=list(HOSTS),
                   help="seed: .cpu()/.cuda() with allocation; pageable or pinned: "
                   "preallocated (default: all)")
    p.add_argument("--direction", nargs="+", choices=DIRECTIONS, default=list(DIRECTIONS),
                   help="d2h, h2d, or both at once (default: all)")
    p.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS),
                   help="per-tensor copies, staged (gather + chunked DMA), streams "
                   "(round-robin over 4 streams), mapped (kernel into mapped pinned memory) "
                   "(default: all)")
    p.add_argument("--block-tokens", type=positive_int, nargs="+", default=[16],
                   help="tokens per paged block (default 16)")
    p.add_argument("--repeats", type=positive_int, default=10,
                   help="timed samples per case (default 10)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed runs before the samples (default 2)")
    p.add_argument("--device", choices=("cuda", "cpu"),
                   help="default cuda (without a GPU: what it would move, nothing measured); "
                   "cpu: a host-memcpy run of the whole pipeline, no GPU needed")
    p.add_argument("--tp", type=positive_int, help="tensor-parallel ranks: starts torchrun; "
                   "each rank moves its own KV shard, all ranks starting each case together; "
                   "reported per rank and in total")
    p.add_argument("--trace", metavar="DIR", help="record the run with torch.profiler: a "
                   "Chrome/Perfetto trace per rank in DIR and each copy's size, time and GB/s "
                   "(also in the Result); profiling slows the run, so time without it")
    add_output_flags(p)
    p.set_defaults(handler=_run_copy)


def _run_copy(args: argparse.Namespace) -> int:
    from infermeter.copy.group import copy_on_ranks, join_group
    from infermeter.copy.job import (
        CopyRequest,
        gpu_available,
        n_cases,
        n_runnable,
        plan_rows,
        skip_reasons,
    )
    from infermeter.copy.table import progress_bar, render_copy, render_plan
    from infermeter.launch import is_rank_zero, relaunch_if_needed, under_torchrun
    from infermeter.measure.result import append_jsonl, check_appendable
    from infermeter.specs.loaders import resolve_model

    def unique(values: list) -> tuple:  # repeated flag values once, in the order given
        return tuple(dict.fromkeys(values))

    spec = resolve_model(args.model)
    if args.output:
        check_appendable(args.output)
    device = args.device or "cuda"
    no_gpu = device == "cuda" and not gpu_available()
    if no_gpu and args.device == "cuda":  # named, so an error, as in generate
        raise InfermeterError("--device cuda asked for, but no CUDA GPU is visible (--device cpu "
                              "runs a host-memcpy version)")
    if no_gpu:  # the plan alone: nothing for these flags
        asked = [flag for flag, value in (("--output", args.output), ("--json", args.json),
                                          ("--trace", args.trace), ("--tp", args.tp)) if value]
        if asked:
            raise InfermeterError(f"no CUDA GPU found, so nothing to measure for "
                                  f"{', '.join(asked)} (--device cpu runs a host-memcpy version)")
    if args.trace:  # a bad folder fails now, not after the copies
        from infermeter.measure.trace import check_trace_dir

        check_trace_dir(args.trace)
    # ---- tensor parallelism (launch.py, engine/parallel/): each rank copies its KV shard
    if args.tp:  # a --tp the heads refuse fails here, not after torchrun starts every rank
        from infermeter.specs.sizes import check_tp

        check_tp(spec, args.tp)
    if (code := relaunch_if_needed(args.tp, args.argv)) is not None:
        return code
    parallel = None
    if under_torchrun():
        spec, parallel = join_group(spec, device, args.tp)
    # ---- end tensor parallelism
    request = CopyRequest(spec, unique(args.batch_size), unique(args.seq_len),
                          kv_dtype=args.kv_dtype or spec.torch_dtype, layouts=unique(args.layout),
                          hosts=unique(args.host), directions=unique(args.direction),
                          methods=unique(args.method), block_tokens=unique(args.block_tokens),
                          repeats=args.repeats, warmup=args.warmup, device=device)
    if no_gpu:
        print("infermeter copy: no CUDA GPU found, nothing measured (--device cpu runs a "
              "host-memcpy version); it would move:", file=sys.stderr)
        print(render_plan(plan_rows(request), n_cases(request), n_runnable(request)))
        return 0
    if n_runnable(request, device) == 0:  # else exit 0 with a Result holding no case
        raise InfermeterError(f"none of the cases these flags name can run on {device} "
                              f"({'; '.join(skip_reasons(request, device))}): nothing to time")
    with progress_bar(n_cases(request), enabled=not args.json and is_rank_zero()) as progress:
        results = copy_on_ranks(request, progress, args.trace, parallel)
    if results is None:  # tensor parallel: only rank 0 prints and writes
        return 0
    if args.output:
        append_jsonl(args.output, results)
    if args.json:
        print("\n".join(result.to_json() for result in results))
    else:
        print("\n\n".join(render_copy(result) for result in results))
        _print_copies(results)
    return 0


def _print_copies(results: list) -> None:
    from infermeter.measure.breakdown import render_breakdown

    found = results[0].metrics.get("breakdown") if results else None
    if found:
        print(f"\n--trace {found['trace']}:\n{render_breakdown(found)}")
