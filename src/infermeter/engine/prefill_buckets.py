"""The lengths a bucketed prefill runs at (Generator(bucketed_prefill=True), the compiled mode's
default): a prompt's forwards padded up to a few static lengths, so that a handful of compiled
graphs (CUDA graphs on a GPU) serve every prompt length. Torch-free: the fit check reads it too.

Buckets: multiples of 16 up to 128, powers of two from 128 to 512, then multiples of 512, never
longer than the chunk (the chunk length is a bucket of its own). A short prompt's forward costs
its weights read once only while its rows are few: a row of fp16/bf16 products is 1 FLOP per
weight byte, and a Hopper card computes about 200-300 FLOP per byte it reads, so 128 rows already
cost about as much arithmetic as the read (an 80-token prompt padded to 128 took 1.81 x the
weights-read floor on an H200: results/ttft-nvidia-h200.jsonl, 2026-12-05). Steps of 16 keep a
short prompt's pads under 16 rows (decided from that figure and the roofline; the 80-token
prompt now runs at 80); from 128 to 512 doubling keeps the graphs few, and past 512 the step of
512 keeps the padded work under 512 tokens a forward (under half of any prompt that long, and a
shrinking share as it grows). A prompt of P tokens with prefill_chunk C runs full chunks of C,
then its last part padded to its bucket (at most C).

Pads go last, all at one position: the first one after the prompt (start + P). There the cache
slot is the one the first decode step writes before it reads it, so the pads' K/V overwrite
nothing a later token reads (a full-attention layer's slot start + P; a ring layer's slot
(start + P) % window, which holds start + P - window: outside the window of every later query).
Real queries never see the pads (causal mask: they sit after every real token). So a forward is
padded only while start + P is still inside the cache; otherwise it runs at its own length.
"""

from __future__ import annotations

PREFILL_KINDS = ("bucketed", "exact")  # generate --prefill; exact: each forward at its length
# How the bucketed prefill's forward is compiled, the default first: "layer" (one layer compiled
# per length and shared by every layer alike, the whole forward recorded as a CUDA graph per
# length: recorded_forward.py), "static" (the whole model compiled per bucket length) or
# "dynamic" (the whole model compiled once with a symbolic length, its CUDA graph recorded per
# length). On an H200 (results/ttft-nvidia-h200.jsonl, 2026-12-05, part warmup) run's lengths
# warmed up in 73.6 s against 170.8 s static and 124.5 s dynamic, at the same or lower TTFT.
PREFILL_GRAPHS = ("layer", "static", "dynamic")
SMALLEST_BUCKET = 16  # buckets grow by this step up to FINE_LIMIT
FINE_LIMIT = 128  # then double up to POWER_OF_TWO_LIMIT
POWER_OF_TWO_LIMIT = 512  # then grow by this step
# The longest forward of a compiled prefill unless a chunk is asked for (generate --prefill-chunk;
# run's prefill ladder uses it too): long enough that every product stays compute-bound, short
# enough that a 32,768-token prompt holds one chunk's activations and a handful of graphs serve
# every length (a bucket itself: full chunks and a last part of 1,537 tokens or more share it).
COMPILED_PREFILL_CHUNK = 2048


def prefill_chunk_for(mode: str, chunk: int | None) -> int | None:
    """The longest prefill forward a case of `mode` runs: `chunk` when one is asked for, else
    COMPILED_PREFILL_CHUNK in compiled mode and None (the whole prompt in one forward, as the
    reference scripts' eager prefill) in the others."""
    if chunk is not None:
        return chunk
    return COMPILED_PREFILL_CHUNK if mode == "compiled" else None


def bucket_length(tokens: int, chunk: int | None = None) -> int:
    """The static forward length that serves `tokens` real tokens (tokens <= chunk if given)."""
    if tokens < 1:
        raise ValueError(f"a forward needs at least one token, got {tokens}")
    if tokens <= FINE_LIMIT:
        length = -(-tokens // SMALLEST_BUCKET) * SMALLEST_BUCKET
    elif tokens <= POWER_OF_TWO_LIMIT:
        length = 1 << (tokens - 1).bit_length()
    else:
        length = -(-tokens // POWER_OF_TWO_LIMIT) * POWER_OF_TWO_LIMIT
    return length if chunk is None else max(tokens, min(length, chunk))


def prefill_forwards(prompt_len: int, chunk: int | None, room: int) -> list[tuple[int, int]]:
    """(real tokens, forward length) of each forward of a bucketed prefill of prompt_len tokens;
    room: the cache positions from the prompt's first one to the cache's end (max_seq_len -
    start). Only the last forward is padded, and only when a position is left after the prompt
    for its pads (room > prompt_len)."""
    step = min(chunk or prompt_len, prompt_len)
    real = [min(step, prompt_len - offset) for offset in range(0, prompt_len, step)]
    out = [(n, n) for n in real[:-1]]
    last = bucket_length(real[-1], chunk) if room > prompt_len else real[-1]
    return out + [(real[-1], last)]
