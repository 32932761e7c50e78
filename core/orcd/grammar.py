"""Constrained decoding with llguidance: JSON schemas, "any JSON object" and
Lark grammars become per-step token bitmasks (``engine.TokenConstraint``).

llguidance is an optional dependency (``pip install 'orcd[structured]'``): a
worker without it serves everything else, and a request that needs a grammar
gets a 400 saying what to install.

One ``Grammars`` per loaded model builds llguidance's token table once (the
vocabulary's bytes, special tokens marked with a 0xFF prefix as llguidance's
llama.cpp bridge does, so grammar text never matches a control token) and
compiles each request's grammar into a ``Matcher``. The mask covers the
model's whole logit row: ids past the tokenizer's vocabulary are never allowed.
End-of-generation ids are allowed exactly when the grammar accepts.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from orcd.errors import InvalidRequest
from orcd.ops.sampling import mask_words

INSTALL_HINT = "install llguidance (pip install 'orcd[structured]')"

#: any JSON object, as OpenAI's json_object mode promises
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
#: the JSON layout grammars allow: Python's json.dumps default, what models are
#: trained on; free whitespace lets a small model pad forever
JSON_STYLE: dict[str, Any] = {"whitespace_flexible": False, "key_separator": ": ",
                              "item_separator": ", "}


class GrammarUnavailable(InvalidRequest):
    """The request needs constrained decoding and llguidance is not installed."""


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401  (the bitmask filler)
    except ImportError:
        return None
    return llguidance


def available() -> bool:
    return _llguidance() is not None


class _Vocab:
    """What llguidance's TokenizerWrapper reads from a tokenizer."""

    def __init__(self, tokenizer, n_vocab: int) -> None:
        specials = set((getattr(tokenizer, "special_tokens", None) or {}).values())
        self.tokenizer = tokenizer
        self.tokens = [(b"\xff" if i in specials else b"") + tokenizer.token_bytes(i)
                       for i in range(tokenizer.vocab_size)]
        self.tokens += [b""] * (n_vocab - len(self.tokens))   # padding rows: never allowed
        self.special_token_ids = sorted(specials)
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.eog_ids)
        self.bos_token_id = getattr(tokenizer, "bos_id", None)

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):   # llguidance probes with bytes; take text only
            raise TypeError("text only")
        return self.tokenizer.encode(text, add_special=False, parse_special=False)


class Grammars:
    """Compiles request grammars for one model. Thread-safe; the token table is
    built on first use (about a second for a 150k vocabulary)."""

    def __init__(self, tokenizer, n_vocab: int) -> None:
        self.tokenizer, self.n_vocab = tokenizer, int(n_vocab)
        self._table = None
        self._lock = threading.Lock()

    def _tokenizer_table(self):
        llg = _llguidance()
        if llg is None:
            raise GrammarUnavailable(f"structured output needs llguidance: {INSTALL_HINT}",
                                     field="response_format")
        with self._lock:
            if self._table is None:
                wrapper = llg.TokenizerWrapper(_Vocab(self.tokenizer, self.n_vocab))
                self._table = llg.LLTokenizer(wrapper, n_vocab=self.n_vocab,
                                              eos_token=sorted(self.tokenizer.eog_ids))
        return llg, self._table

    def json_schema(self, schema: dict[str, Any] | bool, *, field: str = "response_format"
                    ) -> Matcher:
        """A matcher for JSON text valid under ``schema``, laid out as JSON_STYLE."""
        llg, _ = self._tokenizer_table()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(
                schema, defaults=JSON_STYLE)
        except (ValueError, TypeError) as e:
            raise InvalidRequest(f"{field}: not a usable JSON schema: {e}", field=field) from None
        return self._matcher(grammar, field)

    def lark(self, source: str, *, field: str) -> Matcher:
        """A matcher for a Lark grammar (llguidance's dialect: ``%json {...}``
        embeds a schema, ``<[id]>`` names a token)."""
        llg, _ = self._tokenizer_table()
        return self._matcher(llg.LLMatcher.grammar_from_lark(source), field)

    def _matcher(self, grammar: str, field: str) -> Matcher:
        llg, table = self._tokenizer_table()
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, table)
        if is_error:
            raise InvalidRequest(f"{field}: {messages[0]}", field=field)
        m = llg.LLMatcher(table, grammar, log_level=0)
        if m.is_error():
            raise InvalidRequest(f"{field}: {m.get_error()}", field=field)
        return Matcher(m, self.n_vocab)


class Matcher:
    """One request's grammar state, an ``engine.TokenConstraint``."""

    def __init__(self, matcher, n_vocab: int) -> None:
        self.m = matcher
        self.mask = np.zeros((1, mask_words(n_vocab)), dtype=np.int32)

    def allowed(self) -> np.ndarray:
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.m, self.mask)
        self._check()
        return self.mask[0]

    def accept(self, token_id: int) -> None:
        self.m.consume_token(int(token_id))
        self._check()

    def is_accepting(self) -> bool:
        return self.m.is_accepting()

    def _check(self) -> None:
        if self.m.is_error():   # only a sampler bug can lead here: the draw obeys the mask
            raise RuntimeError(f"grammar: {self.m.get_error()}")


def schema_of(response_format: dict[str, Any]) -> dict[str, Any] | bool | None:
    """OpenAI's ``response_format`` -> the JSON schema to enforce, or None for
    plain text. Raises InvalidRequest for a shape OpenAI would refuse."""
    field = "response_format"
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequest("response_format.json_schema must be an object with a 'schema'",
                                 field=f"{field}.json_schema")
        schema = spec.get("schema", True)   # OpenAI: a missing schema allows any JSON
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError:
                schema = None
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequest("response_format.json_schema.schema must be a JSON schema object",
                                 field=f"{field}.json_schema.schema")
        return schema
    raise InvalidRequest(f"response_format.type must be 'text', 'json_object' or 'json_schema', "
                         f"got {kind!r}", field=f"{field}.type")
