"""VRAM sizing (orcd.vram): pure arithmetic, checked against known numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from orcd import vram
from orcd.errors import InsufficientVram

QWEN = Path("/tmp/models/qwen.gguf")


def test_kv_cache_matches_llama_cpp_for_qwen_05b():
    # Qwen2.5-0.5B: 24 layers, 2 KV heads of 64; llama.cpp reports a 384 MiB
    # fp16 KV cache at n_ctx = 32768.
    assert vram.kv_cache_bytes(24, 32768, 2, 64) == 384 << 20


def test_kv_cache_scales_with_every_factor():
    base = vram.kv_cache_bytes(2, 10, 3, 8)
    assert base == 2 * 10 * 3 * 8 * 2 * 2
    assert vram.kv_cache_bytes(4, 10, 3, 8) == 2 * base
    assert vram.kv_cache_bytes(2, 30, 3, 8) == 3 * base
    assert vram.kv_cache_bytes(2, 10, 3, 8, elem_bytes=4) == 2 * base


def test_weight_bytes_align_each_tensor():
    assert vram.weight_bytes([]) == 0
    assert vram.weight_bytes([1]) == 256
    assert vram.weight_bytes([256, 257, 100]) == 256 + 512 + 256


def test_flash_attention_drops_exactly_the_scores():
    kw = dict(n_embd=896, n_ff=4864, n_head=14, n_ctx=4096, n_vocab=151936, n_batch=512)
    plain = vram.scratch_bytes(**kw)
    flash = vram.scratch_bytes(**kw, flash_attention=True)
    assert plain - flash == 14 * 512 * 4096 * 4
    assert flash > vram.FIXED_OVERHEAD


def test_estimate_totals_its_parts():
    est = vram.estimate([1000, 3000], n_layer=2, n_ctx=64, n_head=4, n_head_kv=2, head_dim=16,
                        n_embd=64, n_ff=128, n_vocab=100)
    assert est.weights == 1024 + 3072
    assert est.kv_cache == vram.kv_cache_bytes(2, 64, 2, 16)
    assert est.total == est.weights + est.kv_cache + est.scratch


def test_check_fits_refuses_with_every_number():
    with pytest.raises(InsufficientVram) as e:
        vram.check_fits(10 << 30, 3 << 30, 1, "/models/big.gguf")
    err = e.value
    assert err.code == "INSUFFICIENT_VRAM"
    assert err.details == {"required": 10 << 30, "available": 3 << 30, "device": 1,
                           "model_path": "/models/big.gguf"}
    for text in (str(10 << 30), str(3 << 30), "device 1", "/models/big.gguf"):
        assert text in err.message


def test_check_fits_accepts_exact_fit():
    vram.check_fits(5, 5, 0, "m.gguf")  # no exception


@pytest.mark.skipif(not QWEN.is_file(), reason="real Qwen file not present")
def test_real_qwen_estimate():
    from orcd.gguf_file import ModelFile

    with ModelFile.open(QWEN) as mf:
        tensor_total = sum(t.n_bytes for t in mf.tensors.values())
        n_tensors = len(mf.tensors)
        hp = dict(n_layer=24, n_head=14, n_head_kv=2, head_dim=64, n_embd=896, n_ff=4864,
                  n_vocab=mf.vocab_size())
        est = vram.estimate_for_model(mf, hp, n_ctx=4096)
    # Weights are the file's tensor bytes plus at most 255 bytes of padding each.
    assert tensor_total <= est.weights <= tensor_total + 255 * n_tensors
    assert est.weights < QWEN.stat().st_size
    assert est.kv_cache == 48 << 20


def test_kv_pool_blocks_budget_slots_and_free_memory():
    per_token, block = 1024, 64                      # 64 KiB a block
    one = 4096 // block                               # one full context: 64 blocks
    # no budget: every one of the 16 slots may hold a full context
    assert vram.kv_pool_blocks(per_token, 4096, 16, block) == 16 * one
    # --kv-cache-size-mb is the whole pool ...
    assert vram.kv_pool_blocks(per_token, 4096, 16, block, budget_bytes=8 << 20) == 128
    # ... but never less than one context (what the load's VRAM check counted)
    assert vram.kv_pool_blocks(per_token, 4096, 16, block, budget_bytes=1 << 20) == one
    # a device caps it at what is free, again never below one context
    assert vram.kv_pool_blocks(per_token, 4096, 16, block, free_bytes=100 * 65536 + 5) == 100
    assert vram.kv_pool_blocks(per_token, 4096, 16, block, free_bytes=0) == one
    assert vram.kv_pool_blocks(per_token, 100, 1, block) == 2   # a partial block rounds up
