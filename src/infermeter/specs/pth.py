"""Reading a PyTorch .pth file safely: the spec loaders read Meta's shards for their vocabulary
size and the engine reads them for weights, both through this one safe unpickler."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from infermeter.errors import InfermeterError


def load_pth(path: Path) -> dict[str, Any]:
    """A .pth file through the safe unpickler only; anything else is refused with one line."""
    import torch  # here, so that sizing a model does not import torch

    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InfermeterError(
            f"{path}: refused: this file needs arbitrary code execution to unpickle "
            f"(torch.load weights_only=True said: {first[:160]})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise InfermeterError(f"{path}: cannot read as a PyTorch checkpoint "
                              f"({str(err).splitlines()[0][:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InfermeterError(f"{path}: expected a flat dict of tensor names to tensors")
    return state
