"""Which compile settings make the engine's decode step fastest? (the generation-speed issue)

    python benchmarks/decode_tuning.py [--model llama-2-7b] [--variants fused ...]

Variants: the engine's defaults ("fused-gemv-all-triton": projections fused, the Triton GEMV,
split-KV attention and SwiGLU kernels, inductor with coordinate-descent tuning for the rest)
against what they replaced ("fused": inductor's reductions and the math attention, the defaults
until commit 43e7a3c) and the alternatives tried. For each variant: random fp16 weights, batch 1,
an 80-token prompt in a 512-token cache, the decode step compiled (CUDA graphs on), then 3 timed
runs of 128 decode steps (CUDA events around each run; the median per-step time is reported)
and the weight bytes read per step / TPOT as GB/s. Each variant is also profiled for 5 steps
and its 25 most expensive kernels are listed by name, so the step's cost can be read kernel by
kernel. Writes results/decode-tuning[-TAG]-<device>.json (and $OUT/ when
set) after every variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from infermeter.engine.checkpoint.load import load_weights
from infermeter.engine.generator import GenerationConfig, Generator
from infermeter.engine.linear import set_matvec_kernel
from infermeter.measure.env import capture_env, device_slug
from infermeter.measure.result import Result, write_json

# name: (fuse projections?, extra inductor options, decode attention, SwiGLU activation kernel
# (model.ACTIVATION_KERNELS), materialized attention norm (opaque_ops.materialize), one-row
# products (linear.MATVEC_KERNELS)). Unfused
# variants run first: fusing is in place and irreversible.
VARIANTS = {
    # the first defaults (commit 4b52de7 and before):
    "unfused-before": (False, {"coordinate_descent_tuning": False}, "sdpa", "inline", False,
                       "inductor"),
    "unfused": (False, {}, "math", "inline", False, "inductor"),
    "fused-no-coord-descent": (True, {"coordinate_descent_tuning": False}, "math", "inline",
                               False, "inductor"),
    "fused-sdpa": (True, {}, "sdpa", "inline", False, "inductor"),
    "fused-inline-act": (True, {}, "math", "inline", False, "inductor"),  # default to d5edab0
    "fused": (True, {}, "math", "aten", False, "inductor"),  # the defaults until commit 43e7a3c
    "fused-materialized-norm": (True, {}, "math", "aten", True, "inductor"),  # measured slower, off
    # Tried 2026-11-26: inductor's flex-decoding kernel for attention (one split-KV kernel +
    # combine, KV write unchanged) and wider searches for the matrix-vector kernels' block
    # sizes (the trace showed two w2 kernel variants, 37 and 60 us, for the same 90 MB of weights).
    "fused-flex": (True, {}, "flex", "inline", False, "inductor"),
    "fused-autotune": (True, {"max_autotune_pointwise": True}, "math", "aten", False, "inductor"),
    "fused-flex-autotune": (True, {"max_autotune_pointwise": True}, "flex", "inline", False,
                            "inductor"),
    "fused-radius2": (True, {"coordinate_descent_search_radius": 2}, "math", "aten", False,
                      "inductor"),
    # decode_kernel.py's split-KV Triton kernel (one launch a layer, stops at the position)
    "fused-triton": (True, {}, "triton", "aten", False, "inductor"),
    # swiglu_kernel.py: the activation in one Triton kernel instead of two eager ones
    "fused-triton-act": (True, {}, "math", "triton", False, "inductor"),
    "fused-all-triton": (True, {}, "triton", "triton", False, "inductor"),
    # Commit b5833b9: gemv_kernel.py's fixed-tiling GEMV for every one-row product (linear.py)
    "fused-gemv": (True, {}, "math", "aten", False, "triton"),
    # Commit 7eaced5: the split-KV kernel's combine as a Triton kernel too (decode_kernel.py),
    # beside the GEMV (whose opaque wo left the math attention's PV product unfused: ~20 us a layer)
    "fused-gemv-triton": (True, {}, "triton", "aten", False, "triton"),
    "fused-gemv-all-triton": (True, {}, "triton", "triton", False, "triton"),  # the defaults
}
PROMPT_LEN, CACHE, STEPS, RUNS = 80, 512, 128, 3


def time_decode(generator: Generator, config: GenerationConfig) -> list[float]:
    """Milliseconds per decode step, one figure per run of STEPS steps."""
    tokens = torch.randint(0, generator.spec.vocab_size, (1, PROMPT_LEN), device="cuda")
    per_step = []
    for _ in range(RUNS):
        generator.prepare(1, PROMPT_LEN, STEPS + 1)
        state = generator.prefill(tokens, config)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(STEPS):
            generator.decode_step(state, config)
        end.record()
        torch.cuda.synchronize()
        per_step.append(start.elapsed_time(end) / STEPS)
    return per_step


def top_kernels(generator: Generator, config: GenerationConfig, n: int = 25) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    tokens = torch.randint(0, generator.spec.vocab_size, (1, PROMPT_LEN), device="cuda")
    generator.prepare(1, PROMPT_LEN, 16)
    state = generator.prefill(tokens, config)
    for _ in range(2):
        generator.decode_step(state, config)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            generator.decode_step(state, config)
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if total > 0:
            rows.append({"kernel": event.key[:120], "us_per_step": total / 5,
                         "calls_per_step": event.count / 5})
    return sorted(rows, key=lambda r: -r["us_per_step"])[:n]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--variants", nargs="+", default=["unfused-before", "fused-sdpa",
                                                           "fused"],
                        choices=list(VARIANTS))
    parser.add_argument("--tag", default="", help="file name part: decode-tuning-TAG-<device>")
    args = parser.parse_args()
    torch._inductor.config.triton.unique_kernel_names = True  # names say which ops fused
    env = capture_env()
    model = load_weights(f"random:{args.model}", "cuda", "float16", seed=0)
    weight_bytes = sum(p.nbytes for p in model.parameters()) - model.tok_embeddings.weight.nbytes
    config = GenerationConfig(max_new_tokens=STEPS + 1, compile=True)
    out = {"weight_bytes_per_step": weight_bytes, "variants": {}}
    names = sorted(args.variants, key=lambda n: VARIANTS[n][0])  # unfused first
    config_out = {"benchmark": "decode_tuning", "batch_size": 1, "prompt_len": PROMPT_LEN,
                  "max_seq_len": CACHE, "decode_steps": STEPS, "runs": RUNS, "dtype": "float16",
                  "weights": "random"}
    name_part = f"decode-tuning-{args.tag}-" if args.tag else "decode-tuning-"
    for name in names:
        fuse, options, attention, opaque_act, opaque_norm, matvec = VARIANTS[name]
        for layer in model.layers:
            layer.attention.decode_attention = attention
            layer.feed_forward.activation_kernel = opaque_act
            layer.materialize_norm = opaque_norm
        generator = Generator(model, max_seq_len=CACHE, compile_options=options, fuse=fuse)
        set_matvec_kernel(model, matvec)  # after fusing: the fused matrices are new modules
        t0 = time.perf_counter()
        try:
            generator.warmup(1, PROMPT_LEN, config)
        except Exception as error:  # noqa: BLE001 - one variant failing must not end the rest
            out["variants"][name] = {"error": f"{type(error).__name__}: {error}"[:2000]}
            print(f"{name}: FAILED {out['variants'][name]['error'][:300]}", flush=True)
            torch._dynamo.reset()
            continue
        warmup_s = time.perf_counter() - t0
        runs = time_decode(generator, config)
        tpot = statistics.median(runs)
        row = {"options": options, "fused": fuse, "decode_attention": attention,
               "activation_kernel": opaque_act, "materialized_norm": opaque_norm,
               "matvec_kernel": matvec,
               "warmup_s": warmup_s,
               "tpot_ms_runs": runs,
               "tpot_ms": tpot, "decode_tok_per_s": 1e3 / tpot,
               "weight_gbps": weight_bytes / tpot / 1e6}
        row["top_kernels"] = top_kernels(generator, config)  # every variant's, to compare
        out["variants"][name] = row
        print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
        for k in row["top_kernels"][:12]:
            print(f"  {k['us_per_step']:9.1f} us x{k['calls_per_step']:5.0f}  {k['kernel']}")
        # Written after every variant: a command cut short keeps the variants it finished.
        result = Result("generate", model.spec.to_dict(), config_out, env, out)
        for folder in filter(None, [Path("results"), os.environ.get("OUT")]):
            write_json(Path(folder) / f"{name_part}{device_slug(env)}.json", result)
        torch._dynamo.reset()  # the next variant compiles afresh
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
