"""Dense fp16/bf16 GEMM on raw device pointers.

``Gemm(device)`` computes ``c[m, n] = a[m, k] @ b[n, k]^T`` (``b`` is a linear
weight as GGUF stores it, row-major ``[n_out, n_in]``), accumulating in fp32
and writing ``c`` in the input dtype, on the worker's stream.

impl="cublaslt" (default): cuBLASLt called directly through nvmath-python's
low-level bindings (orcd/backends/cuda/cublaslt.py): per call one ``cublasLtMatmul`` on
the raw pointers, the descriptor, layouts and algorithm planned once per shape,
a 32 MiB workspace allocated once per ``Gemm``. If those bindings cannot be
imported, a warning says why and the ``Gemm`` uses impl "nvmath".

impl="nvmath": cuBLASLt through nvmath-python's ``Matmul``; one
planned ``Matmul`` per (m, n, k, dtype), its operands reset to new pointers on
each call, the result written in place into ``c`` (beta = 0, so ``c`` is never
read). nvmath needs array objects, so the pointers are wrapped as cupy arrays
(torch for bf16 where cupy has no bfloat16); both live on the GPU machine
only and are imported here, never by orcd itself.

impl="simt": a plain shared-memory-tiled kernel (``kernels/gemm_simt.cu``),
no tensor cores: a correctness fallback, far slower than cuBLASLt.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from orcd.errors import CudaError

if TYPE_CHECKING:  # pragma: no cover
    from orcd.backends.cuda.device import CudaDevice
    from orcd.backends.cuda.memory import Allocator

IMPLS = ("cublaslt", "nvmath", "simt")   # how a Gemm computes (not a compute backend)
DTYPES = ("float16", "bfloat16")
SIMT_TILE = 16


class Gemm:
    """``allocator`` (cublaslt only) holds the workspace; by default a private
    ``DeviceAllocator`` on ``device``. ``lt`` is the cuBLASLt planner (orcd.backends.cuda.cublaslt.LtGemm)
    when ``impl`` is cublaslt, else None."""

    def __init__(self, device: "CudaDevice", impl: str = "cublaslt", compiler=None, launcher=None,
                 allocator: "Allocator | None" = None):
        if impl not in IMPLS:
            raise ValueError(f"unknown GEMM implementation {impl!r}: expected one of {IMPLS}")
        self.device = device
        self._plans: dict[tuple, Any] = {}
        self.lt = None
        if impl == "cublaslt":
            impl = self._init_lt(allocator)
        self.impl = impl
        if impl == "simt":
            self._init_simt(compiler, launcher)

    def __call__(self, a: int, b: int, c: int, m: int, n: int, k: int, dtype: str = "float16") -> None:
        """c[m, n] = a[m, k] @ b[n, k]^T, enqueued on the device's stream."""
        if dtype not in DTYPES:
            raise ValueError(f"GEMM dtype must be one of {DTYPES}, got {dtype!r}")
        if min(m, n, k) <= 0:
            raise ValueError(f"GEMM sizes must be positive, got m={m} n={n} k={k}")
        self.device.make_current()
        if self.lt is not None:
            self.lt(int(a), int(b), int(c), m, n, k, dtype, self.device.stream_handle)
        elif self.impl == "nvmath":
            self._nvmath(int(a), int(b), int(c), m, n, k, dtype)
        else:
            self._simt(int(a), int(b), int(c), m, n, k, dtype)

    # -- cuBLASLt directly, through nvmath-python's raw bindings ----------------

    def _init_lt(self, allocator) -> str:
        """Build the cuBLASLt planner; the impl's name, "nvmath" if the bindings are missing."""
        from orcd.backends.cuda import cublaslt

        try:
            lt = cublaslt.bindings()
        except ImportError as e:
            # a slower path, not a silent one (Python shows a warning once per call site)
            warnings.warn(f"GEMM implementation cublaslt unavailable ({e}): using nvmath", stacklevel=3)
            return "nvmath"
        self.lt = cublaslt.LtGemm(self.device, lt, allocator)
        return "cublaslt"

    # -- cuBLASLt through nvmath-python's Matmul --------------------------------

    def _wrap(self, ptr: int, shape: tuple[int, int], dtype: str):
        import cupy

        nbytes = shape[0] * shape[1] * 2
        mem = cupy.cuda.UnownedMemory(ptr, nbytes, None, self.device.index)
        if dtype == "float16":
            return cupy.ndarray(shape, dtype=cupy.float16, memptr=cupy.cuda.MemoryPointer(mem, 0))
        raw = cupy.ndarray(shape, dtype=cupy.uint16, memptr=cupy.cuda.MemoryPointer(mem, 0))
        import torch  # cupy has no bfloat16: view the same bytes through torch

        return torch.as_tensor(raw, device=f"cuda:{self.device.index}").view(torch.bfloat16)

    def _nvmath(self, a: int, b: int, c: int, m: int, n: int, k: int, dtype: str) -> None:
        try:
            import cupy
            from nvmath.linalg import advanced
        except ImportError as e:
            raise CudaError(f"GEMM implementation nvmath needs nvmath-python and cupy: {e}",
                            cuda_error="IMPORT", call="import nvmath") from None
        stream = self.device.stream_handle
        with cupy.cuda.Device(self.device.index):
            A = self._wrap(a, (m, k), dtype)       # A: [m, k]
            B = self._wrap(b, (n, k), dtype).T     # B: [k, n], column-major view of the weight
            C = self._wrap(c, (m, n), dtype)       # C: [m, n]
            key = (m, n, k, dtype)
            mm = self._plans.get(key)
            if mm is None:
                mm = advanced.Matmul(A, B, c=C, beta=0.0, options={"inplace": True}, stream=stream)
                mm.plan(stream=stream)
                self._plans[key] = mm
            else:
                mm.reset_operands(a=A, b=B, c=C, stream=stream)
            mm.execute(stream=stream)

    # -- fallback: SIMT kernel, no tensor cores --------------------------------

    def _init_simt(self, compiler, launcher) -> None:
        from orcd.backends.cuda.launch import Launcher
        from orcd.backends.cuda.nvrtc import KernelCompiler, KernelSource

        compiler = compiler or KernelCompiler(self.device.info.arch)
        module = compiler.load(self.device, KernelSource.from_package("orcd.backends.cuda.kernels", "gemm_simt.cu"))
        self._module = module
        self._kernels = {"float16": module.function("gemm_f16_simt"),
                         "bfloat16": module.function("gemm_bf16_simt")}
        self._launch = launcher or Launcher(self.device)

    def _simt(self, a: int, b: int, c: int, m: int, n: int, k: int, dtype: str) -> None:
        import numpy as np

        t = SIMT_TILE
        grid = (-(-n // t), -(-m // t))
        self._launch(self._kernels[dtype], grid, (t, t),
                     [np.uint64(a), np.uint64(b), np.uint64(c), m, n, k])

    def close(self) -> None:
        if self.lt is not None:
            self.device.synchronize()  # the workspace may still be in use by enqueued GEMMs
            self.lt.close()
            self.lt = None
        for mm in self._plans.values():
            mm.free()
        self._plans.clear()
