"""The streaming detokenizer emits whole UTF-8 only, and exactly what decode() gives."""

from __future__ import annotations

import pytest

from orcd.detok import StreamDecoder
# session fixtures shared with the backend tests
from test_tokenizers import goldens_script, o200k_json, o200k_tok, phi3_gguf, spm_tok  # noqa: F401


def stream(tok, ids, **kw) -> list[str]:
    dec = StreamDecoder(tok, **kw)
    return [dec.feed(i) for i in ids] + [dec.flush()]


class ByteTokenizer:
    """The smallest Tokenizer: one token per byte, id == byte value (no specials)."""

    kind, vocab_size, bos_id, eos_id, pad_id, add_bos = "bytes", 256, None, None, None, False
    eog_ids: frozenset = frozenset()
    special_tokens: dict = {}
    chat_template = None

    def encode(self, text, *, add_special=True, parse_special=True):
        return list(text.encode("utf-8"))

    def decode(self, ids, *, skip_special=False):
        return bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id):
        return bytes([token_id])

    def strips_leading_space(self):
        return False


def test_split_characters_wait_for_their_last_byte():
    text = "hé 👨\u200d👩\u200d👧 世界"
    pieces = stream(ByteTokenizer(), list(text.encode()))
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    # "h", then "" for é's first byte, then "é" on its second
    assert pieces[:3] == ["h", "", "é"]
    assert all(p == "" or p.encode() for p in pieces)


def test_truncated_and_invalid_bytes():
    tok = ByteTokenizer()
    dec = StreamDecoder(tok)
    assert dec.feed(0xE4) == "" and dec.feed(0xB8) == ""
    assert dec.flush() == "\ufffd"  # the stream ended inside a character
    dec = StreamDecoder(tok)
    assert dec.feed(0x80) == "\ufffd"  # can never start a character: no waiting
    assert dec.feed(ord("k")) == "k"


@pytest.mark.parametrize("which", ["spm_tok", "o200k_tok"])
def test_stream_equals_decode(request, goldens_script, which):
    tok = request.getfixturevalue(which)
    for text in goldens_script.COMMON + [goldens_script.long_text()]:
        ids = tok.encode(text, add_special=False)
        pieces = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)


def test_byte_level_emoji_is_split_across_tokens(o200k_tok):
    text = "🦩🪼"  # rare emoji: several byte-level tokens each
    ids = o200k_tok.encode(text, add_special=False)
    pieces = stream(o200k_tok, ids)
    assert len(ids) > 2 and "" in pieces and "".join(pieces) == text


def test_spm_byte_fallback_is_buffered(spm_tok):
    ids = spm_tok.encode("\u4e2d", add_special=False)  # "▁" then <0xE4> <0xB8> <0xAD>
    assert stream(spm_tok, ids)[-4:] == ["", "", "\u4e2d", ""]


def test_spm_has_no_leading_space_at_stream_start(spm_tok):
    ids = spm_tok.encode("Hello there")
    assert "".join(stream(spm_tok, ids, skip_special=True)) == "Hello there"
    assert spm_tok.decode(ids, skip_special=True) == "Hello there"
    # only the first piece loses its space
    gen = spm_tok.encode(" indented", add_special=False)
    assert "".join(stream(spm_tok, gen)) == " indented"


def test_special_tokens_shown_unless_skipped(spm_tok, o200k_tok):
    ids = o200k_tok.encode("<|channel|>final<|message|>Hi<|return|>")
    assert "".join(stream(o200k_tok, ids)) == "<|channel|>final<|message|>Hi<|return|>"
    assert "".join(stream(o200k_tok, ids, skip_special=True)) == "finalHi"
    # control tokens vanish, user-defined ones stay text (as in llama.cpp)
    ids = spm_tok.encode("<|user|>a<|placeholder1|>b<|end|>")
    for skip in (False, True):
        assert "".join(stream(spm_tok, ids, skip_special=skip)) == spm_tok.decode(ids, skip_special=skip)
    assert "".join(stream(spm_tok, ids, skip_special=True)) == "a<|placeholder1|> b"
