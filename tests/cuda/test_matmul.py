"""Quantized matmul kernels (orcd.ops.matmul.MatmulKernels) on a real device.

Every format's GEMV (decode, T <= 8) and the fp16 dequant + cuBLASLt prefill
path against the format's numpy dequantizer + a float64 matmul, on fresh
random blocks (``random_blocks``), outputs poisoned with NaN first; embedding
lookup; the per-token expert GEMV; bitwise determinism and graph replay.
Run with ``scripts/gpu-test.sh`` (docs/gpu-testing.md).
"""

from __future__ import annotations

import numpy as np
import pytest

from gpu_rig import TYPES, rel, sized

pytestmark = [pytest.mark.cuda, pytest.mark.sim]

# Qwen2.5-0.5B's projections: q/o 896x896, gate/up 4864x896, down 896x4864 (n_out, n_in).
SHAPES = sized([(896, 896), (4864, 896), (900, 4864)], [(100, 256), (160, 512)])   # 100, 900 rows: a partial dequant block
GEMV_TOL = 1e-5      # fp32 dequant + fp32 accumulation
GEMM_TOL = 1e-2      # fp16 operands on the tensor cores


@pytest.fixture(autouse=True)
def _free_after_each_test(scope):
    """Weights here reach 145 MB (151936 x 896 Q8_0): each test's go back when it ends."""


def fits(name, shape):
    block = 256 if name.endswith("_K") else 32
    return shape[1] % block == 0


CASES = [(name, shape) for name in TYPES for shape in SHAPES if fits(name, shape)]


# -- linear: decode GEMV and prefill GEMM ---------------------------------------------

@pytest.mark.parametrize("name,shape", CASES, ids=[f"{n}-{s[0]}x{s[1]}" for n, s in CASES])
def test_linear_every_format(gpu, host, name, shape):
    rng = np.random.default_rng()
    w, w_ref = gpu.weight(host, name, shape, rng)
    n_out, n_in = shape
    b_host = rng.standard_normal(n_out).astype(np.float32)
    b = gpu.put(b_host)
    for T in sized((1, 3, 8, 17, 64), (1, 3, 17)):
        x_host = rng.standard_normal((T, n_in)).astype(np.float32)
        x = gpu.put(x_host)
        bias = b if T in (3, 17) else None
        ref = x_host.astype(np.float64) @ w_ref.T + (b_host if bias is not None else 0)
        out = gpu.empty((T, n_out))
        gpu.mm.linear(x, w, bias, out, scratch=gpu.arena)
        err = rel(gpu.get(out), ref)
        tol = GEMV_TOL if T <= 8 else GEMM_TOL
        assert err < tol, f"{name} {shape} T={T}: relative error {err:.2e}"
        if T > 8:
            assert gpu.mm.last_prefill == "gemm"
        if T in (3, 64):  # same inputs -> same bits
            first = gpu.get(out).copy()
            gpu.mm.linear(x, w, bias, out, scratch=gpu.arena)
            assert np.array_equal(gpu.get(out), first), f"{name} T={T} not deterministic"


@pytest.mark.gpu_only   # 136M values: minutes on the simulator
def test_output_projection_q8_0(gpu, host):
    # Qwen's 151936 x 896 output matrix: one weight upload, decode and prefill T.
    rng = np.random.default_rng()
    w, w_ref = gpu.weight(host, "Q8_0", (151936, 896), rng)
    for T in (1, 3, 17):
        x_host = rng.standard_normal((T, 896)).astype(np.float32)
        out = gpu.empty((T, 151936))
        gpu.mm.linear(gpu.put(x_host), w, None, out, scratch=gpu.arena)
        err = rel(gpu.get(out), x_host.astype(np.float64) @ w_ref.T)
        assert err < (GEMV_TOL if T <= 8 else GEMM_TOL), f"T={T}: relative error {err:.2e}"


def test_prefill_without_scratch_falls_back_to_gemv(gpu, host):
    rng = np.random.default_rng()
    w, w_ref = gpu.weight(host, "Q5_0", (896, 896), rng)
    x_host = rng.standard_normal((19, 896)).astype(np.float32)
    out = gpu.empty((19, 896))
    gpu.mm.linear(gpu.put(x_host), w, None, out)
    assert gpu.mm.last_prefill == "gemv"
    assert rel(gpu.get(out), x_host.astype(np.float64) @ w_ref.T) < GEMV_TOL


@pytest.mark.parametrize("name", ["Q5_0", "Q4_K", "F16"])
def test_short_prompts_through_the_int8_gemvs(gpu, host, name):
    # prompt_gemv: a prompt chunk of up to N rows takes the decode batch's int8 GEMVs (no
    # fp16 weight copy, no GEMM): each row the bits the batch GEMV gives it; longer
    # chunks and formats without int8 kernels still take the GEMM
    from orcd.ops.matmul import MatmulKernels

    mk = MatmulKernels(gpu.dev, gpu.compiler, gpu.launcher, gemm=gpu.mm._gemm_impl, prompt_gemv=32)
    rng = np.random.default_rng()
    n_out, n_in = sized((896, 4864), (64, 512))
    w, w_ref = gpu.weight(host, name, (n_out, n_in), rng)
    b_host = rng.standard_normal(n_out).astype(np.float32)
    b = gpu.put(b_host)
    for T in (9, 32, 33):
        x_host = rng.standard_normal((T, n_in)).astype(np.float32)
        x = gpu.put(x_host)
        out = gpu.empty((T, n_out))
        mk.linear(x, w, b, out, scratch=gpu.arena)
        int8 = T <= 32 and name != "F16"
        assert mk.last_prefill == ("gemv" if int8 else "gemm"), (name, T)
        ref = x_host.astype(np.float64) @ w_ref.T + b_host
        assert rel(gpu.get(out), ref) < (2e-2 if int8 else GEMM_TOL)
        if int8:
            rows = gpu.empty((T, n_out))
            mk.gemv(mk.quantize(x, gpu.arena), w, b, rows)
            assert np.array_equal(gpu.get(out), gpu.get(rows))
    with pytest.raises(ValueError, match="prompt_gemv"):
        MatmulKernels(gpu.dev, gpu.compiler, gpu.launcher, prompt_gemv=64)


def test_bfloat16_prefill(gpu, host):
    from orcd.ops.matmul import MatmulKernels

    mk16 = MatmulKernels(gpu.dev, gpu.compiler, gpu.launcher, gemm_dtype="bfloat16", gemm=gpu.mm._gemm_impl)
    rng = np.random.default_rng()
    n_out, n_in = sized((896, 4864), (64, 512))
    w, w_ref = gpu.weight(host, "Q6_K", (n_out, n_in), rng)
    x_host = (rng.standard_normal((33, n_in)) * 3e4).astype(np.float32)  # outputs ~1e5: past fp16
    out = gpu.empty((33, n_out))
    mk16.linear(gpu.put(x_host), w, None, out, scratch=gpu.arena)
    assert mk16.last_prefill == "gemm"
    assert rel(gpu.get(out), x_host.astype(np.float64) @ w_ref.T) < GEMM_TOL


@pytest.mark.parametrize("name", ["Q4_K", "Q5_0", "Q8_0", "Q6_K", "Q4_0", "MXFP4"])
def test_batch_gemv_rows_equal_rows_alone(gpu, host, name):
    # a decode batch's rows in one launch (each weight read once: 16 rows of fp32
    # activations, 32 of int8): every row's sum is bitwise the one it gets alone
    from orcd.ops.matmul_base import BATCH_GEMV_Q8_T, BATCH_GEMV_T

    rng = np.random.default_rng()
    n_out, n_in = sized((896, 4864), (64, 512))
    w, w_ref = gpu.weight(host, name, (n_out, n_in), rng)
    x_host = rng.standard_normal((BATCH_GEMV_Q8_T, n_in)).astype(np.float32)
    x32 = gpu.put(x_host)
    for x, T in ((x32.rows(0, BATCH_GEMV_T), BATCH_GEMV_T), (gpu.mm.quantize(x32, gpu.arena), BATCH_GEMV_Q8_T)):
        assert gpu.mm.gemv_rows(x) == T
        out = gpu.empty((T, n_out))
        gpu.mm.gemv(x, w, None, out)
        batched = gpu.get(out).copy()
        assert rel(batched, x_host[:T].astype(np.float64) @ w_ref.T) < 2e-2   # int8: ~1e-2
        for t in (0, 7, T - 1):
            one = gpu.empty((1, n_out))
            gpu.mm.gemv(x.rows(t, t + 1), w, None, one)
            assert np.array_equal(gpu.get(one)[0], batched[t]), f"{name} row {t} of {T} differs alone"
    with pytest.raises(ValueError, match="at most 16 rows"):
        gpu.mm.gemv(gpu.empty((17, n_in)), w, None, gpu.empty((17, n_out)))
    with pytest.raises(ValueError, match="at most 32 rows"):
        x33 = gpu.mm.quantize(gpu.put(rng.standard_normal((33, n_in)).astype(np.float32)), gpu.arena)
        gpu.mm.gemv(x33, w, None, gpu.empty((33, n_out)))


@pytest.mark.gpu_only
def test_gemv_replays_in_a_cuda_graph(gpu, host):
    from orcd.backends.cuda.graph import capture

    rng = np.random.default_rng()
    w, w_ref = gpu.weight(host, "Q4_K", (896, 4864), rng)
    x_host = rng.standard_normal((1, 4864)).astype(np.float32)
    x = gpu.put(x_host)
    eager, graphed = gpu.empty((1, 896)), gpu.empty((1, 896))
    gpu.mm.linear(x, w, None, eager)
    with capture(gpu.dev, lambda: gpu.mm.linear(x, w, None, graphed)) as graph:
        assert np.isnan(gpu.get(graphed)).all()  # recorded, not run
        graph.replay()
        gpu.dev.synchronize()
        assert np.array_equal(gpu.get(graphed), gpu.get(eager))
    assert rel(gpu.get(graphed), x_host.astype(np.float64) @ w_ref.T) < GEMV_TOL


# -- embedding --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TYPES))
def test_embed_every_format(gpu, host, name):
    rng = np.random.default_rng()
    D = 1024 if name.endswith("_K") else 896
    table, ref = gpu.weight(host, name, (3000, D), rng, std=1.0)
    ids_host = rng.integers(0, 3000, 37).astype(np.int32)
    ids_host[5] = ids_host[20]  # a repeated token
    ids_host[-1] = 2999
    out = gpu.empty((37, D))
    gpu.mm.embed(table, gpu.put(ids_host), out)
    got = gpu.get(out)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref[ids_host], rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    bad = gpu.put(np.array([3000, -1, 7], np.int32))
    out3 = gpu.empty((3, D))
    gpu.mm.embed(table, bad, out3)
    got3 = gpu.get(out3)
    assert np.isnan(got3[:2]).all() and np.allclose(got3[2], ref[7], rtol=1e-6, atol=1e-6)


# -- mixture of experts -------------------------------------------------------------------

@pytest.mark.parametrize("name,n_out,n_in", [("MXFP4", 576, 2880), ("Q8_0", 640, 896),
                                               ("Q4_K", 512, 1024), ("F16", 256, 896)])
@pytest.mark.parametrize("per_slot", [False, True])
def test_moe_linear_matches_per_token_reference(gpu, host, name, n_out, n_in, per_slot):
    rng = np.random.default_rng()
    n_expert, T, k = 32 if name == "MXFP4" else 8, 5, 4
    w, w_ref = gpu.weight(host, name, (n_expert, n_out, n_in), rng)
    b_host = rng.standard_normal((n_expert, n_out)).astype(np.float32)
    ids = np.stack([rng.choice(n_expert, k, replace=False) for _ in range(T)]).astype(np.int32)
    x_host = rng.standard_normal((T * k if per_slot else T, n_in)).astype(np.float32)
    out = gpu.empty((T, k, n_out))
    x, ids_d, b = gpu.put(x_host), gpu.put(ids), gpu.put(b_host)
    gpu.mm.moe_linear(x, w, b, ids_d, out)
    got = gpu.get(out)
    ref = np.empty((T, k, n_out))
    for t in range(T):
        for s in range(k):
            xv = x_host[t * k + s if per_slot else t].astype(np.float64)
            ref[t, s] = w_ref[ids[t, s]] @ xv + b_host[ids[t, s]]
    assert rel(got, ref) < GEMV_TOL
    for t in range(T):  # each pair on its own: a wrong expert would show here
        assert rel(got[t], ref[t]) < GEMV_TOL
    first = got.copy()
    gpu.mm.moe_linear(x, w, b, ids_d, out)
    assert np.array_equal(gpu.get(out), first)


def test_moe_bad_expert_id_gives_nan(gpu, host):
    rng = np.random.default_rng()
    w, w_ref = gpu.weight(host, "MXFP4", (4, 64, 128), rng)
    ids = np.array([[0, 4], [3, -1]], np.int32)
    x_host = rng.standard_normal((2, 128)).astype(np.float32)
    out = gpu.empty((2, 2, 64))
    gpu.mm.moe_linear(gpu.put(x_host), w, None, gpu.put(ids), out)
    got = gpu.get(out)
    assert np.isnan(got[0, 1]).all() and np.isnan(got[1, 1]).all()
    assert rel(got[0, 0], w_ref[0] @ x_host[0]) < GEMV_TOL
    assert rel(got[1, 0], w_ref[3] @ x_host[1]) < GEMV_TOL


def test_shape_errors_are_clear(gpu, host):
    rng = np.random.default_rng()
    w, _ = gpu.weight(host, "Q8_0", (64, 128), rng)
    x = gpu.put(np.zeros((2, 96), np.float32))
    with pytest.raises(ValueError, match="linear x must be"):
        gpu.mm.linear(x, w, None, gpu.empty((2, 64)))
    with pytest.raises(ValueError, match="linear out must be"):
        gpu.mm.linear(gpu.put(np.zeros((2, 128), np.float32)), w, None, gpu.empty((2, 63)))

