"""cuBLASLt called directly through nvmath-python's low-level bindings.

Why not nvmath's ``Matmul``: each of its calls wraps the pointers as array
objects, resets the operands and goes through ``execute``'s bookkeeping (an
estimated 150-200 us of Python per GEMM, the main suspect in a prefill's host
time; 168 GEMMs per Qwen2.5-0.5B prefill). Here a call is
one ``cublasLtMatmul`` on integers already in hand. What cuBLASLt needs besides
the pointers is built once per plan key and kept: the matmul descriptor, the
matrix layouts and the heuristic's best algorithm.

Row-major through column-major. cuBLASLt reads matrices column-major, and a
row-major ``[r, c]`` buffer read column-major is its transpose ``[c, r]``
with ld = c. So the three buffers of ``c[m, n] = a[m, k] @ b[n, k]^T`` are

    a: row-major [m, k]  = column-major A^T [k, m], ld k
    b: row-major [n, k]  = column-major B^T [k, n], ld k
    c: row-major [m, n]  = column-major C^T [n, m], ld n

and C = A B^T  <=>  C^T = B A^T = op_T(B^T) · op_N(A^T). In cuBLASLt's terms,
D[M, N] = op(A_lt)[M, K] · op(B_lt)[K, N], all column-major:

    D    = the c buffer, [n, m] ld n               M = n, N = m
    A_lt = the b buffer, stored [k, n] ld k, op T  op(A_lt) = B   [n, k], K = k
    B_lt = the a buffer, stored [k, m] ld k, op N  op(B_lt) = A^T [k, m]

the "TN" case, the one cuBLAS serves best with tensor cores. C = D (beta = 0,
so C is never read). ``column_major_problem`` returns exactly this table;
tests/cuda/test_gemm_lt.py checks it on the CPU by replaying it in numpy.

Nothing here imports nvmath or touches CUDA at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from orcd.errors import CudaError

if TYPE_CHECKING:  # pragma: no cover
    from orcd.backends.cuda.device import CudaDevice
    from orcd.backends.cuda.memory import Allocator

# Hopper's split-K and stream-K kernels want up to 32 MiB (the size NVIDIA's docs recommend for sm_90).
WORKSPACE_BYTES = 32 << 20
MAX_ALIGNMENT = 256  # the largest operand alignment cuBLASLt's heuristic asks about

# C ABI enum values (library_types.h, cublas_api.h), fixed across CUDA releases; spelled out
# here so that this module needs nothing of nvmath but its cuBLASLt bindings.
CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF = 0, 2, 14          # cudaDataType_t
DATA_TYPES = {"float16": CUDA_R_16F, "bfloat16": CUDA_R_16BF}
CUBLAS_COMPUTE_32F = 68                                  # cublasComputeType_t: fp32 accumulation
OPS = {"N": 0, "T": 1}                                   # cublasOperation_t

Layout = tuple[int, int, int]  # (rows, cols, ld), column-major


def column_major_problem(m: int, n: int, k: int) -> tuple[tuple[str, str], Layout, Layout, Layout]:
    """``c[m, n] = a[m, k] @ b[n, k]^T`` (row-major) as cuBLASLt's column-major
    ``D = op(A_lt) @ op(B_lt)``: ((op A_lt, op B_lt), A_lt layout, B_lt layout,
    D layout), where A_lt is the ``b`` buffer, B_lt the ``a`` buffer and D the
    ``c`` buffer (derivation in the module docstring)."""
    return ("T", "N"), (k, n, k), (k, m, k), (n, m, n)


def alignment(a: int, b: int, c: int) -> int:
    """The largest power of two (at most 256) that divides all three pointers: the
    heuristic picks kernels for it, so a less aligned pointer gets its own plan."""
    x = a | b | c
    return min(MAX_ALIGNMENT, x & -x) if x else MAX_ALIGNMENT


def bindings():
    """nvmath's raw cuBLASLt module; ImportError when nvmath-python is missing."""
    from nvmath.bindings import cublasLt

    return cublasLt


@dataclass
class LtPlan:
    desc: int              # cublasLtMatmulDesc_t
    layouts: tuple         # (A_lt, B_lt, D) cublasLtMatrixLayout_t
    heuristic: Any         # MatmulHeuristicResult(1): owns the algo struct that ``algo`` points into
    algo: int              # &heuristic[0].algo


class LtGemm:
    """cuBLASLt plans and one workspace for one device.

    ``lt(a, b, c, m, n, k, dtype, stream)`` enqueues ``c = a @ b^T``; a plan is
    made (one heuristic query) the first time a key (m, n, k, dtype, operand
    alignment) is seen, and reused after. ``heuristic_calls`` counts the queries."""

    def __init__(self, device: "CudaDevice", lt=None, allocator: "Allocator | None" = None,
                 workspace_bytes: int = WORKSPACE_BYTES) -> None:
        from orcd.backends.cuda.memory import DeviceAllocator

        self.lt = lt or bindings()
        device.make_current()
        self.handle = self.lt.create()
        # VRAM only: the workspace is a plain cuMemAlloc through orcd's allocator.
        self.allocator = allocator or DeviceAllocator(device)
        self.workspace = self.allocator.alloc(workspace_bytes, "workspace")
        # fp32 scalars (scale type 32F) read from host memory at enqueue time (pointer mode host,
        # cuBLASLt's default); the arrays live as long as this object.
        self.alpha, self.beta = np.ones(1, np.float32), np.zeros(1, np.float32)
        # the per-call arguments as plain ints, read once (``.ctypes`` builds an object per access)
        self._scalars = (self.alpha.ctypes.data, self.beta.ctypes.data)
        self._ws = (self.workspace.ptr, self.workspace.nbytes)
        self.plans: dict[tuple, LtPlan] = {}
        self.heuristic_calls = 0

    def __call__(self, a: int, b: int, c: int, m: int, n: int, k: int, dtype: str, stream: int) -> None:
        key = (m, n, k, dtype, alignment(a, b, c))
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = self._plan(*key)
        A_lt, B_lt, D = plan.layouts
        alpha, beta = self._scalars
        try:
            self.lt.matmul(self.handle, plan.desc, alpha, b, A_lt, a, B_lt, beta, c, D, c, D,
                           plan.algo, *self._ws, stream)
        except self.lt.cuBLASLtError as e:
            raise _error(self.lt, e, "cublasLtMatmul") from None

    def _plan(self, m: int, n: int, k: int, dtype: str, align: int) -> LtPlan:
        lt = self.lt
        (op_a, op_b), *shapes = column_major_problem(m, n, k)
        # fp32 accumulation, fp32 alpha/beta; A, B, C, D all in ``dtype``
        desc = lt.matmul_desc_create(CUBLAS_COMPUTE_32F, CUDA_R_32F)
        for attr, op in ((lt.MatmulDescAttribute.TRANSA, op_a), (lt.MatmulDescAttribute.TRANSB, op_b)):
            _set(lt.matmul_desc_set_attribute, lt.get_matmul_desc_attribute_dtype, desc, attr, OPS[op])
        layouts = tuple(lt.matrix_layout_create(DATA_TYPES[dtype], rows, cols, ld)
                        for rows, cols, ld in shapes)
        try:
            heuristic = self._best_algorithm(desc, layouts, align)
        except BaseException:
            _destroy(lt, desc, layouts)
            raise
        algo = heuristic.ptr + lt.matmul_heuristic_result_dtype.fields["algo"][1]
        return LtPlan(desc, layouts, heuristic, algo)

    def _best_algorithm(self, desc: int, layouts: tuple, align: int):
        """cublasLtMatmulAlgoGetHeuristic's first choice, as a MatmulHeuristicResult(1)."""
        lt, P = self.lt, self.lt.MatmulPreferenceAttribute
        heuristic, found = lt.MatmulHeuristicResult(1), np.zeros(1, np.int32)
        A_lt, B_lt, D = layouts
        pref = lt.matmul_preference_create()
        try:
            for attr, value in ((P.MAX_WORKSPACE_BYTES, self.workspace.nbytes),
                                # split-K partial sums only in fp32 (the compute type), never in fp16
                                (P.REDUCTION_SCHEME_MASK, lt.ReductionScheme.COMPUTE_TYPE),
                                (P.MIN_ALIGNMENT_A_BYTES, align), (P.MIN_ALIGNMENT_B_BYTES, align),
                                (P.MIN_ALIGNMENT_C_BYTES, align), (P.MIN_ALIGNMENT_D_BYTES, align)):
                _set(lt.matmul_preference_set_attribute, lt.get_matmul_preference_attribute_dtype,
                     pref, attr, value)
            lt.matmul_algo_get_heuristic(self.handle, desc, A_lt, B_lt, D, D, pref, 1,
                                         heuristic.ptr, found.ctypes.data)
        except lt.cuBLASLtError as e:
            raise _error(lt, e, "cublasLtMatmulAlgoGetHeuristic") from None
        finally:
            lt.matmul_preference_destroy(pref)
        self.heuristic_calls += 1
        if found[0] < 1:
            raise CudaError("cuBLASLt has no algorithm for this GEMM",
                            cuda_error="CUBLAS_STATUS_NOT_SUPPORTED", call="cublasLtMatmulAlgoGetHeuristic")
        return heuristic

    def close(self) -> None:
        """Destroy the plans and the handle, free the workspace (the caller has synchronized)."""
        for plan in self.plans.values():
            _destroy(self.lt, plan.desc, plan.layouts)
        self.plans.clear()
        if self.workspace is not None:
            self.allocator.free(self.workspace)
            self.workspace = None
        if self.handle:
            self.lt.destroy(self.handle)
            self.handle = 0


def _set(setter, dtype_of, obj: int, attr, value) -> None:
    """``cublasLt*SetAttribute(obj, attr, &value, sizeof value)`` with the attribute's own C type."""
    buf = np.array(value, dtype=dtype_of(attr))
    setter(obj, attr, buf.ctypes.data, buf.itemsize)


def _destroy(lt, desc: int, layouts: tuple) -> None:
    for layout in layouts:
        lt.matrix_layout_destroy(layout)
    lt.matmul_desc_destroy(desc)


def _error(lt, e: Exception, call: str) -> CudaError:
    """CudaError (code CUDA_ERROR) naming the cuBLAS status, e.g. CUBLAS_STATUS_NOT_SUPPORTED."""
    status = getattr(e, "status", None)
    try:
        name = lt.get_status_name(int(status))
    except (TypeError, ValueError):  # no usable status on the exception: its class still says what failed
        name = type(e).__name__
    return CudaError(f"{call} failed: {e}", cuda_error=name, call=call)
