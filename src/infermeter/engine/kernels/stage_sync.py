"""Programs of one launch that wait for each other: the one-launch layer step's stages
(layer_step.py) each wait until the stage before has counted all its programs done.

Why it cannot deadlock: a stage's programs have lower program ids than the stages that wait on
them, and a GPU hands out a launch's programs in id order, so by the time a program waits, the
programs it waits for are running or done (the assumption decoupled look-back scans make).
Triton's CPU interpreter runs the programs one after another in id order, so every wait there is
met on arrival.

Memory order: a program's stores are published by a release on its count, after a barrier
(every thread's stores first); a waiting program polls with volatile loads (L2, not its SM's
L1) and, once the count is met, takes it with an acquire, so the loads after it see what the
counted programs wrote.
"""

from __future__ import annotations

from infermeter.engine.kernels.triton_support import tl, triton

if triton is not None:

    @triton.jit
    def wait_count(COUNT, target):
        """Spin until the int32 at COUNT reaches target, then acquire it (every thread of the
        program past the wait: a barrier)."""
        seen = tl.load(COUNT, volatile=True)
        while seen < target:
            seen = tl.load(COUNT, volatile=True)
        tl.atomic_add(COUNT, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()

    @triton.jit
    def count_done(COUNT):
        """Add this program to the int32 count at COUNT once every thread's stores are done
        (acq_rel: the program that finds the last count also sees the others' stores); returns
        the count before the add."""
        tl.debug_barrier()
        return tl.atomic_add(COUNT, 1, sem="acq_rel", scope="gpu")
