"""`infermeter run`: the main job's setting and its four stages (kv, copy, generate, offload).

The setting is fixed before anything is measured, so the first output line can say exactly what
will run. Each stage returns its Results; the command (commands/run.py) appends them to the
results file after each stage and makes the report from whatever exists at the end.

Defaults:
- with a CUDA GPU, the reference setting (the seed's table): llama-2-7b, random fp16 weights,
  batch 1, a 512-token cache; copy moves it on the engine, contiguous and paged-16 layouts from
  pinned memory (per-tensor and staged, the fastest methods measured, docs/copy.md) and the seed's
  way; generate runs the compiled mode, fixed length, 80 prompt + 432 new tokens = 512.
- without one, the `debug` preset on the CPU: the same pipeline, a 64-token cache, eager, few
  repeats. Its numbers check the pipeline, they say nothing about a GPU.

The generate stage also times prefill alone (batch 1, one new token: TTFT) on a ladder of longer
prompts, in the run's mode (compiled on a GPU: the compiled prefill a recompute would run), each a
Result marked `prefill_ladder`, so the report's reload-vs-recompute table has measured prefill
times where it needs them (prefill_ladder() says which lengths, ladder_request() how).

The offload stage times one bounded `infermeter offload` case: a prefix's KV cache in host memory
reloaded (serial, layer by layer) against recomputed, at prefix and suffix lengths taken from the
setting (offload_lengths() says which).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from infermeter.engine.prefill_buckets import COMPILED_PREFILL_CHUNK
from infermeter.errors import InfermeterError
from infermeter.measure.result import Result
from infermeter.specs.model import ModelSpec

SEED_NEW_TOKENS = 432  # the seed generated 432 tokens into a 512-token cache
REFERENCE = {"model": "llama-2-7b", "batch": 1, "seq_len": 512, "dtype": "float16"}
CPU_DEFAULT = {"model": "debug", "batch": 1, "seq_len": 64, "dtype": "float32"}
# copy: the layouts an engine and a server hold; per-tensor and staged are the fastest pinned
# methods measured (docs/copy.md); "seed" is the seed's own .cpu()/.cuda() per tensor, for
# comparison.
COPY_LAYOUTS = ("engine", "contiguous", "paged")
COPY_METHODS = ("per-tensor", "staged")
COPY_DIRECTIONS = ("d2h", "h2d")
COPY_BLOCK_TOKENS = (16,)
# The prefill ladder: prompt lengths timed beside the reference prompt, plus the longest that fits
# the model's context and the device's memory. On the CPU a short one (the debug preset's whole
# 256-token context is milliseconds), so the run stays quick whatever --model is given.
LADDER_PROMPTS = (512, 2048, 8192)
LADDER_LONGEST = 32768  # the report's longest reload-vs-recompute context: none longer is needed
CPU_LADDER_PROMPTS = (128,)
CPU_LADDER_LONGEST = 256
LADDER_NEW_TOKENS = 1  # the first token ends the prefill: TTFT is what the ladder times
# The compiled ladder's longest forward: shorter prompts run padded to their bucket, longer ones
# as compiled chunks of it (generate --prefill-chunk), so a 32,768-token prompt holds a chunk's
# activations and the whole ladder compiles a few graphs (benchmarks/ttft_sweep.py's chunk too).
# generate's compiled default, so the ladder times the prefill `generate` runs.
LADDER_CHUNK = COMPILED_PREFILL_CHUNK
LADDER_MEMORY_SHARE = 0.9  # of the free memory: headroom for what case_memory does not count
# offload: one bounded reload-vs-recompute case (`infermeter offload`) sized from the setting.
# Suffixes (the request's new tokens): the run's prompt and its whole cache; prefixes (the KV in
# host memory): the cache length times these, capped where prefix + suffix stop fitting.
OFFLOAD_PREFIX_FACTORS = (1, 4, 16)  # the reference's 512-token cache: 512, 2048, 8192
CPU_OFFLOAD_PREFIX_FACTORS = (1, 4)  # the CPU default's 64: 64, and 188 (debug's context)
OFFLOAD_NEW_TOKENS = 4  # greedy tokens checked to agree across the three ways (offload's default)


@dataclass(frozen=True)
class RunSetting:
    spec: ModelSpec
    model: str  # what --model named (a preset or a path), or the checkpoint folder
    checkpoint: str | None
    batch: int
    seq_len: int
    dtype: str
    device: str  # "cuda" or "cpu"
    reference: bool  # exactly the seed's setting on a GPU
    trace_dir: str | None = None  # --trace: profiler traces in <dir>/copy and <dir>/generate
    generate_mode: str | None = None  # None: compiled on a GPU, eager on the CPU

    @property
    def new_tokens(self) -> int:
        """432 new tokens as the seed did once the cache holds them with a prompt beside;
        shorter caches keep the seed's ratio 432/512 (a 64-token cache: 10 + 54)."""
        if self.seq_len >= 512:
            return SEED_NEW_TOKENS
        return max(1, self.seq_len * SEED_NEW_TOKENS // 512)

    @property
    def prompt_len(self) -> int:
        return max(1, self.seq_len - self.new_tokens)  # prompt + new tokens fill the cache

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def mode(self) -> str:
        """generate's mode for the reference case and the prefill ladder alike."""
        return self.generate_mode or ("compiled" if self.on_gpu else "eager")

    def describe(self) -> str:
        weights = "checkpoint" if self.checkpoint else "random"
        return (f"{self.spec.name} ({weights} {self.dtype} weights), batch {self.batch}, "
                f"{self.seq_len}-token cache ({self.prompt_len} prompt + {self.new_tokens} new "
                f"tokens)")


def plan_setting(model: str | None, checkpoint: str | None, batch: int | None,
                 seq_len: int | None, dtype: str | None, gpu: bool) -> RunSetting:
    """The setting from the flags; what is not given comes from the reference (GPU) or the
    debug preset (CPU). Raises InfermeterError for an unknown model or a bad checkpoint."""
    from infermeter.units import canonical_dtype

    base = REFERENCE if gpu else CPU_DEFAULT
    if checkpoint:
        from infermeter.engine.checkpoint.load import spec_for

        spec = spec_for(checkpoint)[0]  # kv sizes the user's model from its config
    else:
        from infermeter.specs.loaders import resolve_model

        spec = resolve_model(model or base["model"])
    default_dtype = base["dtype"] if not checkpoint and not model else spec.torch_dtype
    if not gpu:
        default_dtype = "float32"  # half-precision matmuls on a CPU are slow or missing
    setting = RunSetting(spec=spec, model=checkpoint or model or base["model"],
                         checkpoint=checkpoint, batch=batch or base["batch"],
                         # the default cache fits the model (a small one's context)
                         seq_len=seq_len or min(base["seq_len"], spec.max_seq_len),
                         dtype=canonical_dtype(dtype or default_dtype),
                         device="cuda" if gpu else "cpu", reference=False)
    from infermeter.engine.dtypes import torch_dtype

    torch_dtype(setting.dtype)  # the engine's three: fp8 or int8 failed in each stage instead
    # the cache holds the prompt and the new tokens (one each at least), within the model's
    # context: else every stage past kv would fail on its own, one error line each
    if not 2 <= setting.seq_len <= spec.max_seq_len:
        raise InfermeterError(f"--seq-len {setting.seq_len}: the cache holds a prompt and new "
                              f"tokens, so it takes 2 to {spec.max_seq_len} tokens "
                              f"({spec.name}'s context)")
    if checkpoint:
        from infermeter.engine.checkpoint.load import check_checkpoint

        # the loader's name and shape checks, from the files' headers: a missing or misshapen
        # tensor is one line here, not a generate stage failing after kv and copy ran
        check_checkpoint(checkpoint)
    is_reference = gpu and not checkpoint and (setting.spec.name, setting.batch,
                                               setting.seq_len, setting.dtype) == (
        REFERENCE["model"], REFERENCE["batch"], REFERENCE["seq_len"], REFERENCE["dtype"])
    return RunSetting(**{**setting.__dict__, "reference": is_reference})


def kv_stage(setting: RunSetting, env: dict[str, Any]) -> list[Result]:
    """Analytic KV and weight bytes, checked against the engine's allocation (meta device)."""
    from infermeter.kv.job import KvRequest, kv_results
    from infermeter.measure.env import nvml_facts

    memory = nvml_facts().get("gpu_memory_bytes") if setting.on_gpu else None
    request = KvRequest(setting.spec, (setting.batch,), (setting.seq_len,),
                        kv_dtype=setting.dtype, dtype=setting.dtype, gpu_memory=memory,
                        gpu_memory_source=env.get("device_name") if memory else None,
                        check_engine=True)
    return kv_results(request, env)


def copy_request(setting: RunSetting) -> Any:
    from infermeter.copy.job import CopyRequest

    # pinned memory needs CUDA; on the CPU the preallocated pageable buffer stands in for it
    hosts = ("seed", "pinned") if setting.on_gpu else ("seed", "pageable")
    return CopyRequest(setting.spec, (setting.batch,), (setting.seq_len,),
                       kv_dtype=setting.dtype, layouts=COPY_LAYOUTS, hosts=hosts,
                       directions=COPY_DIRECTIONS, methods=COPY_METHODS,
                       block_tokens=COPY_BLOCK_TOKENS, repeats=10 if setting.on_gpu else 3,
                       warmup=2 if setting.on_gpu else 1, device=setting.device)


def copy_stage(setting: RunSetting, env: dict[str, Any]) -> list[Result]:
    from infermeter.copy.job import n_cases, run_copy
    from infermeter.copy.table import progress_bar

    request = copy_request(setting)
    with progress_bar(n_cases(request), enabled=True) as progress:
        if setting.trace_dir:
            from infermeter.copy.trace import traced_copy

            return traced_copy(request, progress, f"{setting.trace_dir}/copy", env=env)
        return run_copy(request, progress, env=env)


def generate_request(setting: RunSetting) -> Any:
    from infermeter.generate.request import build_request

    source = setting.checkpoint or f"random:{setting.model}"
    return build_request(
        source=source, max_new_tokens=setting.new_tokens, device=setting.device,
        dtype=setting.dtype, modes=(setting.mode,), max_seq_len=setting.seq_len,
        batch_sizes=(setting.batch,),
        prompt_lens=(setting.prompt_len,), repeats=3 if setting.on_gpu else 2,
        warmup=1 if setting.on_gpu else 0, roofline=setting.on_gpu,  # MBU needs a GPU's HBM
        trace_dir=f"{setting.trace_dir}/generate" if setting.trace_dir else None)


def longest_prompt(spec: ModelSpec, dtype: str, free_bytes: int | None,
                   new_tokens: int = LADDER_NEW_TOKENS) -> int:
    """The longest batch-1 prompt whose case (weights, its cache, prefill activations: generate's
    own estimate, generate/memory.py) fits LADDER_MEMORY_SHARE of free_bytes and whose prompt +
    new tokens fit the model's context; 0 if none does. free_bytes None: the context only."""
    from infermeter.generate.memory import case_memory
    from infermeter.specs.sizes import cache_length

    def fits(n: int) -> bool:
        if free_bytes is None:
            return True
        cache = cache_length(spec, n, new_tokens, None)
        need = sum(case_memory(spec, 1, n, cache, dtype, dtype, "eager").values())
        return need <= free_bytes * LADDER_MEMORY_SHARE

    low, high = 0, spec.max_seq_len - new_tokens  # fits(low) holds, by convention for 0
    while low < high:  # the memory need grows with n: the last n that fits
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def prefill_ladder(spec: ModelSpec, dtype: str, reference_prompt: int, free_bytes: int | None,
                   on_gpu: bool) -> tuple[int, ...]:
    """The prompt lengths to time prefill at, beside the reference prompt: the ladder's rungs
    longer than it (LADDER_PROMPTS; CPU_LADDER_PROMPTS on the CPU) and the longest prompt that
    fits (longest_prompt, at most LADDER_LONGEST tokens; CPU_LADDER_LONGEST on the CPU),
    ascending."""
    longest = min(longest_prompt(spec, dtype, free_bytes), LADDER_LONGEST)
    rungs = LADDER_PROMPTS
    if not on_gpu:
        rungs, longest = CPU_LADDER_PROMPTS, min(longest, CPU_LADDER_LONGEST)
    return tuple(sorted({n for n in (*rungs, longest) if reference_prompt < n <= longest}))


def ladder_request(setting: RunSetting, prompts: tuple[int, ...]) -> Any:
    """Batch 1, one new token, in the run's mode, every rung in one cache (the longest's).
    Compiled: the compiled mode's default bucketed prefill (engine/prefill_buckets.py) in
    forwards of at most LADDER_CHUNK tokens, and one Generator for the whole ladder
    (Timing.share_compiled): each bucket or chunk length is compiled once, in the warm-up of the
    first rung that runs it (its warmup_s, apart from the timed runs), never again. Eager: eager
    forwards at the prompt's own length, as the run's eager reference case."""
    from infermeter.generate.request import build_request
    from infermeter.specs.sizes import cache_length

    compiled = setting.mode == "compiled"
    return build_request(
        source=setting.checkpoint or f"random:{setting.model}", max_new_tokens=LADDER_NEW_TOKENS,
        device=setting.device, dtype=setting.dtype, modes=(setting.mode,), batch_sizes=(1,),
        max_seq_len=cache_length(setting.spec, max(prompts), LADDER_NEW_TOKENS, None),
        prefill_chunk=LADDER_CHUNK if compiled else None, share_compiled=compiled,
        prompt_lens=prompts, repeats=3 if setting.on_gpu else 1, warmup=1 if setting.on_gpu
        else 0, roofline=setting.on_gpu)


def _free_bytes(setting: RunSetting) -> int | None:
    """Free memory on the device the ladder runs on, after the reference case gave its back."""
    import torch

    from infermeter.generate.memory import collect
    from infermeter.measure.fit import free_memory

    device = torch.device(setting.device)
    if setting.on_gpu:  # the reference model's blocks, still in torch's caching allocator
        collect(device)
    return free_memory(device)[0]


def _warmup_sum(results: list[Result], key: str) -> float:
    return sum(r.metrics.get(key) or 0.0 for r in results)  # an out-of-memory case has none


def run_warmup(reference: list[Result], ladder: list[Result] | None) -> dict[str, Any]:
    """The generate stage's warm-up, apart from its timed figures: `run_warmup_s`, the compile
    and CUDA-graph capture (each case's warmup_s) summed over the reference prompt and the
    prefill ladder (ladder None: it did not run or failed, so not counted), with its parts and
    the untimed full runs after it (warmup_runs_s) beside."""
    ladder_s = None if ladder is None else _warmup_sum(ladder, "warmup_s")
    everything = reference + (ladder or [])
    return {"run_warmup_s": _warmup_sum(everything, "warmup_s"),
            "run_warmup_parts": {"reference_s": _warmup_sum(reference, "warmup_s"),
                                 "prefill_ladder_s": ladder_s,
                                 "untimed_runs_s": _warmup_sum(everything, "warmup_runs_s")}}


def warmup_line(warmup: dict[str, Any]) -> str:
    """One line for the run's output: the warm-up total and its parts."""
    parts = warmup["run_warmup_parts"]
    ladder = parts["prefill_ladder_s"]
    return (f"generate warm-up (compile and CUDA-graph capture, not in any timed figure): "
            f"{warmup['run_warmup_s']:.1f} s (reference prompt {parts['reference_s']:.1f} s, "
            f"prefill ladder {'not measured' if ladder is None else f'{ladder:.1f} s'}); untimed "
            f"warm-up runs {parts['untimed_runs_s']:.1f} s more")


def generate_stage(setting: RunSetting, env: dict[str, Any]) -> list[Result]:
    """The reference case, then the prefill ladder; the reference Results carry the stage's
    whole warm-up (run_warmup), also printed as one line on stderr."""
    import sys

    from infermeter.generate.job import run_generate
    from infermeter.generate.table import progress_bar

    with progress_bar(enabled=True) as bar:
        results = run_generate(generate_request(setting), env, progress=bar)[0]
    prompts = prefill_ladder(setting.spec, setting.dtype, setting.prompt_len,
                             _free_bytes(setting), setting.on_gpu)
    ladder: list[Result] | None = None
    if prompts:
        try:
            with progress_bar(enabled=True) as bar:
                ladder = run_generate(ladder_request(setting, prompts), env, progress=bar)[0]
        except InfermeterError as err:  # the reference Results stand; the report says so
            for result in results:
                result.warnings.append(f"prefill ladder {list(prompts)} not measured: {err}")
    for result in ladder or []:
        result.config["prefill_ladder"] = True  # not a representative of the column (report)
    warmup = run_warmup(results, ladder)
    for result in results:
        result.metrics.update(warmup)
    print(f"infermeter run: {warmup_line(warmup)}", file=sys.stderr, flush=True)
    return results + (ladder or [])


def offload_lengths(spec: ModelSpec, dtype: str, seq_len: int, prompt_len: int,
                    free_bytes: int | None, on_gpu: bool) -> tuple[tuple[int, ...],
                                                                    tuple[int, ...]]:
    """(prefix lengths, suffix lengths) of the offload stage. Prefix + suffix is at most the
    longest batch-1 prompt that fits (longest_prompt: the model's context and, as for the
    ladder, a share of free memory; CPU_LADDER_LONGEST on the CPU); a suffix that leaves no room
    for a prefix is dropped, and none left is one InfermeterError."""
    from infermeter.errors import InfermeterError

    total = longest_prompt(spec, dtype, free_bytes, OFFLOAD_NEW_TOKENS)
    factors = OFFLOAD_PREFIX_FACTORS
    if not on_gpu:
        total, factors = min(total, CPU_LADDER_LONGEST), CPU_OFFLOAD_PREFIX_FACTORS
    suffixes = tuple(n for n in sorted({prompt_len, seq_len}) if n < total)
    if not suffixes:
        if total == 0:  # longest_prompt's convention: not even one token fits the memory
            raise InfermeterError(f"no reload-vs-recompute case fits: {spec.name}'s weights "
                                  "and a one-token prefill do not fit the free memory")
        limits = f"{spec.name}'s context of {spec.max_seq_len}" + (
            " and free memory" if free_bytes is not None else "") + (
            "" if on_gpu else f", at most {CPU_LADDER_LONGEST} on the CPU")
        raise InfermeterError(f"no reload-vs-recompute case fits: prefix + suffix may take "
                              f"{total} tokens ({limits}, less {OFFLOAD_NEW_TOKENS} checked "
                              f"tokens), no room for a prefix before a suffix of {prompt_len}; "
                              "use a smaller --seq-len")
    room = total - suffixes[-1]
    return tuple(sorted({min(f * seq_len, room) for f in factors})), suffixes


def offload_request(setting: RunSetting, free_bytes: int | None) -> Any:
    from infermeter.offload.request import OffloadRequest

    prefixes, suffixes = offload_lengths(setting.spec, setting.dtype, setting.seq_len,
                                         setting.prompt_len, free_bytes, setting.on_gpu)
    return OffloadRequest(source=setting.checkpoint or f"random:{setting.model}",
                          prefix_lens=prefixes, suffix_lens=suffixes, batch_size=setting.batch,
                          device=setting.device, dtype=setting.dtype,
                          block_sizes=COPY_BLOCK_TOKENS,  # the copy stage's paged layout too
                          new_tokens=OFFLOAD_NEW_TOKENS, repeats=5 if setting.on_gpu else 2,
                          warmup=1 if setting.on_gpu else 0)  # the CPU checks the pipeline


def offload_stage(setting: RunSetting, env: dict[str, Any]) -> list[Result]:
    """TTFT with a prefix's KV cache in host memory: reloaded (serial, layer by layer) against
    recomputed, and the break-even, per suffix length (offload/job.py)."""
    from infermeter.offload.job import run_offload

    return [run_offload(offload_request(setting, _free_bytes(setting)), env)]


Stage = tuple[str, str, Callable[[RunSetting, dict[str, Any]], list[Result]]]
STAGES: tuple[Stage, ...] = (
    ("kv", "sizing the KV cache", kv_stage),
    ("copy", "timing KV-cache moves between device and host memory", copy_stage),
    ("generate", "timing generation", generate_stage),
    ("offload", "timing a prefix's KV cache reloaded against recomputed", offload_stage),
)
