"""Engine check on a real GPU (the engine issue's device part), written as one Result.

1. Llama-2-7B with random fp16 weights on one GPU: greedy decoding of 256 tokens, eager and
   compiled (torch.compile + CUDA graphs); the two token lists must be identical. Beside it,
   eager against itself, and a teacher-forced comparison (both paths fed eager's tokens): every
   step where the compiled pick differs, with eager's top-2 logit gap there.
2. Loading a 7B-sized HF checkpoint written here: load time against the time to read the same
   bytes from disk (target < 2x), and peak host memory against the checkpoint size (< 1.2x).
   The page cache is dropped before each timed read when the kernel lets us (root), so both
   read from disk; if it cannot be dropped both read from the page cache, and the Result says so.

Usage: python benchmarks/engine_check.py [--model llama-2-7b] [--tokens 256] [--deterministic]
       [--logit-std 4]   (a trained-like spread of the next-token logits; see sharpen_head)
       [--step-kernels fused]   (the compiled batch-1 step's layers, as generate --step-kernels)
Writes results/engine-check-<device>.json (and a copy to $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from infermeter.engine.checkpoint.load import load_weights, save_checkpoint
from infermeter.engine.generator import GenerationConfig, Generator
from infermeter.engine.model import STEP_KERNEL, STEP_KERNELS, fused_step_layers, set_step_kernels
from infermeter.measure.env import capture_env, device_slug
from infermeter.measure.result import Result, write_json

PROMPT = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889]


def drop_page_cache() -> bool:
    """Flush dirty pages and drop the page cache so the next read comes from disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_bytes_time(files: list[Path]) -> float:
    """Seconds to read every byte of `files` sequentially in 64 MiB chunks."""
    start = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while handle.read(64 << 20):
                pass
    return time.perf_counter() - start


def timed_generate(generator: Generator, prompt: list[int], config: GenerationConfig):
    """generate() with a wall clock around it (synchronized): output ids and seconds."""
    sync = torch.cuda.synchronize if generator.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    ids = generator.generate([prompt], config).output_token_ids[0]
    sync()
    return ids, time.perf_counter() - t0


@torch.no_grad()
def logit_gap_at(generator: Generator, prompt: list[int], eager: list[int],
                 compiled: list[int], step: int) -> dict:
    """At the first differing step: how far apart were the two picks in eager's own logits?

    A gap far below the logits' spread means a near-tie that rounding decided, not a bug.
    """
    seq = prompt + eager[:step]
    generator.prepare(1, len(seq), 1)
    tokens = torch.tensor([seq], device=generator.device)
    positions = torch.arange(len(seq), device=generator.device)
    logits = generator.model(tokens, positions)[0, -1].float()
    top2 = logits.topk(2).values
    return {"mismatch_logit_gap": float(logits[eager[step]] - logits[compiled[step]]),
            "mismatch_top2_gap": float(top2[0] - top2[1]), "logit_std": float(logits.std())}


@torch.no_grad()
def teacher_forced(generator: Generator, prompt: list[int], eager: list[int],
                   config: GenerationConfig) -> dict:
    """Both paths fed eager's own tokens, step by step: does the compiled step pick eager's next
    token wherever eager's choice is not a near-tie? Free-running outputs part for good at the
    first flipped near-tie; this compares every step on the same input instead.

    Eager's logits give each step's top-2 gap; a disagreement is "a tie" when that gap is at
    most two fp16 steps (ulps) of the top logit. Returns the agreement and the disagreements.
    """
    device = generator.device
    tokens = torch.tensor([prompt], device=device)
    gaps, eager_picks = [], []  # eager's pick, top-2 gap and tie bound at each forced step
    generator.prepare(1, len(prompt), len(eager))
    logits = generator.model(tokens, torch.arange(len(prompt), device=device))[0, -1]
    for step in range(len(eager)):
        top2 = logits.float().topk(2).values
        eager_picks.append(int(logits.argmax()))
        ulp = torch.finfo(torch.float16).eps * 2.0 ** torch.floor(torch.log2(top2[0].abs()))
        gaps.append((float(top2[0] - top2[1]), float(2 * ulp)))
        if step + 1 < len(eager):
            pos = torch.tensor([len(prompt) + step], device=device)
            logits = generator.model(torch.tensor([[eager[step]]], device=device), pos)[0, -1]
    state = generator.prefill(tokens, config)  # the compiled path: prefill, then forced steps
    picks = [int(state.token[0])]
    for step in range(len(eager) - 1):
        state.token = torch.tensor([eager[step]], device=device)
        picks.append(int(generator.decode_step(state, config)[0]))
    differ = [{"step": i, "eager": e, "compiled": c, "eager_top2_gap": gaps[i][0],
               "tie_bound": gaps[i][1]}
              for i, (e, c) in enumerate(zip(eager_picks, picks)) if e != c]
    return {"teacher_forced_agreement": 1 - len(differ) / len(eager),
            "teacher_forced_disagreements": differ, "_eager_picks": eager_picks,
            "_compiled_picks": picks,
            "teacher_forced_all_at_ties": all(d["eager_top2_gap"] <= d["tie_bound"]
                                              for d in differ)}


@torch.no_grad()
def float32_arbiter(generator: Generator, prompt: list[int], eager: list[int],
                    forced: dict) -> dict:
    """Who is right where eager and compiled disagree? A float32 copy of the same (fused)
    weights reads prompt + eager's tokens in one forward (TF32 off) and gives each step's
    float32 pick: the rounding-free answer both fp16 paths approximate. Adds its pick to every
    teacher-forced disagreement, and how often eager and compiled agree with it overall."""
    import copy

    model, device = generator.model, generator.device
    reference = copy.deepcopy(model).float()  # fp16 values, exactly, in float32
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        seq = prompt + eager[:-1]  # step i's logits come after prompt + eager[:i]
        reference.setup_cache(1, len(seq))
        logits = reference(torch.tensor([seq], device=device),
                           torch.arange(len(seq), device=device))[0, len(prompt) - 1:]
        truth = logits.argmax(dim=-1).tolist()  # [len(eager)] float32 picks
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        del reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for item in forced["teacher_forced_disagreements"]:
        item["float32"] = truth[item["step"]]
    eager_picks, compiled_picks = forced.pop("_eager_picks"), forced.pop("_compiled_picks")
    return {"float32_agrees_eager": sum(a == b for a, b in zip(truth, eager_picks)) / len(truth),
            "float32_agrees_compiled": sum(a == b for a, b in zip(truth, compiled_picks))
            / len(truth)}


@torch.inference_mode()
def sharpen_head(model, target_std: float) -> float:
    """Scale the output head so the prompt's last logits have standard deviation `target_std`.

    Random weights give nearly flat next-token logits (std ~1.3 over 32k tokens for Llama-2-7B,
    top-2 gaps of one fp16 ulp), so greedy decoding there is a coin toss at fp16 resolution
    and any rounding difference changes the text. A trained model's logits are spread much
    wider; this gives the random model such a spread (the rest of the network is untouched)
    and returns the factor applied. The Result records both.
    """
    prompt = torch.tensor([[p % model.spec.vocab_size for p in PROMPT]],
                          device=model.output.weight.device)
    model.setup_cache(1, prompt.shape[1])
    logits = model(prompt, torch.arange(prompt.shape[1], device=prompt.device))[0, -1]
    scale = target_std / logits.float().std().item()
    if model.output.weight is model.tok_embeddings.weight:  # tied: scale a copy of the head
        model.output.weight = torch.nn.Parameter(model.output.weight.detach().clone(),
                                                 requires_grad=False)
    model.output.weight.mul_(scale)
    return scale


def greedy_check(model, tokens: int, backend: str | None, attention: str | None) -> dict:
    """Eager and compiled greedy decoding of the same prompt; where (if) they first differ.

    The wall times (prefill included, after warm-up) are a rough guide, not the generation
    benchmark, which times prefill and every decode step apart with CUDA events.
    """
    length = min(512, model.spec.max_seq_len)
    generator = Generator(model, max_seq_len=length, compile_backend=backend,
                          decode_attention=attention)
    eager_cfg = GenerationConfig(max_new_tokens=tokens, compile=False)
    compiled_cfg = GenerationConfig(max_new_tokens=tokens, compile=True)
    prompt = [p % model.spec.vocab_size for p in PROMPT]
    generator.warmup(1, len(prompt), eager_cfg)
    eager, eager_s = timed_generate(generator, prompt, eager_cfg)
    # Eager against itself in the same process: if this differs, the GPU run is not
    # deterministic (e.g. split-K GEMMs reducing with atomics) and no compiled path can match.
    eager_again, _ = timed_generate(generator, prompt, eager_cfg)
    repeat_mismatch = next((i for i, (a, b) in enumerate(zip(eager, eager_again)) if a != b),
                           None)
    t0 = time.perf_counter()
    generator.warmup(1, len(prompt), compiled_cfg)
    warmup_s = time.perf_counter() - t0
    compiled, compiled_s = timed_generate(generator, prompt, compiled_cfg)
    mismatch = next((i for i, (a, b) in enumerate(zip(eager, compiled)) if a != b), None)
    gap = {} if mismatch is None else logit_gap_at(generator, prompt, eager, compiled, mismatch)
    gap.update(teacher_forced(generator, prompt, eager, compiled_cfg))
    gap.update(float32_arbiter(generator, prompt, eager, gap))
    return {**gap, "eager": eager, "compiled": compiled, "identical": eager == compiled,
            "first_mismatch": mismatch, "compile_warmup_s": warmup_s,
            "compile_backend": generator.compile_backend, "eager_wall_s": eager_s,
            "compiled_wall_s": compiled_s, "eager_repeat_first_mismatch": repeat_mismatch,
            "decode_attention": generator.decode_attention_used(True, 1)}


LOAD_PROBE = r"""
import json, resource, sys, time, torch
import torch

from infermeter.engine.checkpoint.load import load_weights
if sys.argv[2] == "cuda": torch.cuda.init(); torch.zeros(1, device="cuda")
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"): return int(line.split()[1]) * 1024
before = rss()
t0 = time.perf_counter()
model = load_weights(sys.argv[1], sys.argv[2], sys.argv[3])
if sys.argv[2] == "cuda": torch.cuda.synchronize()
elapsed = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"load_s": elapsed, "rss_before": before, "peak_rss": peak,
                  "peak_over_baseline": peak - before}))
"""


def load_check(model, folder: Path, devices: tuple[str, ...], dtype: str) -> dict:
    t0 = time.perf_counter()
    files = save_checkpoint(model, folder, "hf", n_shards=3)
    write_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in files)
    dropped = drop_page_cache()
    read_s = read_bytes_time(files)
    out = {"checkpoint_bytes": size, "write_s": write_s, "disk_read_s": read_s,
           "page_cache_dropped": dropped}
    for device in devices:
        drop_page_cache()
        probe = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(folder), device, dtype],
                               capture_output=True, text=True, check=True)
        facts = json.loads(probe.stdout.strip().splitlines()[-1])
        out[f"load_{device}_s"] = facts["load_s"]
        out[f"load_{device}_over_read"] = facts["load_s"] / read_s
        out[f"peak_host_{device}_bytes"] = facts["peak_over_baseline"]
        out[f"peak_host_{device}_over_size"] = facts["peak_over_baseline"] / size
    return out


def write(result: Result, slug: str) -> None:
    for folder in filter(None, [Path("results"), os.environ.get("OUT")]):
        write_json(Path(folder) / f"engine-check-{slug}.json", result)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama-2-7b")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--backend", choices=("cudagraphs", "inductor"),
                        help="compile backend (default: the Generator's)")
    parser.add_argument("--deterministic", action="store_true",
                        help="torch.use_deterministic_algorithms + a fixed cuBLAS workspace: "
                        "three H200 runs of eager greedy decoding parted at steps 124 and 149")
    parser.add_argument("--logit-std", type=float, metavar="STD",
                        help="scale the random model's output head so the prompt's logits have "
                        "this spread (trained models' are far wider than random weights' ~1.3); "
                        "the Result's file name then ends in -peaked")
    parser.add_argument("--decode-attention", choices=("auto", "math", "sdpa", "flex", "triton"),
                        help="the compiled step's attention (default: the engine's); the file "
                        "name then ends in -ATTENTION")
    parser.add_argument("--step-kernels", choices=STEP_KERNELS, default=STEP_KERNEL,
                        help="the compiled batch-1 step's layers, as generate --step-kernels "
                        f"(default {STEP_KERNEL}); the file name then ends in -KIND when not "
                        "the default")
    args = parser.parse_args()
    if args.deterministic:  # before the first cuBLAS call, which reads the variable
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # warn where an op has none
    env = capture_env()
    model = load_weights(f"random:{args.model}", args.device, args.dtype, seed=0)
    head_scale = sharpen_head(model, args.logit_std) if args.logit_std else None
    set_step_kernels(model, args.step_kernels)  # eager ignores it: it judges the compiled step
    check = greedy_check(model, args.tokens, args.backend, args.decode_attention)
    keys = ("first_mismatch", "compile_warmup_s", "compile_backend", "eager_wall_s",
            "compiled_wall_s", "mismatch_logit_gap", "mismatch_top2_gap", "logit_std",
            "eager_repeat_first_mismatch", "teacher_forced_agreement",
            "teacher_forced_disagreements", "teacher_forced_all_at_ties",
            "float32_agrees_eager", "float32_agrees_compiled", "decode_attention")
    metrics = {key: check[key] for key in keys if key in check}
    metrics.update(tokens_identical=check["identical"], new_tokens=args.tokens,
                   fused_step_layers=fused_step_layers(model))  # asked for and able to fuse
    print(json.dumps(metrics), flush=True)
    warnings = [] if check["identical"] else [
        f"eager and compiled greedy tokens differ from step {check['first_mismatch']}"]
    config = {"benchmark": "engine_check", "device": args.device, "dtype": args.dtype,
              "deterministic": args.deterministic, "logit_std_target": args.logit_std,
              "step_kernels": args.step_kernels,
              "output_head_scale": head_scale,
              "weights": "random", "batch_size": 1, "prompt_len": len(PROMPT), "max_seq_len": 512}
    slug = f"{device_slug(env)}-{check['compile_backend']}" + ("-peaked" if head_scale else "") \
        + (f"-{args.decode_attention}" if args.decode_attention else "") \
        + (f"-{args.step_kernels}" if args.step_kernels != STEP_KERNEL else "")
    result = Result("generate", model.spec.to_dict(), config, env, metrics, warnings=warnings,
                    output_token_ids=[check["eager"], check["compiled"]])
    write(result, slug)  # the greedy check is saved even if the load check runs out of time
    if not args.skip_load:
        devices = ("cuda", "cpu") if args.device == "cuda" else ("cpu",)
        with tempfile.TemporaryDirectory(dir=os.environ.get("CKPT_TMP", "/tmp")) as tmp:
            metrics.update(load_check(model, Path(tmp), devices, args.dtype))
        if not metrics["page_cache_dropped"]:
            warnings.append("page cache could not be dropped: reads came from memory")
        write(result, slug)
    print(json.dumps(metrics, indent=1))
    return 0 if check["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
