"""Attention over a KV cache: causal, GQA, optional sliding window and learned
sinks (GPT-OSS). K and V are stored in fp16, as llama.cpp and the CUDA path
store them; scores and softmax are float32."""

from __future__ import annotations

import numpy as np


def kv_store_ref(k_cache: np.ndarray, v_cache: np.ndarray, k: np.ndarray, v: np.ndarray,
                 rows: np.ndarray) -> None:
    # k_cache, v_cache: [n_rows, n_kv, hd] fp16; k, v: [T, n_kv * hd] -> at rows (kvcache.kv_rows)
    n_kv, hd = k_cache.shape[1], k_cache.shape[2]
    k_cache[rows] = k.reshape(-1, n_kv, hd).astype(np.float16)
    v_cache[rows] = v.reshape(-1, n_kv, v_cache.shape[2]).astype(np.float16)


def paged_attention_ref(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, tables: np.ndarray,
                        seq: np.ndarray, pos: np.ndarray, scale: float, window: int = 0,
                        sinks: np.ndarray | None = None, round_fp16: bool = False) -> np.ndarray:
    """attention_ref for tokens of several sequences: token t (of sequence seq[t], at
    pos[t]) attends over its own sequence's keys, found through its block table."""
    from orcd.kvcache import kv_rows

    seq, pos = np.asarray(seq), np.asarray(pos)
    out = np.empty((q.shape[0], q.shape[1] // k_cache.shape[2] * v_cache.shape[2]), np.float32)
    for s in np.unique(seq):
        ts = np.flatnonzero(seq == s)
        n_keys = int(pos[ts].max()) + 1
        rows = kv_rows(tables, np.full(n_keys, s), np.arange(n_keys))
        out[ts] = attention_ref(q[ts], k_cache[rows], v_cache[rows], pos[ts], scale, window, sinks, round_fp16)
    return out


def attention_ref(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos: np.ndarray,
                  scale: float, window: int = 0, sinks: np.ndarray | None = None,
                  round_fp16: bool = False) -> np.ndarray:
    """q: [T, n_head * hd] at positions ``pos``; keys 0..max(pos) are in the cache.

    A key at position p0 is visible to a query at p1 when p0 <= p1 and, with a
    window, p1 - p0 < window. ``sinks`` [n_head] adds one logit per head that
    takes part in the softmax's denominator only. Returns [T, n_head * hd_v].
    ``round_fp16`` rounds q and the probabilities to fp16 before their products
    with the fp16 cache, as llama.cpp's CPU attention does (without flash
    attention); only the llama.cpp parity mode asks for it.
    """
    T = q.shape[0]
    n_kv, hd = k_cache.shape[1], k_cache.shape[2]
    hd_v = v_cache.shape[2]
    n_head = q.shape[1] // hd
    group = n_head // n_kv
    n_keys = int(np.max(pos)) + 1
    K = k_cache[:n_keys].astype(np.float32)                      # [S, n_kv, hd]
    V = v_cache[:n_keys].astype(np.float32)                      # [S, n_kv, hd_v]
    if round_fp16:
        q = q.astype(np.float16).astype(np.float32)
    qh = q.reshape(T, n_kv, group, hd)                           # [T, n_kv, g, hd]
    scores = np.einsum("tkgd,skd->tkgs", qh, K) * np.float32(scale)  # [T, n_kv, g, S]
    key_pos = np.arange(n_keys)
    visible = key_pos[None, :] <= pos[:, None]                   # [T, S]
    if window > 0:
        visible &= (pos[:, None] - key_pos[None, :]) < window
    scores = np.where(visible[:, None, None, :], scores, -np.inf)
    m = scores.max(axis=-1, keepdims=True)
    if sinks is not None:
        s = sinks.astype(np.float32).reshape(1, n_kv, group, 1)
        m = np.maximum(m, s)
    p = np.exp(scores - m)
    denom = p.sum(axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + np.exp(s - m)
    p = p / denom
    if round_fp16:
        p = p.astype(np.float16).astype(np.float32)
    out = np.einsum("tkgs,skd->tkgd", p, V)                      # [T, n_kv, g, hd_v]
    return out.reshape(T, n_head * hd_v).astype(np.float32)


# -- CUDA ------------------------------------------------------------------------
# Launchers for attention.cu. Prefill (T > 1): attn_prefill_tc, tiles of 64
# query rows per head on the tensor cores (value head dims 64 / 96 / 128, key
# head dims multiples of 16; else attn_fwd, one pass per (head, query row)). Decode (T == 1): the keys are split into chunks of
# DECODE_KEYS_PER_SPLIT over the whole context (a fixed grid, so the step is
# graph-capturable); one block per (KV head, split) serves the GQA group from
# shared memory (attn_decode), splits past the last key exit at once, and a
# second kernel merges the rest in a fixed order.

# Measured on an H200 (qwen2-0.5b shape, decode graph replay at position 600):
# 256 keys per split 2.50 ms/step, 128 1.83, 64 1.55 -- each block's tile loop
# is latency-bound, so more, shorter splits win; the combine stays cheap.
DECODE_KEYS_PER_SPLIT = 64    # == kvcache.KV_BLOCK: a split reads one block of the paged cache
ATT_TILE = 128
ATT_MAX_HD = 256
DEC_THREADS = 256   # attn_decode: one block per (KV head, split) serves the query-head group
PF_BQ, PF_THREADS = 64, 128      # attn_prefill_tc: query rows and threads per block
PF_HEAD_DIMS = (64, 96, 128)      # value head dims with an attn_prefill_tc_v<N> instantiation


def prefill_smem_bytes(hd: int, hd_v: int) -> int:
    """attn_prefill_tc's dynamic shared memory: Q and K tiles [64, hd + 8] and a V
    tile [64, hd_v + 8], fp16."""
    return 2 * (2 * PF_BQ * (hd + 8) + PF_BQ * (hd_v + 8))


def decode_grid_splits(n_splits: int, n_kv: int, T: int, wave_blocks: int) -> int:
    """attn_decode's blocks along the splits: about one wave of blocks in all (``wave_blocks``
    resident at once), never more than the splits. A block takes every gridDim-th split, so
    a context of thousands of splits (the model's own, orcd serve's default) launches one
    wave, not a block per split of which most leave at once; a short one keeps a block a split."""
    return max(1, min(n_splits, -(-wave_blocks // (n_kv * T))))


def combine_smem(n_splits: int) -> int:
    """attn_combine's dynamic shared memory: each split's m, l and weight (fp32)."""
    return 12 * n_splits


def split_plan(T: int, n_ctx: int) -> tuple[int, int]:
    """(keys per split, number of splits) for T query rows over an n_ctx cache."""
    if T == 1 and n_ctx > DECODE_KEYS_PER_SPLIT:
        return DECODE_KEYS_PER_SPLIT, -(-n_ctx // DECODE_KEYS_PER_SPLIT)
    return n_ctx, 1


def paging_args(cache) -> list:
    """The kernels' view of a paged cache (kvcache.KVCache on the device): block
    tables, their row length, each token's sequence."""
    return [np.uint64(cache.tables.ptr), int(cache.tables.shape[1]), np.uint64(cache.seq.ptr)]


class AttentionKernels:
    """Kernels on a paged KV cache (kvcache.py): every call takes the KVCache view
    ``paging`` (its tables and seq; the layer's K/V tensors come apart)."""

    SOURCE = "attention.cu"   # package data of orcd.ops (orcd.backends.cuda.backend.kernel_sources lists it)

    def __init__(self, device, compiler, launcher) -> None:
        from orcd.backends.cuda.nvrtc import KernelSource

        module = compiler.load(device, KernelSource.from_package("orcd.ops", self.SOURCE))
        self._store = module.function("kv_store")
        self._rope_store = module.function("rope_kv_store")
        self._fwd = module.function("attn_fwd")
        self._prefill_tc = {v: module.function(f"attn_prefill_tc_v{v}") for v in PF_HEAD_DIMS}
        self._combine = module.function("attn_combine")
        self._decode = module.function("attn_decode")
        self._decode_rope = module.function("attn_decode_rope")
        self._launch = launcher
        # attn_decode's blocks resident at once: 8 of DEC_THREADS a multiprocessor (2,048 threads)
        self.wave_blocks = 8 * device.info.sm_count

    def kv_store(self, k_cache, v_cache, k, v, pos, paging) -> None:
        # caches: [rows, n_kv, hd] fp16; k, v: [T, n_kv * hd] f32; pos: [T] int32 (their rows: paging)
        T = k.shape[0]
        n_k = k_cache.shape[1] * k_cache.shape[2]
        n_v = v_cache.shape[1] * v_cache.shape[2]
        self._launch(self._store, (-(-max(n_k, n_v) // 256), T), 256,
                     [np.uint64(k_cache.ptr), np.uint64(v_cache.ptr), np.uint64(k.ptr),
                      np.uint64(v.ptr), np.uint64(pos.ptr), *paging_args(paging), n_k, n_v])

    def rope_kv_store(self, q, k, v, k_cache, v_cache, pos, table, q_out, paging) -> None:
        """q_out = rope(q); rope(k) and v into the caches at the tokens' rows (one launch).
        q, q_out: [T, n_head * hd]; k, v: [T, n_kv * hd(_v)] f32; table: a RopeTable."""
        T = q.shape[0]
        _, n_kv, hd = k_cache.shape
        hd_v = v_cache.shape[2]
        n_head = q.shape[1] // hd
        cfg = table.cfg
        threads = min(256, max(32, -(-max(hd, hd_v) // 32) * 32))
        self._launch(self._rope_store, (n_head + n_kv, T), threads,
                     [np.uint64(q.ptr), np.uint64(q_out.ptr), np.uint64(k.ptr), np.uint64(v.ptr),
                      np.uint64(k_cache.ptr), np.uint64(v_cache.ptr), np.uint64(pos.ptr),
                      *paging_args(paging),
                      np.uint64(table.cos_ptr), np.uint64(table.sin_ptr), n_head, n_kv, hd, hd_v,
                      cfg.n_rot, np.int32(1 if cfg.neox else 0), table.n_pos])

    @classmethod
    def ropes_in_decode(cls, q, k_cache, v_cache, paging) -> bool:
        """Whether ``rope_attention`` takes this call: decodes where no row of the launch
        reads a key another row stores -- one sequence's one token, or a batch whose
        rows are ``apart`` -- and hd == hd_v."""
        return cls._decodes(q, k_cache, v_cache, paging) and (not paging.batched or paging.apart)

    def rope_attention(self, q, k, v, k_cache, v_cache, pos, table, scale: float, window: int, sinks, out,
                       empty, paging, q8=None) -> None:
        """rope_kv_store then ``attention`` for decodes, the store and RoPE inside the
        decode kernel (attn_decode_rope, then attn_combine): the same bits, a launch
        fewer. q, k, v before RoPE; where ``ropes_in_decode``."""
        if not self.ropes_in_decode(q, k_cache, v_cache, paging):
            raise ValueError(f"rope_attention: decodes whose rows store no key another row reads "
                             f"(one token, or a batch apart), got q {q.shape}"
                             f"{' (batched, not apart)' if paging.batched else ''}")
        self._check_heads(q, k_cache, v_cache)
        self._check_q8(q, k_cache, v_cache, paging, q8, out)
        self._attention_decode(q, k_cache, v_cache, pos, scale, window, sinks, out, empty, paging, q8,
                               fresh=(k, v, table))

    @staticmethod
    def _check_heads(q, k_cache, v_cache) -> None:
        _, n_kv, hd = k_cache.shape
        hd_v, n_head = v_cache.shape[2], q.shape[1] // hd
        if hd > ATT_MAX_HD or hd_v > ATT_MAX_HD or hd % 2 or n_head % n_kv:
            raise ValueError(f"attention: unsupported head_dim {hd}/{hd_v} or heads {n_head}/{n_kv}")

    def _check_q8(self, q, k_cache, v_cache, paging, q8, out) -> None:
        if q8 is not None and (not self.quantizes(q, k_cache, v_cache, paging) or q8.shape != out.shape):
            raise ValueError(f"attention: int8 activations {q8.shape} of out {out.shape} only for decodes "
                             "with head dims of whole 32-value groups")

    @staticmethod
    def _decodes(q, k_cache, v_cache, paging) -> bool:
        """Whether ``attention`` takes the decode kernels (split keys, then the combine):
        one token, or a batch of decodes, with hd == hd_v."""
        return (q.shape[0] == 1 or paging.batched) and k_cache.shape[2] == v_cache.shape[2]

    @classmethod
    def quantizes(cls, q, k_cache, v_cache, paging) -> bool:
        """Whether ``attention`` can also write its output's int8 activations (``q8``):
        decodes (the combine kernel writes every output), head dims a whole number of
        32-value groups."""
        return cls._decodes(q, k_cache, v_cache, paging) and v_cache.shape[2] % 32 == 0

    def attention(self, q, k_cache, v_cache, pos, scale: float, window: int, sinks, out,
                  empty, paging, q8=None) -> None:
        """out [T, n_head * hd_v] = attention of q [T, n_head * hd] over the cache;
        ``empty(shape)`` gives scratch for the decode splits' partials. ``paging``
        (the KVCache view): with ``paging.batched`` each token is one decode of its
        own sequence, else the tokens are consecutive positions of one sequence.
        ``q8`` (a Q8Act like out, where ``quantizes``): out's int8 activations too,
        quantize_q8's bits, in the same launch."""
        self._check_q8(q, k_cache, v_cache, paging, q8, out)
        self._check_heads(q, k_cache, v_cache)
        _, n_kv, hd = k_cache.shape
        n_ctx = paging.n_ctx
        hd_v = v_cache.shape[2]
        T = q.shape[0]
        n_head = q.shape[1] // hd
        if self._decodes(q, k_cache, v_cache, paging):
            self._attention_decode(q, k_cache, v_cache, pos, scale, window, sinks, out, empty, paging, q8)
            return
        if T > 1 and not paging.batched and hd % 16 == 0 and hd_v in PF_HEAD_DIMS:   # tensor cores
            self._launch(self._prefill_tc[hd_v], (-(-T // PF_BQ), n_head), PF_THREADS,
                         [np.uint64(q.ptr), np.uint64(k_cache.ptr), np.uint64(v_cache.ptr),
                          np.uint64(pos.ptr), *paging_args(paging), np.uint64(0 if sinks is None else sinks.ptr),
                          np.uint64(out.ptr), T, n_head, n_kv, hd, float(scale), int(window)],
                         shared=prefill_smem_bytes(hd, hd_v))
            return
        kps, n_splits = split_plan(1 if paging.batched else T, n_ctx)
        part = empty((T, n_head, n_splits, hd_v + 2)) if n_splits > 1 else None
        sink = np.uint64(0 if sinks is None else sinks.ptr)
        self._launch(self._fwd, (n_head, n_splits, T), ATT_TILE,
                     [np.uint64(q.ptr), np.uint64(k_cache.ptr), np.uint64(v_cache.ptr),
                      np.uint64(pos.ptr), *paging_args(paging), sink, np.uint64(out.ptr),
                      np.uint64(0 if part is None else part.ptr), n_head, n_kv, hd, hd_v,
                      float(scale), int(window), kps, n_splits])
        if part is not None:
            self._launch(self._combine, (n_head, T), 128,
                         [np.uint64(part.ptr), np.uint64(pos.ptr), sink, np.uint64(out.ptr), np.uint64(0),
                          np.uint64(0), n_head, hd_v, int(window), kps, n_splits], shared=combine_smem(n_splits))

    def _attention_decode(self, q, k_cache, v_cache, pos, scale, window, sinks, out, empty, paging,
                          q8=None, fresh=None) -> None:
        # T query rows, each one decode of its sequence: attn_decode per (KV head, split,
        # row), then attn_combine (always); fresh (k, v, RopeTable): attn_decode_rope
        _, n_kv, hd = k_cache.shape
        T, n_head = q.shape[0], q.shape[1] // hd
        kps = DECODE_KEYS_PER_SPLIT                  # == KV_BLOCK: a split is one block
        n_splits = -(-paging.n_ctx // kps)
        group = n_head // n_kv
        part = empty((T, n_head, n_splits, hd + 2))
        shared = 4 * group * (hd + kps) + 2 * kps * (2 * hd + 2)
        tail = [np.uint64(part.ptr), n_head, n_kv, hd, float(scale), int(window), kps, n_splits]
        grid = (n_kv, decode_grid_splits(n_splits, n_kv, T, self.wave_blocks), T)
        if fresh is None:
            self._launch(self._decode, grid, DEC_THREADS,
                         [np.uint64(q.ptr), np.uint64(k_cache.ptr), np.uint64(v_cache.ptr),
                          np.uint64(pos.ptr), *paging_args(paging), *tail], shared=shared)
        else:
            k, v, table = fresh
            self._launch(self._decode_rope, grid, DEC_THREADS,
                         [np.uint64(q.ptr), np.uint64(k.ptr), np.uint64(v.ptr), np.uint64(k_cache.ptr),
                          np.uint64(v_cache.ptr), np.uint64(pos.ptr), *paging_args(paging),
                          np.uint64(table.cos_ptr), np.uint64(table.sin_ptr), table.cfg.n_rot,
                          np.int32(1 if table.cfg.neox else 0), table.n_pos, *tail], shared=shared)
        self._launch(self._combine, (n_head, T), 128,
                     [np.uint64(part.ptr), np.uint64(pos.ptr), np.uint64(0 if sinks is None else sinks.ptr),
                      np.uint64(out.ptr), np.uint64(0 if q8 is None else q8.xq.ptr),
                      np.uint64(0 if q8 is None else q8.xd.ptr), n_head, hd, int(window), kps, n_splits],
                     shared=combine_smem(n_splits))