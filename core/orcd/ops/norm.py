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
