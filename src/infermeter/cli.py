"""Command line: parse, call, print. No measuring or arithmetic here.

Every error a user can cause ends as one line on stderr (`infermeter: error: ...`) and exit 2;
tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from infermeter import __version__
from infermeter.errors import InfermeterError
from infermeter.presets import DEFAULT_MODEL


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not usage text plus an error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print each Result as one JSON line instead of a table")
    parser.add_argument("--output", metavar="PATH",
                        help="append the Results to this JSONL file (written atomically)")


def _kv_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kv", help="KV-cache size, weight size and what fits in GPU memory",
                       description="Analytic KV-cache and weight sizes; a list of batch sizes "
                       "or sequence lengths gives a sweep.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"preset name or path to config.json / params.json / a checkpoint folder "
                   f"(default {DEFAULT_MODEL})")
    p.add_argument("--batch-size", type=positive_int, nargs="+", default=[1])
    p.add_argument("--seq-len", type=positive_int, nargs="+", default=[512])
    p.add_argument("--kv-dtype", help="KV dtype: fp32, fp16, bf16, fp8, int8 (default: the "
                   "model's dtype)")
    p.add_argument("--dtype", help="weight dtype (default: the model's published dtype)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel degree")
    p.add_argument("--gpu-memory", help="GPU memory to fit into, e.g. 80GiB (default: the "
                   "local GPU's, read through NVML, if there is one)")
    p.add_argument("--reserve", default="10%",
                   help="memory kept for activations and the CUDA context: a percent of GPU "
                   "memory or a size (default 10%%)")
    _add_output_flags(p)
    p.set_defaults(handler=_run_kv)


def _run_kv(args: argparse.Namespace) -> int:
    from infermeter.env import capture_env, nvml_facts
    from infermeter.kvreport import KvRequest, kv_results, render_kv
    from infermeter.results import append_jsonl
    from infermeter.spec_loaders import resolve_model
    from infermeter.units import parse_size

    spec = resolve_model(args.model)
    env = capture_env()
    gpu_memory, source = None, None
    if args.gpu_memory:
        gpu_memory, source = parse_size(args.gpu_memory), "--gpu-memory"
    elif "gpu_memory_bytes" in (local := nvml_facts()):
        gpu_memory, source = local["gpu_memory_bytes"], f"{env['device_name']} via NVML"
    request = KvRequest(spec, tuple(args.batch_size), tuple(args.seq_len),
                        kv_dtype=args.kv_dtype or spec.torch_dtype,
                        dtype=args.dtype or spec.torch_dtype, tp=args.tp,
                        gpu_memory=gpu_memory, gpu_memory_source=source, reserve=args.reserve)
    results = kv_results(request, env)
    if args.output:
        append_jsonl(args.output, results)
    if args.json:
        print("\n".join(result.to_json() for result in results))
    else:
        print(render_kv(request, results))
        if gpu_memory is None:
            print("(give --gpu-memory, e.g. 80GiB, to see the largest batch and context that fit)")
    return 0


def _presets_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the built-in model presets")
    p.add_argument("--json", action="store_true", help="print the presets as JSON")
    p.set_defaults(handler=_run_presets)


def _run_presets(args: argparse.Namespace) -> int:
    import json

    from infermeter.kvsize import kv_bytes_per_token, param_count
    from infermeter.presets import PRESETS, PUBLISHED_PARAMS
    from infermeter.textable import render_table
    from infermeter.units import format_bytes, format_count

    if args.json:
        print(json.dumps({name: spec.to_dict() for name, spec in PRESETS.items()}, indent=2))
        return 0
    rows = []
    for name, spec in PRESETS.items():
        published = PUBLISHED_PARAMS.get(name)
        if isinstance(published, tuple):
            published = published[0]
        rows.append([name, spec.arch, spec.n_layers, spec.dim, f"{spec.n_heads}/{spec.n_kv_heads}",
                     spec.head_dim, format_count(param_count(spec)),
                     format_count(published) if published else "-",
                     format_bytes(kv_bytes_per_token(spec, spec.torch_dtype)), spec.torch_dtype])
    print(render_table(["preset", "arch", "layers", "dim", "heads/kv", "head_dim", "params",
                        "published", "KV/token", "dtype"], rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="infermeter", description="Measure what LLM inference costs on this "
                     "machine: KV-cache size, KV-cache moving speed, generation speed.")
    parser.add_argument("--version", action="version", version=f"infermeter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _kv_parser(sub)
    _presets_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except InfermeterError as err:
        print(f"infermeter: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("infermeter: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `infermeter presets | head`
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
