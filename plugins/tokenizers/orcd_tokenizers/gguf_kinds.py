"""``gguf-bpe`` and ``gguf-spm``: a ``tokenizers`` pipeline built from GGUF metadata.

gguf-bpe (``tokenizer.ggml.model == "gpt2"``): byte-level BPE from the GGUF's
tokens and merges, split first by the regexes of ``tokenizer.ggml.pre``.

gguf-spm (``tokenizer.ggml.model == "llama"``): SentencePiece BPE. llama.cpp
merges, at each step, the adjacent pair whose concatenation is the vocab piece
with the highest score; ``tokenizers``' BPE merges the pair earliest in its
merge list. So the merge list is every split of every piece into two pieces,
ordered by the piece's score. Characters with no piece fall back to
``<0xNN>`` byte tokens. Every run of text gets a leading U+2581 when
``add_space_prefix`` is set (llama.cpp: at the start and after each special token).

In both, control / user-defined tokens are ``tokenizers`` added tokens: matched
whole in the raw text before any splitting. Control tokens are "special" (plain
text when ``parse_special=False``); user-defined ones are always matched, as in
llama.cpp.
"""

from __future__ import annotations

import re

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, normalizers, pre_tokenizers

from orcd.errors import ModelLoadFailed
from orcd_tokenizers.hf_backed import HFBackedTokenizer, TokenizerInfo, byte_level_bytes
from orcd_tokenizers.pretokenize import pretokenizer_for
from orcd_tokenizers.vocab import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, GGUFVocab

SPACE = "\u2581"  # SentencePiece's visible space
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _vocab_dict(v: GGUFVocab) -> dict[str, int]:
    # A text that appears twice keeps its last id, as llama.cpp's token_to_id does.
    return {t: i for i, t in enumerate(v.tokens)}


def _add_special_tokens(tok: HFTok, v: GGUFVocab) -> None:
    control, user = [], []
    for i, t in enumerate(v.types):
        if t in (CONTROL, UNKNOWN, USER_DEFINED) and v.tokens[i]:
            added = AddedToken(v.tokens[i], special=t != USER_DEFINED, normalized=False)
            (user if t == USER_DEFINED else control).append(added)
    tok.add_special_tokens(control)
    tok.add_tokens(user)


def _info(v: GGUFVocab, kind: str, strip_leading_space: bool) -> TokenizerInfo:
    special = {v.tokens[i]: i for i in range(len(v.tokens))
               if v.types[i] in (CONTROL, USER_DEFINED)}
    skip = frozenset(i for i, t in enumerate(v.types) if t in (CONTROL, UNKNOWN))
    return TokenizerInfo(
        kind=kind, vocab_size=len(v.tokens), bos_id=v.bos_id, eos_id=v.eos_id, pad_id=v.pad_id,
        add_bos=v.add_bos and v.bos_id is not None, add_eos=v.add_eos and v.eos_id is not None,
        eog_ids=v.eog_ids, special_tokens=special, skip_ids=skip, chat_template=v.chat_template,
        strip_leading_space=strip_leading_space,
        rstrip_control=tuple(v.tokens[i] for i in sorted(v.rstrip_ids) if v.types[i] != USER_DEFINED),
        rstrip_user=tuple(v.tokens[i] for i in sorted(v.rstrip_ids) if v.types[i] == USER_DEFINED))


# -- gguf-bpe -----------------------------------------------------------------
def build_bpe(v: GGUFVocab, where: str = "model") -> HFBackedTokenizer:
    if not v.merges:
        raise ModelLoadFailed(f"{where}: byte-level BPE vocabulary has no tokenizer.ggml.merges")
    vocab = _vocab_dict(v)
    rule = pretokenizer_for(v.pre)
    try:   # every merge as it is first: checking each in Python cost 0.24 s for Qwen's 151k
        model = models.BPE(vocab, [tuple(m.split(" ", 1)) for m in v.merges], ignore_merges=rule.ignore_merges)
    except Exception:
        # A merge whose pieces are not tokens makes `tokenizers` refuse the lot; llama.cpp
        # just never applies it. Drop those.
        merges = [(a, b) for a, _, b in (m.partition(" ") for m in v.merges)
                  if a in vocab and b in vocab and a + b in vocab]
        model = models.BPE(vocab, merges, ignore_merges=rule.ignore_merges)
    tok = HFTok(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in rule.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    _add_special_tokens(tok, v)
    return HFBackedTokenizer(tok, _info(v, "gguf-bpe", False), lambda: _bpe_pieces(v))


def _bpe_pieces(v: GGUFVocab) -> list[bytes]:
    out = []
    for text, t in zip(v.tokens, v.types):
        if t == NORMAL:
            out.append(byte_level_bytes(text))
        elif t in (CONTROL, USER_DEFINED, UNKNOWN):
            out.append(text.encode("utf-8"))
        elif t == BYTE and (m := _BYTE_TOKEN.fullmatch(text)):
            out.append(bytes([int(m.group(1), 16)]))
        else:  # unused / undefined: llama.cpp renders nothing
            out.append(b"")
    return out


# -- gguf-spm -----------------------------------------------------------------
def spm_merges(v: GGUFVocab) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a piece, best-scored piece first."""
    vocab = _vocab_dict(v)
    scores = v.scores
    ranked = []
    for i, text in enumerate(v.tokens):
        if v.types[i] == BYTE or len(text) < 2 or vocab.get(text) != i:
            continue
        for k in range(1, len(text)):
            a, b = text[:k], text[k:]
            if a in vocab and b in vocab:
                ranked.append((-scores[i], i, k, a, b))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


def build_spm(v: GGUFVocab, where: str = "model") -> HFBackedTokenizer:
    if v.scores is None:
        raise ModelLoadFailed(f"{where}: SentencePiece vocabulary has no tokenizer.ggml.scores")
    vocab = _vocab_dict(v)
    unk = v.tokens[v.unk_id] if v.unk_id is not None else None
    tok = HFTok(models.BPE(vocab, spm_merges(v), unk_token=unk, byte_fallback=True,
                           fuse_unk=True))
    escape = normalizers.Replace(" ", SPACE)
    tok.normalizer = (normalizers.Sequence([normalizers.Prepend(SPACE), escape])
                      if v.add_space_prefix else escape)
    # (orcd decodes through token_bytes; this decoder is for tokenizer.json exports)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if v.add_space_prefix else []))
    _add_special_tokens(tok, v)
    return HFBackedTokenizer(tok, _info(v, "gguf-spm", v.add_space_prefix),
                             lambda: _spm_pieces(v))


def _spm_pieces(v: GGUFVocab) -> list[bytes]:
    out = []
    for text, t in zip(v.tokens, v.types):
        if t == NORMAL:
            out.append(text.replace(SPACE, " ").encode("utf-8"))
        elif t == BYTE and (m := _BYTE_TOKEN.fullmatch(text)):
            out.append(bytes([int(m.group(1), 16)]))
        elif t in (CONTROL, USER_DEFINED, UNKNOWN):
            out.append(text.encode("utf-8"))
        else:  # unused / undefined
            out.append(b"")
    return out


def build(v: GGUFVocab, where: str = "model") -> HFBackedTokenizer | None:
    if v.model == "gpt2":
        return build_bpe(v, where)
    if v.model == "llama":
        return build_spm(v, where)
    return None

