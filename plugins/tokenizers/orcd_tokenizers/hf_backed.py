"""One ``orcd.tokenizer.Tokenizer`` over a ``tokenizers.Tokenizer``.

All three kinds differ only in how they build the ``tokenizers`` object and
the per-token byte table; encoding, decoding and input checks live here.
Decoding joins each token's exact bytes (``token_bytes``) so that ``decode``
and the streaming detokenizer agree byte for byte.
"""

from __future__ import annotations

import operator
import re
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

from tokenizers import Tokenizer as HFTok

from orcd.errors import InvalidRequest


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def byte_level_bytes(text: str) -> bytes:
    """Bytes of a byte-level BPE token; raw UTF-8 if it is not byte-level text."""
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in text)
    except KeyError:
        return text.encode("utf-8")


def check_text(text: object) -> str:
    """The text to encode, or InvalidRequest for input that is not valid Unicode.

    ``bytes`` must be valid UTF-8; lone surrogates (which JSON can carry) are
    refused because they have no UTF-8 form. NUL is an ordinary character.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            return bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequest(f"text is not valid UTF-8 (bad byte at offset {e.start})") from None
    if not isinstance(text, str):
        raise InvalidRequest(f"text must be a string, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(f"text contains a lone surrogate U+{ord(text[e.start]):04X} "
                             f"at position {e.start}") from None
    return text


@dataclass
class TokenizerInfo:
    kind: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    eog_ids: frozenset[int]
    special_tokens: dict[str, int]
    skip_ids: frozenset[int]        # left out by decode(skip_special=True)
    chat_template: str | None
    strip_leading_space: bool       # SentencePiece's add_space_prefix artefact
    hf_post_process: bool = False   # let the tokenizer.json's post-processor add BOS/EOS
    # Tokens that swallow the ASCII whitespace after them (llama.cpp's RSTRIP attribute):
    # control ones only when special text is parsed, user-defined ones always.
    rstrip_control: tuple[str, ...] = ()
    rstrip_user: tuple[str, ...] = ()


def _rstrip_re(texts: tuple[str, ...]) -> re.Pattern | None:
    """llama.cpp strips C ``isspace`` bytes; ``tokenizers``' own rstrip strips all Unicode
    whitespace (e.g. U+00A0), so orcd removes the whitespace itself before encoding."""
    if not texts:
        return None
    alts = "|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True))
    return re.compile(f"({alts})[ \t\n\v\f\r]+")


def _encode_one(tok: HFTok, text: str, add_special_tokens: bool) -> list[int]:
    # encode_batch* release the GIL while they work (encode holds it: a 1 MB prompt
    # would freeze the server's event loop for a second); the ids are the same. The
    # _fast one computes no offsets, and its Encoding is ~15x cheaper to free: freeing
    # encode_batch's for 200k tokens held the GIL for ~8 ms
    return tok.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids


def _twin(tok: HFTok) -> HFTok:
    """A tokenizer that encodes as ``tok`` does, its settings free to change apart:
    the same model object (read-only while encoding) with the same pipeline and
    added tokens, built in well under a millisecond -- a round trip through JSON
    took 0.55 s for Qwen's 151k-token vocabulary, on every server's start-up (the
    chat template's guard encodes plain). Falls back to that round trip where the
    added tokens would not get their ids back, or padding / truncation are set."""
    twin = HFTok(tok.model)
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if (value := getattr(tok, part)) is not None:
            setattr(twin, part, value)
    added = tok.get_added_tokens_decoder()
    for i in sorted(added):
        (twin.add_special_tokens if added[i].special else twin.add_tokens)([added[i]])
    if twin.get_added_tokens_decoder() != added or tok.padding or tok.truncation:
        return HFTok.from_str(tok.to_str())
    return twin


class HFBackedTokenizer:
    def __init__(self, tok: HFTok, info: TokenizerInfo, piece_bytes: Callable[[], list[bytes]]):
        self._tok = tok
        self._info = info
        self._piece_bytes_fn = piece_bytes
        self._plain_tok: HFTok | None = None
        self._lock = threading.Lock()
        self.kind = info.kind
        self.vocab_size = info.vocab_size
        self.bos_id, self.eos_id, self.pad_id = info.bos_id, info.eos_id, info.pad_id
        self.add_bos, self.add_eos = info.add_bos, info.add_eos
        self.eog_ids = info.eog_ids
        self.special_tokens = dict(info.special_tokens)
        self.chat_template = info.chat_template
        self._rstrip = {True: _rstrip_re(info.rstrip_control + info.rstrip_user),
                        False: _rstrip_re(info.rstrip_user)}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind} vocab_size={self.vocab_size}>"

    @property
    def hf(self) -> HFTok:
        """The underlying ``tokenizers.Tokenizer`` (special tokens parsed)."""
        return self._tok

    # -- encode --------------------------------------------------------------
    def _plain(self) -> HFTok:
        """A twin that treats control-token text as plain text (built on first use,
        so the shared tokenizer is never mutated while other threads encode)."""
        with self._lock:
            if self._plain_tok is None:
                plain = _twin(self._tok)
                plain.encode_special_tokens = True
                self._plain_tok = plain
            return self._plain_tok

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        text = check_text(text)
        if (rstrip := self._rstrip[bool(parse_special)]) is not None:
            text = rstrip.sub(r"\1", text)
        tok = self._tok if parse_special else self._plain()
        if self._info.hf_post_process:
            return _encode_one(tok, text, add_special)
        ids = _encode_one(tok, text, False)
        if add_special:
            if self.add_bos and self.bos_id is not None:
                ids.insert(0, self.bos_id)
            if self.add_eos and self.eos_id is not None:
                ids.append(self.eos_id)
        return ids

    # -- decode --------------------------------------------------------------
    @cached_property
    def _pieces(self) -> list[bytes]:
        return self._piece_bytes_fn()

    def token_bytes(self, token_id: int) -> bytes:
        try:
            token_id = operator.index(token_id)  # ints and numpy integers, not floats/str
        except TypeError:
            raise InvalidRequest(f"token id {token_id!r} is not an integer") from None
        if not 0 <= token_id < self.vocab_size:
            raise InvalidRequest(f"token id {token_id} is outside the vocabulary "
                                 f"(0..{self.vocab_size - 1})")
        pieces = self._pieces
        return pieces[token_id] if token_id < len(pieces) else b""

    def decode(self, ids: list[int], *, skip_special: bool = False) -> str:
        skip = self._info.skip_ids if skip_special else frozenset()
        out = b"".join(self.token_bytes(i) for i in ids if i not in skip)
        if self._info.strip_leading_space and out.startswith(b" "):
            out = out[1:]
        return out.decode("utf-8", errors="replace")

    def strips_leading_space(self) -> bool:
        return self._info.strip_leading_space
