"""The direct cuBLASLt GEMM (orcd/backends/cuda/cublaslt.py, Gemm's default).

GPU tests: c[m, n] = a[m, k] @ b[n, k]^T against a float64 numpy product of the
same half-precision values, at the real Qwen2.5-0.5B prefill shapes; bitwise
repeatability; the plan cache. Then checks that need no GPU: the row-major ->
column-major derivation replayed in numpy, the alignment key, the implementation's name
check and the fallback when the bindings are missing. tests/conftest.py skips
everything under tests/cuda on a machine without a GPU, so these carry the cuda
marker too and run with the GPU suite (locally: pytest --noconftest -k "not lt_").
"""

from __future__ import annotations

import ctypes
import types

import numpy as np
import pytest

from gpu_rig import rel

# (m, n, k): prefill of 512 tokens through q/o (896 -> 896) and ffn up (896 -> 4864), the
# LM head on 17 rows (896 -> 151936), a wide-K case with split-K candidates, one decode row.
SHAPES = [(512, 896, 896), (512, 4864, 896), (17, 151936, 896), (512, 3072, 8192), (1, 128, 256)]
DTYPES = ["float16", "bfloat16"]


def half(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint16 bits in ``dtype``, the float64 values those bits hold)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float16":
        h = x.astype(np.float16)
        return h.view(np.uint16), h.astype(np.float64)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)  # truncate to bf16: exact values, no rounding needed
    return bits, (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def as_float(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return bits.view(np.float16).astype(np.float64)
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def operands(scope, rng, m: int, n: int, k: int, dtype: str):
    """Device a [m, k] and b [n, k] of fresh N(0, 1) values, and those values in float64."""
    a_bits, a = half(rng.standard_normal((m, k), np.float32), dtype)
    b_bits, b = half(rng.standard_normal((n, k), np.float32), dtype)
    return scope.put(a_bits), scope.put(b_bits), a, b


@pytest.fixture
def gemm(dev, alloc):
    from orcd.backends.cuda.blas import Gemm

    g = Gemm(dev, allocator=alloc)  # the default implementation
    assert g.impl == "cublaslt", "the cuBLASLt bindings did not load on the GPU machine"
    yield g
    g.close()


# -- GPU ------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_lt_matches_float64(scope, gemm, rng, m, n, k, dtype):
    A, B, a, b = operands(scope, rng, m, n, k, dtype)
    C = scope.empty((m, n), np.uint16)  # NaN poison in both half types
    gemm(A.ptr, B.ptr, C.ptr, m, n, k, dtype)
    out, ref = as_float(scope.get(C), dtype), a @ b.T
    assert rel(out, ref) < 1e-2, f"{dtype} m={m} n={n} k={k}: relative error {rel(out, ref):.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(512, 3072, 8192), (17, 151936, 896)])
def test_lt_is_bitwise_repeatable(scope, gemm, rng, m, n, k, dtype):
    A, B, _, _ = operands(scope, rng, m, n, k, dtype)
    C1, C2 = scope.empty((m, n), np.uint16), scope.empty((m, n), np.uint16)
    gemm(A.ptr, B.ptr, C1.ptr, m, n, k, dtype)
    gemm(A.ptr, B.ptr, C2.ptr, m, n, k, dtype)
    first, second = scope.get(C1), scope.get(C2)
    assert np.isfinite(as_float(first, dtype)).all()
    assert np.array_equal(first, second), f"{int((first != second).sum())} of {m * n} outputs differ"


@pytest.mark.cuda
def test_lt_plans_once_per_shape_and_alignment(scope, gemm, rng):
    lt = gemm.lt
    m, n, k = 64, 896, 896
    A, B, _, b = operands(scope, rng, m, n, k, "float16")
    C = scope.empty((m, n), np.uint16)
    for _ in range(3):
        gemm(A.ptr, B.ptr, C.ptr, m, n, k, "float16")
    assert (lt.heuristic_calls, len(lt.plans)) == (1, 1)
    gemm(A.ptr, B.ptr, C.ptr, m, n // 2, k, "float16")   # a new shape: a new plan
    gemm(A.ptr, B.ptr, C.ptr, m, n, k, "bfloat16")       # a new dtype: a new plan
    gemm(A.ptr, B.ptr, C.ptr, m, n, k, "float16")        # the first key again: reused
    assert (lt.heuristic_calls, len(lt.plans)) == (3, 3)

    # a pointer only 2-byte aligned gets its own plan, picked for that alignment, and is still right
    a_bits, a = half(rng.standard_normal((m, k), np.float32), "float16")
    A2 = scope.put(np.concatenate([np.zeros(1, np.uint16), a_bits.ravel()]))
    C = scope.empty((m, n), np.uint16)
    gemm(A2.ptr + 2, B.ptr, C.ptr, m, n, k, "float16")
    assert lt.heuristic_calls == 4
    assert rel(as_float(scope.get(C), "float16"), a @ b.T) < 1e-2


# -- no GPU needed ----------------------------------------------------------------------

def column_major(buf: np.ndarray, rows: int, cols: int, ld: int) -> np.ndarray:
    """The [rows, cols] matrix cuBLAS reads from ``buf``: element (i, j) at buf[j * ld + i]."""
    return buf.reshape(cols, ld)[:, :rows].T


@pytest.mark.cuda
@pytest.mark.parametrize("m,n,k", [(1, 128, 256), (17, 40, 24), (5, 3, 7)])
def test_column_major_problem_replays_the_row_major_product(m, n, k):
    from orcd.backends.cuda.cublaslt import column_major_problem

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k)), rng.standard_normal((n, k))
    (op_a, op_b), A_lt, B_lt, D = column_major_problem(m, n, k)
    op = {"N": lambda x: x, "T": lambda x: x.T}
    lhs = op[op_a](column_major(b.ravel(), *A_lt))   # cuBLASLt's A is the weight buffer
    rhs = op[op_b](column_major(a.ravel(), *B_lt))   # cuBLASLt's B is the activation buffer
    d = lhs @ rhs                                    # [M, K] @ [K, N]
    assert d.shape == (D[0], D[1]) and D[2] >= D[0] and A_lt[2] >= A_lt[0] and B_lt[2] >= B_lt[0]
    c_buf = np.empty(m * n)
    column_major(c_buf, *D)[...] = d                  # write D column-major into the c buffer
    np.testing.assert_allclose(c_buf.reshape(m, n), a @ b.T, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
def test_alignment_is_the_weakest_pointer_capped_at_256():
    from orcd.backends.cuda.cublaslt import alignment

    assert alignment(0x10000, 0x20000, 0x7000_0000) == 256
    assert alignment(0x10000, 0x10002, 0x10100) == 2
    assert alignment(0x10040, 0x10000, 0x10000) == 64


class NoCudaDevice:
    """A device whose every use fails: the checks below must not reach it."""

    def __getattr__(self, name):
        raise AssertionError(f"the device was used ({name})")


@pytest.mark.cuda
def test_unknown_implementation_is_refused_before_any_cuda():
    from orcd.backends.cuda.blas import Gemm

    with pytest.raises(ValueError, match="cublaslt"):
        Gemm(NoCudaDevice(), impl="cublas")


@pytest.mark.cuda
def test_missing_bindings_fall_back_to_nvmath_with_a_warning(monkeypatch):
    from orcd.backends.cuda import cublaslt
    from orcd.backends.cuda.blas import Gemm

    def missing():
        raise ImportError("No module named 'nvmath'")

    monkeypatch.setattr(cublaslt, "bindings", missing)
    with pytest.warns(UserWarning, match="cublaslt unavailable.*nvmath"):
        g = Gemm(NoCudaDevice())
    assert g.impl == "nvmath" and g.lt is None


class FakeLt:
    """Enough of nvmath.bindings.cublasLt to drive LtGemm on the CPU: it records
    the descriptors, layouts and preferences made and the matmul calls."""

    class cuBLASLtError(Exception):
        pass

    MatmulDescAttribute = types.SimpleNamespace(TRANSA=3, TRANSB=4)
    MatmulPreferenceAttribute = types.SimpleNamespace(
        MAX_WORKSPACE_BYTES=1, REDUCTION_SCHEME_MASK=3, MIN_ALIGNMENT_A_BYTES=5,
        MIN_ALIGNMENT_B_BYTES=6, MIN_ALIGNMENT_C_BYTES=7, MIN_ALIGNMENT_D_BYTES=8)
    ReductionScheme = types.SimpleNamespace(COMPUTE_TYPE=2)
    matmul_heuristic_result_dtype = np.dtype([("algo", "u8", 8), ("workspace_size", "u8")])

    def __init__(self):
        self.objects: dict[int, tuple] = {}   # handle -> what was created
        self.attrs: dict[int, dict] = {}       # descriptor/preference -> {attr: value}
        self.heuristics, self.matmuls, self.results = [], [], []

    def _new(self, *what) -> int:
        h = 0x1000 + len(self.objects)
        self.objects[h], self.attrs[h] = what, {}
        return h

    def create(self):
        return self._new("handle")

    def matmul_desc_create(self, compute, scale):
        return self._new("desc", compute, scale)

    def matrix_layout_create(self, dtype, rows, cols, ld):
        return self._new("layout", dtype, rows, cols, ld)

    def matmul_preference_create(self):
        return self._new("pref")

    def get_matmul_desc_attribute_dtype(self, attr):
        return np.dtype(np.int32)

    def get_matmul_preference_attribute_dtype(self, attr):
        return np.dtype(np.uint64 if attr == 1 else np.uint32)

    def matmul_desc_set_attribute(self, obj, attr, ptr, size):
        self.attrs[obj][attr] = int.from_bytes(ctypes.string_at(ptr, size), "little")

    matmul_preference_set_attribute = matmul_desc_set_attribute

    def MatmulHeuristicResult(self, size):
        buf = np.zeros(size, self.matmul_heuristic_result_dtype)
        self.results.append(buf)
        return types.SimpleNamespace(ptr=buf.ctypes.data, buf=buf)

    def matmul_algo_get_heuristic(self, handle, desc, a, b, c, d, pref, count, results, found):
        self.heuristics.append((desc, a, b, c, d, dict(self.attrs[pref]), count))
        ctypes.c_int32.from_address(found).value = 1

    def matmul(self, handle, desc, alpha, a, adesc, b, bdesc, beta, c, cdesc, d, ddesc,
               algo, ws, ws_size, stream):
        self.matmuls.append(dict(desc=desc, a=a, adesc=adesc, b=b, bdesc=bdesc, c=c, cdesc=cdesc, d=d,
                                 ddesc=ddesc, algo=algo, ws=ws, ws_size=ws_size, stream=stream,
                                 alpha=ctypes.c_float.from_address(alpha).value,
                                 beta=ctypes.c_float.from_address(beta).value))

    def matrix_layout_destroy(self, h):
        del self.objects[h]

    matmul_desc_destroy = matmul_preference_destroy = destroy = matrix_layout_destroy


class FakeAllocator:
    def __init__(self):
        self.live = {}

    def alloc(self, nbytes, purpose):
        buf = types.SimpleNamespace(ptr=0x7000_0000, nbytes=nbytes, purpose=purpose)
        self.live[buf.ptr] = buf
        return buf

    def free(self, buf):
        del self.live[buf.ptr]


@pytest.mark.cuda
def test_lt_gemm_wires_cublaslt_as_the_derivation_says():
    from orcd.backends.cuda.cublaslt import WORKSPACE_BYTES, LtGemm

    lt, allocator = FakeLt(), FakeAllocator()
    gemm = LtGemm(types.SimpleNamespace(make_current=lambda: None), lt, allocator)
    m, n, k = 17, 4864, 896
    a, b, c = 0x1000_0000, 0x2000_0000, 0x3000_0100   # c only 256-byte aligned
    for _ in range(2):
        gemm(a, b, c, m, n, k, "bfloat16", stream=77)
    assert len(lt.heuristics) == 1 and len(lt.matmuls) == 2 and lt.matmuls[0] == lt.matmuls[1]
    call = lt.matmuls[0]
    # cuBLASLt's A is the weight b, [k, n] ld k, transposed; its B the activations a, [k, m] ld k;
    # C and D the output c, [n, m] ld n; all bf16 (CUDA_R_16BF = 14)
    assert (call["a"], call["b"], call["c"], call["d"]) == (b, a, c, c)
    assert lt.objects[call["adesc"]] == ("layout", 14, k, n, k)
    assert lt.objects[call["bdesc"]] == ("layout", 14, k, m, k)
    assert lt.objects[call["cdesc"]] == lt.objects[call["ddesc"]] == ("layout", 14, n, m, n)
    assert lt.objects[call["desc"]] == ("desc", 68, 0)            # COMPUTE_32F, scale CUDA_R_32F
    assert lt.attrs[call["desc"]] == {3: 1, 4: 0}                 # TRANSA = T, TRANSB = N
    assert (call["alpha"], call["beta"], call["stream"]) == (1.0, 0.0, 77)
    assert (call["ws"], call["ws_size"]) == (0x7000_0000, WORKSPACE_BYTES)
    assert call["algo"] == lt.results[0].ctypes.data                # the heuristic's algo, kept alive
    prefs = lt.heuristics[0][5]
    assert prefs == {1: WORKSPACE_BYTES, 3: 2, 5: 256, 6: 256, 7: 256, 8: 256}

    gemm(a + 2, b, c, m, n, k, "bfloat16", stream=77)              # 2-byte aligned: a plan of its own
    assert len(lt.heuristics) == 2 and lt.heuristics[1][5][5] == 2
    gemm.close()
    assert list(lt.objects) == [] and allocator.live == {}        # everything made was released
