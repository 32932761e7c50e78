"""The llama plugin (plugins/llama, written as a third party would write it):
found through its entry point, public API only, its own kit tests
green, and the real SmolLM2-135M-Instruct Q4_1 identical to llama.cpp and
served over HTTP. Goldens: scripts/make_smollm2_goldens.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path

import pytest

from orcd.devkit import testing
from orcd.load import load_model

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "plugins" / "llama"
GOLDEN = ROOT / "tests" / "golden" / "smollm2" / "greedy.json"

# Prompts whose 32 greedy tokens are identical to llama.cpp's. The others agree
# for 10 to 31 tokens and then part at a near tie (llama.cpp's top-2 gap 0.04-0.33,
# and at three of them llama.cpp itself picks orcd's token when it evaluates the
# same prefix in one batch instead of token by token): see docs/plugins.md.
IDENTICAL = ("Write a haiku about GPU computing", "What is 12 times 7?",
             "The three primary colors are", "Name a famous scientist and say why they matter.",
             "Translate 'good morning' into Spanish.", "The capital of France is", "Water boils at")
MIN_SHARED_PREFIX = 10


def test_found_through_its_entry_point(host):
    ep = next(ep for ep in metadata.entry_points(group="orcd") if ep.name == "llama")
    assert ep.value == "orcd_llama" and ep.dist.metadata["Name"] == "orcd-plugin-llama"
    assert host.architecture("llama").plugin == "llama"
    assert host.infos["llama"].provides["architectures"] == ["llama"]
    assert {"llama-tiny", "smollm2-135m"} <= set(host.synth_presets)


def test_uses_only_the_public_api():
    assert testing.private_imports(EXAMPLE / "orcd_llama") == []


def test_private_imports_are_found(tmp_path):
    (tmp_path / "bad.py").write_text("import numpy\nfrom orcd.backends.cpu import CpuOps\n"
                                     "from orcd.ops.rope import RopeConfig\nimport orcd.engine\n")
    assert testing.private_imports(tmp_path) == ["bad.py:2 orcd.backends.cpu", "bad.py:4 orcd.engine"]


def test_its_own_test_suite_passes():
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                       cwd=EXAMPLE, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_smollm2_shape_preset_matches_the_real_file(host, smollm2):
    from orcd.devkit.synth import plan
    from orcd.gguf_file import ModelFile

    with ModelFile.open(smollm2) as mf:
        real = {n: (t.shape, t.type_id) for n, t in mf.tensors.items()}
        assert testing.unread_keys(host.architecture("llama"), mf.metadata) == []
    planned = {t.name: (t.shape, t.type_id) for t in plan(host, "smollm2-135m")}
    assert planned == real


# -- the real SmolLM2 --------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2() -> Path:
    from orcd.pull import cached_path, pull

    path = cached_path("smollm2-135m")
    if path is None:
        if os.environ.get("ORCD_NO_PULL"):
            pytest.skip("SmolLM2 not cached and ORCD_NO_PULL is set")
        path = pull("smollm2-135m", progress=False)
    return path


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


@pytest.mark.slow
def test_smollm2_greedy_matches_llama_cpp(smollm2, host, golden):
    from orcd.engine import Engine, GenerateRequest
    from orcd.sampling import SamplingParams

    from support import all_logits, assert_greedy_agrees, load_script
    qwen_prompt_ids = load_script("make_parity_goldens").qwen_prompt_ids

    lm = load_model(smollm2, host=host, device="cpu", n_ctx=golden["n_ctx"],
                    activation_rounding="ggml-cpu")
    try:
        engine = Engine(lm)
        identical = []
        for case in golden["cases"]:
            assert qwen_prompt_ids(lm.tokenizer, case["kind"], case["text"]) == case["prompt_ids"]
            got = engine.generate(GenerateRequest(case["prompt_ids"], max_tokens=32,
                                                  sampling=SamplingParams(temperature=0.0)))
            want = case["greedy_ids"]
            if case["text"] in IDENTICAL:
                ids = case["prompt_ids"] + got.token_ids
                n = len(case["prompt_ids"])
                if assert_greedy_agrees(lambda k: all_logits(lm, ids[:n + k])[-1], got.token_ids, want,
                                        f"{case['text']!r}: {got.text!r}"):
                    identical.append(case["text"])
            else:
                assert got.token_ids[:MIN_SHARED_PREFIX] == want[:MIN_SHARED_PREFIX], case["text"]
        # equal but where llama.cpp's top two were a near-tie (support.NEAR_TIE): which
        # near-ties flip depends on the CPU's BLAS (all 7 were equal on one machine, 4 on
        # another, whose other 3 parted at gaps of 0.008, 0.03 and 0.25)
        assert len(identical) >= len(IDENTICAL) // 2, identical
    finally:
        lm.close()


@pytest.mark.slow
def test_orcd_serve_smollm2_answers_a_chat(smollm2):
    import httpx

    from orcd.devkit.server_testing import running_server
    from orcd.server.state import ServerConfig

    cfg = ServerConfig(model_path=str(smollm2), model_ref="smollm2-135m",
                       worker_id=str(uuid.uuid4()), device="cpu", ctx_size=512)
    with running_server(cfg, wait="healthy") as srv:
        r = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120, json={
            "model": "smollm2-135m", "temperature": 0, "max_tokens": 24,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert "Paris" in choice["message"]["content"], choice
