"""`infermeter kv` and `infermeter presets`: analytic sizes; no torch needed."""

from __future__ import annotations

import argparse

from infermeter.commands.common import add_cache_flags, add_output_flags, positive_int


def add_kv_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kv", help="KV-cache size, weight size and what fits in GPU memory",
                       description="Analytic KV-cache and weight sizes; a list of batch sizes "
                       "or sequence lengths gives a sweep.")
    add_cache_flags(p)
    p.add_argument("--dtype", help="weight dtype (default: the dtype the model's weights are "
                   "published in, e.g. fp8 for deepseek-v3; see `infermeter presets`)")
    p.add_argument("--expert-dtype", help="dtype of the MoE experts' weight matrices, e.g. "
                   "mxfp4 (default: as published, gpt-oss's mxfp4, where no --dtype is given; "
                   "else --dtype's)")
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel degree (default 1)")
    p.add_argument("--gpu-memory", help="GPU memory to fit into, e.g. 80GiB (default: the "
                   "local GPU's, read through NVML, if there is one)")
    p.add_argument("--reserve", default="10%",
                   help="memory kept for activations and the CUDA context: a percent of GPU "
                   "memory or a size (default 10%%)")
    p.add_argument("--check-engine", action="store_true",
                   help="also report the bytes the engine's cache code allocates (built on "
                   "PyTorch's meta device: no memory used; tp 1)")
    add_output_flags(p)
    p.set_defaults(handler=_run_kv)


def _run_kv(args: argparse.Namespace) -> int:
    from infermeter.kv.job import KvRequest, kv_results, render_kv
    from infermeter.measure.env import capture_env, nvml_facts
    from infermeter.measure.result import append_jsonl, check_appendable
    from infermeter.specs.loaders import resolve_model
    from infermeter.units import parse_size

    if args.output:  # the same one line as the measuring commands' for a folder or a typo
        check_appendable(args.output)
    spec = resolve_model(args.model)
    env = capture_env()
    gpu_memory, source = None, None
    if args.gpu_memory:
        gpu_memory, source = parse_size(args.gpu_memory), "--gpu-memory"
    elif "gpu_memory_bytes" in (local := nvml_facts()):
        gpu_memory, source = local["gpu_memory_bytes"], f"{env['device_name']} via NVML"
    request = KvRequest(spec, tuple(args.batch_size), tuple(args.seq_len),
                        kv_dtype=args.kv_dtype or spec.torch_dtype,
                        dtype=args.dtype or spec.published_dtype, tp=args.tp,
                        expert_dtype=args.expert_dtype or (None if args.dtype
                                                           else spec.expert_weight_dtype),
                        gpu_memory=gpu_memory, gpu_memory_source=source, reserve=args.reserve,
                        check_engine=args.check_engine)
    results = kv_results(request, env)
    if args.output:
        append_jsonl(args.output, results)
    if args.json:
        print("\n".join(result.to_json() for result in results))
    else:
        print(render_kv(request, results))
        if gpu_memory is None and spec.vocab_size is not None:  # the budget needs the weights
            print("(give --gpu-memory, e.g. 80GiB, to see the largest batch and context that fit)")
    return 0


def add_presets_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list the built-in model presets",
                       description="The built-in model shapes (what --model takes by name), "
                       "their weights in the dtype they are published in, the KV cache per "
                       "token and the sliding window where one caps the cache.")
    p.add_argument("--json", action="store_true", help="print the presets as JSON")
    p.set_defaults(handler=_run_presets)


def _run_presets(args: argparse.Namespace) -> int:
    import json

    from infermeter.specs.presets import PRESETS, PUBLISHED_PARAMS
    from infermeter.specs.sizes import kv_bytes_per_token, param_count, weight_bytes
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
                     format_bytes(weight_bytes(spec, spec.published_dtype,
                                               expert_dtype=spec.expert_weight_dtype)),
                     spec.published_dtype + (f" + {spec.expert_weight_dtype} experts"
                                             if spec.expert_weight_dtype else ""),
                     format_bytes(kv_bytes_per_token(spec, spec.torch_dtype)), spec.torch_dtype,
                     spec.window_summary() or "-"])
    print(render_table(["preset", "arch", "layers", "dim", "heads/kv", "head_dim", "params",
                        "published", "weights", "weight dtype", "KV/token", "KV dtype",
                        "sliding window"], rows))
    print("weights in the dtype they are published in (kv's default); a sliding window (or "
          "an attention chunk) caps what those layers cache at that many tokens a sequence")
    return 0
