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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from infermeter.errors import InfermeterError
from infermeter.specs.model import ModelSpec
from infermeter.specs.sizes import cache_length

MODES = ("compiled", "eager", "hf", "hf-eager")


class Rows(Sequence[tuple[int, ...]]):
    """`batch` rows of `length` ids, made by `make` on the first read of a row: planning and the
    fit check read only the two sizes, so a huge --batch-size or --prompt-len is refused before
    its prompts take any memory."""

    def __init__(self, batch: int, length: int,
                 make: Callable[[], tuple[tuple[int, ...], ...]]) -> None:
        self.batch, self.length, self._make = batch, length, make

    @cached_property
    def _rows(self) -> tuple[tuple[int, ...], ...]:
        return self._make()

    def __len__(self) -> int:
        return self.batch

    def __getitem__(self, index):  # type: ignore[no-untyped-def]  # int or slice, as a tuple's
        return self._rows[index]


@dataclass(frozen=True)
class PromptSet:
    prompts: Sequence[Sequence[int]]  # [B][T]; Rows for random and fixed sets
    source: str  # "random" | "fixed" | "user"
    context: int | None = None  # a --context set: prompts of this length, decode timed after

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    @property
    def lengths(self) -> list[int]:
        """Every prompt's length (reads every row: after the fit check only)."""
        return [len(p) for p in self.prompts]

    @property
    def length_range(self) -> tuple[int, int]:
        """(shortest, longest) prompt, from the sizes alone for Rows."""
        if isinstance(self.prompts, Rows):
            return self.prompts.length, self.prompts.length
        lengths = self.lengths
        return min(lengths, default=0), max(lengths, default=0)

    @property
    def prompt_tokens(self) -> int:
        if isinstance(self.prompts, Rows):
            return self.prompts.batch * self.prompts.length
        return sum(self.lengths)

    @property
    def prompt_len(self) -> int | None:
        """The common prompt length, or None for a user set of mixed lengths."""
        shortest, longest = self.length_range
        return longest if shortest == longest else None


@dataclass(frozen=True)
class Case:
    prompt_set: PromptSet
    mode: str
    cache_len: int  # the engine's KV-cache length (tokens) for every run of the case
    max_batch: int | None = field(default=None)  # largest group run at once (None: all)

    @cached_property
    def groups(self) -> tuple[Sequence[int], ...]:
        """Prompt indices run together (equal length, <= max_batch)."""
        p = self.prompt_set
        if isinstance(p.prompts, Rows):  # one length: ranges, no list of B indices
            step = self.max_batch or p.batch_size
            return tuple(range(i, min(i + step, p.batch_size))
                         for i in range(0, p.batch_size, step))
        return _groups(p.lengths, self.max_batch)

    @property
    def largest_group(self) -> int:
        """The largest batch run at once, from the sizes alone for Rows."""
        p = self.prompt_set
        if isinstance(p.prompts, Rows):
            return min(p.batch_size, self.max_batch or p.batch_size)
        return max(len(g) for g in self.groups)

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
    def rows(batch: int, length: int) -> Rows:
        return Rows(batch, length, lambda: random_prompts(batch, length, vocab_size, seed))

    sets = []
    for batch in batch_sizes:
        sets += [PromptSet(rows(batch, length), "random") for length in prompt_lens]
        sets += [PromptSet(rows(batch, context), "random", context) for context in contexts]
        if not prompt_lens and not contexts:
            sets.append(PromptSet(Rows(batch, len(fixed), lambda b=batch: (tuple(fixed),) * b),
                                  "fixed"))
    return sets


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
        shortest, longest = prompt_set.length_range
        if not prompt_set.batch_size or shortest == 0:
            raise InfermeterError("empty prompt: need at least one sequence of one token")
        cache = cache_length(spec, longest, max_new_tokens, max_seq_len)
        cases += [Case(prompt_set, mode, cache, max_batch) for mode in dict.fromkeys(modes)]
    return cases
