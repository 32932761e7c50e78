"""What the engine and the server need from a tokenizer.

Backends come from plugins through the ``orcd_tokenizer`` hook. The engine
only ever uses this protocol.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    #: the kind reported by /health: "gguf-bpe", "gguf-spm" or "hf-json"
    kind: str
    #: number of token ids (may exceed the number of real tokens)
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    #: whether ``encode(add_special=True)`` prepends ``bos_id``
    add_bos: bool
    #: ids that end a generation (e.g. Qwen's <|im_end|> and <|endoftext|>)
    eog_ids: frozenset[int]
    #: text of every control / user-defined token -> id
    special_tokens: dict[str, int]
    #: the jinja2 chat template from the model, or None
    chat_template: str | None

    def encode(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Text -> ids. ``parse_special``: special-token text becomes the special token."""

    def decode(self, ids: list[int], *, skip_special: bool = False) -> str:
        """Ids -> text (invalid UTF-8 replaced)."""

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token contributes to the output text.

        Byte-fallback tokens give their single byte; SentencePiece's U+2581 is a
        space. The streaming detokenizer joins these and emits only whole UTF-8.
        """

    def strips_leading_space(self) -> bool:
        """True when the first generated piece's leading space is an artefact
        (SentencePiece with add_space_prefix) and must not be shown."""
