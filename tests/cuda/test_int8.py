"""The int8-activation GEMVs (dp4a) on a real device (marker ``cuda``).

quantize_q8 against quantize_q8_ref bit for bit; every integer format's GEMV,
per-pair expert GEMV and grouped expert matmul against a float64 reference on
the same int8 activations (so the only difference left is fp32 summation
order); bitwise repeatability.
"""

from __future__ import annotations

import numpy as np
import pytest
from gpu_rig import q8_ref, rel, sized

from orcd.ops import moe
from orcd.ops.matmul import quantize_q8_ref
from orcd.ops.matmul_base import MOE_TILE, Q8Act

pytestmark = [pytest.mark.cuda, pytest.mark.sim]

INT8_NAMES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4"]
SHAPES = sized([(896, 896), (4864, 896), (896, 4864), (2880, 2880)],   # Qwen's projections, GPT-OSS's experts
               [(96, 512), (160, 768)])
TOL = 1e-5


@pytest.fixture(autouse=True)
def _free_after_each_test(scope):
    yield


@pytest.fixture(scope="module")
def mk8(gpu):
    from orcd.ops.matmul import MatmulKernels

    return MatmulKernels(gpu.dev, gpu.compiler, gpu.launcher, int8="all")


def test_auto_takes_int8_only_where_it_pays(gpu, rng, host):
    from orcd.ops.matmul import MatmulKernels

    auto = MatmulKernels(gpu.dev, gpu.compiler, gpu.launcher)          # int8="auto", the default
    big_q4k, _ = gpu.weight(host, "Q4_K", (6144, 3072), rng)            # 18.9M values
    small_q4k, _ = gpu.weight(host, "Q4_K", (1024, 3072), rng)
    big_f16, _ = gpu.weight(host, "F16", (6144, 3072), rng)
    assert auto.use_int8(big_q4k) and not auto.use_int8(small_q4k) and not auto.use_int8(big_f16)
    assert auto.use_int8(small_q4k, small_q4k, small_q4k, small_q4k, small_q4k, small_q4k)  # one input, 18.9M
    assert not auto.use_int8(big_q4k, big_f16)                          # all weights of the input must take it
    with pytest.raises(ValueError, match="int8 must be one of"):
        MatmulKernels(gpu.dev, gpu.compiler, gpu.launcher, int8=True)


@pytest.mark.parametrize("T,n", [(1, 896), (3, 4864), (8, 2880), (64, 3072)])
def test_quantize_matches_reference_bitwise(gpu, mk8, rng, T, n):
    x = (rng.standard_normal((T, n)) * rng.uniform(0.01, 100)).astype(np.float32)
    x[0, :32] = 0.0                                       # a zero group: scale 0, values 0
    x[-1, -32:] = rng.standard_normal(32).astype(np.float32) * 1e-30  # tiny, but not zero
    got = mk8.quantize(gpu.put(x), gpu.arena)
    q, d = quantize_q8_ref(x)
    assert np.array_equal(gpu.get(got.xq), q)
    assert np.array_equal(gpu.get(got.xd), d)
    gpu.arena.reset()


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0", "Q4_K", "Q6_K", "MXFP4"])
def test_int8_gemvs_over_rows_of_many_pieces_a_lane(gpu, mk8, rng, host, name):
    # 8192 values a row: 256 pieces, so every lane of the GEMV loops (a warp's 32 pieces,
    # or 32 x split with a row split between warps) steps through several blocks -- the
    # other shapes on the simulator give each lane one piece at most. (The gated kernel
    # of two rows a warp takes rows of at most 32 pieces: one a lane, by design.)
    from orcd.ops.activation import swiglu_ref

    n_out, n_in = 12, 8192
    (w, w_ref), (wu, wu_ref) = (gpu.weight(host, name, (n_out, n_in), rng) for _ in range(2))
    for T in (1, 3):
        x = rng.standard_normal((T, n_in)).astype(np.float32)
        xr = q8_ref(x)
        out = gpu.empty((T, n_out))
        mk8.linear(gpu.put(x), w, None, out, scratch=gpu.arena)          # gemv_rows
        assert rel(gpu.get(out), xr @ w_ref.T) < TOL
        xa = mk8.quantize(gpu.put(x), gpu.arena)
        mk8.gated(xa, w, wu, out)                                         # gemv_rows, gate and up
        assert rel(gpu.get(out), swiglu_ref(xr @ w_ref.T, xr @ wu_ref.T)) < 1e-4
        gpu.arena.reset()
    xa = mk8.quantize(gpu.put(x[:1]), gpu.arena)
    out = gpu.empty((1, n_out))
    gpu.fused.linear_multi(xa, [w], [None], [out])                        # the single token's GEMV
    assert rel(gpu.get(out), xr[:1] @ w_ref.T) < TOL
    gpu.fused.linear_multi(gpu.put(x[:1]), [w], [None], [out])            # ... on fp32 activations
    assert rel(gpu.get(out), x[:1].astype(np.float64) @ w_ref.T) < TOL
    gpu.fused.gated_linear(xa, w, wu, out)                                # and its gated one
    assert rel(gpu.get(out), swiglu_ref(xr[:1] @ w_ref.T, xr[:1] @ wu_ref.T)) < 1e-4
    gpu.arena.reset()

@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K", "MXFP4"])
def test_the_batched_load_experiment_gives_the_default_bits(gpu, mk8, rng, host, name):
    # ORCD_GEMV_BATCH (bench_gemv.py --variant): K pieces a lane loaded before any is
    # dotted; a batch past the row's end re-reads a block and adds +0, so the same sums.
    # Rows of 8192 and 2304 values: several pieces a lane, and batches cut short.
    from orcd.ops.matmul import MatmulKernels

    batched = MatmulKernels(gpu.dev, gpu.compiler, gpu.launcher, int8="all",
                            defines={"ORCD_GEMV_BATCH": "4"})
    for n_in in (8192, 2304):
        (w, _), (wu, _) = (gpu.weight(host, name, (12, n_in), rng) for _ in range(2))
        for T in (1, 3):
            xa = mk8.quantize(gpu.put(rng.standard_normal((T, n_in)).astype(np.float32)), gpu.arena)
            res = gpu.put(rng.standard_normal((T, 12)).astype(np.float32))
            outs = []
            for mk in (mk8, batched):
                out, gated = gpu.empty((T, 12)), gpu.empty((T, 12))
                mk.gemv(xa, w, None, out, residual=res)    # gemv_rows, NW = 1, with the residual
                mk.gated(xa, w, wu, gated)                 # NW = 2
                outs.append((gpu.get(out), gpu.get(gated)))
            for a, b in zip(*outs):
                assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
            gpu.arena.reset()


@pytest.mark.parametrize("name", INT8_NAMES)
@pytest.mark.parametrize("n_out,n_in", SHAPES)
@pytest.mark.parametrize("T", [1, 3, 8])
def test_int8_gemv_matches_reference(gpu, mk8, rng, host, name, n_out, n_in, T):
    if name.endswith("_K") and n_in % 256:
        pytest.skip("K-quants need rows of 256k values")
    w, w_ref = gpu.weight(host, name, (n_out, n_in), rng)
    x = rng.standard_normal((T, n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    out = gpu.empty((T, n_out))
    mk8.linear(gpu.put(x), w, gpu.put(b), out, scratch=gpu.arena)
    got = gpu.get(out)
    ref = q8_ref(x) @ w_ref.T + b
    assert rel(got, ref) < TOL
    for t in range(T):
        assert rel(got[t], ref[t]) < TOL
    gpu.arena.reset()
    mk8.linear(gpu.put(x), w, gpu.put(b), out, scratch=gpu.arena)
    assert np.array_equal(gpu.get(out), got)                # same inputs, same bits
    gpu.arena.reset()


def test_int8_off_or_float_weight_keeps_fp32_activations(gpu, mk8, rng, host):
    from orcd.ops.matmul import MatmulKernels

    w16, w16_ref = gpu.weight(host, "F16", (256, 896), rng)
    x = rng.standard_normal((1, 896)).astype(np.float32)
    assert mk8.activations(gpu.put(x), w16, gpu.arena).dtype == np.float32
    out = gpu.empty((1, 256))
    mk8.linear(gpu.put(x), w16, None, out, scratch=gpu.arena)
    assert rel(gpu.get(out), x.astype(np.float64) @ w16_ref.T) < TOL
    w4, w4_ref = gpu.weight(host, "Q4_K", (256, 1024), rng)
    x4 = rng.standard_normal((1, 1024)).astype(np.float32)
    plain = MatmulKernels(gpu.dev, gpu.compiler, gpu.launcher, int8="off")
    out4 = gpu.empty((1, 256))
    plain.linear(gpu.put(x4), w4, None, out4, scratch=gpu.arena)
    assert rel(gpu.get(out4), x4.astype(np.float64) @ w4_ref.T) < TOL  # unrounded x
    with pytest.raises(ValueError, match="int8 activations given"):
        mk8.linear(mk8.quantize(gpu.put(x), gpu.arena), w16, None, out)
    gpu.arena.reset()


@pytest.mark.parametrize("name,n_out,n_in", [sized(("MXFP4", 2880, 2880), ("MXFP4", 96, 512)), ("Q4_K", 512, 1024),
                                             ("Q8_0", 640, 896)])
@pytest.mark.parametrize("per_slot", [False, True])
def test_int8_moe_linear_matches_reference(gpu, mk8, rng, host, name, n_out, n_in, per_slot):
    n_expert, T, k = 32, 3, 4
    w, w_ref = gpu.weight(host, name, (n_expert, n_out, n_in), rng)
    b = rng.standard_normal((n_expert, n_out)).astype(np.float32)
    ids = np.stack([rng.choice(n_expert, k, replace=False) for _ in range(T)]).astype(np.int32)
    x = rng.standard_normal((T * k if per_slot else T, n_in)).astype(np.float32)
    out = gpu.empty((T, k, n_out))
    mk8.moe_linear(gpu.put(x), w, gpu.put(b), gpu.put(ids), out, gpu.arena)
    got, xr = gpu.get(out), q8_ref(x)
    for t in range(T):
        for s in range(k):
            ref = w_ref[ids[t, s]] @ xr[t * k + s if per_slot else t] + b[ids[t, s]]
            assert rel(got[t, s], ref) < TOL
    gpu.arena.reset()


@pytest.mark.parametrize("T", sized([5, 200], [5, 40]))
def test_int8_moe_gemm_matches_reference(gpu, mk8, rng, host, T):
    n_expert, k, n_out, n_in = sized((32, 4, 576, 2880), (32, 4, 96, 512))
    w, w_ref = gpu.weight(host, "MXFP4", (n_expert, n_out, n_in), rng)
    ids = np.stack([rng.choice(n_expert, k, replace=False) for _ in range(T)]).astype(np.int32)
    order, _, counts = moe.group_ref(ids, n_expert)
    n_tiles = moe.max_tiles(T * k, n_expert, MOE_TILE)
    xg = rng.standard_normal((T * k, n_in)).astype(np.float32)
    out = gpu.empty((T * k, n_out))
    xa = mk8.quantize(gpu.put(xg), gpu.arena)
    assert isinstance(xa, Q8Act)
    mk8.moe_gemm(xa, w, None, gpu.put(moe.tiles_ref(counts, MOE_TILE, n_tiles)), out)
    e_of = ids.reshape(-1)[order]
    ref = np.einsum("noi,ni->no", w_ref[e_of], q8_ref(xg))
    assert rel(gpu.get(out), ref) < TOL
    gpu.arena.reset()


def test_rms_norm_q8_matches_reference(gpu, mk8, rng):
    from orcd.ops.norm import rms_norm_ref

    x = rng.standard_normal((3, 3072)).astype(np.float32)
    g = rng.uniform(0.5, 1.5, 3072).astype(np.float32)
    xa = Q8Act(gpu.empty((3, 3072), np.int8), gpu.empty((3, 96)))
    gpu.fused.rms_norm_q8(gpu.put(x), gpu.put(g), 1e-5, xa)
    q, d = quantize_q8_ref(rms_norm_ref(x, g, 1e-5))
    got_q = gpu.get(xa.xq).astype(np.int32)
    # the block's sum of squares runs in another order than numpy's: a value on a
    # rounding boundary may land one step away, nothing more
    assert np.abs(got_q - q).max() <= 1 and (got_q != q).mean() < 1e-3
    assert np.allclose(gpu.get(xa.xd), d, rtol=1e-6)


@pytest.mark.parametrize("name,n_ff,n_in,fused_halves", sized(
    [("Q5_0", 4864, 896, False), ("Q8_0", 4863, 896, False), ("Q4_K", 8192, 768, True), ("Q4_0", 3000, 1024, False)],
    [("Q5_0", 1213, 896, False), ("Q4_K", 520, 768, True)]))
def test_int8_gated_rows_per_warp_is_the_warp_per_row_kernel(gpu, mk8, rng, host, name, n_ff, n_in, fused_halves):
    # rows of at most 32 pieces: gemv_gated_q8 (two output rows per warp, gate and up each)
    # gives gemv_fused_q8's bits, an odd n_ff included (a warp's second row past the end)
    from orcd.ops.matmul_base import row_pieces

    wg, _ = gpu.weight(host, name, (2 * n_ff if fused_halves else n_ff, n_in), rng)
    assert row_pieces(wg) <= 32
    wu = None if fused_halves else gpu.weight(host, name, (n_ff, n_in), rng)[0]
    xa = mk8.quantize(gpu.put(rng.standard_normal((1, n_in)).astype(np.float32)), gpu.arena)
    outs = []
    for rows in (True, False):
        gpu.fused.gated_rows = rows
        try:
            outs.append(gpu.empty((1, n_ff)))
            gpu.fused.gated_linear(xa, wg, wu, outs[-1])
        finally:
            gpu.fused.gated_rows = True
    got, want = gpu.get(outs[0]), gpu.get(outs[1])
    assert not np.isnan(want).any()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    gpu.arena.reset()


def fused_case(gpu, host, rng, names, n_in, n_outs):
    ws = [gpu.weight(host, name, (n, n_in), rng) for name, n in zip(names, n_outs)]
    x = rng.standard_normal((1, n_in)).astype(np.float32)
    return ws, x


@pytest.mark.parametrize("names,n_in,n_outs", [(("Q5_0", "Q5_0", "Q8_0"), 896, (896, 128, 128)),
                                               (("Q4_K",), 3072, sized((9216,), (512,))),
                                               (("MXFP4", "MXFP4", "MXFP4"), 2880, sized((4096, 512, 512), (256, 64, 64)))])
def test_int8_fused_linear_multi(gpu, mk8, rng, host, names, n_in, n_outs):
    ws, x = fused_case(gpu, host, rng, names, n_in, n_outs)
    bs = [rng.standard_normal(n).astype(np.float32) for n in n_outs]
    xa = mk8.quantize(gpu.put(x), gpu.arena)
    outs = [gpu.empty((1, n)) for n in n_outs]
    gpu.fused.linear_multi(xa, [w for w, _ in ws], [gpu.put(b) for b in bs], outs)
    xr = q8_ref(x)
    for (_, w_ref), b, out in zip(ws, bs, outs):
        assert rel(gpu.get(out), xr @ w_ref.T + b) < TOL
    gpu.arena.reset()


@pytest.mark.parametrize("name,n_ff,n_in,fused_halves", sized([("Q4_K", 8192, 3072, True), ("Q5_0", 4864, 896, False)],
                                                              [("Q4_K", 512, 768, True), ("Q5_0", 320, 896, False)]))
def test_int8_fused_gated_and_add(gpu, mk8, rng, host, name, n_ff, n_in, fused_halves):
    from orcd.ops.activation import swiglu_ref

    rows = 2 * n_ff if fused_halves else n_ff
    wg, wg_ref = gpu.weight(host, name, (rows, n_in), rng)
    x = rng.standard_normal((1, n_in)).astype(np.float32)
    wu, wu_ref = (None, None) if fused_halves else gpu.weight(host, name, (n_ff, n_in), rng)
    xa = mk8.quantize(gpu.put(x), gpu.arena)
    out = gpu.empty((1, n_ff))
    gpu.fused.gated_linear(xa, wg, wu, out)
    xr = q8_ref(x)
    gate, up = (np.split(xr @ wg_ref.T, 2, axis=1) if fused_halves else (xr @ wg_ref.T, xr @ wu_ref.T))
    h = gpu.get(out)
    assert rel(h, swiglu_ref(gate, up)) < 1e-4
    wd, wd_ref = gpu.weight(host, "Q6_K" if n_ff % 256 == 0 else name, (n_in, n_ff), rng)
    res = rng.standard_normal((1, n_in)).astype(np.float32)
    ha = mk8.quantize(gpu.put(h), gpu.arena)
    out2 = gpu.empty((1, n_in))
    gpu.fused.linear_add(ha, wd, gpu.put(res), None, out2)
    assert rel(gpu.get(out2), res + q8_ref(h) @ wd_ref.T) < TOL
    gpu.arena.reset()


@pytest.mark.parametrize("normed", [False, True])
@pytest.mark.parametrize("name,n_out,n_in", [("Q5_0", 896, 896), ("Q6_K", 896, 4864), ("Q4_K", 512, 3072)])
def test_int8_gemvs_quantizing_their_own_input_give_the_launched_bits(gpu, mk8, rng, host, name, n_out, n_in,
                                                                       normed):
    # ToQ8: each block quantizes x (normed first when asked) into shared memory; the
    # bits of quantize_q8 / rms_norm_q8 then the Q8Act kernel: linear_add (a decode's o
    # and down projections), linear_multi (q/k/v) and both gated kernels
    from orcd.ops.fused import ToQ8
    from orcd.ops.matmul_base import Q8Act

    w, _ = gpu.weight(host, name, (n_out, n_in), rng)
    x = gpu.put(rng.standard_normal((1, n_in)).astype(np.float32) * 3)
    norm = (gpu.put(rng.standard_normal(n_in).astype(np.float32)), 1e-6) if normed else None
    if normed:
        xa = Q8Act.empty(gpu.arena, 1, n_in)
        gpu.fused.rms_norm_q8(x, norm[0], norm[1], xa)
    else:
        xa = mk8.quantize(x, gpu.arena)
    res = gpu.put(rng.standard_normal((1, n_out)).astype(np.float32))

    def both(call, n):
        got, want = gpu.empty((1, n)), gpu.empty((1, n))
        call(ToQ8(x, norm), got)
        call(xa, want)
        assert np.isfinite(gpu.get(want)).all()
        assert gpu.get(got).tobytes() == gpu.get(want).tobytes()

    both(lambda a, out: gpu.fused.linear_add(a, w, res, None, out), n_out)
    both(lambda a, out: gpu.fused.linear_multi(a, [w], [None], [out]), n_out)
    for rows in (True, False):      # two rows a warp (gemv_gated_q8), a warp a row (gemv_fused_q8)
        gpu.fused.gated_rows = rows
        try:
            both(lambda a, out: gpu.fused.gated_linear(a, w, None, out), n_out // 2)
        finally:
            gpu.fused.gated_rows = True
    gpu.arena.reset()
