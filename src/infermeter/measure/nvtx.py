"""Named ranges for profilers: NVTX for `nsys profile infermeter ...`, record_function for
torch.profiler (--trace), both off unless someone is listening.

- range_push / range_pop / nvtx_range: NVTX ranges when CUDA is available, no-ops otherwise.
  Whether CUDA is there is asked once and cached (torch.cuda.is_available() is not free), so an
  untraced CPU run pays one global read per range; on a GPU an NVTX push with no tool attached is
  a ~100 ns library call, against decode steps of milliseconds.
- traced(): also a torch.profiler record_function range, only while a --trace capture runs
  (trace_capture.py sets it); otherwise the same as nvtx_range.
- install_layer_ranges(model): forward pre/post hooks naming every layer (`im/layer 3`: the
  block's forward; the tp path whose adds are fused with the norms calls no block forward, so it
  has none) and projection, for the eager path only. Installed only when asked (--trace) and
  removed after: hooks on a module add Python work to every call, and dynamo would trace them
  into the compiled step. The labels are the vocabulary breakdown.py classifies by.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_CUDA: bool | None = None  # is CUDA available: asked once
_PROFILING = False  # a trace_capture is recording: also emit record_function ranges

# Module attribute name -> breakdown label (engine/model.py's Meta names).
MODULE_LABELS = {"wq": "qkv", "wk": "qkv", "wv": "qkv", "wqkv": "qkv", "w13": "gate_up",
                 "wo": "o", "w1": "gate_up",
                 "w3": "gate_up", "w2": "down", "output": "lm_head", "attention_norm": "norm",
                 "ffn_norm": "norm", "norm": "norm", "attention_post_norm": "norm",
                 "ffn_post_norm": "norm", "attention": "attention",
                 "tok_embeddings": "embedding"}
PREFIX = "im/"  # every infermeter range name starts with this (breakdown.py looks for it)
_BLOCK = re.compile(r"layers\.\d+")  # engine/model.py's Transformer.layers[i]


def cuda_ready() -> bool:
    global _CUDA
    if _CUDA is None:
        import torch

        _CUDA = bool(torch.cuda.is_available())
    return _CUDA


def range_push(name: str) -> None:
    if cuda_ready():
        import torch

        torch.cuda.nvtx.range_push(name)


def range_pop() -> None:
    if cuda_ready():
        import torch

        torch.cuda.nvtx.range_pop()


@contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    range_push(name)
    try:
        yield
    finally:
        range_pop()


def set_profiling(on: bool) -> None:
    global _PROFILING
    _PROFILING = on


@contextmanager
def traced(name: str) -> Iterator[None]:
    """An NVTX range, and a record_function range while a trace is being captured."""
    if not _PROFILING:
        with nvtx_range(name):
            yield
        return
    import torch

    with nvtx_range(name), torch.profiler.record_function(PREFIX + name):
        yield


def install_layer_ranges(model: Any) -> list[Any]:
    """Hooks that open a range (named `im/<label>`, e.g. im/qkv) before each labelled module's
    forward and close it after. Returns the hook handles; remove_ranges(handles) takes them off.
    Eager mode only: never call it on a model about to run compiled."""
    handles = []
    for name, module in model.named_modules():
        # a module may name its own range (the MoE block: its experts are not called modules)
        label = getattr(module, "trace_label", None) or MODULE_LABELS.get(name.rsplit(".", 1)[-1])
        if name == "":
            label = "model"
        elif _BLOCK.fullmatch(name):  # a whole block: breakdown's per-layer gap figures
            label = f"layer {name.rsplit('.', 1)[-1]}"
        if label is None:
            continue
        stack: list[Any] = []  # this module's open record_function ranges (re-entrancy safe)
        handles.append(module.register_forward_pre_hook(_pre(label, stack)))
        handles.append(module.register_forward_hook(_post(stack)))
    return handles


def _pre(label: str, stack: list[Any]) -> Any:
    def hook(module: Any, args: Any) -> None:
        range_push(label)
        if _PROFILING:
            import torch

            scope = torch.profiler.record_function(PREFIX + label)
            scope.__enter__()
            stack.append(scope)
        else:
            stack.append(None)
    return hook


def _post(stack: list[Any]) -> Any:
    def hook(module: Any, args: Any, output: Any) -> None:
        scope = stack.pop() if stack else None
        if scope is not None:
            scope.__exit__(None, None, None)
        range_pop()
    return hook


def remove_ranges(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
