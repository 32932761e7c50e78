"""Backends run the shared ops on one device.

``cpu`` is the numpy reference (an explicit developer option, never a silent
fallback); ``cuda:N`` is the GPU path. ``create_backend`` imports the CUDA
backend only when asked for it.
"""

from __future__ import annotations

from orcd.errors import InvalidRequest


def create_backend(device: str, **options):
    if device == "cpu":
        from orcd.backends.cpu import CpuBackend
        return CpuBackend(**options)
    if device.startswith("cuda"):
        index = device.partition(":")[2] or "0"
        if not index.isdigit():
            raise InvalidRequest(f"bad device {device!r}: use cuda:N or cpu", field="device")
        from orcd.backends.cuda.backend import CudaBackend  # imported only when a GPU is asked for
        return CudaBackend(int(index), **options)
    raise InvalidRequest(f"unknown device {device!r}: use cuda:N or cpu", field="device")
