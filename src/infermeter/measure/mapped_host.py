"""Pinned host memory seen from the GPU: a CUDA tensor aliasing a pinned buffer (its UVA device
mapping), and a copy that is sure to run as a kernel on the SMs.

Used by `copy`'s "mapped" method and by `offload --traffic-method mapped` (both features sit
above this layer). The device pointer is asked from the CUDA runtime (cudaPointerGetAttributes)
through CuPy if installed, else through ctypes from the libcudart that PyTorch already loaded;
the tensor is made with `torch.as_tensor` on an object that exposes `__cuda_array_interface__`.
A short write-and-read-back probe checks the alias before use.
"""

from __future__ import annotations

import ctypes
import os

import torch

_TYPESTR = {torch.int64: "<i8", torch.int32: "<i4", torch.int16: "<i2", torch.uint8: "|u1"}
_CUDA_MEMORY_TYPE_HOST = 1  # cudaMemoryTypeHost: pinned (page-locked) host memory


class _CudaArray:
    """The minimal object `torch.as_tensor` turns into a CUDA tensor without copying."""

    def __init__(self, ptr: int, n: int, dtype: torch.dtype, owner: torch.Tensor) -> None:
        self.owner = owner  # keeps the pinned buffer alive as long as the view
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": _TYPESTR[dtype],
                                         "data": (ptr, False), "version": 2}


class _PointerAttributes(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("device", ctypes.c_int),
                ("devicePointer", ctypes.c_void_p), ("hostPointer", ctypes.c_void_p)]


def _loaded_cudart() -> ctypes.CDLL | None:
    """The libcudart this process already loaded (PyTorch's), found through /proc/self/maps."""
    try:
        with open("/proc/self/maps") as handle:
            paths = {line.split()[-1] for line in handle if "libcudart.so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        if os.path.basename(path).startswith("libcudart.so") and os.path.exists(path):
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    return None


def device_pointer(host_ptr: int) -> tuple[int | None, str]:
    """The device address of pinned host memory, or (None, why not)."""
    try:
        import cupy  # type: ignore[import-not-found]
    except ImportError:
        cupy = None
    if cupy is not None:
        try:
            attrs = cupy.cuda.runtime.pointerGetAttributes(host_ptr)
            if int(attrs.type) == _CUDA_MEMORY_TYPE_HOST and attrs.devicePointer:
                return int(attrs.devicePointer), "cupy"
            return None, f"CUDA reports memory type {int(attrs.type)}, not pinned host memory"
        except (cupy.cuda.runtime.CUDARuntimeError, AttributeError, RuntimeError) as err:
            reason = f"cupy: {err}"
    else:
        reason = "cupy not installed"
    lib = _loaded_cudart()
    if lib is None:
        return None, f"{reason}; no libcudart loaded in this process"
    attrs = _PointerAttributes()
    status = lib.cudaPointerGetAttributes(ctypes.byref(attrs), ctypes.c_void_p(host_ptr))
    if status != 0 or attrs.type != _CUDA_MEMORY_TYPE_HOST or not attrs.devicePointer:
        return None, f"{reason}; cudaPointerGetAttributes gave status {status}, type {attrs.type}"
    return int(attrs.devicePointer), "ctypes"


def mapped_view(host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor | None, str]:
    """A CUDA tensor aliasing pinned `host` (same dtype and length), or (None, why not)."""
    if device.type != "cuda" or not host.is_pinned():
        return None, "needs pinned host memory and a CUDA device"
    ptr, how = device_pointer(host.data_ptr())
    if ptr is None:
        return None, how
    try:
        view = torch.as_tensor(_CudaArray(ptr, host.numel(), host.dtype, host), device=device)
    except (RuntimeError, TypeError, ValueError) as err:  # PyTorch refused the pointer
        return None, "torch.as_tensor refused the mapped pointer: " + " ".join(str(err).split())
    if view.device.type != "cuda" or view.data_ptr() != ptr:
        return None, "torch did not alias the mapped pointer"
    # Probe: a kernel (fill_) and a device-to-device memcpy (copy_ of contiguous tensors, which
    # torch issues as cudaMemcpyAsync) write through the mapping; the host must see both.
    probe = host[:8].clone()
    try:
        view[:4].fill_(90)
        view[4:8].copy_(torch.full((4,), 91, dtype=view.dtype, device=device))
        torch.cuda.synchronize(device)
    except RuntimeError as err:  # a fault through the mapping: a reason, not a traceback
        return None, "a write through the mapping failed: " + " ".join(str(err).split())
    ok = bool((host[:4] == 90).all()) and bool((host[4:8] == 91).all())
    host[:8].copy_(probe)
    return (view, how) if ok else (None, "a write through the mapping did not arrive")


def kernel_copy(dst: torch.Tensor, src: torch.Tensor, rows: torch.Tensor) -> None:
    """dst = src ([rows, row_words] each) by a gather kernel on the SMs. A contiguous `copy_`
    between two CUDA tensors is issued as cudaMemcpyAsync, which the driver may give to a copy
    engine even when one side is mapped host memory; `index_select` is always a kernel. `rows`:
    on the device, arange(n_rows) for a plain copy, any row order for a gather (dst's row i is
    src's row rows[i])."""
    torch.index_select(src, 0, rows, out=dst)
