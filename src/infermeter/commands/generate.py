"""`infermeter generate`: the engine's outputs and their timing; `--dry-run` per-rank plans."""

from __future__ import annotations

import argparse

from infermeter.commands.common import (
    add_device_flags,
    add_model_flags,
    add_output_flags,
    positive_int,
    seed_arg,
    temperature_arg,
    top_p_arg,
)
from infermeter.engine.prefill_buckets import COMPILED_PREFILL_CHUNK, PREFILL_GRAPHS

# engine/attention.py's ATTENTION_KINDS, spelled out so parsing the command line needs no torch
# (a test keeps the two equal).
DECODE_ATTENTION_KINDS = ("auto", "math", "sdpa", "flex", "triton")
ALL_REDUCE_KINDS = ("auto", "nccl", "one-shot", "triton", "triton-unfused")  # all_reduce.py's
MATVEC_KERNELS = ("inductor", "triton")  # engine/linear.py's, likewise
# engine/step_choice.AUTO and engine/model.py's
STEP_KERNELS = ("auto", "split", "fused")
MOE_KERNELS = ("auto", "torch", "triton")  # engine/moe.py's, likewise
MOE_KERNEL = "auto"  # engine/moe.py's default, likewise
PREFILL_KINDS = ("bucketed", "exact")  # engine/prefill_buckets.py's, likewise
CHUNK_ATTENTIONS = ("auto", "mask", "flex")  # engine/chunk_attention.py's, likewise


ADVANCED_GROUP = "advanced: engine variants for A/B benchmarks (defaults are the fastest measured)"


class _HelpFormatter(argparse.HelpFormatter):
    """A wider option column, so that `--batch-size N [N ...]` keeps its text on its line."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=26)


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generation speed: TTFT, TPOT, tokens/s, MBU / MFU",
                       usage="%(prog)s (--checkpoint PATH | --model MODEL) [options]",
                       formatter_class=_HelpFormatter,
                       description="Load a checkpoint (Meta or HF) or a preset's random weights, "
                       "generate and time it (--repeats runs after a warm-up); print the outputs "
                       "and a table, or with --json one Result per case.")
    add_model_flags(p, "--ckpt-dir", "--ckpt_dir")
    p.add_argument("--tokenizer-path", "--tokenizer_path", dest="tokenizer_path", metavar="PATH",
                   help="tokenizer.model / tokenizer.json (default: beside the checkpoint)")
    add_device_flags(p)
    p.add_argument("--mode", nargs="+", choices=("compiled", "eager", "hf", "hf-eager"),
                   metavar="MODE", help="compiled, eager, hf (transformers' generate) or "
                   "hf-eager; several run side by side (default: compiled on cuda, eager on "
                   "cpu)")
    p.add_argument("--seed", type=seed_arg, default=0, metavar="N",
                   help="seed for random weights and sampling (default 0)")
    # Tensor parallelism: launch.py starts torchrun, engine/parallel/sharding.py shards the model.
    p.add_argument("--tp", type=positive_int, metavar="N", help="tensor-parallel ranks on this "
                   "host, started through torchrun (default 1)")
    p.add_argument("--dry-run", action="store_true",
                   help="print each rank's memory plan and exit, allocating nothing")
    p.add_argument("--gpu-memory", metavar="SIZE", help="one GPU's memory for --dry-run, e.g. "
                   "80GiB (default: the local GPU's)")
    p.add_argument("--trace", metavar="DIR", help="after the timed runs, record a few decode "
                   "steps with torch.profiler: a trace per rank in DIR and where a step's time "
                   "goes (also in the Result)")
    add_output_flags(p)
    prompt = p.add_argument_group("prompts (repeat a flag for a batch; default: fixed ids)")
    prompt.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="prompt text")
    prompt.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                        help="raw token ids, e.g. 1,2,3")
    prompt.add_argument("--dialogs", metavar="FILE", help="JSON list of chat dialogs")
    prompt.add_argument("--chat-format", choices=("auto", "llama2", "llama3"),
                        metavar="FORMAT", help="auto (the checkpoint's own chat template, else "
                        "Llama 3's or Llama 2's format by the vocabulary; the default), llama2 or "
                        "llama3")
    gen = p.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                     help="tokens generated per sequence (default 64)")
    gen.add_argument("--greedy", action="store_true",
                     help="argmax decoding (the default)")
    gen.add_argument("--temperature", type=temperature_arg, metavar="T",
                     help="sample with this temperature (default 0: greedy)")
    gen.add_argument("--top-p", type=top_p_arg, default=1.0, metavar="P",
                     help="nucleus sampling threshold (default 1.0)")
    gen.add_argument("--until-eos", action="store_true",
                     help="stop a sequence at the tokenizer's stop ids (default: fixed length)")
    gen.add_argument("--max-seq-len", "--max_seq_len", dest="max_seq_len", type=positive_int,
                     metavar="N", help="KV-cache length (default: prompt + new tokens, rounded "
                     "up)")
    gen.add_argument("--max-batch-size", "--max_batch_size", dest="max_batch_size",
                     type=positive_int, metavar="N",
                     help="largest batch run at once (default: all prompts)")
    bench = p.add_argument_group("timing (without prompts: random ids; lists make a sweep)")
    bench.add_argument("--batch-size", type=positive_int, nargs="+", metavar="N",
                       help="sequences per batch (default 1)")
    bench.add_argument("--prompt-len", type=positive_int, nargs="+", default=[], metavar="N",
                       help="random prompts of this many tokens (TTFT, MFU)")
    bench.add_argument("--context", type=positive_int, nargs="+", default=[], metavar="N",
                       help="decode after a prompt of this many tokens: TPOT at that much KV")
    bench.add_argument("--repeats", type=positive_int, default=5, metavar="N",
                       help="timed runs per case (default 5)")
    bench.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed runs per "
                       "case after the compile / capture warm-up (default 1)")
    bench.add_argument("--roofline", action=argparse.BooleanOptionalAction, default=True,
                       help="measure HBM bandwidth and matmul FLOP/s first for MBU / MFU "
                       "(default on)")
    # Implementation variants of the same computation, for A/B benchmarks: kept last.
    variant = p.add_argument_group(ADVANCED_GROUP)
    variant.add_argument("--compile-backend", choices=("inductor", "cudagraphs"),
                         help="how the compiled mode builds its decode step (default inductor)")
    variant.add_argument("--compile-prefill", action="store_true",
                         help="with --prefill exact (implied): one compiled graph for its layers")
    variant.add_argument("--matvec-kernel", choices=MATVEC_KERNELS, default="triton",
                         metavar="KIND", help="compiled batch-1 products: Triton's GEMV or "
                         "inductor's (default triton)")
    variant.add_argument("--step-kernels", choices=STEP_KERNELS, default="auto", metavar="KIND",
                         help="batch-1 layers: auto by model size, split or fused")
    variant.add_argument("--moe-kernel", choices=MOE_KERNELS, default=MOE_KERNEL,
                         metavar="KIND", help=f"MoE experts (default {MOE_KERNEL})")
    variant.add_argument("--prefill-chunk", type=positive_int, metavar="N",
                         help=f"tokens a prefill forward ({COMPILED_PREFILL_CHUNK} in compiled "
                         "mode)")
    variant.add_argument("--prefill", choices=PREFILL_KINDS, metavar="KIND",
                         help="compiled mode: bucketed (padded, few graphs) or exact (default "
                         "bucketed)")
    variant.add_argument("--prefill-graphs", choices=PREFILL_GRAPHS, metavar="KIND",
                         help=f"bucketed prefill: {', '.join(PREFILL_GRAPHS)} (default "
                         f"{PREFILL_GRAPHS[0]})")
    variant.add_argument("--chunk-attention", choices=CHUNK_ATTENTIONS, default="auto",
                         metavar="KIND", help="later prefill chunks: mask, flex or auto (default)")
    variant.add_argument("--pdl", action=argparse.BooleanOptionalAction,
                         help="kernels start as the one before ends (default: on Hopper+ with "
                         "inductor)")
    variant.add_argument("--decode-attention", choices=DECODE_ATTENTION_KINDS,
                         help="a one-token step's attention over the cache (default auto: "
                         "triton's split-KV kernel where Triton runs, else math)")
    variant.add_argument("--tp-all-reduce", choices=ALL_REDUCE_KINDS, default="auto",
                         help="the decode step's all-reduces at tp >= 2 on CUDA (default auto: "
                         "triton where the GPUs reach each other, else nccl); triton fuses the "
                         "residual add and norm, triton-unfused does not; one-shot: inductor's "
                         "symmetric-memory kernels")
    p.set_defaults(handler=_run_generate)


def _check_flags_go_together(args: argparse.Namespace) -> None:
    """A flag that means something only beside another is an error alone: a run would ignore
    it and record what it did not do."""
    from infermeter.errors import InfermeterError

    sampling = (args.temperature or 0) > 0
    if args.top_p != 1.0 and not sampling:  # greedy would ignore it
        raise InfermeterError(f"--top-p {args.top_p} applies to sampling: give --temperature > 0 "
                              "too (without it decoding is greedy)")
    if args.greedy and sampling:
        raise InfermeterError(f"--greedy and --temperature {args.temperature} ask for two ways "
                              "of decoding: give one")
    if args.chat_format and not args.dialogs:  # only dialogs are formatted
        raise InfermeterError(f"--chat-format {args.chat_format} formats --dialogs: give "
                              "--dialogs FILE too")
    if args.prefill_graphs and (args.prefill == "exact" or args.compile_prefill):
        raise InfermeterError(f"--prefill-graphs {args.prefill_graphs} compiles the bucketed "
                              "prefill: drop --prefill exact / --compile-prefill")
    if args.gpu_memory and not args.dry_run:  # a run fits the GPU it finds
        raise InfermeterError(f"--gpu-memory {args.gpu_memory} sizes the --dry-run plan: give "
                              "--dry-run too")


def _run_generate(args: argparse.Namespace) -> int:
    from infermeter.engine.devices import default_device
    from infermeter.engine.generator import GenerationConfig
    from infermeter.generate.job import run_generate
    from infermeter.generate.request import EngineChoices, GenerateRequest, Timing
    from infermeter.generate.table import progress_bar, render_generate, render_outputs
    from infermeter.launch import is_rank_zero, relaunch_if_needed
    from infermeter.measure.env import capture_env
    from infermeter.measure.result import append_jsonl, check_appendable

    if args.output:
        check_appendable(args.output)
    _check_flags_go_together(args)
    # ---- tensor parallelism (launch.py): --dry-run plans; --tp N starts torchrun for N ranks
    if args.dry_run:
        return _print_rank_plan(args)
    if (code := relaunch_if_needed(args.tp, args.argv)) is not None:
        return code
    # ---- end tensor parallelism
    if args.trace:  # a bad folder fails now, not after the timed runs
        from infermeter.measure.trace import check_trace_dir

        check_trace_dir(args.trace)
    device = args.device or default_device()
    sampling = args.temperature is not None and args.temperature > 0
    request = GenerateRequest(
        source=args.checkpoint or f"random:{args.model}", tokenizer_path=args.tokenizer_path,
        prompts=tuple(args.prompt), prompt_ids=tuple(args.prompt_ids),
        dialogs_path=args.dialogs, chat_format=args.chat_format or "auto", until_eos=args.until_eos,
        sampling=GenerationConfig(max_new_tokens=args.max_new_tokens, greedy=not sampling,
                                  temperature=args.temperature or 1.0, top_p=args.top_p,
                                  seed=args.seed),
        device=device, dtype=args.dtype, kv_dtype=args.kv_dtype,
        modes=tuple(args.mode or ["compiled" if device == "cuda" else "eager"]),
        max_seq_len=args.max_seq_len, max_batch_size=args.max_batch_size, tp=args.tp,
        batch_sizes=tuple(args.batch_size) if args.batch_size else None,
        prompt_lens=tuple(args.prompt_len), contexts=tuple(args.context),
        timing=Timing(repeats=args.repeats, warmup=args.warmup, roofline=args.roofline,
                      trace_dir=args.trace),
        engine=EngineChoices(compile_backend=args.compile_backend,
                             compile_prefill=args.compile_prefill,
                             decode_attention=args.decode_attention,
                             tp_all_reduce=args.tp_all_reduce, matvec_kernel=args.matvec_kernel,
                             step_kernels=args.step_kernels,
                             moe_kernel=args.moe_kernel,
                             pdl=args.pdl, prefill_chunk=args.prefill_chunk,
                             prefill=args.prefill, chunk_attention=args.chunk_attention,
                             prefill_graphs=args.prefill_graphs or PREFILL_GRAPHS[0]))
    with progress_bar(enabled=not args.json and is_rank_zero()) as bar:
        results, texts = run_generate(request, capture_env(), progress=bar)
    if not is_rank_zero():  # tensor parallel: only rank 0 prints and writes
        return 0
    if args.output:
        append_jsonl(args.output, results)
    if args.json:
        print("\n".join(result.to_json() for result in results))
        return 0
    shown = next((r for r in results if r.output_token_ids), None)
    if shown and shown.config["prompt_source"] != "random":  # the user's (or the fixed) prompts
        print(render_outputs(shown, texts))
    print(render_generate(results))
    _print_breakdowns(results)
    return 0


def _print_breakdowns(results: list) -> None:
    """--trace: each case's decode-step table, after the timing table."""
    from infermeter.measure.breakdown import render_breakdown

    for result in results:
        found = result.metrics.get("breakdown")
        if found and "skipped" not in found:
            print(f"\n{result.config.get('mode')} {result.config.get('batch_size')}x"
                  f"{result.config.get('prompt_len')}: {render_breakdown(found)}")


def _print_rank_plan(args: argparse.Namespace) -> int:
    """generate --dry-run: each tensor-parallel rank's weights, KV cache and headroom."""
    import json

    from infermeter.generate.job import DEFAULT_PROMPT_IDS
    from infermeter.measure.env import nvml_facts
    from infermeter.specs.loaders import resolve_model
    from infermeter.specs.rank_plan import rank_plan, render_rank_plan
    from infermeter.specs.sizes import cache_length
    from infermeter.units import default_run_dtype, parse_size

    if args.checkpoint:
        from infermeter.engine.checkpoint.load import spec_for

        spec = spec_for(args.checkpoint)[0]
    else:
        spec = resolve_model(args.model)
    lengths = [len(ids.split(",")) for ids in args.prompt_ids] + args.prompt_len + args.context
    prompt_len = max(lengths or [len(DEFAULT_PROMPT_IDS)])
    length = cache_length(spec, prompt_len, args.max_new_tokens, args.max_seq_len)
    batch = max(args.batch_size or [len(args.prompt) + len(args.prompt_ids) or 1])
    batch = min(batch, args.max_batch_size or batch)
    dtype = args.dtype or default_run_dtype(args.device or "cuda")
    memory = parse_size(args.gpu_memory) if args.gpu_memory else nvml_facts().get(
        "gpu_memory_bytes")
    plan = rank_plan(spec, args.tp or 1, batch, prompt_len, length, dtype,
                     args.kv_dtype or dtype, memory, args.tp_all_reduce)
    print(json.dumps(plan.to_dict()) if args.json else render_rank_plan(plan))
    return 0
