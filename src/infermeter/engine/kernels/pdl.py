"""Programmatic dependent launch (PDL, Hopper and later) for the compiled decode step's kernels.

Why: a batch-1 decode step is ~10 kernels a layer in one CUDA graph, each waiting for the one
before it to finish before its thread blocks are even scheduled. Most of them are small (rotary
and cache write, attention, combine, activation, the tensor-parallel all-reduce: 1-5 us each),
and each GEMV reads its weight only after it starts. With PDL a kernel may start while the one
before it is still running: its blocks are scheduled once every block of the previous kernel
has called `griddepcontrol.launch_dependents`, and they block in `griddepcontrol.wait` only
where they read what that kernel wrote. A GEMV loads its first weight tile before the wait (no
kernel writes weights), so the weight stream starts while the norm or the all-reduce before it
still runs.

The rule that keeps it correct, in every kernel here and in inductor's (its triton.enable_pdl
codegen): a kernel calls launch_dependents only after its own wait. So when a kernel starts,
every kernel before its predecessor has finished, and only reads of the predecessor's outputs
need the wait. Kernels launched without the attribute (cuBLAS, copies) behave as always. The
exceptions are the fused step's products and combine (EARLY_RELEASE below) and, in the fused
step of a model of 1.5 to 3 GB, its norm + wqkv and split kernels (ATTENTION_RELEASE).

How it is launched: the Triton kernels take a PDL constexpr (the wait and the trigger are
compiled in only then) and the launch attribute `launch_pdl`. Inductor does not pass launch
attributes to the user-defined kernels of a torch.library.triton_op, so each kernel also has a
torch.library.custom_op twin that launches it directly (opaque to inductor; a CUDA graph captures
its launch, attribute included). `enabled()` says which the model calls; set_pdl switches it
for the compiled steps traced afterwards (generation_modes.py, from --pdl).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from infermeter.engine.kernels.settings import checked_way

_ENABLED = False
# Whether the fused step's wo, w13 and w2 kernels (fused_step.py's gemv_add and gemv_swiglu) and
# its attention's combine release the next kernel before their own wait ("on", the default
# since 2026-12-07) rather than after it ("off", the rule above): read when the step is traced,
# "off" an A/B's (benchmarks/step_kernels_ab.py --early-release), recorded in the Result
# (config.early_release). Where a kernel's programs all fit on the GPU at once, the next kernel
# then starts, and loads its first weight tiles, while this one still waits for the one before.
# On an H100 the fused step took 0.90-0.91 of its time at SmolLM2-135M, 0.96-0.97 at
# Qwen2.5-0.5B and 0.99 at Llama-3.2-1B, in both orders (docs/engine.md, "The products' early
# release").
# Safe because what follows these kernels reads only weights before its own wait (the next
# product's kernel, an MoE block's router, the GEMV, inductor's kernels, which wait first), and
# that wait returns only once this kernel has ended, which it does only after its own wait:
# every earlier kernel is done by then. The attention, which reads its cache before its wait,
# comes after norm + wqkv (or the q/k norms' kernel), whose release ATTENTION_RELEASE places.
EARLY_RELEASE_WAYS = ("on", "off")
EARLY_RELEASE = "on"
# Whether the fused step's norm + wqkv (+ RoPE, cache write) kernel and its attention's split
# kernel (or the unsplit one) release the next kernel after their own wait ("after") or before
# it ("before"), or only one of them before ("split": the split kernel; "wqkv": norm + wqkv);
# "auto", the default since 2026-12-08, "before" or "after" by the step's weight bytes
# (engine/step_choice.py's attention_release_way, which the generator passes in through
# releasing_attention while it records a step). Read when the step is traced and recorded in
# the Result (config.attention_release); the ways by name are an A/B's
# (benchmarks/step_kernels_ab.py --attention-release). With "before", and EARLY_RELEASE "on", no
# kernel of a fused layer holds the next one back: each next kernel starts, and loads what it
# may read before its wait, as soon as every program of this one has started. On an H100 that
# took 0.983-0.984 of the step's time at Llama-3.2-1B and 1.034-1.037 at SmolLM2-135M, in both
# orders, 1.012 at Qwen2.5-0.5B (docs/engine.md, "The attention's early release").
# Safe because what may read anything but weights before its wait after them is only the
# split kernel (after norm + wqkv), and it reads there only cache slots that earlier steps
# wrote and the step's position (set before the step's first kernel): the slot norm + wqkv
# writes is read again after the wait (decode_attention.chunk_softmax). Those earlier writes
# are done: kernels at a step's start (RoPE's rows, inductor's) release only after their wait.
# And whatever a kernel reads after its wait, every kernel before it has finished: the wait
# returns once the kernel before has ended, which it does after its own.
ATTENTION_RELEASE_WAYS = ("auto", "after", "before", "split", "wqkv")
ATTENTION_KERNELS = ("split", "wqkv")  # the two kernels whose release it moves
ATTENTION_RELEASE = "auto"
_ATTENTION_FIRST = False  # "auto"'s answer for the step being recorded (releasing_attention)


def set_pdl(on: bool) -> None:
    """Whether compiled steps traced from now on launch their kernels with PDL."""
    global _ENABLED
    _ENABLED = on


def enabled() -> bool:
    return _ENABLED


@contextlib.contextmanager
def launching(on: bool) -> Iterator[None]:
    """set_pdl(on) for the block, then back: a compiled step is called (and traced) inside
    it, so its trace picks the PDL ops exactly when its Generator asked for PDL."""
    before = _ENABLED
    set_pdl(on)
    try:
        yield
    finally:
        set_pdl(before)


def early_release() -> bool:
    """EARLY_RELEASE is "on" (a way there is not: a ValueError naming it)."""
    return checked_way(EARLY_RELEASE, "EARLY_RELEASE", EARLY_RELEASE_WAYS) == "on"


@contextlib.contextmanager
def releasing_attention(first: bool) -> Iterator[None]:
    """For the block, ATTENTION_RELEASE "auto" means "before" where `first`, else "after"
    (the generator's answer for its model, around each call of its compiled step)."""
    global _ATTENTION_FIRST
    before = _ATTENTION_FIRST
    _ATTENTION_FIRST = first
    try:
        yield
    finally:
        _ATTENTION_FIRST = before


def attention_release(kernel: str) -> bool:
    """Whether the fused step's `kernel` ("split" or "wqkv", ATTENTION_KERNELS) releases
    before its wait: ATTENTION_RELEASE "before" or that kernel's own way, or "auto" inside
    releasing_attention(True) (a way or a kernel there is not: a ValueError naming it)."""
    way = checked_way(ATTENTION_RELEASE, "ATTENTION_RELEASE", ATTENTION_RELEASE_WAYS)
    checked_way(kernel, "attention kernel", ATTENTION_KERNELS)
    return way in ("before", kernel) or (way == "auto" and _ATTENTION_FIRST)


def inductor_has_pdl() -> bool:
    """This torch's inductor can emit PDL for its own kernels (config.triton.enable_pdl)."""
    import torch._inductor.config as inductor_config

    return hasattr(inductor_config.triton, "enable_pdl")


def supported(device: torch.device) -> bool:
    """PDL can run here: a CUDA GPU of compute capability 9.0 or later, Triton's grid
    dependency control, and inductor's PDL codegen."""
    from infermeter.engine.kernels.triton_support import triton

    if triton is None or device.type != "cuda" or not inductor_has_pdl():
        return False
    from triton.language.extra import cuda as triton_cuda

    return hasattr(triton_cuda, "gdc_wait") and torch.cuda.get_device_capability(device)[0] >= 9


def resolve(asked: bool | None, device: torch.device, compile_backend: str | None) -> bool:
    """--pdl / --no-pdl as asked; unasked (None, the default), on wherever it can run: a
    supported GPU and the inductor backend (measured faster on H200s: 7B batch 1 3.879 ->
    3.671 ms a step, 13B tp 2 4.42 -> 4.08; results/generate-nvidia-h200.jsonl,
    results/tp-nvidia-h200.jsonl)."""
    if asked is not None:
        return asked
    return (compile_backend or "inductor") == "inductor" and supported(device)


def inductor_options(on: bool) -> dict[str, Any]:
    """The torch.compile options that make inductor's own kernels use PDL too."""
    return {"triton.enable_pdl": True} if on else {}


def on_gpu(tensor: Tensor) -> bool:
    return tensor.is_cuda


def direct(kernel: Any) -> Any:
    """The kernel as a custom op's body launches it (a function, so tests can record)."""
    return kernel


def launch(kernel: Any, grid: tuple, pdl: bool, *args: Any, **kwargs: Any) -> None:
    """Launch a Triton kernel from an op's body: without PDL through wrap_triton (a triton_op
    inductor traces into, or eager), with PDL directly with the launch attribute (a custom_op's
    body). The kernel takes a PDL constexpr; under Triton's CPU interpreter (the tests) PDL is
    never compiled in: the interpreter has no grid dependency control."""
    tensor = next(a for a in args if isinstance(a, Tensor))
    if pdl and on_gpu(tensor):
        direct(kernel)[grid](*args, PDL=True, launch_pdl=True, **kwargs)
    else:
        torch.library.wrap_triton(kernel)[grid](*args, PDL=False, **kwargs)


def launch_releasing(kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> None:
    """Launch a Triton kernel plainly (it starts once the kernel before it has ended, so it
    needs no wait) but compiled to let the next kernel, if launched with PDL, start early: its
    RELEASE constexpr. The rule above holds: nothing before it is still running. Without a GPU,
    as launch() without PDL (the interpreter has no grid dependency control)."""
    if on_gpu(next(a for a in args if isinstance(a, Tensor))):
        direct(kernel)[grid](*args, PDL=False, RELEASE=True, **kwargs)
    else:
        launch(kernel, grid, False, *args, RELEASE=False, **kwargs)
