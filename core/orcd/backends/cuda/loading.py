"""The CUDA backend's weights (the ``Backend`` contract's load_weights): every tensor of
the file into "weights" allocations, quantized ones in their format's VRAM layout
(made on the card by ``LayoutKernels`` where it can, else by the copy threads), and
the weight kernels of the file's formats compiled meanwhile. A base of
``CudaBackend``, whose device, allocator, compiler and kernel families it uses.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from orcd.backends.cuda.tensor import DeviceTensor, QWeight
from orcd.errors import VramOom


class WeightLoading:
    """Uploads a model's tensors for a CudaBackend."""

    def load_weights(self, mf, formats, names: Iterable[str],
                     progress: Callable[[float], None] | None = None) -> dict:
        """Every tensor uploaded as stored (QWeight); 1-D tensors and biases as f32.
        The weight kernels are those of ``formats``, compiled here for the file's types."""
        from orcd.backends.cuda.backend import kernel_sources   # the backend imports this module

        self._use_formats(formats)
        types = {mf.tensors[n].type_id for n in names if len(mf.tensors[n].shape) > 1}
        self.compiler.prefetch(kernel_sources(formats, types))   # compiled while the weights upload
        out, items = {}, []
        with self.alloc.transaction() as tx:
            for n in names:
                t = mf.tensors[n]
                fmt = formats[t.type_id]
                if len(t.shape) == 1 or n.endswith(".bias"):
                    vals = np.ascontiguousarray(fmt.dequantize_tensor(t.data, t.shape), np.float32)
                    buf = tx.alloc(vals.nbytes, "weights")
                    items.append((vals, buf.ptr))
                    out[n] = DeviceTensor(buf.ptr, tuple(t.shape), np.dtype(np.float32))
                else:   # quantized, in the format's VRAM layout (made while staging)
                    w = QWeight(0, tuple(t.shape), t.type_id, fmt)
                    buf = tx.alloc(w.nbytes, "weights")
                    items.append((t.data, buf.ptr, fmt, t.shape[-1]))
                    out[n] = QWeight(buf.ptr, w.shape, t.type_id, fmt)
            self._upload(items, progress)
        self.mm.prepare(t.type_id for t in out.values() if isinstance(t, QWeight))
        return out

    def _upload(self, items, progress) -> None:
        # planar formats' layouts made on the card (LayoutKernels) from device staging
        # buffers held only while uploading; without room for them, on the host
        from orcd.backends.cuda.upload import (DEFAULT_CHUNK, DEFAULT_COPY_THREADS, DEFAULT_STAGING, Uploader,
                                               staging_slots)

        n = staging_slots(DEFAULT_STAGING, DEFAULT_COPY_THREADS)
        stage = None
        if any(len(it) > 2 and self.layout.handles(it[2]) for it in items):
            try:
                stage = self.alloc.alloc(n * DEFAULT_CHUNK, "scratch")
            except VramOom:
                pass   # no room: the host makes the planes
        try:
            with Uploader(self.device, repack=self.layout if stage else None,
                          device_staging=[stage.ptr + i * DEFAULT_CHUNK for i in range(n)] if stage else ()) as up:
                up.upload_many(items, progress)
        finally:
            if stage is not None:
                self.alloc.free(stage)

    def _use_formats(self, formats) -> None:
        """Rebuild the weight kernels when ``formats`` has device rows they lack (a plugin's)."""
        from orcd.ops.fused import FusedKernels
        from orcd.ops.matmul import MatmulKernels
        from orcd.quant.device import with_device

        rows = {f.type_id: f for f in with_device(formats)}
        if rows != self.mm.formats:
            self.mm.close()
            self.mm = MatmulKernels(*self._kernel_args, formats=rows.values(), **self._mm_options)
            self.fused = FusedKernels(*self._kernel_args, formats=rows.values(),
                                      self_quantize=self.fused.self_quantize)
