"""The non-matmul CUDA kernels against their numpy references (marker ``cuda``).

Fresh random data for every check, several shapes including the real Qwen's
896 / 4864 / 151936, outputs poisoned with NaN first, relative error
‖out − ref‖ / ‖ref‖ (fp32 kernels ≲ 1e-5; attention reads the same fp16 cache
as the reference, so it is held to 1e-4).
"""

from __future__ import annotations

import numpy as np
import pytest

from gpu_rig import randn, rel, sized

from orcd.kvcache import KV_BLOCK, blocks_for, contiguous_table, kv_rows
from orcd.ops import activation, attention, moe, norm, rope

pytestmark = [pytest.mark.cuda, pytest.mark.sim]


@pytest.fixture(autouse=True)
def _free_after_each_test(scope):
    """The rig lives for the session; what each test uploads goes back when it ends."""


# -- norms and element-wise ----------------------------------------------------------

@pytest.mark.parametrize("T,D", [(1, 896), (7, 896), (3, 4864), (2, 3072), (1, 151936)])
def test_rms_and_layer_norm(gpu, rng, T, D):
    x, w, b = randn(rng, T, D, scale=3), randn(rng, D), randn(rng, D)
    out = gpu.empty((T, D))
    gpu.norm.rms_norm(gpu.put(x), gpu.put(w), 1e-6, out)
    assert rel(gpu.get(out), norm.rms_norm_ref(x, w, 1e-6)) < 1e-5
    for bias in (b, None):
        out = gpu.empty((T, D))
        gpu.norm.layer_norm(gpu.put(x + 2), gpu.put(w), None if bias is None else gpu.put(bias), 1e-5, out)
        assert rel(gpu.get(out), norm.layer_norm_ref(x + 2, w, bias, 1e-5)) < 1e-5


@pytest.mark.parametrize("n", [896, 3 * 4864, 151936, 5])
def test_elementwise(gpu, rng, n):
    a, b = randn(rng, 1, n, scale=4), randn(rng, 1, n, scale=4)
    da, db = gpu.put(a), gpu.put(b)
    cases = [(lambda o: gpu.act.add(da, db, o), a + b),
             (lambda o: gpu.act.silu(da, o), activation.silu_ref(a)),
             (lambda o: gpu.act.gelu(da, o), activation.gelu_ref(a)),
             (lambda o: gpu.act.swiglu(da, db, o), activation.swiglu_ref(a, b)),
             (lambda o: gpu.act.swiglu_oai(da, db, o, 1.702, 7.0),
              activation.swiglu_oai_ref(a, b, 1.702, 7.0))]
    for run, ref in cases:
        out = gpu.empty((1, n))
        run(out)
        assert rel(gpu.get(out), ref) < 1e-5


def test_split_copy(gpu, rng):
    x = randn(rng, 5, 896 + 128 + 128)
    dx = gpu.put(x)
    off = 0
    for size in (896, 128, 128):
        out = gpu.empty((5, size))
        gpu.act.split_copy(dx, off, out)
        assert np.array_equal(gpu.get(out), x[:, off:off + size])
        off += size


# -- weights into their VRAM layout (layout.cu, the twin of QuantFormat.to_vram) -------

@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4"])
def test_planes_made_on_the_device_are_to_vram_bytes(gpu, rng, name):
    from orcd.quant.builtin import builtin_table

    fmt = builtin_table().by_name[name]
    assert gpu.layout.handles(fmt)
    # widths whose planes end off 16 bytes (padding), and a single block a row
    wide = -(-2880 // fmt.block_elems) * fmt.block_elems   # GPT-OSS's rows, in whole blocks
    for n_elems in {fmt.block_elems, 7 * fmt.block_elems, sized(wide, 5 * fmt.block_elems)}:
        rows = 5
        raw = fmt.random_blocks(rows * n_elems // fmt.block_elems, rng, 0.05)
        out = gpu.empty((rows * fmt.vram_row_bytes(n_elems),), np.uint8)
        gpu.layout.to_planes(gpu.put(raw).ptr, out.ptr, rows, fmt, n_elems)
        assert np.array_equal(gpu.get(out), fmt.to_vram(raw, n_elems)), (name, n_elems)


def test_formats_the_kernel_cannot_lay_out_are_refused(gpu):
    from dataclasses import replace

    from orcd.quant.builtin import builtin_table

    table = builtin_table()
    for name in ("F32", "F16", "BF16"):   # not planar
        assert not gpu.layout.handles(table.by_name[name])
    q4k = table.by_name["Q4_K"]           # a block rewrite layout.cu does not know: numpy's
    other = replace(q4k, device=replace(q4k.device, device_rewrite=""))
    assert gpu.layout.handles(q4k) and not gpu.layout.handles(other)
    with pytest.raises(ValueError, match="Q4_K"):
        gpu.layout.to_planes(0, 0, 1, other, 256)


# -- rope ------------------------------------------------------------------------------

ROPES = {
    "qwen-neox": rope.RopeConfig(n_rot=64, head_dim=64, base=1e6, neox=True),
    "normal": rope.RopeConfig(n_rot=128, head_dim=128, base=1e4, neox=False),
    "partial": rope.RopeConfig(n_rot=32, head_dim=96, base=1e4, neox=True),
    "longrope": rope.RopeConfig(n_rot=96, head_dim=96, base=1e4, neox=True, attn_factor=1.19,
                                freq_factors=tuple(np.linspace(1.0, 8.0, 48).tolist())),
    "yarn": rope.RopeConfig(n_rot=64, head_dim=64, base=150000.0, neox=True, freq_scale=1 / 32,
                            ext_factor=1.0, n_ctx_orig=4096),
}


@pytest.mark.parametrize("name", list(ROPES))
@pytest.mark.parametrize("T", [1, 9])
def test_rope(gpu, rng, name, T):
    cfg, n_pos, n_head = ROPES[name], 3000, 5
    cos, sin = rope.RopeTable.host_arrays(cfg, n_pos)
    table = rope.RopeTable(cfg, n_pos, gpu.put(cos).ptr, gpu.put(sin).ptr)
    pos = np.sort(rng.choice(n_pos, T, replace=False)).astype(np.int32)
    x = randn(rng, T, n_head * cfg.head_dim)
    out = gpu.empty(x.shape)
    gpu.rope.rope(gpu.put(x), gpu.put(pos), table, out)
    assert rel(gpu.get(out), rope.rope_ref(x, pos, cfg)) < 1e-5


# -- attention ---------------------------------------------------------------------------

def _attend(gpu, rng, n_ctx, n_head, n_kv, hd, pos, window=0, sinks=False, hd_v=None):
    """Fill a paged cache at random (the sequence's blocks in shuffled order), store
    k/v at ``pos`` on both sides, attend; (gpu, ref)."""
    hd_v = hd_v or hd
    T = len(pos)
    n_blocks = blocks_for(n_ctx)
    table = rng.permutation(n_blocks).astype(np.int32).reshape(1, n_blocks)
    seq = np.zeros(T, np.int32)
    k_cache = (rng.standard_normal((n_blocks * KV_BLOCK, n_kv, hd))).astype(np.float16)
    v_cache = (rng.standard_normal((n_blocks * KV_BLOCK, n_kv, hd_v))).astype(np.float16)
    q, k, v = randn(rng, T, n_head * hd), randn(rng, T, n_kv * hd), randn(rng, T, n_kv * hd_v)
    sink = randn(rng, n_head, scale=2) if sinks else None
    dk, dv = gpu.put(k_cache), gpu.put(v_cache)
    dpos, paging = gpu.put(pos), gpu.paging(table, seq, n_ctx)
    gpu.attn.kv_store(dk, dv, gpu.put(k), gpu.put(v), dpos, paging)
    attention.kv_store_ref(k_cache, v_cache, k, v, kv_rows(table, seq, pos))
    assert np.array_equal(gpu.get(dk).view(np.uint16), k_cache.view(np.uint16))
    assert np.array_equal(gpu.get(dv).view(np.uint16), v_cache.view(np.uint16))
    out = gpu.empty((T, n_head * hd_v))
    scale = 1 / np.sqrt(hd)
    gpu.attn.attention(gpu.put(q), dk, dv, dpos, scale, window,
                       None if sink is None else gpu.put(sink), out, gpu.empty, paging)
    ref = attention.paged_attention_ref(q, k_cache, v_cache, table, seq, pos, scale, window, sink)
    return gpu.get(out), ref


# Prefill runs on the tensor cores: q and the probabilities as fp16 (scores, softmax
# statistics and the output accumulate in fp32), so ~1e-3 of the fp32 reference.
PREFILL_TOL = 3e-3


@pytest.mark.parametrize("n_head,n_kv,hd", sized([(14, 2, 64), (4, 4, 96), (8, 2, 128), (32, 32, 96)],
                                                [(14, 2, 64), (4, 4, 96), (8, 2, 128)]))
def test_prefill_attention(gpu, rng, n_head, n_kv, hd):
    # a first chunk; a second that attends to earlier keys too; one of many tiles (rows and keys)
    for start, T, n_ctx in ((0, 16, 512), (300, 37, 512), (0, 200, 512), (100, 130, 1024)):
        pos = np.arange(start, start + T, dtype=np.int32)
        out, ref = _attend(gpu, rng, n_ctx, n_head, n_kv, hd, pos)
        assert rel(out, ref) < PREFILL_TOL
        for t in (0, T // 2, T - 1):  # row by row: a masking error shows on its row
            assert rel(out[t], ref[t]) < 3 * PREFILL_TOL


@pytest.mark.parametrize("hd", [72, 256])
def test_prefill_attention_other_head_dims_keep_fp32_kernel(gpu, rng, hd):
    # head dims without a tensor-core instantiation: attn_fwd (fp32) serves them
    out, ref = _attend(gpu, rng, 256, 4, 2, hd, np.arange(10, 30, dtype=np.int32))
    assert rel(out, ref) < 1e-4


@pytest.mark.parametrize("n_ctx,p", [(200, 0), (200, 150), (1024, 700), (4096, 4095)])
def test_decode_attention_split(gpu, rng, n_ctx, p):
    # n_ctx > 256: the keys are split over several blocks and combined
    out, ref = _attend(gpu, rng, n_ctx, 14, 2, 64, np.array([p], np.int32))
    assert rel(out, ref) < 1e-4


@pytest.mark.parametrize("T,p0,n_ctx", [(1, 600, 1024), (1, 90, 1024), (24, 0, 64), (20, 130, 512),
                                        *sized([(300, 50, 512)], [])])
def test_attention_sinks_and_window(gpu, rng, T, p0, n_ctx):
    # GPT-OSS shape: 64 heads over 8 KV heads, head_dim 64, window 128, learned sinks
    pos = np.arange(p0, p0 + T, dtype=np.int32)
    tol = 1e-4 if T == 1 else PREFILL_TOL
    for window in (128, 8):
        out, ref = _attend(gpu, rng, n_ctx, 64, 8, 64, pos, window=window, sinks=True)
        assert rel(out, ref) < tol
    out, ref = _attend(gpu, rng, n_ctx, 64, 8, 64, pos, window=0, sinks=True)
    assert rel(out, ref) < tol


@pytest.mark.parametrize("n_head,n_kv,hd", [(4, 4, 96), (8, 2, 128), (2, 1, 256), (16, 1, 64)])
@pytest.mark.parametrize("p", [0, 63, 64, 777])
def test_decode_attention_head_shapes(gpu, rng, n_head, n_kv, hd, p):
    # the GQA-group decode kernel: MHA, groups of 4 and 16, head_dim up to 256, split edges
    out, ref = _attend(gpu, rng, 1024, n_head, n_kv, hd, np.array([p], np.int32))
    assert rel(out, ref) < 1e-4


@pytest.mark.parametrize("window,sinks", [(0, False), (128, True)])
def test_batched_decode_attends_each_sequence_over_its_own_blocks(gpu, rng, window, sinks):
    # a batch of decodes: token t is one step of sequence t, at its own position, its keys in
    # its own (interleaved) blocks of one pool
    n_seqs, max_blocks, n_head, n_kv, hd = 5, 6, 8, 2, 64
    pool = rng.permutation(n_seqs * max_blocks).astype(np.int32)
    tables = pool.reshape(n_seqs, max_blocks)
    seq = np.arange(n_seqs, dtype=np.int32)
    pos = np.array([0, 63, 64, 200, 383], np.int32)
    rows = n_seqs * max_blocks * KV_BLOCK
    k_cache = rng.standard_normal((rows, n_kv, hd)).astype(np.float16)
    v_cache = rng.standard_normal((rows, n_kv, hd)).astype(np.float16)
    q, k, v = randn(rng, n_seqs, n_head * hd), randn(rng, n_seqs, n_kv * hd), randn(rng, n_seqs, n_kv * hd)
    sink = randn(rng, n_head, scale=2) if sinks else None
    dk, dv, dpos = gpu.put(k_cache), gpu.put(v_cache), gpu.put(pos)
    paging = gpu.paging(tables, seq, max_blocks * KV_BLOCK, batched=True)
    gpu.attn.kv_store(dk, dv, gpu.put(k), gpu.put(v), dpos, paging)
    attention.kv_store_ref(k_cache, v_cache, k, v, kv_rows(tables, seq, pos))
    out = gpu.empty((n_seqs, n_head * hd))
    gpu.attn.attention(gpu.put(q), dk, dv, dpos, 0.125, window, None if sink is None else gpu.put(sink),
                       out, gpu.empty, paging)
    ref = attention.paged_attention_ref(q, k_cache, v_cache, tables, seq, pos, 0.125, window, sink)
    got = gpu.get(out)
    for t in range(n_seqs):   # each row on its own: a row that read another sequence's keys shows
        assert rel(got[t], ref[t]) < 1e-4


@pytest.mark.parametrize("n_head,n_kv,hd,batched", [(14, 2, 64, False), (4, 4, 96, False), (2, 1, 256, False),
                                                    (8, 2, 64, True)])
def test_decode_attention_also_writes_its_output_as_int8_activations(gpu, rng, n_head, n_kv, hd, batched):
    # the combine kernel quantizes what it writes (a warp a 32-value group, 256: two rounds):
    # quantize_q8_ref's bits, and the fp32 output the bits it has without them
    from orcd.ops.matmul import quantize_q8_ref
    from orcd.ops.matmul_base import Q8Act

    T, n_ctx = (3, 512) if batched else (1, 1024)
    tables = rng.permutation(T * blocks_for(n_ctx)).astype(np.int32).reshape(T, -1)
    pos = np.array([700, 5, 300][:T] if not batched else [0, 300, 511], np.int32)
    rows = tables.size * KV_BLOCK
    dk = gpu.put(rng.standard_normal((rows, n_kv, hd)).astype(np.float16))
    dv = gpu.put(rng.standard_normal((rows, n_kv, hd)).astype(np.float16))
    q, dpos = gpu.put(randn(rng, T, n_head * hd)), gpu.put(pos)
    paging = gpu.paging(tables, np.arange(T, dtype=np.int32), n_ctx, batched=batched)
    assert gpu.attn.quantizes(q, dk, dv, paging)
    plain, out = gpu.empty((T, n_head * hd)), gpu.empty((T, n_head * hd))
    gpu.attn.attention(q, dk, dv, dpos, 0.125, 0, None, plain, gpu.empty, paging)
    q8 = Q8Act(gpu.empty((T, n_head * hd), np.int8), gpu.empty((T, n_head * hd // 32)))
    gpu.attn.attention(q, dk, dv, dpos, 0.125, 0, None, out, gpu.empty, paging, q8)
    got = gpu.get(out)
    assert np.array_equal(got, gpu.get(plain))
    want_q, want_d = quantize_q8_ref(got)
    assert np.array_equal(gpu.get(q8.xq), want_q) and np.array_equal(gpu.get(q8.xd), want_d)


def test_attention_refuses_int8_activations_it_cannot_write(gpu, rng):
    from orcd.ops.matmul_base import Q8Act

    n_ctx, n_head, n_kv = 256, 4, 2
    paging = gpu.paging(contiguous_table(blocks_for(n_ctx)), [0] * 4, n_ctx)
    q, pos = gpu.put(randn(rng, 4, n_head * 64)), gpu.put(np.arange(4, dtype=np.int32))
    dk = dv = gpu.put(np.zeros((n_ctx, n_kv, 64), np.float16))
    assert not gpu.attn.quantizes(q, dk, dv, paging)      # a prompt chunk: not a decode
    odd = gpu.put(np.zeros((n_ctx, n_kv, 80), np.float16))
    assert not gpu.attn.quantizes(q.rows(0, 1), odd, odd, paging)   # 80 is not whole groups
    q8 = Q8Act(gpu.empty((4, n_head * 64), np.int8), gpu.empty((4, n_head * 2)))
    with pytest.raises(ValueError, match="int8"):
        gpu.attn.attention(q, dk, dv, pos, 0.125, 0, None, gpu.empty((4, n_head * 64)), gpu.empty, paging, q8)


def test_decode_attention_is_deterministic(gpu, rng):
    n_ctx, n_head, n_kv, hd = 2048, 14, 2, 64
    dk = gpu.put(rng.standard_normal((n_ctx, n_kv, hd)).astype(np.float16))
    dv = gpu.put(rng.standard_normal((n_ctx, n_kv, hd)).astype(np.float16))
    q, pos = gpu.put(randn(rng, 1, n_head * hd)), gpu.put(np.array([1999], np.int32))
    paging = gpu.paging(contiguous_table(blocks_for(n_ctx)), [0], n_ctx)
    outs = []
    for _ in range(3):
        out = gpu.empty((1, n_head * hd))
        gpu.attn.attention(q, dk, dv, pos, 0.125, 0, None, out, gpu.empty, paging)
        outs.append(gpu.get(out).tobytes())
    assert outs[0] == outs[1] == outs[2]


# -- MoE -------------------------------------------------------------------------------

@pytest.mark.parametrize("T,n_expert,k", [(1, 32, 4), (37, 32, 4), (5, 4, 2), (3, 128, 8)])
def test_moe_route_matches_reference(gpu, rng, T, n_expert, k):
    for logits in (randn(rng, T, n_expert, scale=2),
                   rng.integers(0, 4, (T, n_expert)).astype(np.float32)):  # many ties
        ids, w = gpu.empty((T, k), np.int32), gpu.empty((T, k))
        gpu.moe.route(gpu.put(logits), k, ids, w)
        ref_ids, ref_w = moe.route_ref(logits, k)
        assert np.array_equal(gpu.get(ids), ref_ids)
        assert rel(gpu.get(w), ref_w) < 1e-6


@pytest.mark.parametrize("T,k,D", [(1, 4, 2880), (9, 2, 896)])
def test_moe_weighted_sum(gpu, rng, T, k, D):
    y, w = randn(rng, T, k, D), rng.random((T, k)).astype(np.float32)
    out = gpu.empty((T, D))
    gpu.moe.weighted_sum(gpu.put(y), gpu.put(w), out)
    assert rel(gpu.get(out), np.einsum("tk,tkd->td", w, y)) < 1e-6
