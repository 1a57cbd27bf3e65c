"""What a generation benchmark runs: prompt sets x modes = cases, each checked before any model
is loaded (lengths against the cache) so a sweep never stops half-way on a user error.

A prompt set is either B random prompts of T tokens (`--batch-size`, `--prompt-len`,
`--context`), B copies of a fixed short prompt (nothing given), or the user's prompts (text,
dialogs or ids; mixed lengths run as one group per length, since the engine's batch shares its
positions). A `--context C` set is a T = C prompt whose point is the decode after it: its steps
read C+1, C+2, ... tokens of KV, in a cache sized for C + new tokens.

Each case runs in one mode:
  compiled  the engine, decode step torch.compile'd (inductor; CUDA graphs on a GPU)
  eager     the engine, plain PyTorch (the reference scripts' style)
  hf        transformers' generate with its static cache, on the same weights (recent versions
            compile the decode forward themselves on a GPU)
  hf-eager  the same with transformers' compilation turned off (disable_compile)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from infermeter.engine.generator import CACHE_ROUND  # nearby lengths share a cache and graph
from infermeter.errors import InfermeterError
from infermeter.spec.model import ModelSpec

MODES = ("compiled", "eager", "hf", "hf-eager")


@dataclass(frozen=True)
class PromptSet:
    prompts: tuple[tuple[int, ...], ...]
    source: str  # "random" | "fixed" | "user"
    context: int | None = None  # a --context set: prompts of this length, decode timed after

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    @property
    def lengths(self) -> list[int]:
        return [len(p) for p in self.prompts]

    @property
    def prompt_len(self) -> int | None:
        """The common prompt length, or None for a user set of mixed lengths."""
        lengths = set(self.lengths)
        return lengths.pop() if len(lengths) == 1 else None


@dataclass(frozen=True)
class Case:
    prompt_set: PromptSet
    mode: str
    cache_len: int  # the engine's KV-cache length (tokens) for every run of the case
    groups: tuple[tuple[int, ...], ...]  # prompt indices run together (equal length, <= max batch)

    @property
    def label(self) -> str:
        p = self.prompt_set
        length = p.prompt_len if p.prompt_len is not None else "mixed"
        what = f"context {p.context}" if p.context else f"prompt {length}"
        return f"batch {p.batch_size}, {what}, {self.mode}"


def random_prompts(batch_size: int, length: int, vocab_size: int,
                   seed: int) -> tuple[tuple[int, ...], ...]:
    """Seeded random ids [B][T]; row i is the same for every B (batch 1 = batch 32's first row)."""
    rng = random.Random(f"{seed}:{length}")
    return tuple(tuple(rng.randrange(vocab_size) for _ in range(length))
                 for _ in range(batch_size))


def prompt_sets(batch_sizes: tuple[int, ...], prompt_lens: tuple[int, ...],
                contexts: tuple[int, ...], vocab_size: int, seed: int,
                fixed: tuple[int, ...]) -> list[PromptSet]:
    """Random sets for every (batch, prompt length) and (batch, context); `fixed` (B copies)
    when no length is asked for."""
    sets = []
    for batch in batch_sizes:
        for length in prompt_lens:
            sets.append(PromptSet(random_prompts(batch, length, vocab_size, seed), "random"))
        for context in contexts:
            sets.append(PromptSet(random_prompts(batch, context, vocab_size, seed), "random",
                                  context))
        if not prompt_lens and not contexts:
            sets.append(PromptSet((tuple(fixed),) * batch, "fixed"))
    return sets


def cache_length(spec: ModelSpec, prompt_len: int, new_tokens: int, fixed: int | None) -> int:
    """The cache for prompt + new tokens: `fixed` if given, else rounded up to CACHE_ROUND."""
    need, limit = prompt_len + new_tokens, fixed or spec.max_seq_len
    if need > limit:
        what = "the KV cache (--max-seq-len)" if fixed else f"model {spec.name}'s context"
        raise InfermeterError(f"prompt of {prompt_len} tokens + {new_tokens} new tokens = {need} "
                              f"tokens does not fit in {what} of {limit} tokens")
    if fixed and fixed > spec.max_seq_len:
        raise InfermeterError(f"cache length {fixed} is longer than model {spec.name}'s context "
                              f"of {spec.max_seq_len} tokens")
    return fixed or min(-(-need // CACHE_ROUND) * CACHE_ROUND, limit)


def _groups(lengths: list[int], max_batch: int | None) -> tuple[tuple[int, ...], ...]:
    """Indices grouped by prompt length, each group split to at most max_batch."""
    by_length: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        by_length.setdefault(length, []).append(index)
    step = max_batch or len(lengths)
    return tuple(tuple(ids[i:i + step]) for ids in by_length.values()
                 for i in range(0, len(ids), step))


def plan_cases(spec: ModelSpec, sets: list[PromptSet], modes: tuple[str, ...],
               max_new_tokens: int, max_seq_len: int | None = None,
               max_batch: int | None = None) -> list[Case]:
    """Every prompt set in every mode (modes side by side), lengths checked against the cache."""
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise InfermeterError(f"unknown mode {unknown[0] if unknown else '(none)'} "
                              f"(use {', '.join(MODES)})")
    cases = []
    for prompt_set in sets:
        if not prompt_set.prompts or min(prompt_set.lengths) == 0:
            raise InfermeterError("empty prompt: need at least one sequence of one token")
        cache = cache_length(spec, max(prompt_set.lengths), max_new_tokens, max_seq_len)
        groups = _groups(prompt_set.lengths, max_batch)
        cases += [Case(prompt_set, mode, cache, groups) for mode in dict.fromkeys(modes)]
    return cases
