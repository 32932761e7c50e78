"""Full-size synthetic Phi-3-mini (Q4_K_M, Q4_0) and GPT-OSS-20B (MXFP4) on the GPU
through the worker (issue 8): load with progress, /health facts, generation,
VRAM back to its level after many requests, and GPT-OSS's VRAM_OOM recovery.

The models are made on the GPU machine with `orcd synth` into
$ORCD_FULL_SIZE_DIR (phi3-mini.gguf, phi3-mini-q4_0.gguf, gpt-oss-20b.gguf);
$ORCD_O200K_JSON is GPT-OSS's o200k_harmony tokenizer.json
(scripts/make_o200k_harmony.py). Without them these tests skip."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.cuda
DIR = Path(os.environ.get("ORCD_FULL_SIZE_DIR", "/nonexistent"))
GB = 1e9


def model(name: str) -> Path:
    path = DIR / f"{name}.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not made (set ORCD_FULL_SIZE_DIR)")
    return path


def server_config(path: Path, **kw):
    from orcd.server.state import ServerConfig
    return ServerConfig(model_path=str(path), model_ref=path.stem, worker_id=str(uuid.uuid4()),
                        device="cuda:0", **kw)


def execute(url: str, job: str, prompt: str, max_tokens: int) -> list:
    from orcd.devkit.server_testing import SSEStream
    return SSEStream(f"{url}/execute", {"job_id": job, "prompt": prompt, "temperature": 0,
                                        "max_tokens": max_tokens}).join(timeout=300)


@pytest.mark.parametrize("name,quant,tokenizer", [("phi3-mini", "Q4_K_M", "gguf-spm"),
                                                  ("phi3-mini-q4_0", "Q4_0", "gguf-spm"),
                                                  ("gpt-oss-20b", None, "hf-json")])
def test_serves_full_size_model(name, quant, tokenizer):
    from orcd.devkit.server_testing import running_server
    path = model(name)
    extra = {}
    if name == "gpt-oss-20b":
        tok = os.environ.get("ORCD_O200K_JSON")
        if not tok or not Path(tok).is_file():
            pytest.skip("set ORCD_O200K_JSON to the o200k_harmony tokenizer.json")
        extra["tokenizer_path"] = tok
    with running_server(server_config(path, ctx_size=4096, **extra), wait=None) as s:
        health = s.wait_status("healthy", timeout=600)
        progress = [e["percent"] for e in s.narration.events() if e["event"] == "model_load_progress"]
        assert {0, 25, 50, 75, 100} <= set(progress), progress
        assert health["device"] == "cuda:0" and health["resident"] is True
        assert health["tokenizer_kind"] == tokenizer
        if quant:
            assert health["quant_kind"] == quant
        assert health["vram_bytes_used"] >= path.stat().st_size * 0.95
        events = execute(s.url, "first", "Hello, how are you?", 16)
        assert events[0][0] == "started" and events[-1][0] == "end", events[-1]
        assert events[-1][1]["tokens_out"] >= 1
        backend = s.state.loaded.backend
        level = sum(backend.memory_usage().values())   # weights, scratch and the pooled KV cache
        for i in range(100):
            assert execute(s.url, f"r{i}", "Count: 1 2 3", 2)[-1][0] == "end"
        assert sum(backend.memory_usage().values()) == level


def test_gpt_oss_vram_at_32k_context_is_about_16_gb(host):
    from orcd.engine import Engine
    from orcd.load import load_model
    lm = load_model(model("gpt-oss-20b"), host=host, device="cuda:0", n_ctx=32768)
    try:
        Engine(lm).new_runner(32768)             # the KV cache of the whole tested context
        used = sum(lm.backend.memory_usage().values())
        assert 0.8 * 16 * GB <= used <= 1.2 * 16 * GB, used
    finally:
        lm.close()


def test_gpt_oss_vram_oom_leaves_the_worker_serving():
    from orcd.devkit.server_testing import running_server
    from orcd.server.app import load_for_serving

    def tight(cfg, progress):
        lm = load_for_serving(cfg, progress)
        ledger = lm.backend.alloc.ledger
        lm.backend.free_kv_cache()
        ledger.budget = ledger.total + (300 << 20)   # room for a 4k-position cache, not an 8k one
        return lm

    with running_server(server_config(model("gpt-oss-20b"), ctx_size=32768), loader=tight,
                        wait=None) as s:
        s.wait_status("healthy", timeout=600)
        long_prompt = "word " * 3000                  # + 2048 new tokens: an 8192-position cache
        events = execute(s.url, "big", long_prompt, 2048)
        assert events[-1][0] == "error" and events[-1][1]["code"] == "VRAM_OOM", events[-1]
        assert s.wait_status("healthy")["status"] == "healthy"
        events = execute(s.url, "small", "Hello", 8)
        assert events[-1][0] == "end", events[-1]
        assert any(e["event"] == "error" for e in s.narration.events())
