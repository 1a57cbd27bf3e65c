"""Attention of a compiled prefill chunk that starts after position 0, over a full-attention
layer's cache: "flex" (the default where it runs) or "mask" (Generator(chunk_attention=...),
generate's --chunk-attention).

Why a choice: one compiled graph serves a chunk length at every start, so the graph cannot cut
the cache at the chunk's end (a start of its own would be a graph of its own). "mask" attends
over the whole cache with a [T, S] mask (self_attention.py): every chunk of a 32k-token prompt
reads all S slots, and the folded bool mask (G*T x S: 268 M entries for Llama-3.1-8B's 2048-token
chunks over 32k slots) is built and read again in every layer. "flex" gives flex_attention a
block mask instead: the chunk's [T, S] in 128 x 128 tiles, each empty (skipped), full (no mask
read) or partial (the mask computed in the kernel). The Generator builds the tile lists once a
chunk, eagerly, before the compiled forward (block_lists); they enter the graph as four int32
tensors of fixed shapes, so one graph still serves every start; inside it, chunk_flex_attention
wraps them into a BlockMask whose mask says the same as "mask": key slot j is visible to query i
when j <= first + i (a full layer's slot j holds position j; first: the chunk's first position).

Pads (prefill_buckets.py) sit at one position after the prompt but are given first + i here,
which lets a pad see a few more slots than "mask" does: pads' outputs and K/V are never read
(the first decode step overwrites their slot before reading it), so no real token changes.
Ring (sliding-window) layers keep the mask: their cache is a window, not the prompt.

The default ("auto") is flex wherever it runs: measured on one H100 (ttft_sweep.py, part long;
docs/engine.md names the Result), Llama-3.1-8B's 32,768-token prompt prefills 1.7x faster on
flex than on the mask, with a third of the mask's warm-up; and a model whose masked chunk would
hold float32 scores (gpt-oss's sinks, Gemma 2's soft cap: attention.decode_attention's
[B, H_kv, G*T, S] a layer, 17 GB for gpt-oss-20b's 2048-token chunks over 32k slots) holds none
on flex. It needs inductor (compiled on CUDA): the Generator passes tile lists only there;
outside torch.compile flex_attention is a slow reference that the CPU tests use.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from infermeter.engine.attention import sink_flex_attention

CHUNK_ATTENTION = "auto"
CHUNK_ATTENTIONS = ("auto", "mask", "flex")
TILE = 128  # flex_attention's block: a tile is TILE queries x TILE key slots
CHUNK_KERNEL = {"FORCE_USE_FLEX_ATTENTION": True}  # chunk_flex_attention's kernel_options

# (kv_num_blocks [1, 1, Qt], kv_indices [1, 1, Qt, Kt], full_kv_num_blocks, full_kv_indices),
# int32, Qt = ceil(T / TILE), Kt = ceil(S / TILE): a BlockMask's tile lists, and the chunk's
# first position, int64 [1]
BlockLists = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def flex_runs(device: torch.device, compile_backend: str, bucketed: bool) -> bool:
    """Whether a later chunk can take flex: its kernel is inductor's, compiled on a GPU, in the
    bucketed prefill's graphs (outside them flex_attention is a reference holding every score)."""
    return bucketed and compile_backend == "inductor" and device.type == "cuda"


def chunk_attention_for(kind: str, runs: bool) -> str:
    """What later chunks run ("mask" or "flex") for the asked kind; runs: flex_runs. "auto" is
    flex wherever flex runs (the module's docstring says why)."""
    if not runs:
        return "mask"
    return "flex" if kind == "auto" else kind


def block_lists(first: int, length: int, slots: int, device: torch.device) -> BlockLists:
    """The tiles a chunk of `length` queries at positions first.. sees of a full-attention
    cache of `slots` slots. Eager (outside the compiled forward): the dense [length, slots]
    check runs once a chunk, shared by every layer."""
    def visible(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return kv <= q + first

    mask = create_block_mask(visible, None, None, length, slots, device=device,
                             BLOCK_SIZE=TILE)
    return (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks,
            mask.full_kv_indices, torch.full((1,), first, dtype=torch.int64, device=device))


def chunk_flex_attention(q: Tensor, keys: Tensor, values: Tensor, lists: BlockLists,
                         softcap: float | None = None, sinks: Tensor | None = None) -> Tensor:
    """q [B, H, T, D] over a full layer's cache keys/values [B, H_kv, S, D] with the chunk's
    tile lists -> [B, H, T, D]. The mask is rebuilt from the lists in the graph (its mask_mod
    closes over the traced `first`, so no start is baked into the graph). softcap: Gemma 2's
    logit cap on the scaled scores, as decode_attention applies it. sinks [H]: gpt-oss's
    logit per query head (attention.sink_flex_attention)."""
    kv_num, kv_index, full_num, full_index, first = lists

    def visible(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        return j <= i + first[0]

    mask = BlockMask.from_kv_blocks(kv_num, kv_index, full_num, full_index, BLOCK_SIZE=TILE,
                                    mask_mod=visible, seq_lengths=(q.shape[2], keys.shape[2]),
                                    compute_q_blocks=False)
    score_mod = None
    if softcap is not None:
        def score_mod(score: Tensor, b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
            return torch.tanh(score / softcap) * softcap
    # flex's main kernel, never its decoding kernel: that one serves few queries (a chunk of
    # fewer than 128 picks it) and with GQA finds no tile size dividing our 128-query tiles
    return sink_flex_attention(q, keys, values, None if sinks is None else sinks[:, None],
                               score_mod=score_mod, block_mask=mask,
                               enable_gqa=q.shape[1] != keys.shape[1],
                               kernel_options=CHUNK_KERNEL)
