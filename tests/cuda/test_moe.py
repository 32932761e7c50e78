"""Mixtures of experts on a real device (marker ``cuda``; ``sim``: also on the simulator).

The grouping kernel against group_ref / tiles_ref exactly (poisoned outputs,
skewed and uniform routings), the grouped expert matmul against a float64
per-pair reference for several formats, the whole grouped MoE op against
both the per-pair decode path (same device, same routing) and moe_ref, and the
three-kernel decode MoE block (norm + router + top-k, gate/up/SwiGLU, down +
weighted sum + residual) against a float64 reference on the same int8 roundings.
"""

from __future__ import annotations


import numpy as np
import pytest
from gpu_rig import rel, sized

from orcd.ops import activation as activation_ref
from orcd.ops import moe
from orcd.ops.matmul_base import MOE_TC_TILE, MOE_TILE
from orcd.ops.norm import rms_norm_ref

pytestmark = [pytest.mark.cuda, pytest.mark.sim]

GEMV_TOL = 1e-5
ALPHA, LIMIT = 1.702, 7.0   # GPT-OSS's clamped SwiGLU (its plugin passes them to the ops)


@pytest.fixture(autouse=True)
def _free_after_each_test(scope):
    yield


def routing(rng, T: int, k: int, n_expert: int, skew: bool = False) -> np.ndarray:
    """[T, k] distinct experts per token; ``skew`` sends most tokens to experts 0..k-1."""
    rows = []
    for _ in range(T):
        if skew and rng.random() < 0.8:
            rows.append(rng.permutation(k))
        else:
            rows.append(rng.choice(n_expert, k, replace=False))
    return np.stack(rows).astype(np.int32)


@pytest.mark.parametrize("T,k,n_expert,skew", [(1, 4, 32, False), (5, 4, 32, False),
                                               (512, 4, 32, False), (512, 4, 32, True),
                                               (33, 2, 3, False), (2000, 4, 32, True)])
def test_group_matches_reference(gpu, rng, T, k, n_expert, skew):
    ids = routing(rng, T, k, n_expert, skew)
    N = T * k
    n_tiles = moe.max_tiles(N, n_expert, MOE_TILE)
    order, slot_of = gpu.empty((N,), np.int32), gpu.empty((N,), np.int32)
    tiles = gpu.empty((n_tiles, 3), np.int32)
    gpu.moe.group(gpu.put(ids), n_expert, MOE_TILE, order, slot_of, tiles)
    ref_order, ref_slot_of, counts = moe.group_ref(ids, n_expert)
    assert np.array_equal(gpu.get(order), ref_order)
    assert np.array_equal(gpu.get(slot_of), ref_slot_of)
    assert np.array_equal(gpu.get(tiles), moe.tiles_ref(counts, MOE_TILE, n_tiles))


def test_group_marks_bad_ids_and_weighted_sum_gives_nan(gpu, rng):
    ids = np.array([[0, 5], [3, -1]], np.int32)
    order, slot_of = gpu.empty((4,), np.int32), gpu.empty((4,), np.int32)
    tiles = gpu.empty((moe.max_tiles(4, 4, MOE_TILE), 3), np.int32)
    gpu.moe.group(gpu.put(ids), 4, MOE_TILE, order, slot_of, tiles)
    assert gpu.get(slot_of).tolist() == [0, -1, 1, -1]
    y = rng.standard_normal((4, 8)).astype(np.float32)   # rows in grouped order
    out = gpu.empty((2, 8))
    gpu.moe.weighted_sum(gpu.put(y).view(2, 2, 8), gpu.put(np.full((2, 2), 0.5, np.float32)), out,
                         slot_of)
    assert np.isnan(gpu.get(out)).all()                  # each token has one bad pair


def _half(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float64)


#: the grouped expert matmuls: (method, pairs per tile, the rounding of x and w it sums, bound)
GROUPED = {"tiles": ("moe_gemm", MOE_TILE, lambda a: a.astype(np.float64), GEMV_TOL),
           "tc": ("moe_gemm_tc", MOE_TC_TILE, _half, 1e-4)}   # tensor cores: fp16 operands


def per_expert_ref(w: np.ndarray, x: np.ndarray, bias: np.ndarray, e_of: np.ndarray) -> np.ndarray:
    """Row i = x[i] @ w[e_of[i]].T + bias[e_of[i]], one matmul per expert: gathering
    w per row instead would hold T*k copies of an expert (186 GB at GPT-OSS's shape)."""
    ref = np.empty((len(e_of), w.shape[1]))
    for e in np.unique(e_of):
        rows = e_of == e
        ref[rows] = x[rows] @ w[e].T + bias[e]
    return ref


@pytest.mark.parametrize("kernel,name,n_out,n_in", [
    *[("tiles", *c) for c in [*sized([("MXFP4", 2880, 2880)], []), ("MXFP4", 576, 2880),
                              ("Q8_0", 640, 896), ("Q4_K", 512, 1024), ("F16", 256, 896)]],
    *[("tc", *c) for c in [*sized([("MXFP4", 2880, 2880), ("Q6_K", 640, 1024)], []), ("MXFP4", 72, 96),
                           ("Q4_K", 80, 512), ("Q8_0", 64, 64), ("F32", 24, 64)]]])
@pytest.mark.parametrize("T", sized([3, 100, 700], [3, 40]))
def test_grouped_expert_matmul_matches_per_pair_reference(gpu, rng, host, kernel, name, n_out, n_in, T):
    """Each tile's rows against a float64 per-pair reference on the roundings the
    kernel makes: several tiles for one expert, row counts that end mid-tile (and,
    on the tensor cores, mid-warp), output rows that end mid-block; bitwise repeatable."""
    method, tile, rounded, tol = GROUPED[kernel]
    n_expert, k = (32, 4) if name == "MXFP4" else (8, 2)
    w, w_ref = gpu.weight(host, name, (n_expert, n_out, n_in), rng)
    bias = rng.standard_normal((n_expert, n_out)).astype(np.float32)
    ids = routing(rng, T, k, n_expert, skew=True)
    order, _, counts = moe.group_ref(ids, n_expert)
    xg = rng.standard_normal((T, n_in)).astype(np.float32)[order // k]   # grouped, as moe_gather makes them
    out = gpu.empty((T * k, n_out))
    tiles = gpu.put(moe.tiles_ref(counts, tile, moe.max_tiles(T * k, n_expert, tile)))
    getattr(gpu.mm, method)(gpu.put(xg), w, gpu.put(bias), tiles, out)
    got = gpu.get(out)
    e_of = ids.reshape(-1)[order]
    ref = per_expert_ref(rounded(w_ref), rounded(xg), bias, e_of)
    assert rel(got, ref) < tol
    for i in range(0, T * k, max(1, T * k // 16)):        # row by row: a wrong expert shows here
        assert rel(got[i], ref[i]) < tol
    getattr(gpu.mm, method)(gpu.put(xg), w, gpu.put(bias), tiles, out)
    assert np.array_equal(gpu.get(out), got)               # deterministic


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from orcd.backends.cuda.backend import CudaBackend

    b = CudaBackend(kernel_cache=tmp_path_factory.mktemp("kcache"))
    b._grow_scratch(64 << 20)   # the largest case's activations, both paths
    yield b
    b.close()


def gpt_oss_experts(backend, host, rng, n_expert, n_ff, D):
    """Experts with MXFP4 matrices and f32 router/biases: (on the device, dequantized on the host)."""
    from orcd.backends.cuda.memory import from_host
    from orcd.backends.cuda.tensor import DeviceTensor, QWeight

    def put(arr):
        buf = backend.alloc.alloc(max(arr.nbytes, 1), "test")
        from_host(backend.device, np.ascontiguousarray(arr), buf.ptr)
        return buf.ptr

    def dense(*shape, scale=1.0):
        a = (rng.standard_normal(shape) * scale).astype(np.float32)
        return DeviceTensor(put(a), shape, np.dtype(np.float32)), a

    def mxfp4(shape):
        fmt = host.formats[39]
        raw = fmt.random_blocks(int(np.prod(shape)) // fmt.block_elems, rng, 0.05)
        return QWeight(put(fmt.to_vram(raw, shape[-1])), shape, 39, fmt), \
            fmt.dequantize_tensor(raw, shape).astype(np.float32)

    f32 = host.formats[0]                                        # the router is an F32 tensor in the file
    router = (rng.standard_normal((n_expert, D)) * 0.5).astype(np.float32)  # spread logits: no near-ties
    rw, rb = (QWeight(put(router), (n_expert, D), 0, f32), router), dense(n_expert)
    parts = [rw, rb, mxfp4((n_expert, n_ff, D)), dense(n_expert, n_ff), mxfp4((n_expert, n_ff, D)),
             dense(n_expert, n_ff), mxfp4((n_expert, D, n_ff)), dense(n_expert, D)]
    return moe.Experts(*(p[0] for p in parts)), moe.Experts(*(p[1] for p in parts))


@pytest.mark.gpu_only   # the whole CudaBackend
@pytest.mark.parametrize("T,tc", [(2, False), (8, False), (9, False), (300, False), (9, True), (300, True)])
def test_grouped_moe_matches_per_pair_and_reference(backend, host, T, tc):
    """tc: the grouped experts on the tensor cores (fp16 operands: a looser bound)."""
    rng = np.random.default_rng()
    default, backend.moe_tc = backend.moe_tc, tc
    n_expert, k, n_ff, D = 32, 4, 256, 512
    ex, ex_ref = gpt_oss_experts(backend, host, rng, n_expert, n_ff, D)
    x_host = rng.standard_normal((T, D)).astype(np.float32)
    ops = backend.ops
    backend.scratch.reset()
    x = ops._empty((T, D))
    from orcd.backends.cuda.memory import from_host
    from_host(backend.device, x_host, x.ptr)
    try:
        grouped = backend.to_host(ops.moe(x, ex, k, ALPHA, LIMIT))
    finally:
        backend.moe_tc = default
    # the decode path on the same routing: one GEMV per pair, summed in pair order
    logits = ops.linear(x, ex.router_w, ex.router_b)
    ids, weights = ops._empty((T, k), np.int32), ops._empty((T, k))
    backend.moe_k.route(logits, k, ids, weights)
    out = ops._empty((T, D))
    backend.moe_k.weighted_sum(ops._experts_per_pair(x, ex, ids, ALPHA, LIMIT), weights, out)
    per_pair = backend.to_host(out)
    assert rel(grouped, per_pair.astype(np.float64)) < (2e-3 if tc else GEMV_TOL)
    if T <= 8 and not tc:  # the router is a GEMV in fp32; beyond 8 tokens an fp16 GEMM (near-ties may flip)
        assert rel(grouped, moe.moe_ref(x_host, ex_ref, k, ALPHA, LIMIT).astype(np.float64)) < 1e-4


# -- one decode token's MoE block in three kernels (ops.moe_add on the GPU) ---------------

def _q8_linear(x, w, b=None):
    """x @ w.T (+ b) on x as the int8 GEMVs see it (quantize_q8_ref), float64."""
    from orcd.ops.matmul import quantize_q8_ref

    q, d = quantize_q8_ref(x)
    xr = (q.reshape(*x.shape[:-1], -1, 32) * d[..., None]).reshape(x.shape).astype(np.float64)
    return xr @ w.T.astype(np.float64) + (0 if b is None else b)


# on the simulator, rows of 1280 values: 40 pieces (Q4_K: 5 blocks of 8), more than a
# warp's 32 lanes, so the expert GEMVs' lanes step through a second block
@pytest.mark.parametrize("name", ["MXFP4", "Q4_0", "Q8_0", *sized([], ["Q4_K"])])
def test_fused_decode_moe_matches_the_reference(gpu, rng, host, name):
    from orcd.backends.cuda.tensor import QWeight
    from orcd.ops.matmul import MatmulKernels, quantize_q8_ref
    from orcd.ops.matmul_base import Q8Act

    mk8 = MatmulKernels(gpu.dev, gpu.compiler, gpu.launcher, int8="all")
    E, D, n_ff, k, eps = sized((32, 2880, 2880, 4, 1e-5), (8, 1280, 1280, 4, 1e-5))
    router = (rng.standard_normal((E, D)) * 0.5).astype(np.float32)      # spread logits: no near-ties
    rw = QWeight(gpu.put(router).ptr, (E, D), 0, host.formats[0])
    gw, uw, dw = (gpu.weight(host, name, s, rng) for s in ((E, n_ff, D), (E, n_ff, D), (E, D, n_ff)))
    rb, gb, ub, db = (rng.standard_normal(s).astype(np.float32) for s in ((E,), (E, n_ff), (E, n_ff), (E, D)))
    ex = moe.Experts(rw, gpu.put(rb), gw[0], gpu.put(gb), uw[0], gpu.put(ub), dw[0], gpu.put(db))
    x = (rng.standard_normal((1, D)) * 2).astype(np.float32)
    g = rng.standard_normal(D).astype(np.float32)
    xd = gpu.put(x)
    ids, weights = gpu.empty((1, k), np.int32), gpu.empty((1, k))
    xa = Q8Act(gpu.empty((1, D), np.int8), gpu.empty((1, D // 32)))
    gpu.moe.norm_route_q8(xd, gpu.put(g), eps, rw, ex.router_b, ids, weights, xa)
    h_ref = rms_norm_ref(x, g, eps)
    want_ids, want_w = moe.route_ref(h_ref @ router.T + rb, k)
    np.testing.assert_array_equal(gpu.get(ids), want_ids)
    np.testing.assert_allclose(gpu.get(weights), want_w, rtol=1e-4, atol=1e-6)
    q, d = quantize_q8_ref(h_ref)
    assert np.mean(gpu.get(xa.xq) == q) > 0.999 and rel(gpu.get(xa.xd), d) < 1e-5   # ulps of the norm
    h = Q8Act(gpu.empty((k, n_ff), np.int8), gpu.empty((k, n_ff // 32)))
    mk8.moe_gate_up_q8(xa, ex, ids, ALPHA, LIMIT, h)
    out = gpu.empty((1, D))
    mk8.moe_down_sum_q8(h, ex.down_w, ex.down_b, ids, weights, xd, out)
    # the reference on the same int8 roundings (x and h quantized per 32), in float64
    e_ids = gpu.get(ids)[0]
    xq = (gpu.get(xa.xq).astype(np.float64).reshape(1, -1, 32) * gpu.get(xa.xd)[..., None]).reshape(1, D)
    y = np.zeros(D)
    for s, e in enumerate(e_ids):
        gate = xq @ gw[1][e].T + gb[e]
        up = xq @ uw[1][e].T + ub[e]
        hh = activation_ref.swiglu_oai_ref(gate.astype(np.float32), up.astype(np.float32), ALPHA, LIMIT)
        y += gpu.get(weights)[0, s] * (_q8_linear(hh, dw[1][e]) + db[e])[0]
    assert rel(gpu.get(out)[0] - x[0], y) < 1e-4
    bad = gpu.put(np.array([[0, E, 1, 2]], np.int32))   # an id outside the table gives NaN
    mk8.moe_gate_up_q8(xa, ex, bad, ALPHA, LIMIT, h)
    mk8.moe_down_sum_q8(h, ex.down_w, ex.down_b, bad, weights, xd, out)
    assert np.isnan(gpu.get(out)).all()


def test_decode_router_takes_ties_to_the_lower_id(gpu, rng, host):
    """moe_norm_route_q8's warp top-k (a butterfly over (logit, id) pairs) chooses what
    route_ref's stable sort does when router rows tie, launch after launch; a router of
    more experts than the warp's top-k takes is refused."""
    from orcd.backends.cuda.tensor import QWeight
    from orcd.ops.matmul_base import Q8Act

    E, D, k, eps = sized((32, 2880, 4, 1e-5), (12, 1280, 3, 1e-5))
    router = (rng.standard_normal((E, D)) * 0.5).astype(np.float32)
    rb = rng.standard_normal(E).astype(np.float32)
    # ties: experts 3 and 9, then 1 and E-1, have the same row and a bias far above every
    # other logit, so each launch chooses 3, 9, 1 first: the lower id of a tie first
    for lo, hi, bias in ((3, 9, 1000.0), (1, E - 1, 500.0)):
        router[lo], rb[lo], rb[hi] = router[hi], bias, bias
    rw = QWeight(gpu.put(router).ptr, (E, D), 0, host.formats[0])
    g_host = rng.standard_normal(D).astype(np.float32)
    g, b = gpu.put(g_host), gpu.put(rb)
    xa = Q8Act(gpu.empty((1, D), np.int8), gpu.empty((1, D // 32)))
    for _ in range(3):
        x_host = (rng.standard_normal((1, D)) * 2).astype(np.float32)
        ids, w = gpu.empty((1, k), np.int32), gpu.empty((1, k))
        gpu.moe.norm_route_q8(gpu.put(x_host), g, eps, rw, b, ids, w, xa)
        want, want_w = moe.route_ref(rms_norm_ref(x_host, g_host, eps) @ router.T + rb, k)
        np.testing.assert_array_equal(gpu.get(ids), want)
        np.testing.assert_array_equal(gpu.get(ids)[0, :3], [3, 9, 1])
        np.testing.assert_allclose(gpu.get(w), want_w, rtol=1e-4, atol=1e-6)
    wide = QWeight(rw.ptr, (1025, D), 0, host.formats[0])
    with pytest.raises(ValueError, match="norm_route"):   # more experts than the warp's top-k takes
        gpu.moe.norm_route_q8(gpu.put(x_host), g, eps, wide, gpu.empty((1025,)), ids, w, xa)
