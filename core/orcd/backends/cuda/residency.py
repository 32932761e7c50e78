"""Residency: every weight allocation must be plain device memory.

Weights that silently became managed or host memory would still "work" while
running at PCIe speed. ``check_pointers`` asks the driver about each pointer
(``cuPointerGetAttribute``); the backend's ``check_residency`` runs it over the
weights, and the server calls that on its idle ticks (``--residency-check-sec``)
and marks itself unhealthy, with a critical narration event, when anything is off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # pragma: no cover
    from orcd.backends.cuda.device import CudaDevice

MEMORYTYPE_DEVICE = 2  # CU_MEMORYTYPE_DEVICE
_MEMORY_TYPES = {1: "host", 2: "device", 3: "array", 4: "unified"}


def classify(name: str, memory_type: int | None, is_managed: bool, host_pointer: int | None) -> str | None:
    """None if the pointer is plain device memory, else what is wrong with it."""
    if memory_type is None:
        return f"{name}: not a CUDA allocation"
    if memory_type != MEMORYTYPE_DEVICE:
        return f"{name}: memory type {_MEMORY_TYPES.get(memory_type, memory_type)}, not device"
    if is_managed:
        return f"{name}: managed memory"
    if host_pointer:
        return f"{name}: mapped to host address {host_pointer:#x}"
    return None


def _pointer_attrs(ptr: int) -> tuple[int | None, bool, int | None]:
    from orcd.backends.cuda.driver import driver_module

    drv = driver_module()
    a, ok = drv.CUpointer_attribute, drv.CUresult.CUDA_SUCCESS
    err, mtype = drv.cuPointerGetAttribute(a.CU_POINTER_ATTRIBUTE_MEMORY_TYPE, ptr)
    if err != ok:
        return None, False, None
    err, managed = drv.cuPointerGetAttribute(a.CU_POINTER_ATTRIBUTE_IS_MANAGED, ptr)
    managed = bool(managed) if err == ok else False
    # Device memory has no host pointer: the driver answers INVALID_VALUE.
    err, host = drv.cuPointerGetAttribute(a.CU_POINTER_ATTRIBUTE_HOST_POINTER, ptr)
    host = int(host) if err == ok and host else None
    return int(mtype), managed, host


def check_pointers(device: "CudaDevice", pointers: Iterable[tuple[str, int]]) -> list[str]:
    """Problems with (name, pointer) pairs; empty if all are device memory."""
    device.make_current()
    problems = []
    for name, ptr in pointers:
        problem = classify(name, *_pointer_attrs(int(ptr)))
        if problem:
            problems.append(problem)
    return problems
