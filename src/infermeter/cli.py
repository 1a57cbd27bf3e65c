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


def _add_cache_flags(parser: argparse.ArgumentParser) -> None:
    """The cache a command sizes or moves: model, batch sizes, sequence lengths, KV dtype."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="preset name or path to config.json / params.json / a checkpoint "
                        f"folder (default {DEFAULT_MODEL})")
    parser.add_argument("--batch-size", type=positive_int, nargs="+", default=[1])
    parser.add_argument("--seq-len", type=positive_int, nargs="+", default=[512])
    parser.add_argument("--kv-dtype", help="KV dtype: fp32, fp16, bf16, fp8, int8 (default: "
                        "the model's dtype)")


def _kv_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kv", help="KV-cache size, weight size and what fits in GPU memory",
                       description="Analytic KV-cache and weight sizes; a list of batch sizes "
                       "or sequence lengths gives a sweep.")
    _add_cache_flags(p)
    p.add_argument("--dtype", help="weight dtype (default: the model's published dtype)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel degree")
    p.add_argument("--gpu-memory", help="GPU memory to fit into, e.g. 80GiB (default: the "
                   "local GPU's, read through NVML, if there is one)")
    p.add_argument("--reserve", default="10%",
                   help="memory kept for activations and the CUDA context: a percent of GPU "
                   "memory or a size (default 10%%)")
    p.add_argument("--check-engine", action="store_true",
                   help="also report the bytes the engine's cache code allocates (built on "
                   "PyTorch's meta device: no memory used; tp 1)")
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
                        gpu_memory=gpu_memory, gpu_memory_source=source, reserve=args.reserve,
                        check_engine=args.check_engine)
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


def _copy_parser(sub: argparse._SubParsersAction) -> None:
    from infermeter.bench.copy_cases import DIRECTIONS, HOSTS, LAYOUTS, METHODS

    p = sub.add_parser("copy", help="KV-cache moving speed between GPU and host memory",
                       description="Time moving a model's KV cache between GPU and host memory "
                       "on its real layouts, verify the bytes, and say why it is slow. "
                       "List-valued flags make a sweep.")
    _add_cache_flags(p)
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
                   "(round-robin over 4 streams), mapped (kernel into mapped pinned memory)")
    p.add_argument("--block-tokens", type=positive_int, nargs="+", default=[16],
                   help="tokens per paged block (default 16)")
    p.add_argument("--repeats", type=positive_int, default=10, help="timed samples per case")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before the samples")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a host-memcpy run of the whole pipeline, no GPU needed")
    _add_output_flags(p)
    p.set_defaults(handler=_run_copy)


def _run_copy(args: argparse.Namespace) -> int:
    from infermeter.bench.copy import (
        CopyRequest,
        gpu_available,
        n_cases,
        n_runnable,
        plan_rows,
        run_copy,
    )
    from infermeter.bench.copy_report import progress_bar, render_copy, render_plan
    from infermeter.results import append_jsonl
    from infermeter.spec_loaders import resolve_model

    def unique(values: list) -> tuple:  # repeated flag values once, in the order given
        return tuple(dict.fromkeys(values))

    spec = resolve_model(args.model)
    request = CopyRequest(spec, unique(args.batch_size), unique(args.seq_len),
                          kv_dtype=args.kv_dtype or spec.torch_dtype, layouts=unique(args.layout),
                          hosts=unique(args.host), directions=unique(args.direction),
                          methods=unique(args.method), block_tokens=unique(args.block_tokens),
                          repeats=args.repeats, warmup=args.warmup, device=args.device)
    if args.device == "cuda" and not gpu_available():
        print("infermeter copy: no CUDA GPU found, nothing measured (--device cpu runs a "
              "host-memcpy version); it would move:", file=sys.stderr)
        if not args.json:
            print(render_plan(plan_rows(request), n_cases(request), n_runnable(request)))
        return 0
    with progress_bar(n_cases(request), enabled=not args.json) as progress:
        results = run_copy(request, progress)
    if args.output:
        append_jsonl(args.output, results)
    if args.json:
        print("\n".join(result.to_json() for result in results))
    else:
        print("\n\n".join(render_copy(result) for result in results))
    return 0


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate tokens with the engine (eager or compiled)",
                       description="Load a checkpoint (Meta or HF) or random weights of a preset "
                       "and generate; prints the text (or ids) and, with --json, the Result.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", "--ckpt-dir", "--ckpt_dir", dest="checkpoint",
                        metavar="DIR", help="Meta (params.json + consolidated.NN.pth) or HF "
                        "(config.json + *.safetensors) checkpoint folder")
    source.add_argument("--model", help="preset name or config path: random weights, seeded")
    p.add_argument("--tokenizer-path", "--tokenizer_path", dest="tokenizer_path",
                   help="tokenizer.model / tokenizer.json (default: beside the checkpoint)")
    prompt = p.add_argument_group("prompts (repeat a flag for a batch; default: fixed ids)")
    prompt.add_argument("--prompt", action="append", default=[], help="prompt text")
    prompt.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                        help="raw token ids, e.g. 1,2,3")
    prompt.add_argument("--dialogs", metavar="FILE", help="JSON list of chat dialogs")
    prompt.add_argument("--chat-format", choices=("auto", "llama2", "llama3"), default="auto")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--greedy", action="store_true", default=True,
                   help="argmax decoding (the default)")
    p.add_argument("--temperature", type=float, help="sample with this temperature (> 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and sampling")
    p.add_argument("--until-eos", action="store_true",
                   help="stop a sequence at the tokenizer's stop ids (default: fixed length)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--dtype", help="weights/activations: fp32, fp16, bf16 (default: fp32 on "
                   "cpu, bf16 on cuda)")
    p.add_argument("--kv-dtype", help="KV-cache dtype (default: --dtype)")
    p.add_argument("--mode", choices=("eager", "compiled"),
                   help="compiled = torch.compile'd decode step (CUDA graphs on GPU); default: "
                   "compiled on cuda, eager on cpu")
    p.add_argument("--max-seq-len", "--max_seq_len", dest="max_seq_len", type=positive_int,
                   help="KV-cache length (default: prompt + new tokens, rounded up)")
    p.add_argument("--max-batch-size", "--max_batch_size", dest="max_batch_size",
                   type=positive_int, help="largest batch run at once (default: all prompts)")
    _add_output_flags(p)
    p.set_defaults(handler=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from infermeter.env import capture_env
    from infermeter.generate_run import GenerateRequest, default_device, run_generate
    from infermeter.results import append_jsonl

    device = args.device or default_device()
    sampling = args.temperature is not None and args.temperature > 0
    request = GenerateRequest(
        source=args.checkpoint or f"random:{args.model}", tokenizer_path=args.tokenizer_path,
        prompts=tuple(args.prompt), prompt_ids=tuple(args.prompt_ids),
        dialogs_path=args.dialogs, chat_format=args.chat_format,
        max_new_tokens=args.max_new_tokens, greedy=not sampling,
        temperature=args.temperature or 1.0, top_p=args.top_p, seed=args.seed,
        until_eos=args.until_eos, device=device, dtype=args.dtype, kv_dtype=args.kv_dtype,
        mode=args.mode or ("compiled" if device == "cuda" else "eager"),
        max_seq_len=args.max_seq_len, max_batch_size=args.max_batch_size)
    result, texts = run_generate(request, capture_env())
    if args.output:
        append_jsonl(args.output, [result])
    if args.json:
        print(result.to_json())
        return 0
    for index, (ids, text) in enumerate(zip(result.output_token_ids or [], texts)):
        print(f"[{index}] {text!r}" if text else f"[{index}] ids {ids}")
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
    _copy_parser(sub)
    _generate_parser(sub)
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
