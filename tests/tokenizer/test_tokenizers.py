"""Tokenizer backends against stored oracle vectors, plus metadata, round trips and bad input.

Vectors in tests/golden/tokenizer/ come from llama.cpp and tiktoken (see
scripts/make_tokenizer_goldens.py). The phi3 SPM GGUF is rebuilt here from the
stored vocabulary; the o200k_harmony tokenizer.json from quicktok-v1's ranks.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from orcd.errors import InvalidRequest, ModelLoadFailed
from orcd.gguf_file import ModelFile
from orcd.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "tokenizer"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def golden(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def goldens_script():
    return load_script("make_tokenizer_goldens")


@pytest.fixture(scope="session")
def phi3_gguf(tmp_path_factory, goldens_script) -> Path:
    vocab = json.loads((GOLDEN / "spm_vocab.json").read_text(encoding="utf-8"))
    return goldens_script.write_spm_gguf(vocab, tmp_path_factory.mktemp("spm") / "phi3-spm.gguf")


@pytest.fixture(scope="session")
def spm_tok(host, phi3_gguf) -> Tokenizer:
    return host.tokenizer(ModelFile.open(phi3_gguf))


@pytest.fixture(scope="session")
def o200k_json() -> Path:
    pytest.importorskip("quicktok", reason="quicktok-v1 (dev extra) supplies the o200k ranks")
    return load_script("make_o200k_harmony").cached()


@pytest.fixture(scope="session")
def o200k_tok(host, o200k_json) -> Tokenizer:
    return host.tokenizer(None, o200k_json)


@pytest.fixture(scope="session")
def qwen_tok(host, real_qwen) -> Tokenizer:
    return host.tokenizer(ModelFile.open(real_qwen))


def check_golden(tok: Tokenizer, gold: dict) -> None:
    assert len(gold["cases"]) >= 30
    bad = [(c["text"][:40], c["add_special"], c["parse_special"]) for c in gold["cases"]
           if tok.encode(c["text"], add_special=c["add_special"],
                         parse_special=c["parse_special"]) != c["ids"]]
    assert not bad, f"{len(bad)} cases differ from {gold['source']}: {bad[:5]}"
    assert sorted(tok.eog_ids) == gold["eog_ids"]


# -- conformance -------------------------------------------------------------------------
def test_spm_matches_llama_cpp(spm_tok):
    assert spm_tok.kind == "gguf-spm"
    check_golden(spm_tok, golden("phi3_spm.json"))


def test_o200k_harmony_matches_tiktoken(o200k_tok):
    assert o200k_tok.kind == "hf-json"
    check_golden(o200k_tok, golden("o200k_harmony.json"))


@pytest.mark.slow
def test_qwen_gguf_matches_llama_cpp(qwen_tok):
    assert qwen_tok.kind == "gguf-bpe"
    check_golden(qwen_tok, golden("qwen_gguf.json"))


# -- metadata ------------------------------------------------------------------------------
def test_spm_metadata(spm_tok):
    assert isinstance(spm_tok, Tokenizer)
    s = spm_tok.special_tokens
    assert spm_tok.bos_id == s["<s>"] == 1 and spm_tok.add_bos and spm_tok.strips_leading_space()
    assert spm_tok.eos_id == s["<|endoftext|>"]
    assert spm_tok.eog_ids == {s["</s>"], s["<|endoftext|>"], s["<|end|>"]}
    assert "<|placeholder1|>" in s and "<0x41>" not in s
    assert spm_tok.encode("hi")[0] == spm_tok.bos_id
    assert spm_tok.encode("hi", add_special=False)[0] != spm_tok.bos_id


def test_o200k_harmony_metadata(o200k_tok):
    mk = load_script("make_o200k_harmony")
    s = o200k_tok.special_tokens
    for text, tid in {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002,
                      "<|constrain|>": 200003, "<|channel|>": 200005, "<|start|>": 200006,
                      "<|end|>": 200007, "<|message|>": 200008, "<|call|>": 200012,
                      "<|reserved_201087|>": 201087}.items():
        assert s[text] == tid
    assert len(s) == mk.N_VOCAB - mk.N_BASE == 1090 and o200k_tok.vocab_size == 201088
    # harmony: <|end|> closes a message, not the generation
    assert o200k_tok.eog_ids == {199999, 200002, 200012}
    assert o200k_tok.bos_id == 199998 and not o200k_tok.add_bos and o200k_tok.eos_id == 200002


def test_harmony_specials_agree_with_tiktoken():
    """Our id table is tiktoken's o200k_harmony table (where tiktoken ships it)."""
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    if not hasattr(openai_public, "o200k_harmony"):
        pytest.skip("this tiktoken has no o200k_harmony")
    import unittest.mock as mock
    with mock.patch.object(openai_public, "load_tiktoken_bpe", return_value={}):
        theirs = openai_public.o200k_harmony()["special_tokens"]
    ours = {t: i for i, t in load_script("make_o200k_harmony").harmony_specials().items()}
    assert {t: i for t, i in theirs.items() if t != "<|reserved_200018|>"} == ours


@pytest.mark.slow
def test_qwen_metadata(qwen_tok):
    s = qwen_tok.special_tokens
    assert qwen_tok.vocab_size == 151936 and not qwen_tok.add_bos
    assert {s["<|im_end|>"], s["<|endoftext|>"]} <= qwen_tok.eog_ids
    assert qwen_tok.eos_id == s["<|im_end|>"] and "<|im_start|>" in qwen_tok.chat_template


# -- behaviour -----------------------------------------------------------------------------
def common_texts(goldens_script) -> list[str]:
    return goldens_script.COMMON + [goldens_script.long_text()]


@pytest.mark.parametrize("which", ["spm_tok", "o200k_tok"])
def test_decode_inverts_encode(request, goldens_script, which):
    tok = request.getfixturevalue(which)
    for text in common_texts(goldens_script):
        assert tok.decode(tok.encode(text, add_special=False)) == text


def test_parse_special_switch(spm_tok, o200k_tok):
    end = spm_tok.special_tokens["<|end|>"]
    assert end in spm_tok.encode("a<|end|>b")
    assert end not in spm_tok.encode("a<|end|>b", parse_special=False)
    # user-defined tokens are matched either way (as llama.cpp does)
    ph = spm_tok.special_tokens["<|placeholder1|>"]
    assert ph in spm_tok.encode("a<|placeholder1|>b", parse_special=False)
    text = "<|start|>user<|message|>hi<|end|>"
    assert o200k_tok.encode(text)[:1] == [200006]
    plain = o200k_tok.encode(text, parse_special=False)
    assert not set(plain) & set(o200k_tok.special_tokens.values())
    assert o200k_tok.decode(plain) == text


@pytest.mark.parametrize("which", ["spm_tok", "o200k_tok", "qwen_tok"])
def test_plain_twin_encodes_as_a_json_copy_does(request, goldens_script, which):
    # the twin that encodes with special parsing off shares the model object instead of
    # a round trip through JSON (0.55 s for Qwen at every start-up): the same ids
    from tokenizers import Tokenizer as HFTok

    tok = request.getfixturevalue(which)
    copy = HFTok.from_str(tok.hf.to_str())
    copy.encode_special_tokens = True
    assert tok._plain().get_added_tokens_decoder() == tok.hf.get_added_tokens_decoder()
    texts = common_texts(goldens_script) + [f"a{t}b {t}" for t in tok.special_tokens]
    for text in texts:
        assert tok._plain().encode_batch_fast([text], add_special_tokens=False)[0].ids == \
            copy.encode_batch_fast([text], add_special_tokens=False)[0].ids, text
    assert tok.hf.encode_special_tokens is False     # the shared tokenizer is left as it was


@pytest.mark.parametrize("which", ["spm_tok", "o200k_tok", "qwen_tok"])
def test_plain_twin_is_built_without_a_json_round_trip(request, monkeypatch, which):
    from tokenizers import Tokenizer as HFTok

    from orcd_tokenizers import hf_backed

    class NoJson:
        def __call__(self, model):
            return HFTok(model)

        @staticmethod
        def from_str(text):
            raise AssertionError("the plain twin went through JSON")

    monkeypatch.setattr(hf_backed, "HFTok", NoJson())
    tok = request.getfixturevalue(which)
    twin = hf_backed._twin(tok.hf)
    assert twin.get_added_tokens_decoder() == tok.hf.get_added_tokens_decoder()


def test_bpe_merges_whose_pieces_are_not_tokens_are_dropped():
    # llama.cpp never applies such a merge; `tokenizers` refuses the whole list with one
    from orcd_tokenizers.gguf_kinds import build_bpe
    from orcd_tokenizers.vocab import CONTROL, NORMAL, GGUFVocab

    tokens = ["a", "b", "c", "ab", "abc", "<|end|>"]
    base = dict(model="gpt2", pre="qwen2", tokens=tokens, types=[NORMAL] * 5 + [CONTROL], scores=None,
                bos_id=None, eos_id=5, pad_id=None, unk_id=None, add_bos=False, add_eos=False,
                add_space_prefix=False, chat_template=None, model_name="tiny")
    good = build_bpe(GGUFVocab(merges=["a b", "ab c"], **base))
    for bad in (["a b", "x y", "ab c"], ["a b", "b c", "ab c"], ["a b", "abc", "ab c"]):
        tok = build_bpe(GGUFVocab(merges=bad, **base))     # "x y": pieces unknown; "b c": no "bc"
        for text in ("abc", "cab", "abcab", "bca"):
            assert tok.encode(text, add_special=False) == good.encode(text, add_special=False)
    assert good.encode("abc", add_special=False) == [4]


def test_skip_special_in_decode(spm_tok):
    ids = spm_tok.encode("<|user|>\nHi<|end|>")
    assert spm_tok.decode(ids, skip_special=True) == "Hi"
    assert spm_tok.decode(ids) == "<s><|user|> Hi<|end|>"  # llama.cpp text for the same ids


def test_spm_byte_fallback_and_leading_space(spm_tok):
    ids = spm_tok.encode("\u4e2d", add_special=False)  # not in the tiny vocab: 3 byte tokens
    assert [spm_tok.token_bytes(i) for i in ids][-3:] == [b"\xe4", b"\xb8", b"\xad"]
    assert spm_tok.token_bytes(spm_tok.encode("hello", add_special=False)[0]).startswith(b" ")
    assert spm_tok.decode(spm_tok.encode(" two", add_special=False)) == " two"


def test_bad_input_is_a_clear_error(spm_tok, o200k_tok):
    for tok in (spm_tok, o200k_tok):
        with pytest.raises(InvalidRequest, match="surrogate"):
            tok.encode("a\ud800b")
        with pytest.raises(InvalidRequest, match="UTF-8"):
            tok.encode(b"\xff\xfe")
        assert tok.encode(b"caf\xc3\xa9", add_special=False) == tok.encode("café", add_special=False)
        assert tok.decode(tok.encode("a\x00b", add_special=False)) == "a\x00b"
        with pytest.raises(InvalidRequest):
            tok.decode([tok.vocab_size])
        with pytest.raises(InvalidRequest):
            tok.decode([-1])
        with pytest.raises(InvalidRequest):
            tok.token_bytes("7")
    # a lone continuation byte decodes to U+FFFD, not an exception
    byte_ids = [i for i in range(spm_tok.vocab_size) if spm_tok.token_bytes(i) == b"\x80"]
    assert spm_tok.decode(byte_ids + spm_tok.encode("ok", add_special=False)) == "\ufffd ok"


# -- backend selection ---------------------------------------------------------------------
def test_tokenizer_json_beside_model_wins(host, tmp_path, phi3_gguf, o200k_json):
    model = tmp_path / "model.gguf"
    shutil.copy(phi3_gguf, model)
    assert host.tokenizer(ModelFile.open(model)).kind == "gguf-spm"
    shutil.copy(o200k_json, tmp_path / "tokenizer.json")
    # the o200k vocabulary is far larger than this model's: refuse, don't mis-tokenize
    with pytest.raises(ModelLoadFailed, match="another model"):
        host.tokenizer(ModelFile.open(model))


def test_explicit_tokenizer_json_wins_over_gguf(host, tmp_path, spm_tok, phi3_gguf):
    hf = tmp_path / "tok" / "tokenizer.json"
    hf.parent.mkdir()
    spm_tok.hf.save(str(hf))  # the same vocabulary, as a tokenizer.json
    tok = host.tokenizer(ModelFile.open(phi3_gguf), hf)
    assert tok.kind == "hf-json" and tok.strips_leading_space()
    assert tok.bos_id == spm_tok.bos_id and tok.eog_ids == spm_tok.eog_ids  # ids from the GGUF
    text = "Hello, world! 你好 <|end|>"
    assert tok.encode(text, add_special=False) == spm_tok.encode(text, add_special=False)
    assert tok.decode(tok.encode(text, add_special=False)) == spm_tok.decode(
        spm_tok.encode(text, add_special=False))


def test_broken_inputs_fail_loading(host, tmp_path, phi3_gguf):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ModelLoadFailed, match="tokenizer"):
        host.tokenizer(ModelFile.open(phi3_gguf), bad)
    with pytest.raises(ModelLoadFailed, match="no such"):
        host.tokenizer(ModelFile.open(phi3_gguf), tmp_path / "missing.json")


def test_plugin_is_registered(host):
    assert host.infos["tokenizers"].module == "orcd_tokenizers"


def test_broken_gguf_vocab_fails_loading():
    from orcd_tokenizers.gguf_kinds import build
    from orcd_tokenizers.vocab import read_vocab

    with pytest.raises(ModelLoadFailed, match="tokens"):
        read_vocab({"tokenizer.ggml.model": "gpt2"})
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
            "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.token_type": [1, 1]}
    with pytest.raises(ModelLoadFailed, match="length"):
        read_vocab(meta)
    meta["tokenizer.ggml.token_type"] = [1, 1, 1]
    with pytest.raises(ModelLoadFailed, match="merges"):
        build(read_vocab(meta))
    meta["tokenizer.ggml.merges"] = ["a b", "x y"]  # "x y" names no tokens: ignored, like llama.cpp
    tok = build(read_vocab(meta))
    assert tok.kind == "gguf-bpe" and tok.encode("abba") == [2, 1, 0]
    meta["tokenizer.ggml.model"] = "llama"
    with pytest.raises(ModelLoadFailed, match="scores"):
        build(read_vocab(meta))
    meta["tokenizer.ggml.model"] = "bert"
    assert build(read_vocab(meta)) is None  # not ours: the host reports no backend


def test_encoding_lets_other_threads_run(host, tiny_model):
    """A long encode must not hold the GIL (the server encodes on a thread while its
    event loop answers /health): another thread keeps ticking meanwhile."""
    import threading
    import time
    with ModelFile.open(tiny_model("qwen2-tiny")) as mf:
        tok = host.tokenizer(mf)
    text = "hello world, this is some text. " * 8000
    done, ticks = threading.Event(), []

    def tick():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=tick)
    t.start()
    t0 = time.perf_counter()
    for _ in range(3):
        tok.encode(text, parse_special=True)
        tok.encode(text, parse_special=False)
    elapsed = time.perf_counter() - t0
    done.set()
    t.join()
    during = [x for x in ticks if t0 < x < t0 + elapsed]
    # holding the GIL, the ticker would get a handful of turns; free, one every ~1 ms
    assert len(during) > elapsed / 0.001 / 10, (len(during), elapsed)
