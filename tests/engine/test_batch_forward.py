"""A batch of decodes (backend.forward_batch, batched=True) over a paged KV pool:
each sequence's logits equal those of the same sequence decoded alone, bit for
bit, whatever else shares the step -- the property continuous batching rests on.
The numpy reference in CI; the same test on the GPU (marker ``cuda``), where the
single-token fused kernels must step aside for per-row GEMVs (Phase.ROWS)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from orcd.kvcache import blocks_for
from orcd.load import load_model

PRESETS = ["qwen2-tiny", "gpt-oss-tiny"]
DEVICES = ["cpu", pytest.param(f"cuda:{os.environ.get('ORCD_TEST_GPU', '0')}", marks=pytest.mark.cuda)]


def _prefill(b, lm, pool, table, prompt):
    hp = lm.hp
    n_ctx = len(table) * 64
    return b.forward_batch(lm.model, pool, [table], [0] * len(prompt), prompt, list(range(len(prompt))),
                           n_ctx, batched=False, last_only=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", PRESETS)
def test_a_decode_row_does_not_depend_on_its_batch(tiny_model, host, preset, device):
    lm = load_model(tiny_model(preset), host=host, device=device)
    try:
        _check(lm)
    finally:
        lm.close()


@pytest.mark.cuda
@pytest.mark.parametrize("preset", PRESETS)
def test_on_the_tensor_cores_too(tiny_model, host, preset):
    # --cuda-option mma=on: the batch GEMVs, residual adds and gated GEMVs on gemv_mma
    lm = load_model(tiny_model(preset), host=host, device=DEVICES[1].values[0], mma=True)
    try:
        _check(lm)
    finally:
        lm.close()


def _check(lm):
    b, hp = lm.backend, lm.hp
    host = b.to_host
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, hp.n_vocab, n).tolist() for n in (5, 70, 130)]
    max_blocks = blocks_for(200)
    pool = b.new_kv_pool(hp.n_layer, len(prompts) * max_blocks + 1, hp.n_head_kv, hp.head_dim,
                         hp.get("head_dim_v"))
    blocks = rng.permutation(len(prompts) * max_blocks).reshape(len(prompts), max_blocks).tolist()
    n_ctx = max_blocks * 64
    last = []
    for s, prompt in enumerate(prompts):   # each sequence's prompt into its own (scattered) blocks
        logits = _prefill(b, lm, pool, blocks[s], prompt)
        last.append(int(np.argmax(host(logits)[-1])))
    pos = [len(p) for p in prompts]
    # the three sequences' next tokens together, then each alone (same cache state: a
    # decode writes only its own new position, rewritten identically)
    together = host(b.forward_batch(lm.model, pool, blocks, [0, 1, 2], last, pos, n_ctx, batched=True,
                                    last_only=False)).reshape(len(prompts), -1)
    for s in range(len(prompts)):
        alone = host(b.forward_batch(lm.model, pool, [blocks[s]], [0], [last[s]], [pos[s]], n_ctx,
                                     batched=True, last_only=False)).reshape(1, -1)
        np.testing.assert_array_equal(together[s], alone[0])
    # and each equals the single-request engine's path within rounding (another order of sums)
    b.free_kv_pool(pool)
    solo = b.new_kv_cache(hp.n_layer, n_ctx, hp.n_head_kv, hp.head_dim, hp.get("head_dim_v"))
    ids = prompts[1] + [last[1]]
    ref = host(lm.model.forward(b.ops, b.ids(ids), b.positions(0, len(ids)), solo, last_only=False)).reshape(len(ids), -1)
    tol = 1e-4 if not hasattr(b, "device") else 3e-2   # GPU: fp16 activations, int8 GEMVs vs the GEMM
    np.testing.assert_allclose(together[1], ref[-1], rtol=tol, atol=tol * np.abs(ref).max())
