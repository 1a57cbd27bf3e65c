"""What a compiled decode step runs when its kernels and replay are left to "auto" (generate's
default): the fused step in our recorded graph for small dense models, the split step in
inductor's graph trees for the rest, by the bytes a step reads.

Why the line falls where it does (docs/engine.md, "Choosing the step by model size"): on an
H200 on 2026-12-05, both in the recorded step, fused / split TPOT was 0.811 at SmolLM2-135M
(0.27 GB of weights a step), 0.979 at Qwen2.5-0.5B (0.99 GB) and 1.033 at Llama-3.2-1B
(2.47 GB) (results/step-kernels-recorded-nvidia-h200-summary.txt), so the line sat at 1.5 GB.
The fused kernels have changed since (fewer round trips a kernel, the held step, RoPE's rows in
one kernel): on an H100 on 2026-12-06 the fused step in the recorded graph took 0.903x the
default's split step in the trees at Llama-3.2-1B
(results/step-line-1b-nvidia-h100-80gb-hbm3.jsonl), so the line moved to 3 GB, past 1B and
short of every 3-8B model, none of which has been timed fused since. The fused kernels only
pay where the host's replay is cheap: in the graph trees the H200's small steps waited on the
host and the fused step lost at every size (results/step-kernels-nvidia-h200-summary.txt), so
the two go together.

MoE models stay in the trees (their experts are counted in Python each step, which a replay would
not repeat). At batch 1 on one GPU a Qwen3-MoE model (q/k norms) with the Triton experts takes the
fused kernels there: its attention side as the fused step's (the q/k norms, RoPE and cache write in
one kernel after norm + wqkv) and its block as four kernels. On an H100, fused / split TPOT at
Qwen3-30B-A3B was 0.892 and 0.875 in two runs of opposite order
(results/step-moe-fused-nvidia-h100-80gb-hbm3.jsonl,
results/step-qk-heads-nvidia-h100-80gb-hbm3.jsonl). Other MoE steps (torch's experts; Mixtral,
gpt-oss: no q/k norms, larger or biased experts) stay split until measured.
Left split, in the trees, whatever the size: other MoE steps, tensor parallelism and batches past
one (neither measured), the cudagraphs compile backend (its own graphs) and anything off a GPU (no
graph to replay). Kernels asked for by name keep their replay by the same pairing: fused
recorded, split in the trees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from infermeter.engine.kernels import pdl
from infermeter.engine.kernels.settings import checked_way

AUTO = "auto"
# The most weight bytes a step may read and still take the fused, recorded step: past
# Llama-3.2-1B's 2.47 GB (fused 0.903x split on an H100), short of Llama-3.2-3B's 6.4 GB.
SMALL_STEP_BYTES = 3e9


# The fewest weight bytes a fused step reads and still releases the next kernel before its
# wait in norm + wqkv and the split kernel (kernels/pdl.py's ATTENTION_RELEASE "auto"): on an
# H100 on 2026-12-07 that took 0.983-0.984 of the step's time at Llama-3.2-1B (2.47 GB), and
# 1.012 at Qwen2.5-0.5B (0.99 GB) and 1.034-1.037 at SmolLM2-135M (0.27 GB)
# (results/step-attention-release-nvidia-h100-80gb-hbm3.jsonl and its -reversed- file).
ATTENTION_FIRST_BYTES = 1.5e9


def attention_release_way(weight_bytes: int) -> str:
    """Where the fused step's norm + wqkv and split kernels release the next kernel, for a step
    reading weight_bytes, as pdl.ATTENTION_RELEASE asks ("after" or "before" their wait, or
    only one of them before: "split", "wqkv"), its "auto" "before" from ATTENTION_FIRST_BYTES
    up to SMALL_STEP_BYTES (the fused recorded step's sizes, where it was measured) and
    "after" elsewhere: below, where it lost, and above, where a fused step (a Qwen3-MoE
    model's, or one asked for by name) has not been timed with it."""
    way = checked_way(pdl.ATTENTION_RELEASE, "ATTENTION_RELEASE", pdl.ATTENTION_RELEASE_WAYS)
    if way != "auto":
        return way
    return "before" if ATTENTION_FIRST_BYTES <= weight_bytes <= SMALL_STEP_BYTES else "after"


@dataclass(frozen=True)
class StepChoice:
    kernels: str  # model.STEP_KERNELS
    graphs: str  # generator.STEP_GRAPHS
    reason: str  # one line for the Result's config.step_choice


def step_weight_bytes(model: nn.Module) -> int:
    """The weight bytes one decode step reads: every parameter once (a tied output head is the
    embedding's Parameter, counted once), less an untied embedding table, of which a step reads
    one row a token."""
    embedding = getattr(model, "tok_embeddings", None)
    output = getattr(model, "output", None)
    tied = embedding is not None and output is not None and output.weight is embedding.weight
    skip = set() if tied or embedding is None else {id(embedding.weight)}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)


def held_in_trees(device: torch.device, moe: bool, tp: int, batch: int,
                  backend: str | None) -> str | None:
    """Why a step stays split in the trees whatever its size (the module docstring), or None."""
    return ("off a GPU" if device.type != "cuda"
            else f"the {backend} backend" if backend not in (None, "inductor")
            else "an MoE model" if moe else f"tp {tp}" if tp > 1
            else f"batch {batch}" if batch > 1 else None)


def choose_step(weight_bytes: int, device: torch.device, moe: bool, tp: int, batch: int,
                backend: str | None = None, kernels: str = AUTO,
                moe_fuses: bool = False) -> StepChoice:
    """The step for a model reading weight_bytes a step on `device`, with MoE layers or not,
    over tp ranks, at a largest batch of `batch` sequences, compiled by `backend` (None:
    inductor). `kernels` asked for by name run as asked, replayed as those kernels are best
    replayed: the fused ones in the recorded graph, split in the trees;
    "auto" picks them by size, and fused in the trees for an MoE model at batch 1 on one GPU
    where moe_fuses (q/k norms and the Triton experts: Qwen3-MoE's measured case). The reason
    says which ("auto: ..." or "asked: ...")."""
    gb = f"{weight_bytes / 1e9:.2f} GB of weights"
    held = held_in_trees(device, moe, tp, batch, backend)
    if kernels != AUTO:
        graphs = "trees" if held or kernels == "split" else "recorded"
        return StepChoice(kernels, graphs,
                          f"asked: {kernels}, {graphs}" + (f" ({held})" if held else ""))
    if held == "an MoE model" and moe_fuses and tp == 1 and batch == 1:
        return StepChoice("fused", "trees", "auto: fused, trees (an MoE model with q/k norms "
                          "and the Triton experts, at batch 1)")
    if held is not None:
        return StepChoice("split", "trees", f"auto: split, trees ({held})")
    if weight_bytes <= SMALL_STEP_BYTES:
        return StepChoice("fused", "recorded",
                          f"auto: fused, recorded ({gb}, at most {SMALL_STEP_BYTES / 1e9:g} GB)")
    return StepChoice("split", "trees",
                      f"auto: split, trees ({gb}, over {SMALL_STEP_BYTES / 1e9:g} GB)")
