"""Generation speed: TTFT, TPOT, decode tokens/s and how close they are to the hardware's limit.

    cases = plan_cases(spec, prompt_sets(...), modes, max_new_tokens)   # generation_cases.py
    results = run_generation(model, cases, request, env, base_config, roofline)

For every case (prompt set x mode; one `generate` Result each):
1. warm-up, timed apart (`warmup_s`): compile + CUDA-graph capture for the compiled mode (the
   Generator's warmup() per shape; with Timing.share_compiled only what no earlier case of the
   same cache compiled), a short run for eager, a first generate for hf; then
   `request.timing.warmup` untimed full runs (`warmup_runs_s`: allocator growth, cuBLAS
   heuristics);
2. `request.timing.repeats` timed runs; in each, a StepRecorder hook marks start, first token
   and every decode step (CUDA events on a GPU, read after the run: no sync per step);
3. metrics (generation_timing.summarize): TTFT, TPOT p50/p10/p90/p99, decode tok/s (prefill
   excluded), prefill tok/s, the seed's total tokens / generation time / tok/s;
4. roofline (roofline.py): bytes per decode step -> decode GB/s -> MBU against the HBM bandwidth
   measured in this run; prefill FLOPs -> MFU against the measured matmul FLOP/s; a figure above
   the roofline is flagged as a measurement error;
5. memory (memory.py): torch peak allocated / reserved since the case began, NVML's figure for
   this process. A case that runs out of memory becomes a Result with `oom: true` and no speed
   numbers, and the sweep goes on;
6. clocks (measure/clocks.py): the GPU's SM and memory clocks as each timed run ended, and why
   they were below their maxima where NVML says, read between runs;
7. compiler (measure/compiler.py): over the warm-up, how many kernel configs torch's compiler
   timed afresh and how many compiled graphs it loaded from its cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from infermeter.engine.dtypes import dtype_name
from infermeter.engine.model import Transformer
from infermeter.engine.moe import MoEFeedForward, touched_experts
from infermeter.errors import InfermeterError
from infermeter.generate import memory
from infermeter.generate.cases import Case
from infermeter.generate.modes import EngineRunner, make_runner
from infermeter.generate.request import GenerateRequest
from infermeter.generate.timing import RunTiming, StepRecorder, make_clock, summarize
from infermeter.measure import roofline as rl
from infermeter.measure.clocks import clock_metrics, clock_warnings, read_clocks
from infermeter.measure.compiler import NOTHING, compiler_counts, compiler_metrics
from infermeter.measure.nvtx import nvtx_range
from infermeter.measure.ranks import group_size, ranks_meet
from infermeter.measure.result import Result
from infermeter.measure.timing import Stats
from infermeter.measure.trace import trace_path, traced_contexts
from infermeter.specs.model import ModelSpec

# Every metric a generate Result carries (None where it does not apply, e.g. out of memory).
METRIC_NAMES = (
    "ttft_ms", "ttft_stats", "tpot_ms", "decode_tok_per_s", "prefill_tok_per_s", "total_tokens",
    "generation_time_s", "token_generation_speed", "decode_steps", "decode_time_ms", "warmup_s",
    "warmup_runs_s", "bytes_per_decode_step", "bytes_per_decode_step_static_cache",
    "decode_context_mean", "decode_context_range", "decode_gbps", "mbu_pct",
    "decode_tok_per_s_roofline", "moe_experts_per_step", "moe_experts_uniform",
    "prefill_flops", "prefill_tflops", "mfu_pct", *rl.TTFT_METRICS,
    "hbm_gbps_measured", "matmul_tflops_measured", "peak_allocated_bytes", "peak_reserved_bytes",
    "process_gpu_memory_bytes", "gpu_memory_used_bytes", "prompt_tokens", "finished", "oom")


class Progress(Protocol):
    """What run_generation reports to (generation_report.ProgressBar, or a test's recorder)."""

    def start(self, total: int) -> None: ...  # units: per case, the warm-up and each repeat

    def advance(self, label: str) -> None: ...


class _Silent:
    def start(self, total: int) -> None:
        pass

    def advance(self, label: str) -> None:
        pass


@dataclass
class CaseRun:
    repeats: list[list[RunTiming]]  # per repeat, one RunTiming per prompt group
    outputs: list[list[list[int]]]  # per repeat, the output ids in prompt order
    finished: list[bool]
    warmup_s: float
    warmup_runs_s: float
    describe: dict[str, Any]
    memory: dict[str, Any]
    breakdown: dict[str, Any] | None = None  # --trace: where one decode step's time goes
    # MoE: per prompt group, the distinct experts a decode step touched per MoE layer (mean
    # over the steps of a counting run after the timed ones; _count_experts)
    experts: list[float | None] | None = None
    # per timed repeat, the GPU's clocks as it ended (measure/clocks.py; None off a GPU)
    clocks: list[dict[str, Any] | None] = field(default_factory=list)
    # over the warm-up (both parts), what the compiler tuned and loaded (measure/compiler.py)
    compiler: dict[str, int] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_gpu(device: torch.device) -> bool:
    return device.type == "cuda"


def _no_hook(event: str, step: int) -> None:
    pass


def time_case(model: Transformer, case: Case, request: GenerateRequest,
              progress: Progress, trace_path: Any = None,
              hbm_gbps: float | None = None,
              runners: dict[tuple[str, int], Any] | None = None) -> CaseRun:
    """runners (Timing.share_compiled): the runner an earlier case of this mode and cache length
    made, reused with its cache and compiled graphs; a new one is kept there."""
    device = model.tok_embeddings.weight.device
    runner = runners.get((case.mode, case.cache_len)) if runners is not None else None
    if runner is None:
        # A case starts with no KV cache (the engine's is allocated again for its shape; hf
        # makes its own), so the peaks below are this case's: weights + cache + activations.
        model.drop_cache()
        runner = make_runner(model, case, request)
        if runners is not None:
            runners[(case.mode, case.cache_len)] = runner
    memory.reset_peaks(device)
    prompts = case.prompt_set.prompts
    groups = [torch.tensor([prompts[i] for i in g], dtype=torch.int64, device=device)
              for g in case.groups]  # one [b, T] per group, made before anything is timed
    ranks_meet(device)
    compiles = case.mode not in ("eager", "hf-eager")  # an eager case never imports the compiler
    counted = compiler_counts() if compiles else NOTHING
    start = time.perf_counter()
    with nvtx_range(f"warm-up {case.label}"):
        runner.warmup({tuple(t.shape) for t in groups})
    _sync(device)
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(request.timing.warmup):
        for tokens in groups:
            runner.run(tokens, _no_hook)
    _sync(device)
    warmup_runs_s = time.perf_counter() - start
    compiler = compiler_metrics(counted, compiler_counts() if compiles else NOTHING)
    progress.advance(f"{case.label}: warm-up")
    repeats, outputs, finished, clocks = [], [], [False] * len(prompts), []
    for index in range(request.timing.repeats):
        runs, ids = [], [[] for _ in prompts]
        for tokens, group in zip(groups, case.groups):
            recorder = StepRecorder(make_clock(device, request.max_new_tokens + 1))
            ranks_meet(device)
            out = runner.run(tokens, recorder)
            runs.append(recorder.timing(*tokens.shape, new_tokens=out.num_new_tokens))
            for i, row, done in zip(group, out.output_token_ids, out.finished):
                ids[i] = row
                if index == 0:  # with the outputs the Result keeps: the first run's
                    finished[i] = done
        repeats.append(runs)
        outputs.append(ids)
        clocks.append(read_clocks(device.index or 0) if _is_gpu(device) else None)
        progress.advance(f"{case.label}: run {index + 1}/{request.timing.repeats}")
    memory_now = memory.memory_metrics(device)  # the trace below must not count in the peaks
    experts = _count_experts(model, runner, groups) if model.spec.is_moe else None
    traced = _trace(runner, groups[0], case, trace_path,
                    _trace_bound(model, groups[0], request, hbm_gbps, experts)) \
        if trace_path else None
    return CaseRun(repeats, outputs, finished, warmup_s, warmup_runs_s, runner.describe(),
                   memory_now, traced, experts, clocks, compiler)


class ExpertCounter:
    """A generate() hook: after each decode step, the distinct experts each MoE layer routed
    that step's tokens to (moe.touched_experts: a host sync per step, so never in a timed run)."""

    def __init__(self, model: Transformer) -> None:
        self.layers = [layer.feed_forward for layer in model.layers
                       if isinstance(layer.feed_forward, MoEFeedForward)]
        self.per_step: list[float] = []  # mean over the MoE layers, one entry per decode step

    def __call__(self, event: str, step: int) -> None:
        if event == "decode" and self.layers:
            touched = sum(touched_experts(moe).numel() for moe in self.layers)
            self.per_step.append(touched / len(self.layers))


def _count_experts(model: Transformer, runner: Any,
                   groups: list[torch.Tensor]) -> list[float | None]:
    """Per prompt group, one more run (untimed) counting the experts each decode step touched,
    averaged over its steps; greedy decoding (or the seeded sampler) routes it as the timed runs
    were routed. None where nothing was counted (no decode step, or a runner not the engine's:
    transformers runs its own modules, and the engine's would hold an earlier case's routing)."""
    if not isinstance(runner, EngineRunner):
        return [None for _ in groups]
    out: list[float | None] = []
    for tokens in groups:
        counter = ExpertCounter(model)
        runner.run(tokens, counter)
        out.append(sum(counter.per_step) / len(counter.per_step) if counter.per_step else None)
    return out


def _trace_bound(model: Transformer, tokens: torch.Tensor, request: GenerateRequest,
                 hbm_gbps: float | None, experts: list[float | None] | None) -> dict[str, float]:
    """The traced steps' bytes (as the roofline counts them) and the run's measured bandwidth,
    for the trace's bytes-bound step time; empty without a measured bandwidth."""
    contexts = traced_contexts(int(tokens.shape[1]), request.max_new_tokens)
    if not hbm_gbps or not contexts:
        return {}
    weights = dtype_name(model.tok_embeddings.weight.dtype)
    kv_dtype = dtype_name(request.kv_dtype) if request.kv_dtype else weights
    nbytes = rl.mean_decode_step_bytes(model.spec, int(tokens.shape[0]), contexts, weights,
                                       kv_dtype, request.tp or 1, experts[0] if experts else None)
    return {"hbm_gbps": hbm_gbps, "bytes_per_step": nbytes}


def _trace(runner: Any, tokens: torch.Tensor, case: Case, path: Any,
           bound: dict[str, float]) -> dict[str, Any]:
    """--trace: after the timed runs, a profiler trace of a few decode steps (trace_capture)."""
    from infermeter.generate.modes import EngineRunner
    from infermeter.measure.trace import capture_decode

    if not isinstance(runner, EngineRunner):
        return {"skipped": f"the {case.mode} mode is not traced (engine modes only)"}
    found = capture_decode(runner, tokens, path, case.mode, bound)
    return found or {"skipped": "too few new tokens for a traced decode step"}


def _decode_bytes(spec: ModelSpec, case: Case, runs: list[RunTiming], dtype: str, kv_dtype: str,
                  tp: int, experts: list[float | None] | None = None) -> dict[str, Any]:
    """Bytes per decode step averaged over every step of every run (each step reads the KV of
    its own context), the same for a read of the whole static cache, and the contexts.
    experts (MoE, per run): the experts a step touched per MoE layer, as counted; None: the
    uniform-routing expectation stands in."""
    steps = sum(r.decode_steps for r in runs)
    if not steps:
        return {"bytes_per_decode_step": None, "bytes_per_decode_step_static_cache": None,
                "decode_context_mean": None, "decode_context_range": None,
                "moe_experts_per_step": None, "moe_experts_uniform": None}
    need = static = context = counted = uniform = 0.0
    for i, r in enumerate(runs):
        if not r.decode_steps:
            continue
        touched = experts[i] if experts else None
        contexts = range(r.prompt_len + 1, r.prompt_len + r.decode_steps + 1)  # KV tokens read
        need += r.decode_steps * rl.mean_decode_step_bytes(spec, r.batch_size, contexts, dtype,
                                                           kv_dtype, tp, touched)
        # hf sizes its static cache to prompt + new tokens; the engine to the case's cache_len
        cache = r.prompt_len + r.decode_steps + 1 if case.mode.startswith("hf") else case.cache_len
        static += r.decode_steps * rl.decode_step_bytes(spec, r.batch_size, cache, dtype,
                                                        kv_dtype, tp, touched)
        context += sum(contexts)
        if spec.is_moe:
            uniform += r.decode_steps * rl.expected_experts(spec, r.batch_size)
            counted += r.decode_steps * (rl.expected_experts(spec, r.batch_size)
                                         if touched is None else touched)
    ranges = [(r.prompt_len + 1, r.prompt_len + r.decode_steps) for r in runs if r.decode_steps]
    measured = spec.is_moe and bool(experts) and all(e is not None for e in experts)
    return {"bytes_per_decode_step": need / steps,
            "bytes_per_decode_step_static_cache": static / steps,
            "decode_context_mean": context / steps,
            "decode_context_range": [min(a for a, _ in ranges), max(b for _, b in ranges)],
            "moe_experts_per_step": counted / steps if measured else None,
            "moe_experts_uniform": uniform / steps if spec.is_moe else None}


def roofline_metrics(model: Transformer, case: Case, run: CaseRun, tpot_p50: float | None,
                     peaks: rl.Roofline | None, kv_dtype: str, tp: int = 1) -> dict[str, Any]:
    """Decode bytes -> GB/s -> MBU; prefill FLOPs -> FLOP/s -> MFU (against this run's peaks)."""
    spec, dtype = model.spec, dtype_name(model.tok_embeddings.weight.dtype)
    runs = run.repeats[0]  # every repeat runs the same shapes
    out = _decode_bytes(spec, case, runs, dtype, kv_dtype, tp, run.experts)
    hbm = peaks.hbm_gbps if peaks else None
    step_bytes = out["bytes_per_decode_step"]
    gbps = rl.achieved_gbps(step_bytes, tpot_p50) if step_bytes else None
    flops = sum(rl.prefill_flops(spec, r.batch_size, r.prompt_len, tp) for r in runs)
    ttft = Stats.of([sum(r.ttft_ms for r in rep) for rep in run.repeats]).median  # all groups
    tflops = flops / (ttft * 1e-3) / 1e12 if ttft > 0 else None
    bound = None
    if hbm and step_bytes and len(runs) == 1:  # tokens/s if every step ran at HBM speed
        bound = runs[0].batch_size * hbm * 1e9 / step_bytes
    out.update(decode_gbps=gbps, mbu_pct=rl.pct(gbps, hbm), decode_tok_per_s_roofline=bound,
               prefill_flops=flops, prefill_tflops=tflops,
               mfu_pct=rl.pct(tflops, peaks.matmul_tflops if peaks else None))
    out.update(rl.ttft_roofline(spec, [(r.batch_size, r.prompt_len) for r in runs], ttft, dtype,
                                kv_dtype, hbm, peaks.matmul_tflops if peaks else None, tp))
    out.update(peaks.metrics() if peaks else {"hbm_gbps_measured": None,
                                               "matmul_tflops_measured": None})
    return out


# ---- Results ---------------------------------------------------------------------------------
def case_config(case: Case, base: dict[str, Any]) -> dict[str, Any]:
    p = case.prompt_set
    return {**base, "mode": case.mode, "batch_size": p.batch_size, "prompt_len": p.prompt_len,
            "prompt_lengths": p.lengths, "context": p.context, "cache_len": case.cache_len,
            "prompt_source": p.source, "prompt_groups": len(case.groups)}


def agreement(first_mode: str, first: list[list[int]], ids: list[list[int]]) -> dict[str, Any]:
    """Where this mode's tokens first differ from the first mode's on the same prompts."""
    mismatch = None
    for a, b in zip(first, ids):
        step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if step is None and len(a) != len(b):
            step = min(len(a), len(b))
        if step is not None:
            mismatch = step if mismatch is None else min(mismatch, step)
    return {"mode": first_mode, "identical": mismatch is None, "first_mismatch": mismatch}


def case_result(model: Transformer, case: Case, run: CaseRun, request: GenerateRequest,
                peaks: rl.Roofline | None, env: dict[str, Any],
                base: dict[str, Any]) -> Result:
    metrics, samples, warnings = summarize(run.repeats)
    kv_dtype = base.get("kv_dtype") or dtype_name(model.tok_embeddings.weight.dtype)
    tpot_p50 = metrics["tpot_ms"]["p50"] if metrics["tpot_ms"] else None
    metrics.update(roofline_metrics(model, case, run, tpot_p50, peaks, kv_dtype, request.tp or 1))
    metrics.update(run.memory, warmup_s=run.warmup_s, warmup_runs_s=run.warmup_runs_s,
                   prompt_tokens=case.prompt_set.prompt_tokens, finished=run.finished, oom=False)
    warnings += rl.roofline_warnings(metrics["mbu_pct"], metrics["mfu_pct"])
    metrics["gpu_clocks"] = clock_metrics(run.clocks)
    warnings += clock_warnings(metrics["gpu_clocks"])
    metrics["compiler"] = run.compiler
    if any(ids != run.outputs[0] for ids in run.outputs[1:]):
        warnings.append("output tokens differ between repeats (nondeterministic kernels?)")
    if peaks:
        samples.update({f"roofline_{k}": v for k, v in peaks.samples.items()})
        warnings += peaks.warnings
    if run.breakdown is not None:
        metrics["breakdown"] = run.breakdown
        if "skipped" in run.breakdown:
            warnings.append(f"--trace: {run.breakdown['skipped']}")
    return Result("generate", model.spec.to_dict(), {**case_config(case, base), **run.describe},
                  env, metrics, samples=samples, warnings=warnings,
                  output_token_ids=run.outputs[0])


def oom_result(model: Transformer, case: Case, err: BaseException, peaks: rl.Roofline | None,
               env: dict[str, Any], base: dict[str, Any]) -> Result:
    """A case that ran out of memory: recorded, with no speed numbers."""
    device = model.tok_embeddings.weight.device
    metrics: dict[str, Any] = dict.fromkeys(METRIC_NAMES)
    metrics.update(memory.memory_metrics(device), oom=True,
                   prompt_tokens=case.prompt_set.prompt_tokens)
    if peaks:
        metrics.update(peaks.metrics())
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return Result("generate", model.spec.to_dict(), case_config(case, base), env, metrics,
                  warnings=[f"out of memory: {first_line}"])


def run_generation(model: Transformer, cases: list[Case], request: GenerateRequest,
                   env: dict[str, Any], base: dict[str, Any], peaks: rl.Roofline | None = None,
                   progress: Progress | None = None,
                   on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Time every case in order; one Result each (also handed to on_result as it is made)."""
    progress = progress or _Silent()
    progress.start(len(cases) * (request.timing.repeats + 1))
    device = model.tok_embeddings.weight.device
    first: dict[int, tuple[str, list[list[int]]]] = {}  # prompt set -> first mode's tokens
    runners: dict[tuple[str, int], Any] | None = {} if request.timing.share_compiled else None
    results = []
    compiled = False  # whether any case so far went through dynamo (its caches to drop)
    for index, case in enumerate(cases):
        compiled = compiled or case.mode != "eager"  # make_runner's rule
        # --trace only: an untraced run calls time_case exactly as before
        traced = {"trace_path": trace_path(request.timing.trace_dir, index, len(cases)),
                  "hbm_gbps": peaks.hbm_gbps if peaks else None} \
            if request.timing.trace_dir else {}
        try:
            shared = {"runners": runners} if runners is not None else {}  # likewise
            run = time_case(model, case, request, progress, **traced, **shared)
        except Exception as err:  # an OOM is recorded and the sweep goes on; the rest raise
            if not memory.is_oom(err):
                raise
            if group_size() > 1:  # its peers are inside this case: a rank cannot skip it alone
                raise InfermeterError(f"out of memory in case {case.label} under tensor "
                                      f"parallelism (the run stops: a rank cannot skip a case "
                                      f"its peers run): {str(err).splitlines()[0]}") from err
            if runners:
                runners.clear()  # the next case starts afresh, its compiled graphs too
            model.drop_cache()
            result = oom_result(model, case, err, peaks, env, base)
        else:
            result = case_result(model, case, run, request, peaks, env, base)
            key = id(case.prompt_set)
            if key in first:
                same = agreement(*first[key], run.outputs[0])
                result.metrics["tokens_vs_first_mode"] = same
                if not same["identical"] and request.sampling.greedy:
                    result.warnings.append(f"greedy tokens differ from the {same['mode']} "
                                           f"mode's from step {same['first_mismatch']}")
            else:
                first[key] = (case.mode, run.outputs[0])
        if not runners:  # a shared runner keeps its graphs for the next case
            # the case's runner (and an error's frames) are gone by now
            memory.collect(device, compiled)
        results.append(result)
        if on_result:
            on_result(result)
    if runners:
        runners.clear()
        memory.collect(device, compiled)
    return results
