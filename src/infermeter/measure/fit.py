"""Fit checks: what a measurement will allocate, by part, against what the device or the host
has free, before anything is allocated (docs/design.md, "Measuring")."""

from __future__ import annotations

from typing import Any

from infermeter.errors import InfermeterError
from infermeter.measure.env import host_available
from infermeter.units import format_bytes


def free_memory(device: Any) -> tuple[int | None, str]:
    """(free bytes, where) for a torch device: the GPU's free memory or the host's available."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free), "free on the GPU"
    return host_available(), "available in host memory"


def check_fit(what: str, parts: dict[str, int], free: int | None, where: str,
              advice: str) -> None:
    """Raise, with every number and the command's `advice`, when the parts add up to more than
    `free` (None: unknown, nothing checked)."""
    need = sum(parts.values())
    if free is None or need <= free:
        return
    terms = " + ".join(f"{name} {format_bytes(size)}" for name, size in parts.items())
    raise InfermeterError(f"{what} does not fit: {terms} = {format_bytes(need)} > "
                          f"{format_bytes(free)} {where}; {advice}")
