"""share_of (engine/kernels/prefetch.py) under Triton's CPU interpreter, run by
tests/test_prefetch.py in a subprocess (TRITON_INTERPRET must be set before Triton is imported).
Prints "ok"."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from infermeter.engine.kernels.prefetch import share_of
from tests.triton_interpreter import run_checks


@triton.jit
def _shares_kernel(OUT, total):
    pid = tl.program_id(0)
    start, size = share_of(total, pid, tl.num_programs(0))
    tl.store(OUT + 2 * pid, start)
    tl.store(OUT + 2 * pid + 1, size)


def check_shares_cover_the_range_once() -> None:
    """For each (bytes, programs): the programs' slices, in program order, are consecutive from
    0 and cover the bytes exactly; every start is 16-byte aligned and every slice but the last
    with bytes a multiple of 16; a program past the end gets nothing (size <= 0). A product of
    135M's (1.8 MB), the 16 MiB cap, fewer bytes than programs x 16, one program, and a ragged
    total."""
    # (each program is a Python call under the interpreter: a few hundred, not 1B's 12,864)
    for total, programs in ((1_769_472, 48), (16 * 2**20, 256), (160, 64), (4096, 1),
                            (1_000_016, 7)):
        out = torch.zeros(2 * programs, dtype=torch.int64)
        _shares_kernel[(programs,)](out, total)
        starts, sizes = out[0::2].tolist(), out[1::2].tolist()
        covered = 0
        for pid, (start, size) in enumerate(zip(starts, sizes, strict=True)):
            assert start % 16 == 0, (total, programs, pid, start)
            if size <= 0:
                assert start >= total, (total, programs, pid)
                continue
            assert start == covered, (total, programs, pid, start, covered)
            covered += size
            if covered < total:
                assert size % 16 == 0, (total, programs, pid, size)
        assert covered == total, (total, programs, covered)


if __name__ == "__main__":
    run_checks(check_shares_cover_the_range_once)
