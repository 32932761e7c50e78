"""Qwen2.5's tool calls (the Hermes format its chat template asks for):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

``HermesParser`` is the streaming output parser: text outside the tags is
content; each complete block whose JSON has a string ``name`` and object
``arguments`` becomes a ``ToolCall``; anything else (bad JSON, a block cut off
by max_tokens) passes through verbatim as content, so nothing is lost. Pieces
depend only on the text, never on how it was split. Whitespace between and
after calls is dropped, as vLLM's hermes parser does.
"""

from __future__ import annotations

import json
from typing import Any

from orcd.toolcalls import ToolCall, arguments_text, function_schema, json_rule, lark_literal

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def _held(text: str, tag: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def parse_block(body: str) -> ToolCall | None:
    """The JSON between the tags -> a call, or None."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = arguments_text(obj.get("arguments", obj.get("parameters", {})))
    if args is None:
        return None
    return ToolCall(obj["name"], args, raw=OPEN + body + CLOSE)


class HermesParser:
    """One request's parser: ``feed(text)`` / ``finish()`` -> [(channel, payload)]."""

    def __init__(self) -> None:
        self.buf = ""           # unscanned text (a possible tag prefix, or an open block)
        self.inside = False
        self.calls = 0
        self.space = ""         # whitespace after a call, released only if content follows

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self.buf += text
        out: list[tuple[str, Any]] = []
        while True:
            tag = CLOSE if self.inside else OPEN
            i = self.buf.find(tag)
            if i < 0:
                break
            head, self.buf = self.buf[:i], self.buf[i + len(tag):]
            if self.inside:
                self._block(head, out)
            else:
                self._content(head, out)
            self.inside = not self.inside
        if not self.inside:
            keep = _held(self.buf, OPEN)
            self._content(self.buf[:len(self.buf) - keep], out)
            self.buf = self.buf[len(self.buf) - keep:]
        return out

    def finish(self) -> list[tuple[str, Any]]:
        out: list[tuple[str, Any]] = []
        if self.inside:   # cut off (max_tokens, stop) or closed by the end token
            call = parse_block(self.buf)
            if call is not None:
                call.raw = OPEN + self.buf
                self.calls += 1
                out.append(("tool_call", call))
            else:
                self._content(OPEN + self.buf, out)
        else:
            self._content(self.buf, out)
        self.buf, self.inside = "", False
        return out

    def _block(self, body: str, out: list) -> None:
        call = parse_block(body)
        if call is None:
            self._content(OPEN + body + CLOSE, out)
            return
        self.calls += 1
        self.space = ""
        out.append(("tool_call", call))

    def _content(self, text: str, out: list) -> None:
        if not text:
            return
        if self.calls and not text.strip():
            self.space += text
            return
        text, self.space = self.space + text, ""
        if out and out[-1][0] == "content":
            out[-1] = ("content", out[-1][1] + text)
        else:
            out.append(("content", text))

    @staticmethod
    def call_grammar(tools: list[dict], name: str | None, tokenizer) -> str:
        """A Lark grammar forcing one call of ``name`` (or of any of ``tools``)."""
        alts = []
        for tool in tools:
            fname, params = function_schema(tool)
            if name is not None and fname != name:
                continue
            schema = {"type": "object", "properties": {"name": {"const": fname},
                                                       "arguments": params},
                      "required": ["name", "arguments"], "additionalProperties": False}
            alts.append(json_rule(schema))
        return (f"start: {lark_literal(OPEN, tokenizer)} \"\\n\" call \"\\n\" "
                f"{lark_literal(CLOSE, tokenizer)}\n"
                f"call: {' | '.join(alts)}\n")


def parser_factory(tokenizer: Any):
    """Hermes tool calls for a vocabulary that has the tags, else None."""
    specials = getattr(tokenizer, "special_tokens", None) or {}
    return HermesParser if OPEN in specials and CLOSE in specials else None
