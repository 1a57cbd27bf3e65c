"""What a generate run reports about memory (generate/memory.py), without a GPU: NVML's figure for
this process from a fake pynvml, its failure paths, and the torch peaks with torch.cuda's
functions replaced."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from infermeter.generate import memory
from infermeter.measure import link

MiB = 1 << 20
BUS_IDS = {0: "00000000:18:00.0", 1: "00000000:2a:00.0"}


def fake_nvml(processes: dict[str, list], fail: str | None = None) -> types.ModuleType:
    """A pynvml with two GPUs (handles are their bus ids) and `processes` per bus id; `fail`
    names a function that raises NVMLError. Records the calls made."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    nvml.NVMLError = NVMLError
    nvml.calls = []

    def api(name, body):
        def call(*args):
            nvml.calls.append(name)
            if name == fail:
                raise NVMLError(f"{name} failed")
            return body(*args)
        setattr(nvml, name, call)

    api("nvmlInit", lambda: None)
    api("nvmlShutdown", lambda: None)
    api("nvmlDeviceGetHandleByPciBusId", lambda bus: bus.decode())
    api("nvmlDeviceGetHandleByIndex", lambda index: BUS_IDS[index])
    api("nvmlDeviceGetComputeRunningProcesses", lambda handle: processes.get(handle, []))
    return nvml


def proc(pid: int, used: int | None) -> types.SimpleNamespace:
    return types.SimpleNamespace(pid=pid, usedGpuMemory=used)


@pytest.fixture
def gpus(monkeypatch):
    """torch's bus ids for CUDA devices 0 and 1 (a CPU-only torch has none)."""
    monkeypatch.setattr(link, "torch_bus_id", lambda index: BUS_IDS[index])


ME, OTHER = os.getpid(), os.getpid() + 1


def test_process_gpu_memory_is_this_pids_entry_on_this_gpu(gpus, monkeypatch):
    nvml = fake_nvml({BUS_IDS[0]: [proc(OTHER, 999 * MiB), proc(ME, 300 * MiB)],
                      BUS_IDS[1]: [proc(OTHER, 5 * MiB), proc(ME, 700 * MiB)]})
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert memory.process_gpu_memory(torch.device("cuda", 1)) == 700 * MiB
    assert memory.process_gpu_memory(torch.device("cuda", 0)) == 300 * MiB
    assert memory.process_gpu_memory(torch.device("cuda")) == 300 * MiB  # no index: device 0
    assert nvml.calls.count("nvmlInit") == nvml.calls.count("nvmlShutdown") == 3


def test_process_gpu_memory_falls_back_to_the_nvml_index(monkeypatch):
    """No bus id from torch (or NVML does not know it): the handle of NVML's device index."""
    nvml = fake_nvml({BUS_IDS[1]: [proc(ME, 64 * MiB)]}, fail="nvmlDeviceGetHandleByPciBusId")
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(link, "torch_bus_id", lambda index: BUS_IDS[index])
    assert memory.process_gpu_memory(torch.device("cuda", 1)) == 64 * MiB
    monkeypatch.setattr(link, "torch_bus_id", lambda index: None)
    assert memory.process_gpu_memory(torch.device("cuda", 1)) == 64 * MiB
    assert "nvmlDeviceGetHandleByIndex" in nvml.calls


@pytest.mark.parametrize("processes, fail", [
    ({BUS_IDS[0]: [proc(OTHER, 999 * MiB)]}, None),  # our pid not listed (a pid namespace)
    ({BUS_IDS[0]: [proc(ME, None), proc(OTHER, 999 * MiB)]}, None),  # no figure for it
    ({BUS_IDS[0]: [proc(ME, 300 * MiB)]}, "nvmlDeviceGetComputeRunningProcesses"),
    ({BUS_IDS[0]: [proc(ME, 300 * MiB)]}, "nvmlDeviceGetHandleByIndex"),  # no handle at all
    ({BUS_IDS[0]: [proc(ME, 300 * MiB)]}, "nvmlInit"),  # no driver
], ids=["not-listed", "no-figure", "query-fails", "no-handle", "init-fails"])
def test_process_gpu_memory_is_none_when_nvml_cannot_say(processes, fail, gpus, monkeypatch):
    nvml = fake_nvml(processes, fail)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    if fail == "nvmlDeviceGetHandleByIndex":  # and no bus id from torch to try first
        monkeypatch.setattr(link, "torch_bus_id", lambda index: None)
    assert memory.process_gpu_memory(torch.device("cuda", 0)) is None
    if fail != "nvmlInit":  # initialised: shut down again, whatever happened
        assert nvml.calls[-1] == "nvmlShutdown"


def test_process_gpu_memory_without_pynvml_or_with_a_failing_shutdown(gpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: the import fails
    assert memory.process_gpu_memory(torch.device("cuda", 0)) is None
    nvml = fake_nvml({BUS_IDS[0]: [proc(ME, 300 * MiB)]}, fail="nvmlShutdown")
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert memory.process_gpu_memory(torch.device("cuda", 0)) == 300 * MiB


def test_memory_metrics_and_reset_peaks_read_torch_and_nvml(monkeypatch):
    reset = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset.append)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (30 * MiB, 100 * MiB))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 40 * MiB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 48 * MiB)
    monkeypatch.setattr(memory, "process_gpu_memory", lambda device: 55 * MiB)
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    memory.reset_peaks(gpu)
    memory.reset_peaks(cpu)
    assert reset == [gpu]  # the CPU has no peaks to reset
    assert memory.memory_metrics(gpu) == {
        "peak_allocated_bytes": 40 * MiB, "peak_reserved_bytes": 48 * MiB,
        "process_gpu_memory_bytes": 55 * MiB, "gpu_memory_used_bytes": 70 * MiB}
    assert memory.memory_metrics(cpu) == dict.fromkeys(
        ("peak_allocated_bytes", "peak_reserved_bytes", "process_gpu_memory_bytes",
         "gpu_memory_used_bytes"))
