"""Tensor-parallel timing: every rank starts the warm-up and each timed run together
(parallel.ranks_meet, called by loop.time_case), so no rank's TTFT counts another rank's
lag."""

from __future__ import annotations

import time

import torch

from infermeter.engine.checkpoint.load import load_weights
from infermeter.engine.generator import GenerationConfig
from infermeter.generate import loop
from infermeter.generate.cases import plan_cases, prompt_sets
from infermeter.generate.request import GenerateRequest, Timing
from infermeter.measure.ranks import ranks_meet
from infermeter.specs.presets import PRESETS
from tests.tp_workers import run_ranks

LAG_S = 0.3  # how late rank 1 comes to the barrier


def _barrier_times(parallel) -> float:
    """Rank 1 arrives LAG_S late; both leave together: rank 0's wait is about LAG_S."""
    if parallel.rank == 1:
        time.sleep(LAG_S)
    start = time.monotonic()
    ranks_meet(torch.device("cpu"))
    return time.monotonic() - start


def test_ranks_in_step_waits_for_every_rank():
    waited = run_ranks(_barrier_times, 2)
    assert waited[0] > 0.8 * LAG_S  # rank 0 waited for the late rank
    assert waited[1] < 0.8 * LAG_S  # the late rank found rank 0 there


def test_ranks_in_step_alone_is_a_no_op():
    start = time.monotonic()
    ranks_meet(torch.device("cpu"))
    assert time.monotonic() - start < 0.1


def test_every_run_starts_after_the_ranks_meet(monkeypatch):
    """time_case: the ranks meet before the warm-up and before each timed run (not only once),
    and nothing is timed between the meeting and the run it precedes."""
    events = []
    monkeypatch.setattr(loop, "ranks_meet", lambda device: events.append("meet"))
    real_make_runner = loop.make_runner

    def logging_runner(*args, **kwargs):
        runner = real_make_runner(*args, **kwargs)
        real_run, real_warmup = runner.run, runner.warmup

        def run(tokens, hook):
            events.append("run")
            return real_run(tokens, hook)

        def warmup(shapes):
            events.append("warm-up")
            return real_warmup(shapes)

        runner.run, runner.warmup = run, warmup
        return runner

    monkeypatch.setattr(loop, "make_runner", logging_runner)
    spec = PRESETS["debug"]
    model = load_weights("random:debug", "cpu", "float32")
    sets = prompt_sets((1,), (8,), (), spec.vocab_size, 0, ())
    (case,) = plan_cases(spec, sets, ("eager",), 4)
    request = GenerateRequest("random:debug", sampling=GenerationConfig(max_new_tokens=4),
                              timing=Timing(repeats=3, warmup=1))
    loop.time_case(model, case, request, loop._Silent())
    # warm-up, one untimed run (--warmup 1), then three timed runs each after a meeting
    assert events == ["meet", "warm-up", "run", "meet", "run", "meet", "run", "meet", "run"]


def test_an_out_of_memory_case_under_tp_ends_the_run(monkeypatch):
    """Alone, an OOM case is recorded and the sweep goes on; under tensor parallelism the rank's
    peers are inside that case's collectives, so it ends the run with one error line instead of
    moving on alone (and leaving them waiting for the NCCL watchdog)."""
    import pytest

    from infermeter.errors import InfermeterError

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64 GiB")

    monkeypatch.setattr(loop, "time_case", out_of_memory)
    spec = PRESETS["debug"]
    model = load_weights("random:debug", "cpu", "float32")
    sets = prompt_sets((1,), (8,), (), spec.vocab_size, 0, ())
    cases = plan_cases(spec, sets, ("eager",), 4)
    request = GenerateRequest("random:debug", sampling=GenerationConfig(max_new_tokens=4),
                              timing=Timing(repeats=1, warmup=0))
    (alone,) = loop.run_generation(model, cases, request, {"device_name": "cpu"}, {})
    assert alone.metrics["oom"] is True
    monkeypatch.setattr(loop, "group_size", lambda: 2)
    with pytest.raises(InfermeterError, match="out of memory in case .* under tensor parallel"):
        loop.run_generation(model, cases, request, {"device_name": "cpu"}, {})
