"""The decode batch's GEMV on the int8 tensor cores (ops/gemv_mma.cuh), on a real
device (marker ``cuda``) and on the CUDA simulator (``sim``: its mma.sync stand-in).

Every format with ``mma_chunk`` against a float64 reference on the same int8
activations; and the property the batch rests on: a row's output is the same bits
whatever the batch around it (its place, the batch's size, the other rows).
"""

from __future__ import annotations

import numpy as np
import pytest
from gpu_rig import q8_ref, rel, sized

from orcd.ops.matmul import quantize_q8_ref

from orcd.ops.matmul_base import Q8Act

pytestmark = [pytest.mark.cuda, pytest.mark.sim]

MMA_NAMES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
SHAPES = sized([(896, 896), (4864, 896), (896, 4864), (151, 2816)],   # Qwen's projections; rows past a tile
               [(40, 512), (17, 256)])
TOL = 1e-5


@pytest.fixture(autouse=True)
def _free_after_each_test(scope):
    yield


@pytest.fixture(scope="module")
def mk(gpu):
    from orcd.ops.matmul import MatmulKernels

    return MatmulKernels(gpu.dev, gpu.compiler, gpu.launcher, int8="all", mma=True)


def _gemv(gpu, mk, x: np.ndarray, w, b) -> np.ndarray:
    from orcd.ops.matmul_base import int8_capable

    T = x.shape[0]
    xa = mk.quantize(gpu.put(x), gpu.arena) if int8_capable(w) else gpu.put(x)
    out = gpu.empty((T, w.shape[0]))
    mk.gemv(xa, w, b, out)
    got = gpu.get(out)
    gpu.arena.reset()
    return got


def test_the_table_marks_the_formats_with_mma_chunk():
    from orcd.quant.builtin import builtin_table

    have = {f.name for f in builtin_table() if f.device is not None and f.device.mma}
    assert have == set(MMA_NAMES)


@pytest.mark.parametrize("name", MMA_NAMES)
@pytest.mark.parametrize("n_out,n_in", SHAPES)
@pytest.mark.parametrize("T", sized([1, 5, 16, 32], [1, 11]))
def test_mma_gemv_matches_reference(gpu, mk, rng, host, name, n_out, n_in, T):
    if name.endswith("_K") and n_in % 256:
        pytest.skip("K-quants need rows of 256k values")
    w, w_ref = gpu.weight(host, name, (n_out, n_in), rng)
    x = rng.standard_normal((T, n_in)).astype(np.float32)
    x[0, :32] = 0.0                                       # a zero group: its scale 0
    b = rng.standard_normal(n_out).astype(np.float32)
    got = _gemv(gpu, mk, x, w, gpu.put(b))
    ref = q8_ref(x) @ w_ref.T + b
    for t in range(T):
        assert rel(got[t], ref[t]) < TOL, (name, t)


@pytest.mark.parametrize("name", sized(MMA_NAMES, ["Q5_0", "Q4_K", "Q6_K"]))
def test_a_row_gets_the_same_bits_in_any_batch(gpu, mk, rng, host, name):
    n_out, n_in = sized((640, 1024), (24, 256))
    w, _ = gpu.weight(host, name, (n_out, n_in), rng)
    T = sized(32, 12)
    x = (rng.standard_normal((T, n_in)) * rng.uniform(0.1, 10, (T, 1))).astype(np.float32)
    together = _gemv(gpu, mk, x, w, None)
    alone = _gemv(gpu, mk, x[3:4], w, None)
    assert np.array_equal(alone[0], together[3])
    order = rng.permutation(T)[:sized(13, 9)]            # another size, other places, other rows
    mixed = _gemv(gpu, mk, x[order], w, None)
    assert np.array_equal(mixed, together[order])


def test_mma_off_or_a_float_weight_takes_the_dp4a_or_fp32_gemv(gpu, rng, host):
    from orcd.ops.matmul import MatmulKernels

    off = MatmulKernels(gpu.dev, gpu.compiler, gpu.launcher, int8="all", mma=False)
    n_in = 256
    w, w_ref = gpu.weight(host, "Q4_K", (24, n_in), rng)
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    assert rel(_gemv(gpu, off, x, w, None), q8_ref(x) @ w_ref.T) < TOL
    w16, w16_ref = gpu.weight(host, "F16", (24, n_in), rng)
    out = gpu.empty((3, 24))
    off.gemv(gpu.put(x), w16, None, out)
    assert rel(gpu.get(out), x.astype(np.float64) @ w16_ref.T) < TOL


def test_q8act_rows_keep_their_scales(gpu, mk, rng):
    # the launcher passes a row range's own int8 values and scales (rows(s, e))
    x = rng.standard_normal((5, 64)).astype(np.float32)
    xa = mk.quantize(gpu.put(x), gpu.arena)
    part = xa.rows(2, 4)
    assert isinstance(part, Q8Act) and part.shape == (2, 64)
    q, d = quantize_q8_ref(x[2:4])
    assert np.array_equal(gpu.get(part.xq), q) and np.array_equal(gpu.get(part.xd), d)
    gpu.arena.reset()


@pytest.fixture(scope="module")
def dp4a(gpu):
    from orcd.ops.matmul import MatmulKernels

    return MatmulKernels(gpu.dev, gpu.compiler, gpu.launcher, int8="all", mma=False)


@pytest.fixture(params=["mma", "dp4a"])
def per_row(request, mk, dp4a):
    # the decode batch's GEMVs either way: the residual and the gated launch on both
    return mk if request.param == "mma" else dp4a


@pytest.mark.parametrize("name", ["Q5_0", "Q6_K", "F16"])
def test_the_residual_is_added_in_the_same_launch(gpu, per_row, rng, host, name):
    # out = residual + (x @ w.T + b), as ops.add(residual, linear) sums it: the same bits
    # (F16: the fp32-activation GEMV)
    n_out, n_in, T = sized((896, 1024, 16), (40, 256, 5))
    w, _ = gpu.weight(host, name, (n_out, n_in), rng)
    x = rng.standard_normal((T, n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    res = rng.standard_normal((T, n_out)).astype(np.float32)
    plain = _gemv(gpu, per_row, x, w, gpu.put(b))
    xa = per_row.quantize(gpu.put(x), gpu.arena) if name != "F16" else gpu.put(x)   # as _gemv gives it
    out = gpu.empty((T, n_out))
    per_row.gemv(xa, w, gpu.put(b), out, residual=gpu.put(res))
    assert np.array_equal(gpu.get(out), res + plain)
    with pytest.raises(ValueError, match="residual"):
        per_row.gemv(xa, w, None, out, residual=gpu.put(res[:1]))
    gpu.arena.reset()


@pytest.mark.parametrize("name", ["Q5_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("joined", [False, True])
def test_gated_is_swiglu_of_the_two_gemvs(gpu, per_row, rng, host, name, joined):
    # one launch: silu(x @ gate.T) * (x @ up.T), the bits of the two GEMVs and swiglu_f32
    # (joined: Phi-3's gate_up, gate rows then up rows in one matrix)
    from orcd.ops.activation import ActivationKernels

    n_ff, n_in, T = sized((896, 1024, 16), (40, 256, 5))
    x = rng.standard_normal((T, n_in)).astype(np.float32)
    if joined:
        w, _ = gpu.weight(host, name, (2 * n_ff, n_in), rng)
        gate_up = _gemv(gpu, per_row, x, w, None)
        gate, up, ws = gate_up[:, :n_ff], gate_up[:, n_ff:], (w, None)
    else:
        ws = (gpu.weight(host, name, (n_ff, n_in), rng)[0], gpu.weight(host, name, (n_ff, n_in), rng)[0])
        gate, up = _gemv(gpu, per_row, x, ws[0], None), _gemv(gpu, per_row, x, ws[1], None)
    act = ActivationKernels(gpu.dev, gpu.compiler, gpu.launcher)
    want = gpu.empty((T, n_ff))
    act.swiglu(gpu.put(np.ascontiguousarray(gate)), gpu.put(np.ascontiguousarray(up)), want)
    xa = per_row.quantize(gpu.put(x), gpu.arena)
    assert per_row.gates(xa, *ws)
    out = gpu.empty((T, n_ff))
    per_row.gated(xa, *ws, out)
    assert np.array_equal(gpu.get(out), gpu.get(want))
    alone = gpu.empty((1, n_ff))
    per_row.gated(xa.rows(2, 3), *ws, alone)
    assert np.array_equal(gpu.get(alone)[0], gpu.get(out)[2])
    gpu.arena.reset()


def test_gated_refuses_what_it_cannot_take(gpu, per_row, rng, host):
    xa = per_row.quantize(gpu.put(rng.standard_normal((2, 256)).astype(np.float32)), gpu.arena)
    q5, _ = gpu.weight(host, "Q5_0", (24, 256), rng)
    q8, _ = gpu.weight(host, "Q8_0", (24, 256), rng)
    f16, _ = gpu.weight(host, "F16", (24, 256), rng)
    assert not per_row.gates(xa, q5, q8) and not per_row.gates(xa, f16, f16)
    with pytest.raises(ValueError, match="gated"):
        per_row.gated(xa, q5, q8, gpu.empty((2, 24)))
    many = per_row.quantize(gpu.put(rng.standard_normal((33, 256)).astype(np.float32)), gpu.arena)
    assert not per_row.gates(many, q5, q5)   # more rows than one launch takes (16 dp4a, 32 mma)
    assert per_row.gates(many.rows(0, per_row.gated_rows(many, q5)), q5, q5)
    gpu.arena.reset()
