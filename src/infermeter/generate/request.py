"""What `infermeter generate` is asked to do: one frozen object that flows unchanged from the
command line to the timed loop and the engine.

Its parts are the engine's own GenerationConfig (how tokens are chosen: it reaches the Generator
as it is), Timing (how the cases are timed) and EngineChoices (which implementation variants the
step runs: the advanced flags, kept for A/B benchmarks). The loop and the runners read these
parts; nothing copies them field by field. What a run resolves (the tensor-parallel size, the
all-reduce kind `auto` picked, the tokenizer's stop ids) goes back in with dataclasses.replace.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from infermeter.engine.chunk_attention import CHUNK_ATTENTION
from infermeter.engine.generator import STEP_GRAPHS, GenerationConfig
from infermeter.engine.linear import MATVEC_KERNEL
from infermeter.engine.model import STEP_KERNELS
from infermeter.engine.moe import MOE_KERNEL
from infermeter.engine.prefill_buckets import PREFILL_GRAPHS, PREFILL_KINDS, prefill_chunk_for
from infermeter.engine.step_choice import AUTO
from infermeter.errors import InfermeterError

DEFAULT_NEW_TOKENS = 64


@dataclass(frozen=True)
class Timing:
    """How every case is timed (docs/design.md, "Measuring")."""

    repeats: int = 5  # timed runs
    warmup: int = 1  # untimed full runs after the compile / capture warm-up
    roofline: bool = True  # measure the HBM and matmul peaks for MBU / MFU
    trace_dir: str | None = None  # --trace: a profiler trace per case after the timed runs
    # Cases of one mode and cache length share one runner (its Generator, cache and compiled
    # graphs): a shape compiled for one case (a bucket, a chunk) is not compiled again, and a
    # case's warmup_s covers only its new shapes (infermeter run's prefill ladder)
    share_compiled: bool = False


@dataclass(frozen=True)
class EngineChoices:
    """Which implementation the step runs: the advanced flags, defaults the fastest measured."""

    compile_backend: str | None = None  # generator.COMPILE_BACKENDS; None: inductor
    compile_prefill: bool = False  # compiled mode: the prefill's layers compiled too
    decode_attention: str | None = None  # attention.ATTENTION_KINDS; None: the model's default
    tp_all_reduce: str = "auto"  # parallel/all_reduce.ALL_REDUCE_KINDS (tp > 1)
    matvec_kernel: str = MATVEC_KERNEL  # linear.MATVEC_KERNELS: compiled one-row products
    # model.STEP_KERNELS: the compiled batch-1 step's layers; "auto": by model size
    # (engine/step_choice.py)
    step_kernels: str = AUTO
    moe_kernel: str = MOE_KERNEL  # moe.MOE_KERNELS: the gathered experts' products
    pdl: bool | None = None  # programmatic dependent launch; None: wherever it can run
    # the longest prefill forward, in tokens; None: prefill_buckets.COMPILED_PREFILL_CHUNK in
    # compiled mode, one forward in the others (chunk_for says which a mode runs)
    prefill_chunk: int | None = None
    # compiled mode's prefill (engine/prefill_buckets.PREFILL_KINDS): "bucketed" (static graphs
    # at bucket lengths, the prompt padded) or "exact" (forwards at the prompt's own length:
    # eager, or compile_prefill's layer graph); None: bucketed unless compile_prefill
    prefill: str | None = None
    # a bucketed chunk from a later start over a full layer's cache: "mask" or "flex"
    # (engine/chunk_attention.CHUNK_ATTENTIONS)
    chunk_attention: str = CHUNK_ATTENTION
    # the bucketed prefill's graphs: "layer" (one layer a bucket length, the forward recorded),
    # "static" (the model a bucket length) or "dynamic" (the model, of symbolic length)
    # (engine/prefill_buckets.PREFILL_GRAPHS, the default first; generate --prefill-graphs)
    prefill_graphs: str = PREFILL_GRAPHS[0]
    # how the compiled decode step's CUDA graph is replayed: "trees" (inductor's) or "recorded"
    # (engine/generator.STEP_GRAPHS); "auto": by model size, as step_kernels (engine/
    # step_choice.py); for benchmarks: no CLI flag
    step_graphs: str = AUTO
    # inductor options the resolved all-reduce kind needs (set by the job, not by users)
    compile_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        for what, kind, kinds in (("step kernels", self.step_kernels, STEP_KERNELS),
                                  ("step graphs", self.step_graphs, STEP_GRAPHS)):
            if kind not in (AUTO, *kinds):
                raise InfermeterError(f"unknown {what} {kind!r} "
                                      f"(use {' or '.join((AUTO, *kinds))})")
        if self.prefill is not None and self.prefill not in PREFILL_KINDS:
            raise InfermeterError(f"unknown prefill {self.prefill!r} "
                                  f"(use {' or '.join(PREFILL_KINDS)})")
        if self.prefill == "bucketed" and self.compile_prefill:
            raise InfermeterError("--compile-prefill compiles the exact-length prefill's layers: "
                                  "use it with --prefill exact (bucketed compiles the whole "
                                  "forward already)")

    def chunk_for(self, mode: str) -> int | None:
        """The longest prefill forward a case of `mode` runs (None: the whole prompt)."""
        return prefill_chunk_for(mode, self.prefill_chunk)

    @property
    def prefill_kind(self) -> str:
        """The compiled mode's prefill: the choice, or bucketed unless compile_prefill."""
        return self.prefill or ("exact" if self.compile_prefill else "bucketed")


@dataclass(frozen=True)
class GenerateRequest:
    source: str  # checkpoint folder or file, or "random:<model>"
    tokenizer_path: str | None = None
    prompts: tuple[str, ...] = ()
    prompt_ids: tuple[str, ...] = ()
    dialogs_path: str | None = None
    chat_format: str = "auto"
    until_eos: bool = False  # the tokenizer's stop ids go into sampling.stop_ids
    sampling: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(max_new_tokens=DEFAULT_NEW_TOKENS))
    device: str = "cpu"
    dtype: str | None = None
    kv_dtype: str | None = None  # None: the weights' dtype
    modes: tuple[str, ...] = ("eager",)  # generate/cases.MODES; several compare them
    max_seq_len: int | None = None  # a fixed KV-cache length for every case
    max_batch_size: int | None = None
    tp: int | None = None  # the tensor-parallel size; None: as torchrun started (then resolved)
    batch_sizes: tuple[int, ...] | None = None  # None: 1 (or the user's prompts)
    prompt_lens: tuple[int, ...] = ()
    contexts: tuple[int, ...] = ()
    max_positions: int | None = None  # random weights only: raise the model's context
    timing: Timing = field(default_factory=Timing)
    engine: EngineChoices = field(default_factory=EngineChoices)

    @property
    def max_new_tokens(self) -> int:
        return self.sampling.max_new_tokens


_PARTS = {"sampling": GenerationConfig, "timing": Timing, "engine": EngineChoices}


def build_request(source: str, **options: Any) -> GenerateRequest:
    """A request from flat options, as scripts and tests write them (max_new_tokens=16,
    repeats=3, pdl=True): each goes to the part that has a field of that name, the rest to the
    request itself; a name no part has is a TypeError, as for any dataclass."""
    parts: dict[str, dict[str, Any]] = {name: {} for name in _PARTS}
    top: dict[str, Any] = {}
    owners = {f.name: part for part, cls in _PARTS.items() for f in fields(cls)}
    for key, value in options.items():
        if key in owners and key not in {f.name for f in fields(GenerateRequest)}:
            parts[owners[key]][key] = value
        else:
            top[key] = value
    sampling = {"max_new_tokens": DEFAULT_NEW_TOKENS, **parts["sampling"]}
    return GenerateRequest(source, sampling=GenerationConfig(**sampling),
                           timing=Timing(**parts["timing"]),
                           engine=EngineChoices(**parts["engine"]), **top)
