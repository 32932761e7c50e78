"""The uploader with the card making the planar layouts (LayoutKernels), on the CPU:
a host-memory driver for the pinned buffers, copies and events, the CUDA simulator
for the layout kernel. A file of mixed tensors must land as QuantFormat.to_vram lays
it out, whichever side made each layout. (On a card: tests/cuda/test_runtime.py.)"""

from __future__ import annotations

import ctypes
import types
from dataclasses import replace

import numpy as np
import pytest

from orcd import cudasim
from orcd.backends.cuda import driver

pytestmark = pytest.mark.skipif(not cudasim.available(), reason="no C++ compiler for the CUDA simulator")


class HostDriver:
    """cuMemHostAlloc, cuMemcpyHtoDAsync, events and streams over host memory (a
    simulated device address is a host address): every copy done when enqueued."""

    CUevent_flags = types.SimpleNamespace(CU_EVENT_DISABLE_TIMING=2)

    def __init__(self) -> None:
        self.pinned: dict[int, np.ndarray] = {}
        self.copies = 0

    def __call__(self, name: str, *args):
        if name == "cuMemHostAlloc":
            buf = np.zeros(args[0], np.uint8)
            self.pinned[buf.ctypes.data] = buf
            return buf.ctypes.data
        if name == "cuMemcpyHtoDAsync":
            dst, src, n, _stream = args
            ctypes.memmove(dst, src, n)
            self.copies += 1
        return None


class CountingLayout:
    def __init__(self, kernels) -> None:
        self.kernels, self.calls = kernels, []
        self.handles = kernels.handles

    def to_planes(self, src, dst, rows, fmt, n_elems) -> None:
        self.calls.append(fmt.name)
        self.kernels.to_planes(src, dst, rows, fmt, n_elems)


@pytest.fixture
def host_driver(monkeypatch):
    d = HostDriver()
    monkeypatch.setattr(driver, "cu", d)
    monkeypatch.setattr(driver, "driver_module", lambda: HostDriver)
    return d


def test_planar_weights_laid_out_by_the_card_land_as_to_vram_lays_them(host_driver):
    from orcd.backends.cuda.upload import Uploader, staging_slots
    from orcd.cudasim import SimAllocator, SimCompiler, SimDevice, SimLauncher
    from orcd.ops.layout import LayoutKernels
    from orcd.quant.builtin import builtin_table

    rng, table, chunk = np.random.default_rng(), builtin_table(), 4096
    dev, alloc = SimDevice(), SimAllocator()
    layout = CountingLayout(LayoutKernels(dev, SimCompiler(), SimLauncher(after=alloc.check)))
    # (format, rows, values a row): MXFP4 and Q6_K over many chunks, Q4_K (its scales
    # unpacked on the card), a Q5_K whose rewrite the kernel does not know (by the host),
    # Q8_0 rows that do not divide a chunk, and plain bytes
    q5k = table.by_name["Q5_K"]
    host_only = replace(q5k, name="Q5_K-host", device=replace(q5k.device, device_rewrite=""))
    shapes = [("MXFP4", 40, 2880), ("Q4_0", 3, 96), ("Q6_K", 9, 512), ("Q4_K", 6, 512), (host_only, 5, 512),
              ("Q8_0", 7, 1024)]
    items, expect = [], []
    for name, rows, n in shapes:
        fmt = table.by_name[name] if isinstance(name, str) else name
        raw = fmt.random_blocks(rows * n // fmt.block_elems, rng, 0.05)
        buf = alloc.alloc(rows * fmt.vram_row_bytes(n), "weights")
        items.append((raw, buf.ptr, fmt, n))
        expect.append((buf, fmt.to_vram(raw, n)))
    plain = rng.integers(0, 256, 10_000, dtype=np.uint8)
    buf = alloc.alloc(plain.nbytes, "weights")
    items.append((plain, buf.ptr))
    expect.append((buf, plain))
    n_slots = staging_slots(2, 1)
    stage = alloc.alloc(n_slots * chunk, "scratch")
    with Uploader(dev, chunk_bytes=chunk, copy_threads=1, repack=layout,
                  device_staging=[stage.ptr + i * chunk for i in range(n_slots)]) as up:
        total = up.upload_many(items)
    assert total == sum(it[0].nbytes for it in items)
    for buf, want in expect:
        assert np.array_equal(dev.to_host(buf.ptr, buf.nbytes), want)
    assert set(layout.calls) == {"MXFP4", "Q4_0", "Q6_K", "Q4_K", "Q8_0"}   # not Q5_K-host
    assert layout.calls.count("MXFP4") > 1                           # chunks of whole rows


def test_a_repack_needs_a_device_buffer_per_staging_slot(host_driver):
    from orcd.backends.cuda.upload import Uploader
    from orcd.cudasim import SimDevice

    with pytest.raises(ValueError, match="staging buffer per staging slot"):
        Uploader(SimDevice(), copy_threads=2, repack=object(), device_staging=[0, 0])


class TightAllocator:
    """The simulator's allocator with no room left for the upload's device staging."""

    def __init__(self) -> None:
        self.asked: list = []

    def alloc(self, nbytes: int, purpose: str):
        from orcd.errors import VramOom

        self.asked.append((nbytes, purpose))
        raise VramOom("no room for the staging", requested=nbytes, available=0)


@pytest.mark.parametrize("room", [True, False])
def test_the_backend_lays_out_on_the_card_when_it_has_room_for_the_staging(host_driver, room):
    # CudaBackend._upload (WeightLoading): device staging from the allocator while it has
    # room; without it, the same bytes by the copy threads, and nothing left allocated
    from orcd.backends.cuda.loading import WeightLoading
    from orcd.cudasim import SimAllocator, SimCompiler, SimDevice, SimLauncher
    from orcd.ops.layout import LayoutKernels
    from orcd.quant.builtin import builtin_table

    rng, fmt, n = np.random.default_rng(), builtin_table().by_name["MXFP4"], 2880
    dev, alloc = SimDevice(), SimAllocator()
    raw = fmt.random_blocks(300 * n // fmt.block_elems, rng, 0.05)
    dst = alloc.alloc(300 * fmt.vram_row_bytes(n), "weights")
    backend = types.SimpleNamespace(device=dev, alloc=alloc if room else TightAllocator(),
                                    layout=CountingLayout(LayoutKernels(dev, SimCompiler(),
                                                                        SimLauncher(after=alloc.check))))
    WeightLoading._upload(backend, [(raw, dst.ptr, fmt, n)], None)
    assert np.array_equal(dev.to_host(dst.ptr, dst.nbytes), fmt.to_vram(raw, n))
    assert bool(backend.layout.calls) == room
    assert room or backend.alloc.asked == [(8 << 20, "scratch")]   # two 1 MiB slots a copy thread
    assert alloc.ledger.total == dst.nbytes   # the staging went back
