"""The GPU's clocks as each timed run ends (measure/clocks.py), without a GPU: NVML's answers
from a fake pynvml, the reasons' names, what a Result keeps and when it warns, and that a
generate run reads them once per timed run, between runs."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from infermeter.measure import clocks, link

BUS = "00000000:18:00.0"


def fake_nvml(sm=1980, memory=2619, reasons=0x0, fail=None, reasons_call="Event"):
    """A pynvml whose GPU (its handle: the bus id) runs at sm/memory MHz (maxima 1980/2619)
    with the `reasons` bit mask active; `fail` names a function that raises NVMLError;
    reasons_call "Event" (today's NVML), "Throttle" (older) or None (neither)."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    nvml.NVMLError, nvml.NVML_CLOCK_SM, nvml.NVML_CLOCK_MEM = NVMLError, 1, 2
    nvml.calls = []

    def api(name, body):
        def call(*args):
            nvml.calls.append(name)
            if name == fail:
                raise NVMLError(name)
            return body(*args)
        setattr(nvml, name, call)

    api("nvmlInit", lambda: None)
    api("nvmlShutdown", lambda: None)
    api("nvmlDeviceGetHandleByPciBusId", lambda bus: bus.decode())
    api("nvmlDeviceGetHandleByIndex", lambda index: f"index {index}")
    api("nvmlDeviceGetClockInfo", lambda handle, kind: {1: sm, 2: memory}[kind]
        if handle == BUS else 0)
    api("nvmlDeviceGetMaxClockInfo", lambda handle, kind: {1: 1980, 2: 2619}[kind])
    if reasons_call:
        api(f"nvmlDeviceGetCurrentClocks{reasons_call}Reasons", lambda handle: reasons)
    return nvml


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setattr(link, "torch_bus_id", lambda index: BUS)


def test_a_reading_is_the_clocks_their_maxima_and_the_reasons_by_name(gpu, monkeypatch):
    nvml = fake_nvml(sm=1755, reasons=0x4 | 0x40)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert clocks.read_clocks(0) == {"sm_mhz": 1755, "memory_mhz": 2619, "sm_max_mhz": 1980,
                                     "memory_max_mhz": 2619,
                                     "reasons": ["sw_power_cap", "hw_thermal_slowdown"]}
    assert nvml.calls.count("nvmlInit") == nvml.calls.count("nvmlShutdown") == 1
    # an older NVML names the same bits "throttle reasons"
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(reasons=0x1, reasons_call="Throttle"))
    assert clocks.read_clocks(0)["reasons"] == ["gpu_idle"]


def test_what_nvml_cannot_answer_is_none_not_a_failure(gpu, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(fail="nvmlDeviceGetClockInfo"))
    assert clocks.read_clocks(0) is None
    for reasons_call, fail in ((None, None), ("Event", "nvmlDeviceGetCurrentClocksEventReasons")):
        monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(reasons_call=reasons_call,
                                                             fail=fail))
        reading = clocks.read_clocks(0)
        assert reading["sm_mhz"] == 1980 and reading["reasons"] is None, reasons_call
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import fails
    assert clocks.read_clocks(0) is None


def test_reason_bits_are_named_in_bit_order_and_an_unknown_bit_by_its_value():
    assert clocks.reason_names(0) == []
    assert clocks.reason_names(0x80 | 0x8 | 0x2) == [
        "applications_clocks_setting", "hw_slowdown", "hw_power_brake_slowdown"]
    assert clocks.reason_names(0x1000 | 0x20) == ["sw_thermal_slowdown", "0x1000"]


def reading(sm, reasons=()):
    return {"sm_mhz": sm, "memory_mhz": 2619, "sm_max_mhz": 1980, "memory_max_mhz": 2619,
            "reasons": list(reasons)}


def test_an_sm_range_is_written_one_way():
    """The headline, the slowdown warning and the A/B summary all write clocks so."""
    assert clocks.sm_span([1755, 1980, 1830]) == "1,755-1,980"
    assert clocks.sm_span([1980, 1980]) == "1,980"
    assert clocks.sm_span([]) == "-"


def test_a_result_keeps_each_runs_clocks_and_every_reason_and_warns_on_a_slowdown():
    got = clocks.clock_metrics([reading(1980), None, reading(1830, ["sw_power_cap"])])
    assert got == {"sm_mhz": [1980, 1830], "memory_mhz": [2619, 2619], "sm_max_mhz": 1980,
                   "memory_max_mhz": 2619, "reasons": ["sw_power_cap"]}
    assert clocks.clock_warnings(got) == [
        "GPU clocks: a timed run ended under sw_power_cap (SM 1,830-1,980 of 1,980 MHz)"]
    # idle and the application setting are not slowdowns; nothing read: nothing kept
    quiet = clocks.clock_metrics([reading(1980, ["gpu_idle", "applications_clocks_setting"])])
    assert quiet["reasons"] == ["applications_clocks_setting", "gpu_idle"]
    assert clocks.clock_warnings(quiet) == [] and clocks.clock_warnings(None) == []
    assert clocks.clock_metrics([None, None]) is None and clocks.clock_metrics([]) is None
    unknown = clocks.clock_metrics([{**reading(1980), "reasons": None}])
    assert unknown["reasons"] is None and clocks.clock_warnings(unknown) == []


def test_generate_reads_the_clocks_once_after_each_timed_run(monkeypatch):
    """The loop reads the clocks after each timed run (never inside one), and the Result
    carries them; on the CPU there are none to read."""
    from infermeter.engine.generator import GenerationConfig
    from infermeter.engine.model import build_model
    from infermeter.generate import loop
    from infermeter.generate.cases import plan_cases, prompt_sets
    from infermeter.generate.request import GenerateRequest, Timing
    from infermeter.specs.presets import PRESETS

    spec = PRESETS["debug"]
    model = build_model(spec, seed=1)
    cases = plan_cases(spec, prompt_sets((1,), (4,), (), spec.vocab_size, 0, ()), ("eager",), 3)
    request = GenerateRequest("random:debug", sampling=GenerationConfig(max_new_tokens=3),
                              timing=Timing(repeats=3, warmup=0))
    base = {"dtype": "float32", "kv_dtype": "float32", "repeats": 3, "warmup": 0}
    with torch.inference_mode():
        cpu, = loop.run_generation(model, cases, request, {"device_name": "cpu"}, base, None)
    assert cpu.metrics["gpu_clocks"] is None

    # as if on a GPU: each read comes after a run's timing, and there are as many as runs
    events = []
    recorder_timing = loop.StepRecorder.timing
    monkeypatch.setattr(loop.StepRecorder, "timing",
                        lambda self, *a, **k: events.append("run") or recorder_timing(self, *a,
                                                                                     **k))
    monkeypatch.setattr(loop, "read_clocks", lambda index: events.append("read") or reading(
        1980 - 75 * events.count("read"), ["sw_power_cap"] if len(events) > 4 else []))
    monkeypatch.setattr(loop, "_is_gpu", lambda device: True)
    with torch.inference_mode():
        result, = loop.run_generation(model, cases, request, {"device_name": "cpu"}, base, None)
    assert events == ["run", "read"] * 3
    assert result.metrics["gpu_clocks"]["sm_mhz"] == [1905, 1830, 1755]
    assert result.metrics["gpu_clocks"]["reasons"] == ["sw_power_cap"]
    assert any(w.startswith("GPU clocks: a timed run ended under sw_power_cap")
               for w in result.warnings)


def test_the_generate_headline_gives_the_clocks_the_runs_ended_at():
    from infermeter.generate.table import headline
    from infermeter.measure.result import Result

    def case(clocks):
        config = {"batch_size": 1, "prompt_len": 8, "context": None, "mode": "compiled",
                  "weights": "random", "dtype": "bf16", "kv_dtype": "bf16", "repeats": 2,
                  "warmup": 1}
        return Result("generate", {"name": "m"}, config, {"device_name": "gpu"},
                      {"gpu_clocks": clocks})

    one = clocks.clock_metrics([reading(1980), reading(1980)])
    two = clocks.clock_metrics([reading(1755), reading(1830)])
    assert headline([case(one)]).endswith("; SM clock 1,980 MHz (of 1,980) as the timed runs "
                                          "ended")
    assert headline([case(one), case(two)]).endswith("; SM clock 1,755-1,980 MHz (of 1,980) "
                                                     "as the timed runs ended")
    assert "SM clock" not in headline([case(None)])  # the CPU, no NVML: nothing to say
