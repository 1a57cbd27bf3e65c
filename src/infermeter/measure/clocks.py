"""The GPU's clocks as each timed run ends, read through NVML: a step's time depends on them,
and two processes on one GPU can differ by several percent, so a Result says what the clocks
were rather than leaving a reader to guess.

Read between timed runs, never during one (an NVML call costs the host tens of microseconds to
milliseconds); the clock a run ended at stands for the run (the GPU drops its clocks only after
milliseconds of idling). Clock event reasons ("throttle reasons" in older NVML) say why the
clocks were below their maximum where they were.
"""

from __future__ import annotations

from typing import Any

# NVML's clock event reason bits (nvmlClocksEventReason*, formerly nvmlClocksThrottleReason*),
# by the name a Result records. GPU idle and the application clock setting are not slowdowns.
REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
# the reasons that mean the GPU slowed itself down (power, heat, an external brake): a Result
# whose runs ended under one of these gets a warning
SLOWDOWNS = ("sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown",
             "hw_power_brake_slowdown")


def reason_names(mask: int) -> list[str]:
    """An NVML clock event reason bit mask -> the names of its bits, in bit order; a bit NVML
    adds later shows as its hex value."""
    names = [name for bit, name in REASONS.items() if mask & bit]
    unknown = mask & ~sum(REASONS)
    return names + ([f"0x{unknown:x}"] if unknown else [])


def read_clocks(device_index: int) -> dict[str, Any] | None:
    """The GPU's SM and memory clocks now, their maxima (MHz) and the active clock event
    reasons; None without NVML or where the GPU does not answer."""
    from infermeter.measure.link import torch_bus_id
    from infermeter.measure.nvml import device_handle, opened_nvml

    with opened_nvml() as pynvml:
        if pynvml is None:
            return None
        try:
            handle = device_handle(pynvml, torch_bus_id(device_index), device_index)
            sm, memory = pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_MEM
            reading = {"sm_mhz": int(pynvml.nvmlDeviceGetClockInfo(handle, sm)),
                       "memory_mhz": int(pynvml.nvmlDeviceGetClockInfo(handle, memory)),
                       "sm_max_mhz": int(pynvml.nvmlDeviceGetMaxClockInfo(handle, sm)),
                       "memory_max_mhz": int(pynvml.nvmlDeviceGetMaxClockInfo(handle, memory))}
        except pynvml.NVMLError:
            return None
        query = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        try:
            reading["reasons"] = reason_names(int(query(handle))) if query else None
        except pynvml.NVMLError:
            reading["reasons"] = None
        return reading


def clock_metrics(readings: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The Result's metrics.gpu_clocks from one reading per timed run: each run's SM and memory
    clock (MHz), the maxima, and every reason any run ended under; None where no run was read
    (no NVML, a CPU run)."""
    read = [r for r in readings if r is not None]
    if not read:
        return None
    reasons = sorted({name for r in read for name in (r.get("reasons") or [])})
    return {"sm_mhz": [r["sm_mhz"] for r in read],
            "memory_mhz": [r["memory_mhz"] for r in read],
            "sm_max_mhz": read[0]["sm_max_mhz"], "memory_max_mhz": read[0]["memory_max_mhz"],
            "reasons": reasons if any(r.get("reasons") is not None for r in read) else None}


def sm_span(mhz: list[int]) -> str:
    """A list of SM clocks (MHz) as the one way every report writes it: "1,980" where all are
    equal, else "1,755-1,980"; "-" where there are none."""
    if not mhz:
        return "-"
    low, high = min(mhz), max(mhz)
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"


def clock_warnings(clocks: dict[str, Any] | None) -> list[str]:
    """A warning where a timed run ended with the GPU slowing itself down (SLOWDOWNS): its
    figures are the slowed GPU's."""
    slowed = [name for name in (clocks or {}).get("reasons") or [] if name in SLOWDOWNS]
    if not slowed:
        return []
    return [f"GPU clocks: a timed run ended under {', '.join(slowed)} (SM "
            f"{sm_span(clocks['sm_mhz'])} of {clocks['sm_max_mhz']:,} MHz)"]
