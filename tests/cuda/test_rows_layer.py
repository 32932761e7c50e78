"""A decode batch's layer ops (CudaOps in Phase.ROWS) on a device (marker ``cuda``) and
on the CUDA simulator (``sim``), over the kernel families alone (no CudaBackend):

- the output projection adds the residual in its GEMV's launch, and the FFN's gate, up
  and SwiGLU are one launch after the norm+quantize one, with the bits the separate
  ops give (each row summed as alone: a stream's tokens do not depend on its batch);
- how many launches each takes: what the per-row step is made of.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
from gpu_rig import sized

from orcd.ops.contract import Phase, in_phase

pytestmark = [pytest.mark.cuda, pytest.mark.sim]


class Counting:
    """A launcher that counts the kernels it starts, by name."""

    def __init__(self, launcher) -> None:
        self.launcher, self.names = launcher, []

    def __call__(self, fn, *args, **kwargs):
        self.names.append(getattr(fn, "name", str(fn)))
        return self.launcher(fn, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.launcher, name)


@pytest.fixture(params=["dp4a", "mma"])
def rows(request, gpu):
    # CudaOps over the kernel families, each launching through one counting launcher
    from orcd.backends.cuda.ops import CudaOps, Scratch
    from orcd.ops.activation import ActivationKernels
    from orcd.ops.attention import AttentionKernels
    from orcd.ops.fused import FusedKernels
    from orcd.ops.matmul import MatmulKernels
    from orcd.ops.norm import NormKernels

    count = Counting(gpu.launcher)
    k = (gpu.dev, gpu.compiler, count)
    b = SimpleNamespace(mm=MatmulKernels(*k, int8="all", mma=request.param == "mma"), fused=FusedKernels(*k),
                        act=ActivationKernels(*k), norm=NormKernels(*k), attn=AttentionKernels(*k),
                        scratch=Scratch(gpu.alloc, 4 << 20))
    ops = CudaOps(b)
    yield ops, count
    b.scratch.free()


@pytest.mark.parametrize("name,n_in", [("Q5_0", 896), ("Q6_K", 4864)])   # Qwen's o and down
def test_the_output_projection_adds_the_residual_in_its_launch(gpu, rows, rng, host, name, n_in):
    ops, count = rows
    D, n_in, T = sized((896, n_in, 16), (48, 256, 3))
    w, _ = gpu.weight(host, name, (D, n_in), rng)
    a = gpu.put(rng.standard_normal((T, n_in)).astype(np.float32))
    res = gpu.put(rng.standard_normal((T, D)).astype(np.float32))
    with in_phase(ops, Phase.ROWS):
        count.names.clear()
        got = gpu.get(ops.linear_add(a, w, res))
        launches = list(count.names)
        alone = gpu.get(ops.linear_add(a.rows(1, 2), w, res.rows(1, 2)))
        plain = gpu.get(ops.add(res, ops.linear(a, w)))
    assert np.array_equal(got, plain)
    assert np.array_equal(alone[0], got[1])
    assert len(launches) == 2, launches          # quantize x, then the GEMV that adds


@pytest.mark.parametrize("joined", [False, True])
def test_the_ffn_is_two_launches_after_the_attention(gpu, rows, rng, host, joined):
    ops, count = rows
    D, n_ff, T = sized((1024, 4864, 16), (256, 48, 3))   # rows of whole Q4_K blocks
    if joined:   # Phi-3's gate_up
        ws = (gpu.weight(host, "Q4_K", (2 * n_ff, D), rng)[0], None)
    else:
        ws = tuple(gpu.weight(host, "Q4_K", (n_ff, D), rng)[0] for _ in range(2))
    x = gpu.put(rng.standard_normal((T, D)).astype(np.float32))
    norm = (gpu.put((1 + 0.1 * rng.standard_normal(D)).astype(np.float32)), 1e-6)
    with in_phase(ops, Phase.ROWS):
        count.names.clear()
        got = gpu.get(ops.gated_linear(x, *ws, norm=norm))
        launches = list(count.names)
        alone = gpu.get(ops.gated_linear(x.rows(2, 3), *ws, norm=norm))
        h = ops._shared_act(x, [w for w in ws if w is not None], norm)
        if joined:
            gate, up = ops.split(ops.linear(h, ws[0]), (n_ff, n_ff))
        else:
            gate, up = ops.linear(h, ws[0]), ops.linear(h, ws[1])
        plain = gpu.get(ops.swiglu(gate, up))
    assert np.array_equal(got, plain)
    assert np.array_equal(alone[0], got[2])
    assert len(launches) == 2, launches          # rms_norm_q8, then gate + up + SwiGLU


def test_q_k_and_v_of_one_format_share_a_launch(gpu, rows, rng, host):
    # Qwen's mix: q and k Q5_0 (different rows, so different splits), v Q8_0; with biases
    ops, count = rows
    D, T = sized((896, 16), (64, 3))
    shapes = sized(((896, "Q5_0"), (128, "Q5_0"), (128, "Q8_0")), ((64, "Q5_0"), (16, "Q5_0"), (16, "Q8_0")))
    ws = [gpu.weight(host, name, (n, D), rng)[0] for n, name in shapes]
    bs = [gpu.put(rng.standard_normal(n).astype(np.float32)) for n, _ in shapes]
    x = gpu.put(rng.standard_normal((T, D)).astype(np.float32))
    norm = (gpu.put((1 + 0.1 * rng.standard_normal(D)).astype(np.float32)), 1e-6)
    with in_phase(ops, Phase.ROWS):
        count.names.clear()
        got = [gpu.get(o) for o in ops.linear_multi(x, ws, bs, norm=norm)]
        launches = list(count.names)
        alone = [gpu.get(o) for o in ops.linear_multi(x.rows(1, 2), ws, bs, norm=norm)]
        h = ops._shared_act(x, ws, norm)
        plain = [gpu.get(ops.linear(h, w, b)) for w, b in zip(ws, bs)]
    for g, a, p in zip(got, alone, plain):
        assert np.array_equal(g, p)
        assert np.array_equal(a[0], g[1])
    want = 3 if ops.b.mm.mma else 2    # on the tensor cores each weight is a launch of its own
    assert len(launches) == 1 + want, launches   # rms_norm_q8, then q+k and v


def test_a_batch_over_one_gemv_launch_is_each_row_as_alone(gpu, rows, rng, host):
    # more rows than one GEMV launch takes (MatmulKernels.gemv_rows): every launch's rows
    # written, each row the bits it has alone
    from orcd.ops.matmul_base import BATCH_GEMV_Q8_T

    ops, _ = rows
    D, T = sized(896, 64), BATCH_GEMV_Q8_T + 3
    ws = [gpu.weight(host, name, (n, D), rng)[0] for n, name in ((D, "Q5_0"), (D // 2, "Q8_0"))]
    x = gpu.put(rng.standard_normal((T, D)).astype(np.float32))
    res = gpu.put(rng.standard_normal((T, D)).astype(np.float32))
    with in_phase(ops, Phase.ROWS):
        multi = [gpu.get(o) for o in ops.linear_multi(x, ws)]
        added = gpu.get(ops.linear_add(x, ws[0], res))
        for t in (0, T - 1):
            alone = [gpu.get(o) for o in ops.linear_multi(x.rows(t, t + 1), ws)]
            for m, a in zip(multi, alone):
                assert np.array_equal(m[t], a[0]), t
            assert np.array_equal(added[t], gpu.get(ops.linear_add(x.rows(t, t + 1), ws[0], res.rows(t, t + 1)))[0])


@pytest.mark.parametrize("phase", [Phase.ROWS, None])
def test_the_output_projection_reads_the_int8_activations_attention_wrote(gpu, rows, rng, host, phase):
    # a decode's attention output comes with its int8 activations, so o's GEMV needs no
    # quantize launch: in a decode batch (ROWS) and in one sequence's fused decode step
    # (None, one token; Phi-3's and GPT-OSS's o projections are int8 there)
    from orcd.kvcache import KV_BLOCK, KVCache, blocks_for

    ops, count = rows
    n_head, n_kv, hd, n_ctx = 4, 2, 64, 256
    T = 3 if phase is Phase.ROWS else 1
    D = n_head * hd
    tables = rng.permutation(T * blocks_for(n_ctx)).astype(np.int32).reshape(T, -1)
    kc = gpu.put(rng.standard_normal((tables.size * KV_BLOCK, n_kv, hd)).astype(np.float16))
    vc = gpu.put(rng.standard_normal((tables.size * KV_BLOCK, n_kv, hd)).astype(np.float16))
    cache = KVCache([kc], [vc], gpu.put(tables), gpu.put(np.arange(T, dtype=np.int32)), n_ctx,
                    batched=phase is Phase.ROWS)
    q = gpu.put(rng.standard_normal((T, D)).astype(np.float32))
    k, v = (gpu.put(rng.standard_normal((T, n_kv * hd)).astype(np.float32)) for _ in range(2))
    pos = gpu.put(np.array([5, 200, 255][:T], np.int32))
    w, _ = gpu.weight(host, "Q8_0", (D, D), rng)
    res = gpu.put(rng.standard_normal((T, D)).astype(np.float32))
    with in_phase(ops, phase) if phase is not None else contextlib.nullcontext():
        attn = ops.attention(q, k, v, cache, 0, pos, 0.125)
        assert attn.q8 is not None
        count.names.clear()
        got = gpu.get(ops.linear_add(attn, w, res))
        launches = list(count.names)
        plain = gpu.get(ops.linear_add(attn.view(*attn.shape), w, res))   # a view: quantized again
    assert np.array_equal(got, plain)
    assert len(launches) == 1, launches



def test_gemv_multi_groups_weights_by_format_three_at_a_time(gpu, rows, rng, host):
    # four Q5_0 weights and a Q8_0 one: Q5_0 x3, Q5_0 x1, Q8_0 -- each output the bits of
    # its own gemv (on the tensor cores: a launch each)
    ops, count = rows
    mm, n_in, T = ops.b.mm, 256, 2
    names = ["Q5_0", "Q8_0", "Q5_0", "Q5_0", "Q5_0"]
    ws = [gpu.weight(host, name, (8 * (i + 1), n_in), rng)[0] for i, name in enumerate(names)]
    xa = mm.quantize(gpu.put(rng.standard_normal((T, n_in)).astype(np.float32)), ops.b.scratch)
    outs = [gpu.empty((T, w.shape[0])) for w in ws]
    count.names.clear()
    mm.gemv_multi(xa, ws, [None] * len(ws), outs)
    launches = len(count.names)
    for w, o in zip(ws, outs):
        alone = gpu.empty((T, w.shape[0]))
        mm.gemv(xa, w, None, alone)
        assert np.array_equal(gpu.get(o), gpu.get(alone))
    assert launches == (5 if mm.mma else 3)


@pytest.mark.parametrize("phase,apart", [(Phase.ROWS, True), (Phase.ROWS, False), (None, False)])
def test_a_decodes_attention_ropes_inside_the_decode_kernel(gpu, rows, rng, host, phase, apart):
    # one sequence's decode token, or a batch of distinct sequences: RoPE and the KV store
    # inside the decode kernel, then the combine (2 launches); a batch with a folded
    # prompt's rows (not apart) keeps rope_kv_store apart (3): they read keys others store
    from orcd.kvcache import KV_BLOCK, KVCache, blocks_for
    from orcd.ops.rope import RopeConfig

    ops, count = rows
    n_head, n_kv, hd, n_ctx = 4, 2, 64, 128
    cfg = RopeConfig(n_rot=hd, head_dim=hd, base=1e6, neox=True)
    tables = np.arange(blocks_for(n_ctx), dtype=np.int32).reshape(1, -1)
    kc = gpu.put(np.zeros((tables.size * KV_BLOCK, n_kv, hd), np.float16))
    vc = gpu.put(np.zeros((tables.size * KV_BLOCK, n_kv, hd), np.float16))
    cache = KVCache([kc], [vc], gpu.put(tables), gpu.put(np.zeros(1, np.int32)), n_ctx,
                    batched=phase is Phase.ROWS, apart=apart)
    ops.b.rope_table = lambda c: _table(gpu, c, n_ctx)
    q = gpu.put(rng.standard_normal((1, n_head * hd)).astype(np.float32))
    k, v = (gpu.put(rng.standard_normal((1, n_kv * hd)).astype(np.float32)) for _ in range(2))
    with in_phase(ops, phase) if phase is not None else contextlib.nullcontext():
        count.names.clear()
        out = ops.attention(q, k, v, cache, 0, gpu.put(np.array([70], np.int32)), 0.125, rope=cfg)
    assert len(count.names) == (3 if phase is Phase.ROWS and not apart else 2), count.names
    assert np.isfinite(gpu.get(out)).all() and out.q8 is not None


def _table(gpu, cfg, n_pos):
    from orcd.ops.rope import RopeTable

    cos, sin = RopeTable.host_arrays(cfg, n_pos)
    return RopeTable(cfg, n_pos, gpu.put(cos).ptr, gpu.put(sin).ptr)


def test_a_qwen_layer_of_a_decode_batch_is_ten_launches(gpu, rows, rng, host):
    # the shared decoder blocks (orcd.blocks) with Qwen's type mix, a decode batch of three
    # distinct sequences: ten launches with the dp4a GEMVs (rms_norm_q8; q+k; v; attention
    # 2; o with its residual; rms_norm_q8; gate+up+SwiGLU; down's quantize and GEMV), and
    # each row's output the bits it has alone
    from orcd.blocks import Attention, Ffn
    from orcd.kvcache import KV_BLOCK, KVCache, blocks_for
    from orcd.ops.rope import RopeConfig

    ops, count = rows
    n_head, n_kv, hd, n_ff, n_ctx, T = 4, 2, 64, 512, 128, 3
    D = n_head * hd

    def w(name, shape):
        return gpu.weight(host, name, shape, rng)[0]

    def vec(n, scale=0.1):
        return gpu.put((scale * rng.standard_normal(n)).astype(np.float32))

    def norm():
        return gpu.put((1 + 0.1 * rng.standard_normal(D)).astype(np.float32))

    attn = Attention(norm(), w("Q5_0", (D, D)), w("Q5_0", (D, D)), w("Q5_0", (n_kv * hd, D)),
                     w("Q8_0", (n_kv * hd, D)), bq=vec(D), bk=vec(n_kv * hd), bv=vec(n_kv * hd))
    ffn = Ffn(norm(), w("Q5_0", (n_ff, D)), w("Q5_0", (n_ff, D)), w("Q6_K", (D, n_ff)))
    cfg = RopeConfig(n_rot=hd, head_dim=hd, base=1e6, neox=True)
    ops.b.rope_table = lambda c: _table(gpu, c, n_ctx)
    tables = rng.permutation(T * blocks_for(n_ctx)).astype(np.int32).reshape(T, -1)
    kv = [gpu.put(rng.standard_normal((tables.size * KV_BLOCK, n_kv, hd)).astype(np.float16)) for _ in range(2)]
    x = gpu.put(rng.standard_normal((T, D)).astype(np.float32))
    pos = np.array([3, 70, 127], np.int32)

    def layer(rows_):
        cache = KVCache([kv[0]], [kv[1]], gpu.put(tables[rows_]), gpu.put(np.arange(len(rows_), dtype=np.int32)),
                        n_ctx, batched=True, apart=True)
        xs = gpu.put(gpu.get(x)[rows_])
        h = attn(ops, xs, cache, 0, gpu.put(pos[rows_]), eps=1e-6, scale=0.125, rope=cfg)
        return gpu.get(ffn(ops, h, eps=1e-6))

    with in_phase(ops, Phase.ROWS):
        count.names.clear()
        together = layer([0, 1, 2])
        launches = list(count.names)
        alone = layer([1])
    assert np.array_equal(alone[0], together[1])
    assert len(launches) == (11 if ops.b.mm.mma else 10), launches   # mma: q, k, v a launch each
