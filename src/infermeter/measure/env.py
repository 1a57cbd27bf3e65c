"""Environment capture: which machine a Result came from.

Works with no GPU, no NVML and even no torch: every probe is optional and a missing one leaves
its field None. NVML gives the driver and the PCIe link (the copy benchmark's peak comes from it).
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

from infermeter import __version__

REVISION_ENV = "INFERMETER_SOURCE_REVISION"
PACKAGE_DIR = Path(__file__).resolve().parent
# Environment variables by which torch, its compiler, Triton, CUDA, cuBLAS or NCCL may run a
# measurement differently (an allocator setting, a compiler cache, NVLink multicast off): a
# Result keeps the ones set, so a figure can be reproduced with them. Prefixes, not names: each
# release adds knobs.
SETTING_PREFIXES = ("PYTORCH_", "TORCH_", "TORCHINDUCTOR_", "TRITON_", "CUDA_", "CUBLAS_",
                    "NCCL_", "NVSHMEM_")


def runtime_settings() -> dict[str, str]:
    """This process's environment variables named with SETTING_PREFIXES, by name."""
    return {name: os.environ[name] for name in sorted(os.environ)
            if name.startswith(SETTING_PREFIXES)}


def host_cpu_name() -> str:
    """Model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def source_revision(where: Path = PACKAGE_DIR) -> str | None:
    """The git commit of the code that ran, "+dirty" when its tracked files (in `where`, the
    package) differ from it; None outside a git checkout (an installed wheel) or without git.
    Why: the version number does not move between commits, and a Result is only reproducible
    with the code that made it.
    $INFERMETER_SOURCE_REVISION, when set, is taken as given: for a copy of a checkout without
    its .git (the benchmarks' GPU machines), whose commit the sender knows."""
    given = os.environ.get(REVISION_ENV)
    if given:
        return given
    def git(*args: str) -> str | None:
        try:
            run = subprocess.run(["git", "-C", str(where), *args], capture_output=True,
                                 text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return run.stdout.strip() if run.returncode == 0 else None

    # The package's own files must be tracked there: a wheel installed into an ignored folder of
    # some other checkout is not that checkout's code.
    if git("ls-files", "--error-unmatch", "--", "__init__.py") is None:
        return None
    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    # Only this folder's changes count: the sweeps append to tracked results/ files as they go.
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return commit + ("+unknown" if changed is None else "+dirty" if changed else "")


def host_available() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _torch_facts() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"torch": None, "cuda": None, "device_name": None, "device_count": 0}
    facts: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        facts["device_count"] = torch.cuda.device_count()
        facts["device_name"] = torch.cuda.get_device_name(torch.cuda.current_device())
    else:
        facts["device_count"] = 0
        facts["device_name"] = None
    return facts


def nvml_facts(index: int = 0) -> dict[str, Any]:
    """Driver, PCIe generation/width and total memory of GPU `index`, or {} without NVML."""
    from infermeter.measure.nvml import opened_nvml

    facts: dict[str, Any] = {}
    with opened_nvml() as pynvml:
        if pynvml is None:
            return facts
        try:
            facts["driver"] = _decode(pynvml.nvmlSystemGetDriverVersion())
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            facts["gpu_memory_bytes"] = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            for key, call in (("pcie_gen", "nvmlDeviceGetMaxPcieLinkGeneration"),
                              ("pcie_width", "nvmlDeviceGetMaxPcieLinkWidth"),
                              ("pcie_gen_current", "nvmlDeviceGetCurrPcieLinkGeneration"),
                              ("pcie_width_current", "nvmlDeviceGetCurrPcieLinkWidth")):
                try:
                    facts[key] = int(getattr(pynvml, call)(handle))
                except Exception:  # not every GPU/driver answers every query
                    facts[key] = None
        except Exception:  # NVML present but the device query failed: what was read so far
            pass
    return facts


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def device_slug(env: dict[str, Any]) -> str:
    """A Result file's device part: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", str(env["device_name"]).lower()).strip("-")


def capture_env() -> dict[str, Any]:
    env: dict[str, Any] = {
        "device_name": None, "device_count": 0, "driver": None, "cuda": None, "torch": None,
        "pcie_gen": None, "pcie_width": None, "host_cpu": host_cpu_name(),
        "hostname": socket.gethostname(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "infermeter_version": __version__, "python": platform.python_version(),
        "source_revision": source_revision(), "settings": runtime_settings(),
    }
    env.update(_torch_facts())
    if env["device_count"]:
        nvml = nvml_facts()
        nvml.pop("gpu_memory_bytes", None)
        env.update(nvml)
    if env["device_name"] is None:
        env["device_name"] = "cpu"
    return env
