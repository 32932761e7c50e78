"""Quantized matmul kernels (orcd.ops.matmul.MatmulKernels) on a real device.

Every format's GEMV (decode, T <= 8) and the fp16 dequant + cuBLASLt prefill
path against the format's numpy dequantizer + a float64 matmul, on fresh
random blocks (``random_blocks``), outputs poisoned with NaN first; embedding
lookup; the per-token expert GEMV; bitwise determinism and graph replay.
Run with ``scripts/gpu-test.sh`` (docs/gpu-testing.md).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytestmark = pytest.mark.cuda

TYPES = {"F32": 0, "F16": 1, "BF16": 30, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
         "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "MXFP4": 39}
# Qwen2.5-0.5B's projections: q/o 896x896, gate/up 4864x896, down 896x4864 (n_out, n_in).
SHAPES = [(896, 896), (4864, 896), (896, 4864)]
GEMV_TOL = 1e-5      # fp32 dequant + fp32 accumulation
GEMM_TOL = 1e-2      # fp16 operands on the tensor cores


@pytest.fixture(scope="module")
def dev():
    from orcd.cuda.device import CudaDevice

    d = CudaDevice(int(os.environ.get("ORCD_TEST_GPU", "0")))
    yield d
    d.close()


@pytest.fixture(scope="module")
def alloc(dev):
    from orcd.cuda.memory import DeviceAllocator

    a = DeviceAllocator(dev)
    yield a
    a.free_all()


@pytest.fixture(scope="module")
def compiler(dev, tmp_path_factory):
    from orcd.cuda.nvrtc import KernelCompiler

    return KernelCompiler(dev.info.arch, cache=tmp_path_factory.mktemp("kcache"))


@pytest.fixture(scope="module")
def mk(dev, compiler):
    from orcd.cuda.launch import Launcher
    from orcd.ops.matmul import MatmulKernels

    return MatmulKernels(dev, compiler, Launcher(dev))


@pytest.fixture(scope="module")
def arena(dev, alloc):
    from orcd.cuda.tensor import Arena

    buf = alloc.alloc(256 << 20, "scratch")
    return Arena(buf.ptr, buf.nbytes)


@pytest.fixture
def scope(dev, alloc):
    """Allocations made through it are freed after the test."""
    bufs = []

    class Scope:
        def tensor(self, arr):
            from orcd.cuda.memory import from_host
            from orcd.cuda.tensor import DeviceTensor

            arr = np.ascontiguousarray(arr)
            buf = alloc.alloc(max(arr.nbytes, 1), "test")
            bufs.append(buf)
            from_host(dev, arr, buf.ptr)
            return DeviceTensor(buf.ptr, arr.shape, arr.dtype)

        def poisoned(self, shape, dtype=np.float32):
            from orcd.cuda.memory import fill_bytes
            from orcd.cuda.tensor import DeviceTensor

            t = DeviceTensor(0, tuple(shape), np.dtype(dtype))
            buf = alloc.alloc(t.nbytes, "test")
            bufs.append(buf)
            fill_bytes(dev, buf.ptr, 0xFF, t.nbytes)  # NaN in float32
            return DeviceTensor(buf.ptr, t.shape, t.dtype)

        def weight(self, host, name, shape, rng, std=0.05):
            """(QWeight of fresh random blocks, its float64 dequantization)."""
            from orcd.cuda.tensor import QWeight

            fmt = host.formats[TYPES[name]]
            n_blocks = int(np.prod(shape)) // fmt.block_elems
            raw = fmt.random_blocks(n_blocks, rng, std)
            t = self.tensor(raw)
            ref = fmt.dequantize_tensor(raw, tuple(shape)).astype(np.float64)
            return QWeight(t.ptr, tuple(shape), fmt.type_id, fmt), ref

    yield Scope()
    for b in bufs:
        alloc.free(b)


def fetch(dev, t):
    from orcd.cuda.memory import to_host

    return to_host(dev, t.ptr, t.nbytes).view(t.dtype).reshape(t.shape)


def rel_err(out, ref):
    assert np.isfinite(out).all(), "unwritten (NaN) or non-finite outputs"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def fits(name, shape):
    block = 256 if name.endswith("_K") else 32
    return shape[1] % block == 0


CASES = [(name, shape) for name in TYPES for shape in SHAPES if fits(name, shape)]


# -- linear: decode GEMV and prefill GEMM ---------------------------------------------

@pytest.mark.parametrize("name,shape", CASES, ids=[f"{n}-{s[0]}x{s[1]}" for n, s in CASES])
def test_linear_every_format(dev, mk, arena, scope, host, name, shape):
    rng = np.random.default_rng()
    w, w_ref = scope.weight(host, name, shape, rng)
    n_out, n_in = shape
    b_host = rng.standard_normal(n_out).astype(np.float32)
    b = scope.tensor(b_host)
    for T in (1, 3, 8, 17, 64):
        x_host = rng.standard_normal((T, n_in)).astype(np.float32)
        x = scope.tensor(x_host)
        bias = b if T in (3, 17) else None
        ref = x_host.astype(np.float64) @ w_ref.T + (b_host if bias is not None else 0)
        out = scope.poisoned((T, n_out))
        mk.linear(x, w, bias, out, scratch=arena)
        err = rel_err(fetch(dev, out), ref)
        tol = GEMV_TOL if T <= 8 else GEMM_TOL
        assert err < tol, f"{name} {shape} T={T}: relative error {err:.2e}"
        if T > 8:
            assert mk.last_prefill == "gemm"
        if T in (3, 64):  # same inputs -> same bits
            first = fetch(dev, out).copy()
            mk.linear(x, w, bias, out, scratch=arena)
            assert np.array_equal(fetch(dev, out), first), f"{name} T={T} not deterministic"


def test_output_projection_q8_0(dev, mk, arena, scope, host):
    # Qwen's 151936 x 896 output matrix: one weight upload, decode and prefill T.
    rng = np.random.default_rng()
    w, w_ref = scope.weight(host, "Q8_0", (151936, 896), rng)
    for T in (1, 3, 17):
        x_host = rng.standard_normal((T, 896)).astype(np.float32)
        out = scope.poisoned((T, 151936))
        mk.linear(scope.tensor(x_host), w, None, out, scratch=arena)
        err = rel_err(fetch(dev, out), x_host.astype(np.float64) @ w_ref.T)
        assert err < (GEMV_TOL if T <= 8 else GEMM_TOL), f"T={T}: relative error {err:.2e}"


def test_prefill_without_scratch_falls_back_to_gemv(dev, mk, scope, host):
    rng = np.random.default_rng()
    w, w_ref = scope.weight(host, "Q5_0", (896, 896), rng)
    x_host = rng.standard_normal((19, 896)).astype(np.float32)
    out = scope.poisoned((19, 896))
    mk.linear(scope.tensor(x_host), w, None, out)
    assert mk.last_prefill == "gemv"
    assert rel_err(fetch(dev, out), x_host.astype(np.float64) @ w_ref.T) < GEMV_TOL


def test_bfloat16_prefill(dev, compiler, arena, scope, host):
    from orcd.cuda.launch import Launcher
    from orcd.ops.matmul import MatmulKernels

    mk16 = MatmulKernels(dev, compiler, Launcher(dev), gemm_dtype="bfloat16")
    rng = np.random.default_rng()
    w, w_ref = scope.weight(host, "Q6_K", (896, 4864), rng)
    x_host = (rng.standard_normal((33, 4864)) * 3e4).astype(np.float32)  # outputs ~1e5: past fp16
    out = scope.poisoned((33, 896))
    mk16.linear(scope.tensor(x_host), w, None, out, scratch=arena)
    assert mk16.last_prefill == "gemm"
    assert rel_err(fetch(dev, out), x_host.astype(np.float64) @ w_ref.T) < GEMM_TOL


def test_gemv_replays_in_a_cuda_graph(dev, mk, scope, host):
    from orcd.cuda.graph import capture

    rng = np.random.default_rng()
    w, w_ref = scope.weight(host, "Q4_K", (896, 4864), rng)
    x_host = rng.standard_normal((1, 4864)).astype(np.float32)
    x = scope.tensor(x_host)
    eager, graphed = scope.poisoned((1, 896)), scope.poisoned((1, 896))
    mk.linear(x, w, None, eager)
    with capture(dev, lambda: mk.linear(x, w, None, graphed)) as graph:
        assert np.isnan(fetch(dev, graphed)).all()  # recorded, not run
        graph.replay()
        dev.synchronize()
        assert np.array_equal(fetch(dev, graphed), fetch(dev, eager))
    assert rel_err(fetch(dev, graphed), x_host.astype(np.float64) @ w_ref.T) < GEMV_TOL


# -- embedding --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TYPES))
def test_embed_every_format(dev, mk, scope, host, name):
    rng = np.random.default_rng()
    D = 1024 if name.endswith("_K") else 896
    table, ref = scope.weight(host, name, (3000, D), rng, std=1.0)
    ids_host = rng.integers(0, 3000, 37).astype(np.int32)
    ids_host[5] = ids_host[20]  # a repeated token
    ids_host[-1] = 2999
    out = scope.poisoned((37, D))
    mk.embed(table, scope.tensor(ids_host), out)
    got = fetch(dev, out)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref[ids_host], rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    bad = scope.tensor(np.array([3000, -1, 7], np.int32))
    out3 = scope.poisoned((3, D))
    mk.embed(table, bad, out3)
    got3 = fetch(dev, out3)
    assert np.isnan(got3[:2]).all() and np.allclose(got3[2], ref[7], rtol=1e-6, atol=1e-6)


# -- mixture of experts -------------------------------------------------------------------

@pytest.mark.parametrize("name,n_out,n_in", [("MXFP4", 576, 2880), ("Q8_0", 640, 896),
                                               ("Q4_K", 512, 1024), ("F16", 256, 896)])
@pytest.mark.parametrize("per_slot", [False, True])
def test_moe_linear_matches_per_token_reference(dev, mk, scope, host, name, n_out, n_in, per_slot):
    rng = np.random.default_rng()
    n_expert, T, k = 32 if name == "MXFP4" else 8, 5, 4
    w, w_ref = scope.weight(host, name, (n_expert, n_out, n_in), rng)
    b_host = rng.standard_normal((n_expert, n_out)).astype(np.float32)
    ids = np.stack([rng.choice(n_expert, k, replace=False) for _ in range(T)]).astype(np.int32)
    x_host = rng.standard_normal((T * k if per_slot else T, n_in)).astype(np.float32)
    out = scope.poisoned((T, k, n_out))
    x, ids_d, b = scope.tensor(x_host), scope.tensor(ids), scope.tensor(b_host)
    mk.moe_linear(x, w, b, ids_d, out)
    got = fetch(dev, out)
    ref = np.empty((T, k, n_out))
    for t in range(T):
        for s in range(k):
            xv = x_host[t * k + s if per_slot else t].astype(np.float64)
            ref[t, s] = w_ref[ids[t, s]] @ xv + b_host[ids[t, s]]
    assert rel_err(got, ref) < GEMV_TOL
    for t in range(T):  # each pair on its own: a wrong expert would show here
        assert rel_err(got[t], ref[t]) < GEMV_TOL
    first = got.copy()
    mk.moe_linear(x, w, b, ids_d, out)
    assert np.array_equal(fetch(dev, out), first)


def test_moe_bad_expert_id_gives_nan(dev, mk, scope, host):
    rng = np.random.default_rng()
    w, w_ref = scope.weight(host, "MXFP4", (4, 64, 128), rng)
    ids = np.array([[0, 4], [3, -1]], np.int32)
    x_host = rng.standard_normal((2, 128)).astype(np.float32)
    out = scope.poisoned((2, 2, 64))
    mk.moe_linear(scope.tensor(x_host), w, None, scope.tensor(ids), out)
    got = fetch(dev, out)
    assert np.isnan(got[0, 1]).all() and np.isnan(got[1, 1]).all()
    assert rel_err(got[0, 0], w_ref[0] @ x_host[0]) < GEMV_TOL
    assert rel_err(got[1, 0], w_ref[3] @ x_host[1]) < GEMV_TOL


def test_shape_errors_are_clear(mk, scope, host):
    rng = np.random.default_rng()
    w, _ = scope.weight(host, "Q8_0", (64, 128), rng)
    x = scope.tensor(np.zeros((2, 96), np.float32))
    with pytest.raises(ValueError, match="linear x must be"):
        mk.linear(x, w, None, scope.poisoned((2, 64)))
    with pytest.raises(ValueError, match="linear out must be"):
        mk.linear(scope.tensor(np.zeros((2, 128), np.float32)), w, None, scope.poisoned((2, 63)))
