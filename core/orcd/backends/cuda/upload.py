"""Host bytes (usually a GGUF mmap) -> device memory, chunk by chunk.

Two (or more) pinned staging buffers take turns: while the copy engine moves
chunk i from one staging buffer to the device (``cuMemcpyHtoDAsync`` on the
worker's stream), the CPU reads chunk i+1 from the file into the other. An
event per staging buffer says when its last copy finished and it may be
refilled. Bytes are copied as they are, or, for a weight whose format has a
planar VRAM layout (QuantFormat.planes), rearranged row by row into it while
being staged: such a weight moves in chunks of whole rows. With a ``repack``
(orcd.ops.layout.LayoutKernels) the planes of the formats it handles are made on
the device instead: the chunk goes as it is to a device staging buffer of its slot
and a kernel gathers it into place, so the copy threads only memcpy.
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from orcd.backends.cuda.device import CudaDevice

DEFAULT_CHUNK = 1 << 20
#: Measured on an H200 (bench/RESULTS.md): 1 copy thread 6.7 GB/s, 4 threads
#: 13-16 GB/s with 1 MiB chunks (20-23 GB/s with 4 MiB) against a 54 GB/s link.
DEFAULT_COPY_THREADS = 4
DEFAULT_STAGING = 2   # staging buffers a copy thread takes turns with
Progress = Callable[[float], None]


def plan_chunks(nbytes: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(offset, size) pieces covering ``nbytes``, each at most ``chunk``."""
    if chunk <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk}")
    for off in range(0, nbytes, chunk):
        yield off, min(chunk, nbytes - off)


def plan_rows(n_rows: int, src_row: int, dst_row: int, chunk: int) -> Iterator[tuple[int, int, int, int]]:
    """(src offset, src size, dst offset, dst size) pieces of whole rows, each at most
    ``chunk`` bytes on both sides (a row larger than a chunk goes alone)."""
    per = max(1, chunk // max(src_row, dst_row))
    for r in range(0, n_rows, per):
        n = min(per, n_rows - r)
        yield r * src_row, n * src_row, r * dst_row, n * dst_row


def _jobs(item, chunk: int) -> list[tuple]:
    """(src, dst, src_off, src_n, dst_off, dst_n, fmt, n_elems) chunks of one item:
    (src bytes, dst address) as is, or (src, dst, fmt, n_elems) into fmt's VRAM layout."""
    src, dst, *layout = item
    if layout and layout[0].planar:
        fmt, n_elems = layout
        rows = src.nbytes // fmt.row_bytes(n_elems)
        return [(src, dst, so, sn, do, dn, fmt, n_elems)
                for so, sn, do, dn in plan_rows(rows, fmt.row_bytes(n_elems), fmt.vram_row_bytes(n_elems), chunk)]
    return [(src, dst, off, n, off, n, None, 0) for off, n in plan_chunks(src.nbytes, chunk)]


def staging_slots(n_staging: int, copy_threads: int) -> int:
    """Staging buffers an Uploader uses: ``n_staging`` for each copy thread."""
    return n_staging * copy_threads


class Milestones:
    """Turns a stream of fractions into calls at fixed steps (0, 25, ..., 100 %).

    ``Milestones(emit)(f)`` calls ``emit(percent)`` once for every step that
    ``f`` has reached and not yet emitted, in order; 100 only at f >= 1."""

    def __init__(self, emit: Callable[[int], None], steps: Sequence[int] = (0, 25, 50, 75, 100)):
        self._emit = emit
        self._pending = list(steps)

    def __call__(self, fraction: float) -> None:
        while self._pending and fraction * 100 >= self._pending[0]:
            self._emit(self._pending.pop(0))


class _Tally:
    """Bytes enqueued so far, reported as a fraction below 1 (1.0 comes after the sync)."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self.progress and self.done < self.total:
                self.progress(self.done / self.total)


class Uploader:
    """Chunked, double-buffered host-to-device copies on the device's stream.

    ``copy_threads`` splits the chunks round-robin over that many threads,
    each with its own ``n_staging`` pinned buffers: one thread's memcpy from
    the page cache runs at ~7 GB/s, well under the PCIe link, so several
    threads reading at once keep the copy engine busier. Copies all go to the
    one stream; the driver API is thread-safe."""

    def __init__(self, device: "CudaDevice", chunk_bytes: int = DEFAULT_CHUNK, n_staging: int = DEFAULT_STAGING,
                 copy_threads: int = DEFAULT_COPY_THREADS, repack=None, device_staging: Sequence[int] = ()):
        """``repack``: ``handles(fmt)`` and ``to_planes(src, dst, rows, fmt, n_elems)`` on
        the device's stream; ``device_staging``: then one device buffer of ``chunk_bytes``
        a staging slot (``staging_slots(n_staging, copy_threads)`` of them)."""
        from orcd.backends.cuda.driver import cu, driver_module

        if chunk_bytes <= 0 or n_staging < 2 or copy_threads < 1:
            raise ValueError("need a positive chunk size, at least two staging buffers "
                             "and at least one copy thread")
        if repack is not None and len(device_staging) != staging_slots(n_staging, copy_threads):
            raise ValueError("a device repack needs one device staging buffer per staging slot")
        self.repack, self._dev_staging = repack, [int(p) for p in device_staging]
        self.device = device
        self.chunk = chunk_bytes
        self.copy_threads = copy_threads
        self.n_staging = n_staging
        device.make_current()
        drv = driver_module()
        self._staging: list[int] = []
        self._events = []
        self._views: list[np.ndarray] = []
        try:
            for _ in range(staging_slots(n_staging, copy_threads)):
                self._staging.append(int(cu("cuMemHostAlloc", chunk_bytes, 0)))
                self._events.append(cu("cuEventCreate", drv.CUevent_flags.CU_EVENT_DISABLE_TIMING))
        except BaseException:
            self.close()
            raise
        # Host views of the pinned buffers: the file read lands here.
        self._views = [np.ctypeslib.as_array((ctypes.c_uint8 * chunk_bytes).from_address(p))
                       for p in self._staging]

    def upload(self, src: np.ndarray, dst: int, progress: Progress | None = None) -> None:
        """Copy ``src`` (bytes) to device address ``dst``; waits until done."""
        self.upload_many([(src, dst)], progress)

    def upload_many(self, items: Iterable[tuple], progress: Progress | None = None) -> int:
        """Copy every (host bytes, device address) pair, or (host bytes, device
        address, format, values per row) into that format's VRAM layout; progress
        runs 0 → 1 over the total bytes (called from the copy threads, one at a
        time); returns the host bytes copied."""
        from orcd.backends.cuda.driver import cu

        items = [(np.asarray(s).reshape(-1).view(np.uint8), int(d), *rest) for s, d, *rest in items]
        jobs = [job for item in items for job in _jobs(item, self.chunk)]
        report = _Tally(sum(it[0].nbytes for it in items), progress)
        if progress:
            progress(0.0)
        t = self.copy_threads
        if t == 1:
            self._copy(jobs, list(range(self.n_staging)), report)
        else:
            with ThreadPoolExecutor(t, thread_name_prefix="orcd-upload") as pool:
                lanes = [pool.submit(self._copy, jobs[i::t],
                                     list(range(i * self.n_staging, (i + 1) * self.n_staging)), report)
                         for i in range(t)]
                for lane in lanes:
                    lane.result()  # re-raises a copy thread's error here
        self.device.make_current()
        cu("cuStreamSynchronize", self.device.stream)
        if progress:
            progress(1.0)
        return report.total

    def _copy(self, jobs: list, slots: list[int], report: "_Tally") -> None:
        """Stage and enqueue ``jobs`` through the staging buffers ``slots``, in turn."""
        from orcd.backends.cuda.driver import cu

        self.device.make_current()
        stream = self.device.stream
        for i, (src, dst, off, n, dst_off, dst_n, fmt, n_elems) in enumerate(jobs):
            slot = slots[i % len(slots)]
            cu("cuEventSynchronize", self._events[slot])  # its previous copy is done
            on_card = fmt is not None and self.repack is not None and self.repack.handles(fmt)
            if fmt is None or on_card:
                self._views[slot][:n] = src[off:off + n]     # the file read
            else:                                            # the file read, into the planes
                fmt.to_vram(src[off:off + n], n_elems, out=self._views[slot])
            if on_card:   # as stored to the slot's device buffer; the card makes the planes
                cu("cuMemcpyHtoDAsync", self._dev_staging[slot], self._staging[slot], n, stream)
                self.repack.to_planes(self._dev_staging[slot], dst + dst_off, n // fmt.row_bytes(n_elems),
                                      fmt, n_elems)
            else:
                cu("cuMemcpyHtoDAsync", dst + dst_off, self._staging[slot], dst_n, stream)
            cu("cuEventRecord", self._events[slot], stream)
            report.add(n)

    def close(self) -> None:
        from orcd.backends.cuda.driver import cu

        if not self._staging and not self._events:
            return
        self.device.make_current()
        cu("cuStreamSynchronize", self.device.stream)
        for ev in self._events:
            cu("cuEventDestroy", ev)
        for p in self._staging:
            cu("cuMemFreeHost", p)
        self._events, self._staging, self._views = [], [], []

    def __enter__(self) -> "Uploader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
