"""Live oracles (marker ``oracle``): llama.cpp and tiktoken against orcd on the stored
cases and on seeded random text. Skipped where an oracle is not installed."""

from __future__ import annotations

import random

import pytest

from test_tokenizers import (goldens_script, o200k_json, o200k_tok, phi3_gguf,  # noqa: F401
                             qwen_tok, spm_tok)

pytestmark = pytest.mark.oracle

POOL = ("abcXYZ  \t\n\r0123456789.,;:!?'\"()[]{}<>/\\|-_=+*&^%$#@~`"
        "éüßñçøÅ\u0301\u0308你好世界日本語한국어مرحباשלוםΕλλάδαпривет"
        "😀👍🏽🇺🇸👨\u200d👩\u200d👧\u00a0\u2003\u3000\u200b\x00")
WORDS = [" the", "'s", "'LL", "def ", "    ", "\n\n", "1234567", "<|end|>", "<|im_end|>",
         "<|start|>", "<|message|>", "<|user|>", "<s>", "</s>"]


def fuzz_texts(n: int = 300, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [rng.choice(WORDS) if rng.random() < 0.2 else rng.choice(POOL)
                 for _ in range(rng.randint(0, 40))]
        out.append("".join(parts))
    return out


def compare(tok, encode, cases) -> None:
    bad = []
    for text, add_special, parse_special in cases:
        ours = tok.encode(text, add_special=add_special, parse_special=parse_special)
        if ours != encode(text, add_special, parse_special):
            bad.append((text, add_special, parse_special))
    assert not bad, f"{len(bad)} of {len(cases)} differ, e.g. {bad[:3]!r}"


def all_cases(goldens_script, backend):
    stored = [(c["text"], c["add_special"], c["parse_special"]) for c in goldens_script.cases(backend)]
    return stored + [(t, True, True) for t in fuzz_texts()] + [(t, False, False) for t in fuzz_texts(100, 2)]


def test_spm_live_llama_cpp(spm_tok, phi3_gguf, goldens_script):
    pytest.importorskip("llama_cpp")
    encode, meta = goldens_script.llama_cpp_oracle(phi3_gguf)
    assert sorted(spm_tok.eog_ids) == meta["eog_ids"]
    compare(spm_tok, encode, all_cases(goldens_script, "phi3"))


def test_o200k_live_tiktoken(o200k_tok, goldens_script):
    pytest.importorskip("tiktoken")
    encode, _ = goldens_script.tiktoken_oracle()
    compare(o200k_tok, encode, all_cases(goldens_script, "o200k"))


@pytest.mark.slow
def test_qwen_live_llama_cpp(qwen_tok, real_qwen, goldens_script):
    pytest.importorskip("llama_cpp")
    encode, meta = goldens_script.llama_cpp_oracle(real_qwen)
    assert sorted(qwen_tok.eog_ids) == meta["eog_ids"]
    compare(qwen_tok, encode, all_cases(goldens_script, "qwen"))


def test_smollm_live_llama_cpp(host, goldens_script):
    """SmolLM2 (pre "smollm"); set ORCD_SMOLLM2_GGUF to a SmolLM2 GGUF to run it."""
    import os
    from pathlib import Path

    from orcd.gguf_file import ModelFile

    pytest.importorskip("llama_cpp")
    path = os.environ.get("ORCD_SMOLLM2_GGUF")
    if not path or not Path(path).is_file():
        pytest.skip("ORCD_SMOLLM2_GGUF is not set")
    tok = host.tokenizer(ModelFile.open(path))
    encode, meta = goldens_script.llama_cpp_oracle(Path(path))
    assert sorted(tok.eog_ids) == meta["eog_ids"]
    compare(tok, encode, all_cases(goldens_script, "qwen"))
