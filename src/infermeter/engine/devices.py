"""Which torch device a run asked for: a device named on the command line must be there."""

from __future__ import annotations

import torch

from infermeter.errors import InfermeterError


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_device(name: str) -> torch.device:
    """'cuda' -> the current CUDA device (one error line where none is visible); else as named."""
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InfermeterError("--device cuda asked for, but no CUDA GPU is visible")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)
