"""`infermeter run`'s prefill ladder in the run's mode (run/stages.py ladder_request): compiled,
it times the compiled mode's bucketed prefill in forwards of at most LADDER_CHUNK tokens, every
rung in one cache and one Generator, so each bucket or chunk length is compiled once, in the
warm-up of the first rung that needs it; eager, the eager prefill. The Results record the path,
and the report's break-even reads their times. CPU, debug model: torch.compile runs with a
backend that counts dynamo's graphs (of the layer the default layer graphs compile) and runs
them uncompiled (the graphs, not inductor's code, are under test).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from infermeter.generate.job import run_generate
from infermeter.measure.result import append_jsonl
from infermeter.report.derive import prefill_points
from infermeter.report.load import load_records
from infermeter.run import stages

CHUNK = 64  # the CPU ladder's rungs (40, 128, 255) then need two graphs: 64 from 0, 64 later


@pytest.fixture
def graphs(monkeypatch):
    """The forward length of each graph dynamo hands a backend: a layer's, whose hidden state
    h [B, T, dim] is its one 3-d floating input (the caches are 4-d), or a whole forward's,
    whose tokens [B, T] are its one 2-d int64 input."""
    made: list[int] = []
    compile_ = torch.compile

    def counting(fn=None, **kwargs):
        def backend(gm, example_inputs):
            rows = next(t for t in example_inputs if isinstance(t, torch.Tensor) and (
                t.dim() == 3 and t.is_floating_point() or t.dim() == 2
                and t.dtype == torch.int64))
            made.append(rows.shape[1])
            return gm.forward

        return compile_(fn, backend=backend, fullgraph=kwargs.get("fullgraph", False),
                        dynamic=kwargs.get("dynamic"))

    monkeypatch.setattr(torch, "compile", counting)
    monkeypatch.setattr(stages, "LADDER_CHUNK", CHUNK)
    return made


def _setting(mode: str | None) -> stages.RunSetting:
    return replace(stages.plan_setting(None, None, None, None, None, gpu=False),
                   generate_mode=mode)


def test_the_compiled_ladder_compiles_each_forward_length_once(graphs, tmp_path):
    setting = _setting("compiled")
    request = stages.ladder_request(setting, (56, 128, 255))
    assert request.modes == ("compiled",) and request.engine.prefill_kind == "bucketed"
    results = run_generate(request, {"device_name": "cpu"})[0]
    # 56 pads to the 64 bucket; 128 is two chunks of 64, from 0 and after it; 255 three and its
    # last 63 tokens padded to 64: two graphs for the whole ladder, both made by the first rungs
    assert graphs == [64, 64]
    configs = [r.config for r in results]
    assert [c["prompt_len"] for c in configs] == [56, 128, 255]
    assert all(c["mode"] == "compiled" and c["prefill"] == "bucketed"
               and c["prefill_chunk"] == CHUNK and c["prefill_forward_lens"] == [CHUNK]
               and c["cache_len"] == 256 for c in configs)
    assert all(r.metrics["warmup_s"] > 0 and r.metrics["ttft_ms"] > 0 for r in results)
    # the report's break-even stands on these compiled prefill times
    append_jsonl(tmp_path / "ladder.jsonl", results)
    records = load_records([tmp_path / "ladder.jsonl"]).records
    assert prefill_points(records) == tuple((float(r.config["prompt_len"]),
                                             r.metrics["ttft_ms"]) for r in results)


def test_an_eager_run_keeps_the_eager_ladder_and_reference(graphs):
    setting = _setting(None)  # the CPU's default
    ladder = stages.ladder_request(setting, (128, 255))
    assert ladder.modes == ("eager",) and ladder.engine.prefill_chunk is None
    assert not ladder.timing.share_compiled and ladder.max_seq_len == 256
    assert stages.generate_request(setting).modes == ("eager",)
    results = run_generate(ladder, {"device_name": "cpu"})[0]
    assert graphs == [] and [r.config["prefill"] for r in results] == ["exact", "exact"]


def test_the_reference_prompt_runs_in_the_runs_mode():
    compiled = stages.generate_request(_setting("compiled"))
    assert compiled.modes == ("compiled",) and compiled.engine.prefill_kind == "bucketed"
    gpu = stages.plan_setting(None, None, None, None, None, gpu=True)
    assert gpu.mode == "compiled" and stages.ladder_request(gpu, (512, 4095)).engine \
        .prefill_chunk == stages.LADDER_CHUNK


def test_a_failed_ladder_is_a_warning_on_the_reference_results(monkeypatch):
    """A ladder prompt the model cannot hold (debug's 256 positions) fails as an InfermeterError
    would on a device; the reference Results stand, each saying which ladder is missing and why,
    and the warm-up counts the reference prompt only."""
    setting = _setting(None)
    monkeypatch.setattr(stages, "prefill_ladder", lambda *args: (128, 300))
    results = stages.generate_stage(setting, {"device_name": "cpu"})
    assert len(results) == 1 and "prefill_ladder" not in results[0].config
    (warning,) = [w for w in results[0].warnings if "prefill ladder" in w]
    assert warning.startswith("prefill ladder [128, 300] not measured: ")
    assert "300" in warning.split("not measured: ", 1)[1]  # the error itself, not only the list
    metrics = results[0].metrics
    assert metrics["run_warmup_parts"]["prefill_ladder_s"] is None
    assert metrics["run_warmup_s"] == metrics["warmup_s"] > 0
