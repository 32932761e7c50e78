"""Device memory: plain ``cuMemAlloc`` with per-purpose accounting.

No managed and no host-mapped memory, ever: weights and caches live in device
memory, which the residency check verifies. ``VramLedger`` is the pure
accounting (CPU-testable); ``DeviceAllocator`` puts the driver underneath.
A failed allocation raises ``VramOom`` (requested and available bytes); a
``transaction()`` frees everything it allocated if any allocation in it fails,
so a request that runs out of memory leaves the worker as it was.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from orcd.errors import CudaError, VramOom

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from orcd.backends.cuda.device import CudaDevice

ALIGNMENT = 256
PURPOSES = ("weights", "kv_cache", "scratch", "workspace", "test")


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


@dataclass(frozen=True)
class DeviceBuffer:
    ptr: int      # device address (CUdeviceptr as int)
    nbytes: int   # bytes asked for; the allocation is align_up(nbytes)
    purpose: str

    def __int__(self) -> int:
        return self.ptr


class VramLedger:
    """Bytes in use by purpose, under an optional budget.

    ``budget`` caps the total bytes this worker may hold (tests lower it to
    provoke VRAM_OOM without filling the card); None means only the device's
    free memory limits allocations."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget
        self._live: dict[int, tuple[int, str]] = {}  # ptr -> (aligned bytes, purpose)

    @property
    def total(self) -> int:
        return sum(n for n, _ in self._live.values())

    def usage(self) -> dict[str, int]:
        out = {p: 0 for p in PURPOSES}
        for n, purpose in self._live.values():
            out[purpose] = out.get(purpose, 0) + n
        return out

    def admit(self, nbytes: int, purpose: str) -> int:
        """Aligned size for a request of ``nbytes``; VramOom if over budget."""
        if nbytes <= 0:
            raise ValueError(f"allocation of {nbytes} bytes for {purpose!r}")
        size = align_up(nbytes)
        if self.budget is not None and self.total + size > self.budget:
            available = max(self.budget - self.total, 0)
            raise VramOom(f"VRAM budget exhausted: {purpose} needs {size} bytes, "
                          f"{available} of the {self.budget}-byte budget left",
                          requested=size, available=available, purpose=purpose)
        return size

    def record(self, ptr: int, size: int, purpose: str) -> None:
        if ptr in self._live:
            raise ValueError(f"pointer {ptr:#x} recorded twice")
        self._live[ptr] = (size, purpose)

    def release(self, ptr: int) -> tuple[int, str]:
        try:
            return self._live.pop(ptr)
        except KeyError:
            raise ValueError(f"pointer {ptr:#x} is not a live allocation") from None

    def pointers(self, purpose: str | None = None) -> list[tuple[int, int, str]]:
        return [(p, n, u) for p, (n, u) in self._live.items() if purpose is None or u == purpose]


class Transaction:
    """Allocations that succeed or fail together (see ``DeviceAllocator.transaction``)."""

    def __init__(self, allocator: "Allocator") -> None:
        self._allocator = allocator
        self.buffers: list[DeviceBuffer] = []

    def alloc(self, nbytes: int, purpose: str) -> DeviceBuffer:
        buf = self._allocator.alloc(nbytes, purpose)
        self.buffers.append(buf)
        return buf

    def rollback(self) -> None:
        for buf in reversed(self.buffers):
            self._allocator.free(buf)
        self.buffers.clear()


class Allocator:
    """Allocation policy over two primitives a subclass provides:
    ``_raw_alloc(size) -> ptr`` (raises VramOom) and ``_raw_free(ptr)``."""

    def __init__(self, budget: int | None = None) -> None:
        self.ledger = VramLedger(budget)

    def alloc(self, nbytes: int, purpose: str) -> DeviceBuffer:
        size = self.ledger.admit(nbytes, purpose)
        ptr = self._raw_alloc(size, purpose)
        self.ledger.record(ptr, size, purpose)
        return DeviceBuffer(ptr, nbytes, purpose)

    def free(self, buf: DeviceBuffer) -> None:
        self.ledger.release(buf.ptr)
        self._raw_free(buf.ptr)

    def usage(self) -> dict[str, int]:
        return self.ledger.usage()

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """All-or-nothing: if the block raises, free what it allocated."""
        tx = Transaction(self)
        try:
            yield tx
        except BaseException:
            tx.rollback()
            raise

    def alloc_all(self, requests: list[tuple[int, str]]) -> list[DeviceBuffer]:
        with self.transaction() as tx:
            for nbytes, purpose in requests:
                tx.alloc(nbytes, purpose)
        return tx.buffers

    def free_all(self, purpose: str | None = None) -> None:
        for ptr, _, _ in self.ledger.pointers(purpose):
            self.ledger.release(ptr)
            self._raw_free(ptr)

    def _raw_alloc(self, size: int, purpose: str) -> int:  # pragma: no cover
        raise NotImplementedError

    def _raw_free(self, ptr: int) -> None:  # pragma: no cover
        raise NotImplementedError


class DeviceAllocator(Allocator):
    """``cuMemAlloc``/``cuMemFree`` on the worker's device."""

    def __init__(self, device: "CudaDevice", budget: int | None = None) -> None:
        super().__init__(budget)
        self.device = device

    def _raw_alloc(self, size: int, purpose: str) -> int:
        from orcd.backends.cuda.driver import cu, is_oom

        self.device.make_current()
        try:
            ptr = int(cu("cuMemAlloc", size))
        except CudaError as e:
            if not is_oom(e):
                raise
            free, _ = self.device.mem_info()
            raise VramOom(f"out of device memory: {purpose} needs {size} bytes, "
                          f"{free} bytes free on device {self.device.index}",
                          requested=size, available=free, purpose=purpose) from None
        if ptr % ALIGNMENT:  # cuMemAlloc promises 256-byte alignment; kernels rely on it
            cu("cuMemFree", ptr)
            raise CudaError(f"cuMemAlloc returned unaligned pointer {ptr:#x}",
                            cuda_error="UNALIGNED", call="cuMemAlloc")
        return ptr

    def _raw_free(self, ptr: int) -> None:
        from orcd.backends.cuda.driver import cu

        self.device.make_current()
        cu("cuMemFree", ptr)


def to_host(device: "CudaDevice", ptr: int, nbytes: int) -> "np.ndarray":
    """Copy ``nbytes`` at ``ptr`` back to a new uint8 array, ordered after the stream's work."""
    import numpy as np

    from orcd.backends.cuda.driver import cu

    if getattr(device, "simulated", False):   # orcd.cudasim: device memory is host memory
        return device.to_host(ptr, nbytes)
    out = np.empty(nbytes, dtype=np.uint8)
    device.make_current()
    cu("cuMemcpyDtoHAsync", out.ctypes.data, int(ptr), nbytes, device.stream)
    cu("cuStreamSynchronize", device.stream)
    return out


def from_host(device: "CudaDevice", src: "np.ndarray", ptr: int) -> None:
    """Copy a small host array to ``ptr`` on the stream and wait (use ``Uploader`` for weights)."""
    import numpy as np

    from orcd.backends.cuda.driver import cu

    src = np.ascontiguousarray(src)
    if getattr(device, "simulated", False):
        return device.from_host(src, ptr)
    device.make_current()
    cu("cuMemcpyHtoDAsync", int(ptr), src.ctypes.data, src.nbytes, device.stream)
    cu("cuStreamSynchronize", device.stream)


def from_host_async(device: "CudaDevice", src: "np.ndarray", ptr: int) -> None:
    """Copy a small pageable host array to ``ptr``, ordered on the stream, without
    waiting: the driver stages a pageable source before returning, so the caller may
    reuse it at once (kernel parameters written before each graph replay)."""
    if getattr(device, "simulated", False):
        return device.from_host(src, ptr)
    from orcd.backends.cuda.driver import cu

    device.make_current()
    cu("cuMemcpyHtoDAsync", int(ptr), src.ctypes.data, src.nbytes, device.stream)


def fill_bytes(device: "CudaDevice", ptr: int, value: int, nbytes: int) -> None:
    """Set ``nbytes`` at ``ptr`` to the byte ``value`` (stream-ordered, async)."""
    if getattr(device, "simulated", False):
        return device.fill_bytes(ptr, value, nbytes)
    from orcd.backends.cuda.driver import cu

    device.make_current()
    cu("cuMemsetD8Async", int(ptr), value, nbytes, device.stream)
