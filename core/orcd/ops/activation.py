"""Element-wise ops: residual add, SiLU/SwiGLU, GELU, GPT-OSS's clamped SwiGLU."""

from __future__ import annotations

import numpy as np


def silu_ref(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


def swiglu_ref(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    # gate, up: [T, n_ff]
    return silu_ref(gate) * up


def gelu_ref(x: np.ndarray) -> np.ndarray:
    # the tanh approximation, as ggml_gelu: 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), the
    # second form free of 1 + tanh(u)'s cancellation for negative x
    c2 = np.float32(2 * np.sqrt(2.0 / np.pi))
    with np.errstate(over="ignore"):   # exp(-2u) = inf for x < ~-10: x / inf = -0, the limit
        return x / (np.float32(1) + np.exp(-c2 * (x + np.float32(0.044715) * x ** 3)))


def swiglu_oai_ref(gate: np.ndarray, up: np.ndarray, alpha: float,
                   limit: float) -> np.ndarray:
    # GPT-OSS: gate clamped above, up clamped both ways, and (up + 1)
    g = np.minimum(gate, np.float32(limit))
    u = np.clip(up, np.float32(-limit), np.float32(limit))
    return g / (np.float32(1) + np.exp(np.float32(-alpha) * g)) * (u + np.float32(1))


# -- CUDA ------------------------------------------------------------------------
# Launchers for activation.cu (fp32 device tensors of equal shape).

EW_THREADS = 256
EW_MAX_BLOCKS = 4096  # grid-stride beyond this


def _ew_grid(n: int) -> int:
    return max(1, min(EW_MAX_BLOCKS, -(-n // EW_THREADS)))


class ActivationKernels:

    SOURCE = "activation.cu"   # package data of orcd.ops (orcd.backends.cuda.backend.kernel_sources lists it)
    def __init__(self, device, compiler, launcher) -> None:
        from orcd.backends.cuda.nvrtc import KernelSource

        module = compiler.load(device, KernelSource.from_package("orcd.ops", self.SOURCE))
        self._fn = {n: module.function(n) for n in
                    ("add_f32", "silu_f32", "gelu_f32", "swiglu_f32", "swiglu_oai_f32",
                     "split_copy_f32")}
        self._launch = launcher

    def _ew(self, name: str, tensors, out, *extra) -> None:
        n = out.numel
        self._launch(self._fn[name], _ew_grid(n), EW_THREADS,
                     [*(np.uint64(t.ptr) for t in tensors), np.uint64(out.ptr), n, *extra])

    def add(self, a, b, out) -> None:
        self._ew("add_f32", (a, b), out)

    def silu(self, x, out) -> None:
        self._ew("silu_f32", (x,), out)

    def gelu(self, x, out) -> None:
        self._ew("gelu_f32", (x,), out)

    def swiglu(self, gate, up, out) -> None:
        self._ew("swiglu_f32", (gate, up), out)

    def swiglu_oai(self, gate, up, out, alpha: float, limit: float) -> None:
        self._ew("swiglu_oai_f32", (gate, up), out, float(alpha), float(limit))

    def split_copy(self, x, offset: int, out) -> None:
        # out[t, :] = x[t, offset:offset + out.shape[1]]; x: [T, width]
        T, width = x.shape
        size = out.shape[1]
        self._launch(self._fn["split_copy_f32"], _ew_grid(T * size), EW_THREADS,
                     [np.uint64(x.ptr), np.uint64(out.ptr), T, width, offset, size])
