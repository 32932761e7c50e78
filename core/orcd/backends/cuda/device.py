"""Device discovery and the worker's device: primary context plus one stream.

``CudaDevice(index)`` retains the primary context of device ``index`` (the
context the runtime API, cupy and cuBLAS share, so nvmath and our kernels see
the same memory), makes it current, and creates one non-blocking stream on
which all of the worker's work is ordered. The primary context is per device,
not per thread: any thread that uses the device calls ``make_current()``
first (every orcd.backends.cuda entry point does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orcd.backends.cuda.driver import cu, driver_module, init
from orcd.errors import InvalidRequest


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: tuple[int, int]
    total_bytes: int
    sm_count: int
    l2_bytes: int
    max_threads_per_block: int
    max_block_dim: tuple[int, int, int]
    max_grid_dim: tuple[int, int, int]
    max_shared_per_block: int        # without opting in (48 KiB)
    max_shared_per_block_optin: int  # after cuFuncSetAttribute (227 KiB on sm_90)

    @property
    def arch(self) -> str:
        """NVRTC's real architecture, e.g. ``sm_90`` for H100/H200."""
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"


def device_count() -> int:
    init()
    return int(cu("cuDeviceGetCount"))


def _attr(dev: Any, name: str) -> int:
    drv = driver_module()
    return int(cu("cuDeviceGetAttribute", getattr(drv.CUdevice_attribute, f"CU_DEVICE_ATTRIBUTE_{name}"), dev))


def _handle(index: int) -> Any:
    n = device_count()
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
        raise InvalidRequest(f"no CUDA device {index!r}; available: {describe_devices()}",
                             field="gpu_device")
    return cu("cuDeviceGet", index)


def _name(dev: Any) -> str:
    return cu("cuDeviceGetName", 256, dev).split(b"\0")[0].decode()


def describe_devices() -> str:
    """``0: NVIDIA H100 80GB HBM3, 1: ...`` or ``none``."""
    names = [f"{i}: {_name(cu('cuDeviceGet', i))}" for i in range(device_count())]
    return ", ".join(names) if names else "none"


def device_info(index: int) -> DeviceInfo:
    dev = _handle(index)
    return DeviceInfo(
        index=index, name=_name(dev),
        compute_capability=(_attr(dev, "COMPUTE_CAPABILITY_MAJOR"), _attr(dev, "COMPUTE_CAPABILITY_MINOR")),
        total_bytes=int(cu("cuDeviceTotalMem", dev)),
        sm_count=_attr(dev, "MULTIPROCESSOR_COUNT"),
        l2_bytes=_attr(dev, "L2_CACHE_SIZE"),
        max_threads_per_block=_attr(dev, "MAX_THREADS_PER_BLOCK"),
        max_block_dim=tuple(_attr(dev, f"MAX_BLOCK_DIM_{a}") for a in "XYZ"),
        max_grid_dim=tuple(_attr(dev, f"MAX_GRID_DIM_{a}") for a in "XYZ"),
        max_shared_per_block=_attr(dev, "MAX_SHARED_MEMORY_PER_BLOCK"),
        max_shared_per_block_optin=_attr(dev, "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN"),
    )


def list_devices() -> list[DeviceInfo]:
    return [device_info(i) for i in range(device_count())]


class CudaDevice:
    """The worker's GPU: primary context (retained) and one non-blocking stream."""

    def __init__(self, index: int = 0) -> None:
        self.info = device_info(index)  # raises InvalidRequest for a bad index
        self.index = index
        self._dev = cu("cuDeviceGet", index)
        self.context = cu("cuDevicePrimaryCtxRetain", self._dev)
        self.make_current()
        drv = driver_module()
        self.stream = cu("cuStreamCreate", drv.CUstream_flags.CU_STREAM_NON_BLOCKING)
        self._closed = False

    def make_current(self) -> None:
        """Bind this device's primary context to the calling thread."""
        cu("cuCtxSetCurrent", self.context)

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory right now."""
        self.make_current()
        free, total = cu("cuMemGetInfo")
        return int(free), int(total)

    def synchronize(self) -> None:
        """Wait for the stream; a kernel fault surfaces here as CudaError."""
        self.make_current()
        cu("cuStreamSynchronize", self.stream)

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.make_current()
        cu("cuStreamSynchronize", self.stream)
        cu("cuStreamDestroy", self.stream)
        cu("cuDevicePrimaryCtxRelease", self._dev)

    def __enter__(self) -> "CudaDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CudaDevice({self.index}, {self.info.name!r}, {self.info.arch})"
