"""The layout of the Triton all-reduce's per-rank buffer (peer_all_reduce.py), torch-free, so that
`generate --dry-run` (specs/rank_plan.py) can count it without importing torch.

  [flag area: n_sites x MAX_PROGRAMS int32 flags, rounded up to 256 bytes]
  [site 0: slot for rank 0, rank 1, ...][site 1: ...] ...   each slot SLOT_BYTES

A model has 2 sites a layer (its wo and its w2): Llama-2-13B at tp 2 holds 40 MiB a rank.
"""

from __future__ import annotations

SLOT_BYTES = 256 * 1024  # the largest all-reduce taken: batch 32 of a 4096-wide bf16 model
BLOCK = 1024  # elements a program moves: 5120-wide activations -> 5 programs
MAX_PROGRAMS = SLOT_BYTES // (2 * BLOCK)  # flags per site (2-byte elements need the most)
FLAG_BYTES = 4  # int32


def buffer_bytes(n_sites: int, world: int) -> int:
    """Bytes of each rank's buffer: the flags, then n_sites x world slots."""
    return flag_area_bytes(n_sites) + n_sites * world * SLOT_BYTES


def flag_area_bytes(n_sites: int) -> int:
    return -(-n_sites * MAX_PROGRAMS * FLAG_BYTES // 256) * 256  # data starts 256-byte aligned


def model_buffer_bytes(n_layers: int, world: int) -> int:
    """One rank's buffer for a model of n_layers layers at tensor-parallel degree `world`."""
    return buffer_bytes(2 * n_layers, world)


def uses_peer_buffer(tp: int, all_reduce: str) -> bool:
    """Whether a run allocates this buffer: tp >= 2 with a triton kind, or auto (which picks it
    on the GPUs of one host, where --tp starts its ranks)."""
    return tp > 1 and (all_reduce == "auto" or all_reduce.startswith("triton"))
