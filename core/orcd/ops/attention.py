"""Attention over a KV cache: causal, GQA, optional sliding window and learned
sinks (GPT-OSS). K and V are stored in fp16, as llama.cpp and the CUDA path
store them; scores and softmax are float32."""

from __future__ import annotations

import numpy as np


def kv_store_ref(k_cache: np.ndarray, v_cache: np.ndarray, k: np.ndarray, v: np.ndarray,
                 pos: np.ndarray) -> None:
    # k_cache, v_cache: [n_ctx, n_kv, hd] fp16; k, v: [T, n_kv * hd]
    n_kv, hd = k_cache.shape[1], k_cache.shape[2]
    k_cache[pos] = k.reshape(-1, n_kv, hd).astype(np.float16)
    v_cache[pos] = v.reshape(-1, n_kv, v_cache.shape[2]).astype(np.float16)


def attention_ref(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos: np.ndarray,
                  scale: float, window: int = 0, sinks: np.ndarray | None = None) -> np.ndarray:
    """q: [T, n_head * hd] at positions ``pos``; keys 0..pos[-1] are in the cache.

    A key at position p0 is visible to a query at p1 when p0 <= p1 and, with a
    window, p1 - p0 < window. ``sinks`` [n_head] adds one logit per head that
    takes part in the softmax's denominator only. Returns [T, n_head * hd_v].
    """
    T = q.shape[0]
    n_kv, hd = k_cache.shape[1], k_cache.shape[2]
    hd_v = v_cache.shape[2]
    n_head = q.shape[1] // hd
    group = n_head // n_kv
    n_keys = int(pos[-1]) + 1
    K = k_cache[:n_keys].astype(np.float32)                      # [S, n_kv, hd]
    V = v_cache[:n_keys].astype(np.float32)                      # [S, n_kv, hd_v]
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
    out = np.einsum("tkgs,skd->tkgd", p / denom, V)              # [T, n_kv, g, hd_v]
    return out.reshape(T, n_head * hd_v).astype(np.float32)
