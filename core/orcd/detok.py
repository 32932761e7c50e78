"""Streaming detokenizer: token ids in, whole UTF-8 text out.

A token may end in the middle of a character (byte-level BPE splits emoji and
CJK across tokens; SentencePiece byte-fallback emits one ``<0xNN>`` per byte),
so each token's bytes (``Tokenizer.token_bytes``) go through an incremental
UTF-8 decoder that holds back an unfinished sequence until it completes. Bytes
that can never become valid UTF-8 come out as U+FFFD, as in ``decode``.

The concatenation of every ``feed`` and the final ``flush`` equals
``tokenizer.decode(ids, skip_special=...)``.
"""

from __future__ import annotations

import codecs

from orcd.tokenizer import Tokenizer


class StreamDecoder:
    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._special_ids = frozenset(tokenizer.special_tokens.values()) if skip_special else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # SentencePiece prefixes the text with a space the user never typed: drop it once.
        self._strip_space = tokenizer.strips_leading_space()
        self._started = False

    def _piece(self, token_id: int) -> bytes:
        if token_id in self._special_ids and self._skipped(token_id):
            return b""
        return self.tokenizer.token_bytes(token_id)

    def _skipped(self, token_id: int) -> bool:
        # Control tokens vanish under skip_special; user-defined ones (e.g. <tool_call>)
        # are still text. The tokenizer's own decode knows which is which.
        return self.tokenizer.decode([token_id], skip_special=True) == ""

    def feed(self, token_id: int) -> str:
        """The text that ``token_id`` completes (often "", never a partial character)."""
        piece = self._piece(token_id)
        if not piece:
            return ""
        if not self._started:
            self._started = True
            if self._strip_space and piece.startswith(b" "):
                piece = piece[1:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """End of stream: whatever is held back (an unfinished sequence becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
