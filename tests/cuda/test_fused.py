"""The fused decode kernels (orcd.ops.fused, attention's rope_kv_store) against
float64 compositions of the single ops' references (marker ``cuda``).

Fresh random blocks and activations for every check, the real Qwen's shapes
(896 / 4864 / 151936) and its format mix, outputs poisoned with NaN first,
relative error ‖out − ref‖ / ‖ref‖ (fp32 kernels: < 1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest

from gpu_rig import TYPES, randn, rel, sized

from orcd.kvcache import KV_BLOCK, kv_rows
from orcd.ops import attention, rope

pytestmark = [pytest.mark.cuda, pytest.mark.sim]

TOL = 1e-5


@pytest.fixture(autouse=True)
def _free_after_each_test(scope):
    """The rig lives for the session; what each test uploads goes back when it ends."""


def rms64(x, g, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def silu64(x):
    return x / (1 + np.exp(-x))


# -- linear_multi -----------------------------------------------------------------------

QKV_CASES = [  # (formats, n_outs, n_in): Qwen's q/k/v mix, gpt-oss' Q8_0, one of every format
    (("Q5_0", "Q5_0", "Q8_0"), (896, 128, 128), 896),
    (("Q5_0", "Q5_0", "Q5_0"), (896, 128, 128), 896),
    (("Q8_0", "Q8_0", "Q8_0"), (4096, 512, 512), 2880),
    *sized([(("Q8_0",), (151936,), 896)], []),
    *[((name,), (4864,), 896) for name in TYPES if not name.endswith("_K")],
    *[((name,), (896,), 4864) for name in TYPES if name not in ("F32",)],
]


@pytest.mark.parametrize("names,n_outs,n_in", QKV_CASES,
                         ids=[f"{'-'.join(c[0])}-{c[2]}x{'+'.join(map(str, c[1]))}" for c in QKV_CASES])
def test_linear_multi(gpu, host, rng, names, n_outs, n_in):
    x, g = randn(rng, 1, n_in, scale=2), randn(rng, n_in)
    ws = [gpu.weight(host, n, (o, n_in), rng) for n, o in zip(names, n_outs)]
    bs = [randn(rng, o) for o in n_outs]
    for norm, with_bias in ((None, True), ((g, 1e-6), False)):
        outs = [gpu.empty((1, o)) for o in n_outs]
        dnorm = None if norm is None else (gpu.put(g), 1e-6)
        gpu.fused.linear_multi(gpu.put(x), [w for w, _ in ws],
                               [gpu.put(b) if with_bias else None for b in bs], outs, dnorm)
        h = x.astype(np.float64) if norm is None else rms64(x, g, 1e-6)
        for out, (_, w64), b in zip(outs, ws, bs):
            ref = h @ w64.T + (b if with_bias else 0)
            assert rel(gpu.get(out), ref) < TOL


def test_linear_multi_is_deterministic(gpu, host, rng):
    x, g = gpu.put(randn(rng, 1, 896)), gpu.put(randn(rng, 896))
    w, _ = gpu.weight(host, "Q5_0", (4864, 896), rng)
    got = []
    for _ in range(3):
        out = gpu.empty((1, 4864))
        gpu.fused.linear_multi(x, [w], [None], [out], (g, 1e-6))
        got.append(gpu.get(out).tobytes())
    assert got[0] == got[1] == got[2]


# -- gated_linear -------------------------------------------------------------------------

@pytest.mark.parametrize("gate,up,n_ff,n_in", [("Q5_0", "Q5_0", 4864, 896), ("Q4_K", "Q6_K", 512, 1024),
                                               ("MXFP4", "Q8_0", 2880, 2880), ("F16", "BF16", 640, 256)])
def test_gated_linear(gpu, host, rng, gate, up, n_ff, n_in):
    x, g = randn(rng, 1, n_in, scale=2), randn(rng, n_in)
    (wg, g64), (wu, u64) = gpu.weight(host, gate, (n_ff, n_in), rng), gpu.weight(host, up, (n_ff, n_in), rng)
    for norm in (None, (g, 1e-5)):
        out = gpu.empty((1, n_ff))
        gpu.fused.gated_linear(gpu.put(x), wg, wu, out, None if norm is None else (gpu.put(g), 1e-5))
        h = x.astype(np.float64) if norm is None else rms64(x, g, 1e-5)
        assert rel(gpu.get(out), silu64(h @ g64.T) * (h @ u64.T)) < TOL


@pytest.mark.parametrize("name,n_ff,n_in", sized([("Q4_K", 8192, 3072), ("Q4_0", 512, 256)],
                                                 [("Q4_K", 512, 768), ("Q4_0", 512, 256)]))
def test_gated_linear_fused_gate_up_weight(gpu, host, rng, name, n_ff, n_in):
    # Phi-3's ffn_up: rows [0, n_ff) gate, [n_ff, 2 n_ff) up, one tensor
    x, g = randn(rng, 1, n_in), randn(rng, n_in)
    w, w64 = gpu.weight(host, name, (2 * n_ff, n_in), rng)
    out = gpu.empty((1, n_ff))
    gpu.fused.gated_linear(gpu.put(x), w, None, out, (gpu.put(g), 1e-5))
    y = rms64(x, g, 1e-5) @ w64.T
    assert rel(gpu.get(out), silu64(y[:, :n_ff]) * y[:, n_ff:]) < TOL


# -- linear_add ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,n_out,n_in", [("Q5_0", 896, 896), ("Q6_K", 896, 4864), ("Q4_K", 896, 4864),
                                             ("Q8_0", 2880, 4096)])
def test_linear_add(gpu, host, rng, name, n_out, n_in):
    a, res, b = randn(rng, 1, n_in), randn(rng, 1, n_out, scale=3), randn(rng, n_out)
    w, w64 = gpu.weight(host, name, (n_out, n_in), rng)
    for bias in (None, b):
        out = gpu.empty((1, n_out))
        gpu.fused.linear_add(gpu.put(a), w, gpu.put(res), None if bias is None else gpu.put(bias), out)
        ref = res + a.astype(np.float64) @ w64.T + (0 if bias is None else bias)
        assert rel(gpu.get(out), ref) < TOL


# -- rope + KV store ------------------------------------------------------------------------

ROPES = {
    "qwen": (rope.RopeConfig(n_rot=64, head_dim=64, base=1e6, neox=True), 14, 2),
    "partial-longrope": (rope.RopeConfig(n_rot=32, head_dim=96, base=1e4, neox=True, attn_factor=1.19,
                                         freq_factors=tuple(np.linspace(1.0, 8.0, 16).tolist())), 4, 4),
    "normal": (rope.RopeConfig(n_rot=128, head_dim=128, base=1e4, neox=False), 8, 2),
    "yarn": (rope.RopeConfig(n_rot=64, head_dim=64, base=150000.0, neox=True, freq_scale=1 / 32,
                             ext_factor=1.0, n_ctx_orig=4096), 64, 8),
}


@pytest.mark.parametrize("name", list(ROPES))
@pytest.mark.parametrize("T", [1, 7])
def test_rope_kv_store(gpu, rng, name, T):
    cfg, n_head, n_kv = ROPES[name]
    hd, n_ctx = cfg.head_dim, 1024
    cos, sin = rope.RopeTable.host_arrays(cfg, n_ctx)
    table = rope.RopeTable(cfg, n_ctx, gpu.put(cos).ptr, gpu.put(sin).ptr)
    pos = np.sort(rng.choice(n_ctx, T, replace=False)).astype(np.int32)
    q, k, v = randn(rng, T, n_head * hd), randn(rng, T, n_kv * hd), randn(rng, T, n_kv * hd)
    k_cache = rng.standard_normal((n_ctx, n_kv, hd)).astype(np.float16)
    v_cache = rng.standard_normal((n_ctx, n_kv, hd)).astype(np.float16)
    blocks = rng.permutation(n_ctx // KV_BLOCK).astype(np.int32).reshape(1, -1)   # shuffled blocks
    rows = kv_rows(blocks, np.zeros(T, np.int32), pos)
    dk, dv, q_out = gpu.put(k_cache), gpu.put(v_cache), gpu.empty(q.shape)
    gpu.attn.rope_kv_store(gpu.put(q), gpu.put(k), gpu.put(v), dk, dv, gpu.put(pos), table, q_out,
                           gpu.paging(blocks, np.zeros(T, np.int32), n_ctx))
    assert rel(gpu.get(q_out), rope.rope_ref(q, pos, cfg)) < TOL
    attention.kv_store_ref(k_cache, v_cache, rope.rope_ref(k, pos, cfg), v, rows)
    got_k = gpu.get(dk).astype(np.float32)
    assert np.array_equal(gpu.get(dv).view(np.uint16), v_cache.view(np.uint16))
    assert np.array_equal(np.delete(got_k, rows, 0), np.delete(k_cache, rows, 0).astype(np.float32))
    assert rel(got_k[rows], k_cache[rows].astype(np.float64)) < 1e-3  # fp16 rounding of fp32 rope


@pytest.mark.parametrize("name", list(ROPES))
@pytest.mark.parametrize("p,window,sinks", [(0, 0, False), (63, 0, False), (64, 0, True), (700, 128, True)])
def test_rope_inside_the_decode_gives_the_bits_of_rope_kv_store_then_attention(gpu, rng, name, p, window, sinks):
    # attn_decode_rope (+ combine) against rope_kv_store + attn_decode + combine on the same
    # inputs: the output, its int8 activations and both caches, bit for bit
    from orcd.ops.matmul_base import Q8Act

    cfg, n_head, n_kv = ROPES[name]
    hd, n_ctx = cfg.head_dim, 1024
    cos, sin = rope.RopeTable.host_arrays(cfg, n_ctx)
    table = rope.RopeTable(cfg, n_ctx, gpu.put(cos).ptr, gpu.put(sin).ptr)
    q, k, v = gpu.put(randn(rng, 1, n_head * hd)), gpu.put(randn(rng, 1, n_kv * hd)), gpu.put(randn(rng, 1, n_kv * hd))
    caches = rng.standard_normal((2, n_ctx, n_kv, hd)).astype(np.float16)
    blocks = rng.permutation(n_ctx // KV_BLOCK).astype(np.int32).reshape(1, -1)
    paging, pos = gpu.paging(blocks, np.zeros(1, np.int32), n_ctx), gpu.put(np.array([p], np.int32))
    sink = gpu.put(randn(rng, n_head, scale=2)) if sinks else None
    got, want = [], []
    for fused in (True, False):
        dk, dv, out = gpu.put(caches[0]), gpu.put(caches[1]), gpu.empty((1, n_head * hd))
        q8 = Q8Act(gpu.empty((1, n_head * hd), np.int8), gpu.empty((1, n_head * hd // 32))) if hd % 32 == 0 else None
        assert gpu.attn.ropes_in_decode(q, dk, dv, paging)
        if fused:
            gpu.attn.rope_attention(q, k, v, dk, dv, pos, table, 0.125, window, sink, out, gpu.empty, paging, q8)
        else:
            q_rot = gpu.empty(q.shape)
            gpu.attn.rope_kv_store(q, k, v, dk, dv, pos, table, q_rot, paging)
            gpu.attn.attention(q_rot, dk, dv, pos, 0.125, window, sink, out, gpu.empty, paging, q8)
        (got if fused else want).append([gpu.get(t).tobytes() for t in (out, dk, dv)]
                                        + ([gpu.get(q8.xq).tobytes(), gpu.get(q8.xd).tobytes()] if q8 else []))
    assert got == want


def test_rope_inside_the_decode_of_a_batch_of_distinct_sequences(gpu, rng):
    # a decode batch whose rows are apart (distinct sequences, and two padding rows that
    # both store the spare block's row 0): the bits of the three-launch path
    from orcd.ops.matmul_base import Q8Act

    cfg, n_head, n_kv = ROPES["yarn"]
    hd, max_blocks, spare = cfg.head_dim, 4, 12
    cos, sin = rope.RopeTable.host_arrays(cfg, max_blocks * KV_BLOCK)
    table = rope.RopeTable(cfg, max_blocks * KV_BLOCK, gpu.put(cos).ptr, gpu.put(sin).ptr)
    tables = np.concatenate([rng.permutation(12).astype(np.int32).reshape(3, 4), np.full((2, 4), spare, np.int32)])
    pos = np.array([5, 64, 255, 0, 0], np.int32)
    T = len(pos)
    def rows(n):   # the padding rows are alike (one id, one position: the same q, k, v)
        x = randn(rng, T, n * hd)
        x[4] = x[3]
        return gpu.put(x)

    q, k, v = rows(n_head), rows(n_kv), rows(n_kv)
    caches = rng.standard_normal((2, 13 * KV_BLOCK, n_kv, hd)).astype(np.float16)
    paging = gpu.paging(tables, np.arange(T), max_blocks * KV_BLOCK, batched=True, apart=True)
    dpos = gpu.put(pos)
    results = []
    for fused in (True, False):
        dk, dv, out = gpu.put(caches[0]), gpu.put(caches[1]), gpu.empty((T, n_head * hd))
        q8 = Q8Act(gpu.empty((T, n_head * hd), np.int8), gpu.empty((T, n_head * hd // 32)))
        if fused:
            gpu.attn.rope_attention(q, k, v, dk, dv, dpos, table, 0.125, 128, None, out, gpu.empty, paging, q8)
        else:
            q_rot = gpu.empty(q.shape)
            gpu.attn.rope_kv_store(q, k, v, dk, dv, dpos, table, q_rot, paging)
            gpu.attn.attention(q_rot, dk, dv, dpos, 0.125, 128, None, out, gpu.empty, paging, q8)
        results.append([gpu.get(t).tobytes() for t in (out, dk, dv, q8.xq, q8.xd)])
    assert results[0] == results[1]


def test_rope_inside_the_decode_only_where_no_row_reads_a_key_another_stores(gpu, rng):
    cfg, n_head, n_kv = ROPES["qwen"]
    hd, n_ctx = cfg.head_dim, 256
    dk = dv = gpu.put(np.zeros((n_ctx, n_kv, hd), np.float16))
    two = gpu.put(randn(rng, 2, n_head * hd))
    one = two.rows(0, 1)
    single = gpu.paging([[0, 1, 2, 3]], [0, 0], n_ctx)
    batched = gpu.paging([[0, 1], [2, 3]], [0, 1], 128, batched=True)
    apart = gpu.paging([[0, 1], [2, 3]], [0, 1], 128, batched=True, apart=True)
    assert gpu.attn.ropes_in_decode(one, dk, dv, single)
    assert gpu.attn.ropes_in_decode(two, dk, dv, apart)
    assert not gpu.attn.ropes_in_decode(two, dk, dv, single)      # a prompt chunk: later rows read earlier keys
    assert not gpu.attn.ropes_in_decode(two, dk, dv, batched)     # a batch with a folded prompt's rows
    with pytest.raises(ValueError, match="store no key another row reads"):
        gpu.attn.rope_attention(two, two, two, dk, dv, gpu.put(np.array([0, 1], np.int32)), None, 0.125, 0,
                                None, gpu.empty((2, n_head * hd)), gpu.empty, single)


@pytest.mark.parametrize("fused", [True, False])
def test_decode_blocks_that_loop_over_splits_give_the_bits_of_a_block_a_split(gpu, rng, monkeypatch, fused):
    # attn_decode(_rope)'s grid holds about one wave of blocks (decode_grid_splits): with
    # fewer blocks than splits each loops over every gridDim-th split, skipping those before
    # the window and stopping past the position -- the bits of one block a split, for one
    # sequence (a window, sinks) and a batch of distinct sequences
    from orcd.ops.matmul_base import Q8Act

    cfg, n_head, n_kv = ROPES["qwen"]
    hd, max_blocks = cfg.head_dim, 16
    n_ctx = max_blocks * KV_BLOCK
    cos, sin = rope.RopeTable.host_arrays(cfg, n_ctx)
    table = rope.RopeTable(cfg, n_ctx, gpu.put(cos).ptr, gpu.put(sin).ptr)
    cases = [([[*rng.permutation(max_blocks)]], [700], 128, True, {}),
             ([[*rng.permutation(max_blocks)]], [1023], 0, False, {}),
             ([[*range(i * 4, i * 4 + 4)] for i in range(3)], [5, 200, 255], 100, False,
              dict(batched=True, apart=True))]
    for tables, pos, window, sinks, how in cases:
        T, ctx = len(pos), len(tables[0]) * KV_BLOCK
        q, k, v = (gpu.put(randn(rng, T, n * hd)) for n in (n_head, n_kv, n_kv))
        caches = rng.standard_normal((2, n_ctx, n_kv, hd)).astype(np.float16)
        paging = gpu.paging(np.array(tables, np.int32), np.arange(T), ctx, **how)
        dpos, sink = gpu.put(np.array(pos, np.int32)), gpu.put(randn(rng, n_head, scale=2)) if sinks else None
        results = []
        for wave in (1, 1 << 20):   # one block a KV head and row looping over all splits; a block a split
            monkeypatch.setattr(gpu.attn, "wave_blocks", wave)   # the session's rig: put back after
            dk, dv, out = gpu.put(caches[0]), gpu.put(caches[1]), gpu.empty((T, n_head * hd))
            q8 = Q8Act(gpu.empty((T, n_head * hd), np.int8), gpu.empty((T, n_head * hd // 32)))
            if fused:
                gpu.attn.rope_attention(q, k, v, dk, dv, dpos, table, 0.125, window, sink, out, gpu.empty, paging, q8)
            else:
                gpu.attn.attention(q, dk, dv, dpos, 0.125, window, sink, out, gpu.empty, paging, q8)
            results.append([gpu.get(t).tobytes() for t in (out, dk, dv, q8.xq, q8.xd)])
        assert results[0] == results[1], (pos, window)
    assert attention.decode_grid_splits(512, 2, 1, 1056) == 512     # Qwen at 32k, one row: a block a split
    assert attention.decode_grid_splits(512, 2, 16, 1056) == 33     # 16 rows: one wave, the blocks loop
    assert attention.decode_grid_splits(32, 32, 16, 1056) == 3
    assert attention.decode_grid_splits(8, 64, 64, 1056) == 1
