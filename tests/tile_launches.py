"""The tiles each Triton launch of a kernels module gets, recorded on the CPU with nothing run:
for the tests of modules whose launchers take a `tiles` override (expert_gemv, fused_step)."""

from __future__ import annotations

from types import ModuleType


def tile_launches(monkeypatch, module: ModuleType, call) -> list[tuple[str, tuple, int, int, int]]:
    """(kernel, grid, BLOCK_N, BLOCK_K, num_warps) of each launch `call` makes through
    module.launch (replaced by a recorder, so no kernel runs)."""
    seen = []

    def launch(kernel, grid, pdl, *args, **kwargs):
        seen.append((kernel.fn.__name__, grid, kwargs["BLOCK_N"], kwargs["BLOCK_K"],
                     kwargs["num_warps"]))

    monkeypatch.setattr(module, "launch", launch)
    call()
    return seen
