"""Element-wise ops: residual add, SiLU/SwiGLU, GELU, GPT-OSS's clamped SwiGLU."""

from __future__ import annotations

import numpy as np


def silu_ref(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


def swiglu_ref(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    # gate, up: [T, n_ff]
    return silu_ref(gate) * up


def gelu_ref(x: np.ndarray) -> np.ndarray:
    # the tanh approximation, as ggml_gelu
    c = np.float32(np.sqrt(2.0 / np.pi))
    return np.float32(0.5) * x * (np.float32(1) + np.tanh(c * (x + np.float32(0.044715) * x ** 3)))


def swiglu_oai_ref(gate: np.ndarray, up: np.ndarray, alpha: float = 1.702,
                   limit: float = 7.0) -> np.ndarray:
    # GPT-OSS: gate clamped above, up clamped both ways, and (up + 1)
    g = np.minimum(gate, np.float32(limit))
    u = np.clip(up, np.float32(-limit), np.float32(limit))
    return g / (np.float32(1) + np.exp(np.float32(-alpha) * g)) * (u + np.float32(1))
