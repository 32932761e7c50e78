"""Streaming parser of GPT-OSS's harmony output: ``analysis`` → reasoning, ``final`` → content.

The chat prompt ends with ``<|start|>assistant``, so a well-formed generation reads

    <|channel|>analysis<|message|>…thinking…<|end|>
    <|start|>assistant<|channel|>final<|message|>…answer…<|return|>

Each message is a header (role, ``<|channel|>`` name, optional `` to=RECIPIENT``
and ``<|constrain|>FORMAT``), ``<|message|>``, a body, and ``<|end|>`` (or the
end-of-generation ``<|return|>`` / ``<|call|>``, which the engine usually stops
on before they reach us). The text arrives in arbitrary pieces, so a special
token may be split across two ``feed`` calls: a tail that could still become
one is held back.

What comes out:

- ``analysis`` and ``commentary`` bodies → ``"reasoning"``; ``final`` → ``"content"``.
  Their headers and the ``<|end|>``/``<|start|>`` framing are dropped.
- Anything the parser does not understand passes through as ``"content"``,
  exactly as generated, framing included: text outside any message, an unknown
  channel or role, a header with two channels, a header that never reaches
  ``<|message|>`` (by ``finish`` or within ``MAX_HEADER`` characters). So
  malformed output reads as if there were no parser, and nothing ever raises.
- A function call (an assistant header addressed `` to=functions.NAME``, in
  the role part or after the channel) whose body is a JSON object becomes
  ``("tool_call", ToolCall)`` when its message ends (``<|call|>``, ``<|end|>``,
  a new message, or ``finish``); its ``raw`` is the message verbatim, which the
  server shows as content when the request has no tools. Any other recipient
  (built-in tools) or a body that is no JSON object passes through verbatim.

Pieces depend only on the text, never on how it was split: feeding a transcript
in any chunks gives the same channels and text as feeding it at once.
"""

from __future__ import annotations

import json
import re
from typing import Any

from orcd.toolcalls import ToolCall, arguments_text, function_schema, json_rule

SPECIALS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>",
            "<|return|>", "<|call|>")
SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIALS))
ENDS = ("<|end|>", "<|return|>", "<|call|>")   # end a message's body
OPENS = ("<|start|>", "<|channel|>")           # begin a header (the model may skip <|start|>role)
CHANNELS = {"analysis": "reasoning", "commentary": "reasoning", "final": "content"}
MAX_HEADER = 256   # a real header, tool name included, is far shorter: longer is plain text
VERBATIM = "verbatim"  # a message passed through whole as content
CALL = "call"          # a function call's body, collected until its message ends


def held_prefix(text: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a special token."""
    start = max(0, len(text) - max(map(len, SPECIALS)) + 1)
    for i in range(start, len(text)):
        tail = text[i:]
        if any(s.startswith(tail) and s != tail for s in SPECIALS):
            return len(text) - i
    return 0


def header_channel(header: str) -> str | None:
    """``header`` (raw, up to ``<|message|>``) → "reasoning" / "content", or None
    for a header that is malformed or addresses a recipient (a tool call)."""
    role, sep, rest = header.removeprefix("<|start|>").partition("<|channel|>")
    if not sep or "<|channel|>" in rest:
        return None
    words = SPECIAL_RE.sub(" ", header).split()
    if any(w.startswith("to=") for w in words):
        return None
    if role.split() not in ([], ["assistant"]):
        return None
    name = rest.partition("<|constrain|>")[0].split()
    return CHANNELS.get(name[0]) if name else None


def header_function(header: str) -> str | None:
    """The function an assistant header calls (`` to=functions.NAME``), or None."""
    role, sep, rest = header.removeprefix("<|start|>").partition("<|channel|>")
    if not sep or "<|channel|>" in rest:
        return None
    words = SPECIAL_RE.sub(" ", header.removeprefix("<|start|>")).split()
    targets = [w[3:] for w in words if w.startswith("to=")]
    if len(targets) != 1 or not targets[0].startswith("functions."):
        return None
    if [w for w in role.split() if not w.startswith("to=")] not in ([], ["assistant"]):
        return None
    return targets[0].removeprefix("functions.") or None


class HarmonyParser:
    """One request's parser: ``feed(text)`` and ``finish()`` → [(channel, text)]."""

    def __init__(self) -> None:
        self.pending = ""        # a tail that may still become a special token
        self.state = "header"    # the prompt already opened the first message
        self.header = ""         # the current header as generated
        self.channel = None      # the open message's channel, VERBATIM or CALL
        self.call: tuple[str, str] | None = None   # (function, raw header) of an open call
        self.body = ""           # the open call's arguments so far

    def feed(self, text: str) -> list[tuple[str, str]]:
        buf = self.pending + text
        hold = held_prefix(buf)
        self.pending = buf[len(buf) - hold:] if hold else ""
        return self._scan(buf[:len(buf) - hold])

    def finish(self) -> list[tuple[str, Any]]:
        out = self._scan(self.pending)
        self.pending = ""
        if self.state == "body" and self.channel == CALL:   # stopped on <|call|>
            self._end_call("", out)
        if self.state == "header" and self.header:   # never reached <|message|>
            out.append(("content", self.header))
            self.header = ""
        self.state = "outside"
        return out

    def _scan(self, text: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        pos = 0
        for m in SPECIAL_RE.finditer(text):
            self._text(text[pos:m.start()], out)
            self._special(m.group(), out)
            pos = m.end()
        self._text(text[pos:], out)
        return _merged(out)

    def _text(self, text: str, out: list) -> None:
        if not text:
            return
        if self.state == "header":
            self.header += text
            if len(self.header) > MAX_HEADER:   # no header after all: plain text
                out.append(("content", self.header))
                self.header, self.state = "", "outside"
        elif self.state == "body" and self.channel == CALL:
            self.body += text
        elif self.state == "body":
            out.append(("content" if self.channel == VERBATIM else self.channel, text))
        else:
            out.append(("content", text))

    def _special(self, tok: str, out: list) -> None:
        if self.state == "header":
            self._header_special(tok, out)
        elif self.state == "body" and tok in ENDS:
            if self.channel == CALL:
                self._end_call(tok, out)
            elif self.channel == VERBATIM:
                out.append(("content", tok))
            self.state = "outside"
        elif tok in OPENS:             # a new message, its predecessor left unterminated
            if self.state == "body" and self.channel == CALL:
                self._end_call("", out)
            self.state, self.header = "header", tok
        else:                          # a stray special inside a body or outside: text
            self._text(tok, out)

    def _header_special(self, tok: str, out: list) -> None:
        if tok == "<|message|>":
            function = header_function(self.header)
            if function is not None:
                self.channel, self.call, self.body = CALL, (function, self.header + tok), ""
            else:
                self.channel = header_channel(self.header) or VERBATIM
            if self.channel == VERBATIM:
                out.append(("content", self.header + tok))
            self.header, self.state = "", "body"
        elif tok in ("<|channel|>", "<|constrain|>"):
            self.header += tok
        else:                          # <|start|> or an end inside a header: it was no header
            if self.header:
                out.append(("content", self.header))
            self.header, self.state = "", "outside"
            if tok == "<|start|>":
                self.state, self.header = "header", tok
            else:
                out.append(("content", tok))


    def _end_call(self, end: str, out: list) -> None:
        """The open call's message ended (``end``: its end token, or "")."""
        (function, head), body = self.call, self.body
        self.call, self.body = None, ""
        raw = head + body + end
        args = arguments_text(body)
        out.append(("tool_call", ToolCall(function, args, raw)) if args is not None
                   else ("content", raw))

    @staticmethod
    def call_grammar(tools: list[dict], name: str | None, tokenizer) -> str:
        """A Lark grammar forcing one call of ``name`` (or of any of ``tools``)
        right after the prompt's ``<|start|>assistant``."""
        special = getattr(tokenizer, "special_tokens", None) or {}
        tok = {s: f"<[{special[s]}]>" for s in ("<|channel|>", "<|constrain|>", "<|message|>",
                                               "<|call|>")}
        alts = []
        for tool in tools:
            fname, params = function_schema(tool)
            if name is None or fname == name:
                alts.append(f'{tok["<|channel|>"]} {json.dumps("commentary to=functions." + fname)} '
                            f'" " {tok["<|constrain|>"]} "json" {tok["<|message|>"]} '
                            f'{json_rule(params)} {tok["<|call|>"]}')
        return "start: " + "\n     | ".join(alts) + "\n"


def _merged(pieces: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Adjacent text pieces of one channel joined, empty ones dropped."""
    out: list[tuple[str, Any]] = []
    for ch, t in pieces:
        if not t:
            continue
        if out and out[-1][0] == ch and isinstance(t, str) and isinstance(out[-1][1], str):
            out[-1] = (ch, out[-1][1] + t)
        else:
            out.append((ch, t))
    return out


def parser_factory(tokenizer: Any):
    """The factory ``OutputSplitter`` calls once per request, or None when the
    vocabulary has no harmony tokens (then the output cannot be harmony)."""
    specials = getattr(tokenizer, "special_tokens", None) or {}
    if not all(s in specials for s in ("<|channel|>", "<|message|>")):
        return None
    return HarmonyParser
