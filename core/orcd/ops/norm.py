"""Normalisation: RMSNorm and LayerNorm (reference; CUDA kernels beside them)."""

from __future__ import annotations

import numpy as np


def rms_norm_ref(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    # x: [T, D], w: [D]; mean of squares in float32, as llama.cpp does (ggml_rms_norm)
    ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(ms + np.float32(eps))) * w


def layer_norm_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, eps: float) -> np.ndarray:
    # x: [T, D]
    mu = np.mean(x, axis=-1, keepdims=True, dtype=np.float32)
    xc = x - mu
    var = np.mean(np.square(xc), axis=-1, keepdims=True, dtype=np.float32)
    y = xc / np.sqrt(var + np.float32(eps)) * w
    return y if b is None else y + b


# -- CUDA ------------------------------------------------------------------------
# Launchers for norm.cu. CUDA modules are imported lazily: importing orcd never
# touches the driver.

NORM_THREADS = 256


class NormKernels:
    """RMSNorm / LayerNorm over the last axis of fp32 device tensors."""

    SOURCE = "norm.cu"   # package data of orcd.ops (orcd.backends.cuda.backend.kernel_sources lists it)

    def __init__(self, device, compiler, launcher) -> None:
        from orcd.backends.cuda.nvrtc import KernelSource

        module = compiler.load(device, KernelSource.from_package("orcd.ops", self.SOURCE))
        self._rms = module.function("rms_norm_f32")
        self._ln = module.function("layer_norm_f32")
        self._launch = launcher

    def rms_norm(self, x, w, eps: float, out) -> None:
        # x, out: [T, D] f32; w: [D] f32
        T, D = x.shape
        self._launch(self._rms, T, NORM_THREADS,
                     [np.uint64(x.ptr), np.uint64(w.ptr), np.uint64(out.ptr), D, float(eps)])

    def layer_norm(self, x, w, b, eps: float, out) -> None:
        T, D = x.shape
        bias = np.uint64(0 if b is None else b.ptr)
        self._launch(self._ln, T, NORM_THREADS,
                     [np.uint64(x.ptr), np.uint64(w.ptr), bias, np.uint64(out.ptr), D, float(eps)])
