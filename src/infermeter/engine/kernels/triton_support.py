"""Triton, where it is installed, and whether it can run on a tensor's device.

Every kernel module imports `triton` from here (None on a CPU-only install, where the model
never picks a Triton kernel), so that no kernel module needs another one just for the import.
"""

from __future__ import annotations

import os

from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install
    triton = tl = None


def triton_runs_on(x: Tensor) -> bool:
    """Triton is installed and x lives where it runs: CUDA, or anywhere under
    TRITON_INTERPRET=1 (Triton's CPU interpreter, what the tests use)."""
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
