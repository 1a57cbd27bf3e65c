"""`infermeter offload`: reload a prefix's KV cache from host memory or recompute it."""

from __future__ import annotations

import argparse

from infermeter.commands.common import (
    add_device_flags,
    add_model_flags,
    add_output_flags,
    positive_int,
    seed_arg,
)
from infermeter.errors import InfermeterError


def add_offload_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("offload", help="TTFT with a prefix's KV cache in host memory: reloaded "
                       "(serial or layer by layer) against recomputed",
                       usage="%(prog)s (--checkpoint PATH | --model MODEL) --prefix-len N [N ...] "
                       "[options]",
                       description="For each prefix and suffix length: the TTFT of a request "
                       "whose prefix KV cache sits in host memory (pinned on a GPU), (a) reloaded "
                       "then prefilled, (b) reloaded layer by layer while the suffix's forward "
                       "runs, (c) recomputed by a prefill of prefix + suffix; the greedy tokens "
                       "of the three ways compared, and the prefix length from which reloading "
                       "wins, per suffix length.")
    add_model_flags(p)
    p.add_argument("--prefix-len", type=positive_int, nargs="+", required=True, metavar="N",
                   help="tokens whose KV cache sits in host memory")
    p.add_argument("--suffix-len", type=positive_int, nargs="+", default=[128], metavar="N",
                   help="new tokens prefilled after the prefix (default 128)")
    p.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
                   help="sequences per request (default 1)")
    add_device_flags(p)
    p.add_argument("--new-tokens", type=positive_int, default=4, metavar="N",
                   help="greedy tokens generated once, untimed, to check that the three ways "
                   "agree (default 4)")
    p.add_argument("--prefill-chunk", type=positive_int, metavar="N",
                   help="the longest forward a prefill runs, in tokens (default: one forward)")
    p.add_argument("--max-seq-len", type=positive_int, metavar="N",
                   help="KV-cache length for every case (default: prefix + suffix + new tokens, "
                   "rounded up)")
    p.add_argument("--lookahead", type=positive_int, metavar="N",
                   help="layer-wise reload: layers' copies issued ahead of the layer computing "
                   "(default: as many as the two staging slots allow; all of them when the "
                   "forward starts where the prefix fills every layer)")
    p.add_argument("--block-size", type=positive_int, nargs="+", metavar="N",
                   help="also reload the prefix from a paged host copy, in blocks of N tokens "
                   "scattered through a pool, block by block (e.g. 16 256); a break-even per "
                   "block size")
    p.add_argument("--paged-copy", nargs="+", choices=("dma", "mapped"), metavar="METHOD",
                   help="how that paged reload copies: dma (one DMA per block of K or V, the "
                   "default), mapped (one SM gather kernel per layer's K or V, reading the pool "
                   "through its mapping into the GPU); give both to measure both")
    p.add_argument("--repeats", type=positive_int, default=5, metavar="N",
                   help="timed runs per case and way (default 5)")
    p.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="untimed runs before them (default 1)")
    p.add_argument("--seed", type=seed_arg, default=0, metavar="N",
                   help="seed for random weights and token ids (default 0)")
    traffic = p.add_argument_group("decode under copy traffic (--traffic) and offloaded "
                                   "(--offloaded-decode)")
    traffic.add_argument("--traffic", nargs="+", choices=("d2h", "h2d", "both"),
                         metavar="DIRECTION", help="also time decode while background copies "
                         "run this way: d2h, h2d or both")
    traffic.add_argument("--traffic-method", nargs="+", choices=("dma", "mapped"),
                         metavar="METHOD", help="how those copies run: dma (copy engines), "
                         "mapped (an SM kernel on pinned host memory mapped into the GPU, as "
                         "copy's mapped method; GPU only); default both on a GPU, dma on the CPU")
    traffic.add_argument("--offloaded-decode", action="store_true",
                         help="also decode with the KV cache in host memory, every layer's "
                         "streamed in ahead of its attention each step (double-buffered)")
    traffic.add_argument("--context", type=positive_int, metavar="N",
                         help="tokens in the cache when that decode starts (default: the "
                         "longest --prefix-len)")
    traffic.add_argument("--decode-steps", type=positive_int, metavar="N",
                         help="decode steps a timed window (default 32)")
    traffic.add_argument("--trace", metavar="DIR",
                         help="with --offloaded-decode: write a profiler trace of a few of its "
                         "steps to DIR/trace-rank0.json (read it with `infermeter trace`)")
    add_output_flags(p)
    p.set_defaults(handler=_run_offload)


def _run_offload(args: argparse.Namespace) -> int:
    from infermeter.measure.env import capture_env
    from infermeter.measure.result import append_jsonl, check_appendable
    from infermeter.measure.trace import check_trace_dir
    from infermeter.offload.job import run_offload
    from infermeter.offload.request import OffloadRequest
    from infermeter.offload.table import render_offload

    if args.output:
        check_appendable(args.output)
    if not (args.traffic or args.offloaded_decode):  # else they were ignored without a word
        for flag, value in (("--context", args.context), ("--decode-steps", args.decode_steps)):
            if value is not None:
                raise InfermeterError(f"{flag} sets the decode of --traffic and "
                                      "--offloaded-decode: give one of them too")
    if args.paged_copy and not args.block_size:  # else ignored without a word
        raise InfermeterError("--paged-copy: give --block-size too (the methods are those of "
                              "the paged host copy's reload)")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    request = OffloadRequest(
        source=args.checkpoint or f"random:{args.model}", prefix_lens=tuple(args.prefix_len),
        suffix_lens=tuple(args.suffix_len), batch_size=args.batch_size, device=args.device,
        dtype=args.dtype, kv_dtype=args.kv_dtype, new_tokens=args.new_tokens,
        prefill_chunk=args.prefill_chunk, max_seq_len=args.max_seq_len, lookahead=args.lookahead,
        block_sizes=tuple(args.block_size or ()), paged_copies=tuple(args.paged_copy or ()),
        repeats=args.repeats, warmup=args.warmup, seed=args.seed,
        traffic=tuple(args.traffic or ()), traffic_methods=tuple(args.traffic_method or ()),
        context=args.context, decode_steps=args.decode_steps or OffloadRequest.decode_steps,
        offloaded_decode=args.offloaded_decode, trace=args.trace)
    if request.trace:  # a folder that cannot be one fails before anything is measured
        check_trace_dir(request.trace)
    result = run_offload(request, capture_env())
    if args.output:
        append_jsonl(args.output, [result])
    print(result.to_json() if args.json else render_offload(result))
    return 0
