"""Programs of one launch that wait for each other: the one-launch layer step's stages
(layer_step.py) each wait until the stage before has counted all its programs done.

Why it cannot deadlock: a program's place in the launch is a ticket it draws when it starts
(take_ticket), not its program id, and a stage's programs hold lower tickets than the stages
that wait on them. A program that holds ticket t knows every ticket below t was drawn by a
program already running or done, whatever order the GPU hands programs out in (CUDA promises
none), so every program it waits for makes progress. Triton's CPU interpreter runs the programs
one after another, so there the tickets are the program ids and every wait is met on arrival.

Memory order: a program's stores are published by a release on its count, after a barrier
(every thread's stores first). A waiting program polls with acquire loads from one thread (a
scalar atomic: Triton issues it from thread 0 and broadcasts its value), so one load a program
per poll reaches the count's L2 line, and the loads after the wait see what the counted
programs wrote. Each count has a 128-byte line of its own (LINE int32s), so the polls of one
stage never share a line with another stage's counting.
"""

from __future__ import annotations

from infermeter.engine.kernels.triton_support import tl, triton

LINE = 32  # int32s between two counts: a 128-byte L2 line each

if triton is not None:

    @triton.jit
    def take_ticket(TICKET):
        """This program's place in the launch: the int32 at TICKET before this program's add
        (the programs' count of starts so far)."""
        return tl.atomic_add(TICKET, 1, sem="relaxed", scope="gpu")

    @triton.jit
    def wait_count(COUNT, target):
        """Spin until the int32 at COUNT reaches target, each poll an acquire (every thread of
        the program past the wait: a barrier)."""
        seen = tl.atomic_add(COUNT, 0, sem="acquire", scope="gpu")
        while seen < target:
            seen = tl.atomic_add(COUNT, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()

    @triton.jit
    def count_done(COUNT):
        """Add this program to the int32 count at COUNT once every thread's stores are done
        (acq_rel: the program that finds the last count also sees the others' stores); returns
        the count before the add."""
        tl.debug_barrier()
        return tl.atomic_add(COUNT, 1, sem="acq_rel", scope="gpu")
