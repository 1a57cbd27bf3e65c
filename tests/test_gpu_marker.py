"""`pytest -m gpu` on a machine without CUDA skips every gpu test with its reason (conftest.py),
instead of failing inside code meant to run on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU skip")
def test_gpu_tests_skip_without_a_gpu():
    # a file whose gpu tests call CUDA directly (they fail, not skip, without the hook)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-m", "gpu", "-p", "no:cacheprovider",
         "-q", "-rs", "tests/test_kernel_exact_math.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout[-2000:]
    assert "failed" not in done.stdout and " skipped" in done.stdout
    assert "marked gpu: needs a CUDA GPU" in done.stdout
