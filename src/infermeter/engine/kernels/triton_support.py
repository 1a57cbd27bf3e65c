"""Triton, where it is installed, and whether it can run on a tensor's device.

Every kernel module imports `triton` from here (None on a CPU-only install, where the model
never picks a Triton kernel), so that no kernel module needs another one just for the import.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install
    triton = tl = None


def _not_triton_missing(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Triton not available")


if triton is None:
    # torch.library.triton_op looks for Triton kernels in each op's body and, without Triton,
    # warns once an op (three on every run); no Triton kernel runs here, so drop only that line.
    logging.getLogger("torch._library.triton").addFilter(_not_triton_missing)


def triton_runs_on(x: Tensor) -> bool:
    """Triton is installed and x lives where it runs: CUDA, or anywhere under
    TRITON_INTERPRET=1 (Triton's CPU interpreter, what the tests use)."""
    return triton_runs_on_device(x.device)


def triton_runs_on_device(device: torch.device) -> bool:
    """triton_runs_on for a device, before any tensor is on it (the fit checks)."""
    return triton is not None and (device.type == "cuda"
                                   or os.environ.get("TRITON_INTERPRET") == "1")


def head_size_fits(head_dim: int) -> bool:
    """A head of `head_dim` features is one tl.arange block: a power of two, at least 16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0
