"""The GPU's link to host memory: its peak speed per direction (from NVML) and its NUMA node.

PCIe payload rate per lane and direction, after line encoding (PCI-SIG base specifications;
the same table as Wikipedia's "PCI Express" article):
    Gen1 2.5 GT/s 8b/10b -> 0.250 GB/s     Gen4 16 GT/s 128b/130b -> 1.969 GB/s
    Gen2 5.0 GT/s 8b/10b -> 0.500 GB/s     Gen5 32 GT/s 128b/130b -> 3.938 GB/s
    Gen3 8.0 GT/s 128b/130b -> 0.985 GB/s  Gen6 64 GT/s PAM4, 242B/256B FLIT -> 7.563 GB/s
The peak is this rate x the lane count (x16: Gen4 31.5, Gen5 63.0 GB/s). Packet headers
(TLP/DLLP) still take a part of it, so DMA copies reach roughly 85-90% of it in practice.

The peak uses the *maximum* generation and width of the link (NVML's
nvmlDeviceGetMaxPcieLinkGeneration / Width: what the GPU and the slot can do together), because an
idle GPU trains its link down to save power; the current values are read while a copy runs
(`current_link`) to tell a link that really is slower apart from one that was only idle.

Grace Hopper (GH200) reaches host memory over NVLink-C2C, not PCIe: NVML reports C2C links
(field NVML_FI_DEV_C2C_LINK_COUNT) and each one's speed in MB/s per direction
(NVML_FI_DEV_C2C_LINK_GET_MAX_BW, ~45 GB/s x 10 links = the 450 GB/s per direction of the
datasheet); the peak is then their sum.

NUMA: host memory on the GPU's own NUMA node is reached without crossing the socket interconnect.
The node is read from /sys/bus/pci/devices/<domain:bus:device.function>/numa_node (-1 = none).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infermeter.measure.nvml import device_handle, opened_nvml

PCIE_GBPS_PER_LANE = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
C2C_LINK_COUNT, C2C_LINK_STATUS, C2C_LINK_MAX_BW = 170, 171, 172  # NVML field ids


def pcie_peak_gbps(gen: int | None, width: int | None) -> float | None:
    """GB/s per direction of a PCIe link of generation `gen` and `width` lanes."""
    if not gen or not width or gen not in PCIE_GBPS_PER_LANE:
        return None
    return PCIE_GBPS_PER_LANE[gen] * width


def sysfs_bus_id(bus_id: str) -> str:
    """NVML's '00000000:18:00.0' -> sysfs' '0000:18:00.0' (4-digit domain, lower case)."""
    domain, rest = bus_id.strip().lower().split(":", 1)
    return f"{int(domain, 16):04x}:{rest}"


def numa_node_of(bus_id: str, root: str = "/sys/bus/pci/devices") -> int | None:
    try:
        node = int(Path(root, sysfs_bus_id(bus_id), "numa_node").read_text().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def host_numa_nodes(root: str = "/sys/devices/system/node") -> int | None:
    try:
        return sum(1 for name in os.listdir(root) if name.startswith("node")
                   and name[4:].isdigit()) or None
    except OSError:
        return None


def process_on_node(node: int | None, root: str = "/sys/devices/system/node") -> bool | None:
    """Whether this process may run only on CPUs of NUMA node `node` (pinned buffers are placed
    on the node of the CPU that first touches them)."""
    if node is None or not hasattr(os, "sched_getaffinity"):
        return None
    try:
        text = Path(root, f"node{node}", "cpulist").read_text().strip()
    except OSError:
        return None
    cpus: set[int] = set()
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.update(range(int(lo), int(hi) + 1))
        elif part:
            cpus.add(int(part))
    return os.sched_getaffinity(0) <= cpus


@dataclass
class LinkInfo:
    kind: str | None = None  # "pcie", "nvlink-c2c", or None when NVML is unavailable
    gen: int | None = None
    width: int | None = None
    gen_current: int | None = None
    width_current: int | None = None
    c2c_links: int | None = None
    peak_gbps: float | None = None  # per direction
    bus_id: str | None = None
    numa_node: int | None = None
    host_numa_nodes: int | None = None
    process_on_gpu_node: bool | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.kind == "nvlink-c2c":
            return f"NVLink-C2C x{self.c2c_links}, {self.peak_gbps:.1f} GB/s per direction"
        if self.peak_gbps:
            return f"PCIe Gen{self.gen} x{self.width}, {self.peak_gbps:.1f} GB/s per direction"
        return "link peak unknown (no NVML)"


def _c2c_peak(pynvml: Any, handle: Any) -> tuple[int, float] | None:
    """(active C2C links, GB/s per direction) or None when the GPU has no C2C link."""
    try:
        count, _status, speed = pynvml.nvmlDeviceGetFieldValues(
            handle, [C2C_LINK_COUNT, C2C_LINK_STATUS, C2C_LINK_MAX_BW])
    except (pynvml.NVMLError, AttributeError, ValueError):  # old driver/pynvml: no such fields
        return None
    links = _field_value(count)
    if not links:
        return None
    return int(links), int(links) * (_field_value(speed) or 0) / 1e3


def _field_value(value: Any) -> float | None:
    """An nvmlFieldValue_t's number, read by its type tag (nvmlValueType_t)."""
    if value.nvmlReturn != 0:
        return None
    member = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal",
              6: "usVal"}.get(int(value.valueType), "uiVal")
    return getattr(value.value, member)


def _query(pynvml: Any, handle: Any, name: str) -> Any:
    try:
        return getattr(pynvml, name)(handle)
    except (pynvml.NVMLError, AttributeError):  # not every GPU or driver answers every query
        return None


def link_info(bus_id: str | None = None, index: int = 0) -> LinkInfo:
    """What NVML and sysfs say about GPU `bus_id` (or NVML index `index`); never raises."""
    info = LinkInfo(bus_id=bus_id, host_numa_nodes=host_numa_nodes())
    with opened_nvml() as pynvml:
        if pynvml is None:
            info.notes.append("NVML unavailable (pip install nvidia-ml-py): no link peak")
        else:
            _read_link(pynvml, info, bus_id, index)
    _fill_numa(info)
    return info


def _read_link(pynvml: Any, info: LinkInfo, bus_id: str | None, index: int) -> None:
    try:
        handle = device_handle(pynvml, bus_id, index)
        pci = _query(pynvml, handle, "nvmlDeviceGetPciInfo")
        if pci is not None:
            raw = pci.busId
            info.bus_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        info.gen = _query(pynvml, handle, "nvmlDeviceGetMaxPcieLinkGeneration")
        info.width = _query(pynvml, handle, "nvmlDeviceGetMaxPcieLinkWidth")
        info.gen_current, info.width_current = current_link(pynvml, handle)
        c2c = _c2c_peak(pynvml, handle)
        if c2c and c2c[1] > 0:
            info.kind, (info.c2c_links, info.peak_gbps) = "nvlink-c2c", c2c
        elif c2c:
            info.kind, info.c2c_links, info.peak_gbps = "nvlink-c2c", c2c[0], 450.0
            info.notes.append("NVML gave no C2C link speed: assumed GH200's 450 GB/s")
        else:
            info.kind, info.peak_gbps = "pcie", pcie_peak_gbps(info.gen, info.width)
    except pynvml.NVMLError as err:  # NVML present but the device query failed
        info.notes.append(f"NVML query failed: {err}")


def _fill_numa(info: LinkInfo) -> None:
    if info.bus_id:
        info.numa_node = numa_node_of(info.bus_id)
    info.process_on_gpu_node = process_on_node(info.numa_node)


def current_link(pynvml: Any, handle: Any) -> tuple[int | None, int | None]:
    return (_query(pynvml, handle, "nvmlDeviceGetCurrPcieLinkGeneration"),
            _query(pynvml, handle, "nvmlDeviceGetCurrPcieLinkWidth"))


def current_link_of(bus_id: str | None, index: int = 0) -> tuple[int | None, int | None]:
    """Current PCIe generation and width now (call it while a copy runs), or (None, None)."""
    with opened_nvml() as pynvml:
        if pynvml is None:
            return None, None
        try:
            return current_link(pynvml, device_handle(pynvml, bus_id, index))
        except pynvml.NVMLError:
            return None, None


def torch_bus_id(device_index: int) -> str | None:
    """PCI bus id of a CUDA device as torch sees it (respects CUDA_VISIBLE_DEVICES)."""
    try:
        import torch

        props = torch.cuda.get_device_properties(device_index)
        return f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    except (ImportError, RuntimeError, AssertionError, AttributeError):
        return None
