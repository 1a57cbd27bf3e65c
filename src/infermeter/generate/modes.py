"""Runners of one case's mode behind one interface: warmup(shapes) once, then run(tokens, hook)
per timed run, returning the engine's GenerationOutput. compiled and eager run the engine's
Generator; hf and hf-eager run transformers (generation_hf.py) on the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from infermeter.engine.generator import GenerationConfig, GenerationOutput, Generator
from infermeter.engine.kernels.pdl import resolve as resolve_pdl
from infermeter.engine.linear import MATVEC_KERNEL, set_matvec_kernel, takes_gemv
from infermeter.engine.model import Transformer
from infermeter.generate.cases import Case
from infermeter.measure.nvtx import cuda_ready, nvtx_range, range_pop, range_push


@dataclass(frozen=True)
class RunSettings:
    """How every case of a benchmark runs (the flags that are not a sweep)."""

    max_new_tokens: int = 64
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: frozenset[int] = field(default_factory=frozenset)  # --until-eos: the EOS ids
    repeats: int = 5
    warmup: int = 1  # untimed full runs after the compile / capture warm-up
    kv_dtype: str | None = None  # None: the weights' dtype
    compile_backend: str | None = None  # engine/generator.py COMPILE_BACKENDS; None: inductor
    compile_prefill: bool = False  # compiled mode: the prefill's layers compiled too
    decode_attention: str | None = None  # attention.ATTENTION_KINDS; None: the model's default
    tp_all_reduce: str = "nccl"  # parallel.ALL_REDUCE_KINDS, auto already resolved (generate_run)
    matvec_kernel: str = MATVEC_KERNEL  # linear.MATVEC_KERNELS: compiled one-row products
    compile_options: dict[str, Any] = field(default_factory=dict)  # extra inductor options
    pdl: bool | None = None  # the compiled step's kernels with programmatic dependent launch
    # (engine/kernels/pdl.py); None: wherever it can run (pdl.resolve)
    roofline: bool = True
    tp: int = 1  # tensor-parallel degree (engine/parallel/sharding.py sets it; 1 here)
    trace_dir: str | None = None  # --trace: a profiler trace per case after the timed runs

    def generation_config(self, compile: bool) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=self.max_new_tokens, greedy=self.greedy,
                                temperature=self.temperature, top_p=self.top_p,
                                stop_ids=self.stop_ids, seed=self.seed, compile=compile)


class EngineRunner:
    """The engine's Generator with a cache of the case's length, eager or compiled."""

    def __init__(self, model: Transformer, case: Case, settings: RunSettings) -> None:
        self.config = settings.generation_config(compile=case.mode == "compiled")
        self.generator = Generator(model, case.cache_len, kv_dtype=settings.kv_dtype,
                                   compile_backend=settings.compile_backend,
                                   compile_prefill=settings.compile_prefill,
                                   decode_attention=settings.decode_attention,
                                   compile_options=settings.compile_options,
                                   pdl=self.config.compile and resolve_pdl(
                                       settings.pdl, model.tok_embeddings.weight.device,
                                       settings.compile_backend))
        set_matvec_kernel(model, settings.matvec_kernel)  # after the Generator fused w13/wqkv
        self.matvec_kernel = settings.matvec_kernel
        # one-shot all-reduces are inductor's lowering: only the compiled step has them;
        # "triton" (peer_all_reduce.py, set on the model) runs in eager steps too
        self.all_reduce = None if settings.tp == 1 else \
            settings.tp_all_reduce if self.config.compile or "triton" in settings.tp_all_reduce \
            else "nccl"
        self.batch_sizes: list[int] = []  # warmup() learns them: the attention depends on it

    def describe(self) -> dict[str, Any]:
        compiled = self.config.compile
        used = dict.fromkeys(self.generator.decode_attention_used(compiled, batch)
                             for batch in self.batch_sizes)  # one kind unless batches differ
        return {"compile_backend": self.generator.compile_backend if compiled else None,
                "compile_prefill": compiled and self.generator.compile_prefill,
                "decode_attention": "/".join(map(str, used)) or None,
                "tp_all_reduce": self.all_reduce, "matvec_kernel": self._matvec_used(),
                "pdl": self.generator.pdl}

    def _matvec_used(self) -> str | None:
        """The compiled step's one-row products: "triton" where a case's batch of 1 takes the
        GEMV (linear.takes_gemv, Linear's own rule), else inductor's; None in eager mode."""
        if not self.config.compile:
            return None
        weight = self.generator.model.output.weight
        gemv = any(takes_gemv(self.matvec_kernel, batch, weight) for batch in self.batch_sizes)
        return "triton" if gemv else "inductor"

    def warmup(self, shapes: set[tuple[int, int]]) -> None:
        """Compile and capture (compiled) or a short run (eager) for every (batch, length)."""
        self.batch_sizes = sorted({batch for batch, _ in shapes})
        for batch, length in sorted(shapes):
            with nvtx_range(f"warmup {batch}x{length}"):
                self.generator.warmup(batch, length, self.config)

    def run(self, tokens: Tensor, hook: Callable[[str, int], None]) -> GenerationOutput:
        if not cuda_ready():  # NVTX ranges are for nsys on a GPU; the CPU path stays bare
            return self.generator.generate(tokens, self.config, hook=hook)
        ranges = StepRanges(hook, self.config.max_new_tokens)
        try:
            return self.generator.generate(tokens, self.config, hook=ranges)
        finally:
            ranges.close()


class StepRanges:
    """A generate() hook around another: NVTX ranges "prefill", "decode 1", "decode 2", ...
    The engine calls the hook after each phase, so a phase's range opens at the previous call."""

    def __init__(self, hook: Callable[[str, int], None], max_new_tokens: int) -> None:
        self.hook, self.last_step, self.open = hook, max_new_tokens - 1, False

    def __call__(self, event: str, step: int) -> None:
        self.hook(event, step)  # the timing mark first: the range calls stay outside it
        self.close()
        if event == "start":
            self._push("prefill")
        elif step < self.last_step:  # after the last decode step no step follows
            self._push(f"decode {step + 1}")

    def _push(self, name: str) -> None:
        range_push(name)
        self.open = True

    def close(self) -> None:
        if self.open:
            range_pop()
            self.open = False


def make_runner(model: Transformer, case: Case, settings: RunSettings) -> Any:
    if case.mode != "eager":
        # dynamo keeps compiled variants per code object and, past its recompile limit (8),
        # silently runs eager: a sweep of shapes must start each compiled case afresh (hf too:
        # transformers compiles Module.__call__, one code object for every model).
        torch._dynamo.reset()
    if case.mode in ("compiled", "eager"):
        return EngineRunner(model, case, settings)
    from infermeter.generate.hf import HFRunner

    return HFRunner(model, settings.generation_config(compile=False),
                    compile=case.mode == "hf")
