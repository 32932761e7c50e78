"""The numpy reference ops against independent float64 formulations."""

import math

import numpy as np
import pytest

from orcd.ops import activation, attention, moe, norm, rope
from orcd.ops.rope import RopeConfig


def rng(seed=None):
    return np.random.default_rng(seed)


def test_rms_norm_matches_float64():
    g = rng()
    x = g.standard_normal((5, 96)).astype(np.float32) * 3
    w = g.standard_normal(96).astype(np.float32)
    ref = x.astype(np.float64) / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * w
    got = norm.rms_norm_ref(x, w, 1e-6)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-6


def test_layer_norm_zero_mean_unit_var():
    x = rng().standard_normal((3, 64)).astype(np.float32) * 5 + 2
    y = norm.layer_norm_ref(x, np.ones(64, np.float32), None, 1e-5)
    assert np.allclose(y.mean(-1), 0, atol=1e-5) and np.allclose(y.std(-1), 1, atol=1e-3)


def _rope64(x, pos, cfg):
    """Pair-by-pair float64 rotation, written independently of rope_ref."""
    T, D = x.shape
    out = x.astype(np.float64).copy().reshape(T, -1, cfg.head_dim)
    half = cfg.n_rot // 2
    for t in range(T):
        for i in range(half):
            theta = pos[t] * cfg.base ** (-2 * i / cfg.n_rot)
            a, b = (i, i + half) if cfg.neox else (2 * i, 2 * i + 1)
            xa, xb = out[t, :, a].copy(), out[t, :, b].copy()
            out[t, :, a] = xa * math.cos(theta) - xb * math.sin(theta)
            out[t, :, b] = xa * math.sin(theta) + xb * math.cos(theta)
    return out.reshape(T, D)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("n_rot", [64, 32])  # full and partial rotary
def test_rope_matches_pairwise_rotation(neox, n_rot):
    cfg = RopeConfig(n_rot=n_rot, head_dim=64, base=10000.0, neox=neox)
    x = rng().standard_normal((7, 3 * 64)).astype(np.float32)
    pos = np.array([0, 1, 2, 5, 100, 1000, 4095])
    got = rope.rope_ref(x, pos, cfg)
    ref = _rope64(x, pos, cfg)
    assert np.abs(got - ref).max() < 1e-4
    assert np.array_equal(got[0], x[0])  # position 0 is the identity


def test_rope_scores_depend_only_on_relative_position():
    cfg = RopeConfig(n_rot=64, head_dim=64, base=1e6)
    g = rng()
    q, k = g.standard_normal((1, 64)).astype(np.float32), g.standard_normal((1, 64)).astype(np.float32)
    def score(m, n):
        return float((rope.rope_ref(q, np.array([m]), cfg) @ rope.rope_ref(k, np.array([n]), cfg).T)[0, 0])
    assert score(10, 3) == pytest.approx(score(107, 100), rel=1e-4)


def test_yarn_corr_dims_and_magnitude_as_ggml():
    # GPT-OSS: base 150000, factor 32, original context 4096, head dim 64
    cfg = RopeConfig(n_rot=64, head_dim=64, base=150000.0, freq_scale=1 / 32, ext_factor=1.0,
                     n_ctx_orig=4096)
    low, high = cfg.corr_dims()
    def corr(beta):
        return 64 * math.log(4096 / (beta * 2 * math.pi)) / (2 * math.log(150000.0))
    assert (low, high) == (math.floor(corr(32)), math.ceil(corr(1)))
    cos, sin = rope.rope_cos_sin(cfg, np.array([0, 7]))
    assert cos[0, 0] == pytest.approx(1 + 0.1 * math.log(32), rel=1e-6)  # mscale at theta 0
    # fast dimensions (below low) extrapolate: theta = pos * inv_freq unscaled
    assert math.atan2(sin[1, 0], cos[1, 0]) == pytest.approx(7.0 - 2 * math.pi, rel=1e-5)
    # slow dimensions (above high) interpolate: theta = pos * inv_freq / 32
    i = 31
    theta = 7 * 150000.0 ** (-2 * i / 64) / 32
    assert math.atan2(sin[1, i], cos[1, i]) == pytest.approx(theta, rel=1e-4)


def _attention64(q, K, V, pos, scale, window, sinks, n_head, n_kv):
    T, hd = q.shape[0], K.shape[-1]
    out = np.zeros((T, n_head, V.shape[-1]))
    for t in range(T):
        for h in range(n_head):
            kv = h // (n_head // n_kv)
            keys = [j for j in range(pos[t] + 1) if not window or pos[t] - j < window]
            s = np.array([q[t, h * hd:(h + 1) * hd] @ K[j, kv] * scale for j in keys], np.float64)
            extra = [sinks[h]] if sinks is not None else []
            m = max(list(s) + extra)
            p = np.exp(s - m)
            denom = p.sum() + sum(math.exp(e - m) for e in extra)
            out[t, h] = (p / denom) @ V[keys, kv]
    return out.reshape(T, -1)


@pytest.mark.parametrize("window,use_sinks", [(0, False), (4, False), (0, True), (3, True)])
def test_attention_gqa_window_sinks(window, use_sinks):
    g = rng()
    n_head, n_kv, hd, n_ctx = 8, 2, 16, 32
    kc = np.zeros((n_ctx, n_kv, hd), np.float16)
    vc = np.zeros((n_ctx, n_kv, hd), np.float16)
    sinks = g.standard_normal(n_head).astype(np.float32) if use_sinks else None
    # prefill 6 tokens, then one decode token: both go through the cache
    for pos in (np.arange(6), np.array([6])):
        T = len(pos)
        q = g.standard_normal((T, n_head * hd)).astype(np.float32)
        k = g.standard_normal((T, n_kv * hd)).astype(np.float32)
        v = g.standard_normal((T, n_kv * hd)).astype(np.float32)
        attention.kv_store_ref(kc, vc, k, v, pos)
        got = attention.attention_ref(q, kc, vc, pos, 0.25, window, sinks)
        ref = _attention64(q, kc.astype(np.float64), vc.astype(np.float64), pos, 0.25, window,
                           sinks, n_head, n_kv)
        assert np.abs(got - ref).max() < 1e-4


def test_gelu_keeps_its_digits_in_the_negative_tail():
    # the tanh form 0.5 x (1 + tanh(u)) cancels to noise for x < ~-3 in fp32; each value
    # must stay within fp32 rounding of the float64 function, however small
    x = np.concatenate([np.linspace(-9, 9, 3601), [-3.5, -5.0, -7.25]]).astype(np.float32)
    x64 = x.astype(np.float64)
    exact = 0.5 * x64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64 ** 3)))
    tail = x64 < -3   # float64's tanh form is exact enough only where 1 + tanh(u) > 1e-9
    exact[tail] = x64[tail] / (1 + np.exp(-2 * np.sqrt(2 / np.pi) * (x64[tail] + 0.044715 * x64[tail] ** 3)))
    got = activation.gelu_ref(x).astype(np.float64)
    nonzero = exact != 0
    assert np.max(np.abs(got - exact)[nonzero] / np.abs(exact[nonzero])) < 2e-5
    assert got[x == 0] == 0


def test_swiglu_oai_clamps():
    gate = np.array([-20.0, 0.0, 3.0, 50.0], np.float32)
    up = np.array([100.0, -100.0, 1.0, 0.0], np.float32)
    got = activation.swiglu_oai_ref(gate, up, 1.702, 7.0)
    def ref(g, u):
        g, u = min(g, 7.0), max(min(u, 7.0), -7.0)
        return g / (1 + math.exp(-1.702 * g)) * (u + 1)
    assert np.allclose(got, [ref(a, b) for a, b in zip(gate, up)], rtol=1e-6)


def test_route_picks_top_k_and_softmax_over_chosen():
    logits = np.array([[0.1, 3.0, -1.0, 2.0, 2.5]], np.float32)
    ids, w = moe.route_ref(logits, 2)
    assert ids.tolist() == [[1, 4]]
    e = np.exp([3.0, 2.5])
    assert np.allclose(w, e / e.sum())


def test_moe_matches_dense_mixture():
    g = rng()
    D, F, E = 8, 6, 4
    def r(*s):
        return g.standard_normal(s).astype(np.float32)
    ex = moe.Experts(r(E, D), r(E), r(E, F, D), r(E, F), r(E, F, D), r(E, F), r(E, D, F), r(E, D))
    x = r(3, D)
    got = moe.moe_ref(x, ex, 2, 1.702, 7.0)
    logits = x @ ex.router_w.T + ex.router_b
    for t in range(3):
        top = np.argsort(-logits[t])[:2]
        w = np.exp(logits[t, top] - logits[t, top].max())
        w /= w.sum()
        ref = sum(wi * (ex.down_w[e] @ activation.swiglu_oai_ref(ex.gate_w[e] @ x[t] + ex.gate_b[e],
                                                                 ex.up_w[e] @ x[t] + ex.up_b[e], 1.702, 7.0)
                        + ex.down_b[e]) for wi, e in zip(w, top))
        assert np.allclose(got[t], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("T,k,n_expert", [(1, 4, 32), (7, 4, 32), (300, 4, 32), (16, 2, 3)])
def test_group_lists_each_experts_pairs_in_order(T, k, n_expert):
    ids = np.stack([rng().choice(n_expert, k, replace=False) for _ in range(T)]).astype(np.int32)
    order, slot_of, counts = moe.group_ref(ids, n_expert)
    flat = ids.reshape(-1)
    assert sorted(order.tolist()) == list(range(T * k))             # a permutation of the pairs
    assert np.array_equal(slot_of[order], np.arange(T * k))         # slot_of inverts it
    assert np.all(np.diff(flat[order]) >= 0)                        # grouped by expert, 0 first
    for e in range(n_expert):                                       # each group in pair order
        group = order[flat[order] == e]
        assert np.all(np.diff(group) > 0) and counts[e] == len(group)


def test_group_leaves_out_bad_ids():
    ids = np.array([[0, 5], [-1, 2]], np.int32)
    order, slot_of, counts = moe.group_ref(ids, 4)
    assert order.tolist() == [0, 3] and slot_of.tolist() == [0, -1, -1, 1]
    assert counts.tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize("counts", [[0, 0, 0], [17, 0, 8], [1, 1, 1], [64, 0, 0], [3, 9, 16]])
def test_tiles_cover_every_group_within_the_bound(counts):
    counts = np.array(counts, np.int32)
    n_tiles = moe.max_tiles(int(counts.sum()), len(counts), 8)
    tiles = moe.tiles_ref(counts, 8, n_tiles)
    used = tiles[tiles[:, 2] > 0]
    assert len(used) == sum(-(-c // 8) for c in counts) <= n_tiles
    assert np.all(used[:, 2] <= 8) and not tiles[len(used):].any()  # unused rows all zero
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for e, c in enumerate(counts):                                  # rows start..start+c, no gap
        mine = used[used[:, 0] == e]
        assert mine[:, 2].sum() == c
        assert mine[:, 1].tolist() == list(range(starts[e], starts[e] + c, 8))


def test_fused_refs_are_the_compositions():
    from orcd.ops import fused, matmul

    g = rng()
    x, gn = g.standard_normal((3, 64)).astype(np.float32), g.standard_normal(64).astype(np.float32)
    w1, w2 = (g.standard_normal((n, 64)).astype(np.float32) for n in (48, 16))
    b1 = g.standard_normal(48).astype(np.float32)
    h = norm.rms_norm_ref(x, gn, 1e-6)
    y1, y2 = fused.linear_multi_ref(x, (w1, w2), (b1, None), norm=(gn, 1e-6))
    assert np.allclose(y1, h @ w1.T + b1, atol=1e-5) and np.allclose(y2, h @ w2.T, atol=1e-5)
    wg = g.standard_normal((2 * 16, 64)).astype(np.float32)    # fused gate_up: gate rows first
    both = fused.gated_linear_ref(x, wg, None, norm=(gn, 1e-6))
    split = fused.gated_linear_ref(x, wg[:16], wg[16:], norm=(gn, 1e-6))
    assert np.array_equal(both.shape, (3, 16)) and np.allclose(both, split, atol=1e-6)
    assert np.allclose(split, activation.silu_ref(h @ wg[:16].T) * (h @ wg[16:].T), atol=1e-5)
    res = g.standard_normal((3, 48)).astype(np.float32)
    assert np.allclose(fused.linear_add_ref(x, w1, res, b1), res + matmul.linear_ref(x, w1, b1))


def test_cpu_attention_rope_is_rope_then_attention():
    from orcd.backends.cpu import CpuBackend

    g = rng()
    b = CpuBackend()
    cfg = RopeConfig(n_rot=32, head_dim=32, base=1e4)
    q, k, v = (g.standard_normal((5, n * 32)).astype(np.float32) for n in (4, 2, 2))
    pos = np.arange(3, 8)
    c1, c2 = (b.new_kv_cache(1, 16, 2, 32) for _ in range(2))
    got = b.ops.attention(q, k, v, c1, 0, pos, 0.2, rope=cfg)
    ref = b.ops.attention(rope.rope_ref(q, pos, cfg), rope.rope_ref(k, pos, cfg), v, c2, 0, pos, 0.2)
    assert np.array_equal(got, ref) and np.array_equal(c1.k[0], c2.k[0])
