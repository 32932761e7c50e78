"""Weights into their VRAM layout: the numpy reference is ``QuantFormat.to_vram``
(orcd.quant.format); the CUDA kernel (layout.cu) does the same gather on the device, so
the upload's copy threads move GGUF bytes as they are and the card makes the planes."""

from __future__ import annotations

import numpy as np

LAYOUT_THREADS = 256
LAYOUT_MAX_BLOCKS = 8192   # grid-stride beyond this
MAX_PLANES = 4             # layout.cu's LAYOUT_PLANES
REWRITES = {"": 0, "kscales": 1}   # DeviceFormat.device_rewrite -> to_planes' kscales


def device_planes(fmt) -> bool:
    """Whether the kernel makes ``fmt``'s layout: planar, at most four planes, and a
    block rewrite only where the kernel knows it (``device_rewrite``; another one is
    numpy code: those formats stay on the host's path)."""
    d = fmt.device
    rewrite_known = d.block_to_vram is None or (d.device_rewrite and d.device_rewrite in REWRITES)
    return bool(fmt.planar and rewrite_known and len(d.planes) <= MAX_PLANES)


class LayoutKernels:

    SOURCE = "layout.cu"   # package data of orcd.ops (orcd.backends.cuda.backend.kernel_sources lists it)

    def __init__(self, device, compiler, launcher) -> None:
        from orcd.backends.cuda.nvrtc import KernelSource

        module = compiler.load(device, KernelSource.from_package("orcd.ops", self.SOURCE))
        self._fn = module.function("to_planes")
        self._launch = launcher

    handles = staticmethod(device_planes)

    def to_planes(self, src: int, dst: int, rows: int, fmt, n_elems: int) -> None:
        """``rows`` GGUF rows at device address ``src`` -> ``fmt``'s planar rows at ``dst``
        (``rows * fmt.vram_row_bytes(n_elems)`` bytes); ``device_planes(fmt)`` must hold."""
        if not device_planes(fmt):
            raise ValueError(f"{fmt.name}: its VRAM layout is not made on the device")
        planes = [(lo, hi - lo) for lo, hi in fmt.device.planes]
        planes += [(0, 0)] * (MAX_PLANES - len(planes))
        vram_row = fmt.vram_row_bytes(n_elems)
        n = rows * vram_row
        grid = max(1, min(LAYOUT_MAX_BLOCKS, -(-n // LAYOUT_THREADS)))
        self._launch(self._fn, grid, LAYOUT_THREADS,
                     [np.uint64(src), np.uint64(dst), np.int64(rows), n_elems // fmt.block_elems,
                      fmt.block_bytes, np.int64(vram_row), REWRITES[fmt.device.device_rewrite],
                      *(v for p in planes for v in p)])
