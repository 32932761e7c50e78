"""bench/compare.py's host-side logic, so a GPU run is not spent finding its bugs:
the bytes one decoded token reads, rows kept across calls only for the same card,
and the table's ratios and bandwidth floor."""

from __future__ import annotations

import pytest


@pytest.fixture
def compare(bench_module, tmp_path, monkeypatch):
    module = bench_module("compare")
    monkeypatch.setattr(module, "ROWS", tmp_path / "rows.json")
    return module


def test_rows_are_kept_for_the_same_card_only(compare):
    rows = {"qwen2-0.5b": {"model": "qwen2-0.5b", "bytes_per_token": 100, "orcd": {"decode_tok_s": 5.0},
                           "peer": {}}}
    assert compare.load_rows("card A") == {}
    compare.save_rows("card A", 1e12, rows)
    assert compare.load_rows("card A") == rows
    assert compare.load_rows("card B") == {}        # never mix numbers from two cards


def test_table_ratios_and_floor(compare):
    rows = [{"model": "m", "bytes_per_token": 10**9,
             "orcd": {"decode_tok_s": 300.0, "prefill_tok_s": 5000.0, "ttft_ms": 50.0, "load_s": 1.0,
                      "vram_bytes": 2 << 30},
             "peer": {"decode_tok_s": 400.0, "prefill_tok_s": 10000.0, "ttft_ms": 10.0}}]
    md = compare.table(rows, "card A", 3e12, {"int8": "auto"})
    lines = {line.split("|")[2].strip(): line for line in md.splitlines() if line.startswith("| m ")}
    assert "card A" in md and "int8" in md
    decode = lines["decode tok/s (tg128 after 512)"]
    assert "| 0.75 |" in decode                       # orcd / llama.cpp
    assert "10% of 3,000" in decode                   # 300 tok/s of a 3e12 / 1e9 floor
    assert "| 0.50 |" in lines["prefill tok/s (pp512)"]
    assert "| 2,048.0 |" in lines["peak VRAM MiB"] and "n/a" in lines["peak VRAM MiB"]


def test_bytes_per_token_counts_experts_at_their_share(compare, host, tiny_model):
    # the floor's numerator: every weight but the token embedding, experts at used / total
    from orcd.gguf_file import ModelFile

    path = tiny_model("gpt-oss-tiny")
    mf = ModelFile.open(path)
    used = mf.metadata[f"{mf.arch}.expert_used_count"]
    total = mf.metadata[f"{mf.arch}.expert_count"]
    experts = [t.n_bytes for name, t in mf.tensors.items() if "_exps." in name]
    dense = sum(t.n_bytes for name, t in mf.tensors.items()
                if "_exps." not in name and name != "token_embd.weight")
    assert experts and used < total
    got = compare.bytes_per_token(path, host)
    assert abs(got - (dense + sum(experts) * used / total)) <= len(experts)   # per-tensor rounding
    assert got < dense + sum(experts)
