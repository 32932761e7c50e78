"""Residency: every weight allocation must be plain device memory.

Weights that silently became managed or host memory would still "work" while
running at PCIe speed. ``check_pointers`` asks the driver about each pointer
(``cuPointerGetAttribute``); ``ResidencyMonitor`` repeats that on a thread
every ``interval_s`` seconds (default 60) and calls ``on_failure(problems)``
when anything is off; the worker then marks itself unhealthy and emits a
critical narration event.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:  # pragma: no cover
    from orcd.cuda.device import CudaDevice

DEFAULT_INTERVAL_S = 60.0
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
    from orcd.cuda.driver import driver_module

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


class ResidencyMonitor:
    """Periodic residency check on a daemon thread.

    ``pointers()`` returns the (name, pointer) pairs to check each time (the
    allocator's weights, say); ``on_failure(problems)`` is called once per
    failing check."""

    def __init__(self, device: "CudaDevice", pointers: Callable[[], Iterable[tuple[str, int]]],
                 on_failure: Callable[[list[str]], None], interval_s: float = DEFAULT_INTERVAL_S):
        if interval_s <= 0:
            raise ValueError(f"residency interval must be positive, got {interval_s}")
        self.device, self.pointers, self.on_failure = device, pointers, on_failure
        self.interval_s = interval_s
        self.checks = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_now(self) -> list[str]:
        problems = check_pointers(self.device, self.pointers())
        self.checks += 1
        if problems:
            self.on_failure(problems)
        return problems

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check_now()
            except Exception as e:  # a broken driver is itself a residency failure
                self.on_failure([f"residency check failed: {e}"])

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="orcd-residency", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
