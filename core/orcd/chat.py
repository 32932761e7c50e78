"""Chat templates: the GGUF's jinja2 template rendered as Hugging Face and
llama.cpp render it.

The environment mirrors transformers' ``apply_chat_template``: an immutable
sandbox (templates come from model files, i.e. untrusted input), ``trim_blocks``
and ``lstrip_blocks``, the ``loopcontrols`` extension, and the globals templates
rely on: ``raise_exception``, ``strftime_now`` and a ``tojson`` filter that
keeps non-ASCII text as is.

Text in messages is text: special-token text a user writes (``<|im_start|>``)
is encoded as plain characters, and only the template's own markup becomes
control tokens (``SpecialTextGuard``). llama-server and vLLM parse special
text everywhere in the rendered prompt, which lets a message forge turns; orcd
keeps their tokenization for every prompt that holds no such text.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Callable, Iterator, Mapping, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from orcd.errors import InvalidRequest

#: Used when a model carries no template (llama.cpp falls back to ChatML too).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


#: template variables orcd sets itself; chat_template_kwargs may not replace them
RESERVED_VARIABLES = ("messages", "bos_token", "eos_token", "add_generation_prompt")


class TemplateError(InvalidRequest):
    """The template rejected the conversation (``raise_exception``) or is broken."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template: {message}", field="messages")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # HF's tojson: jinja2's built-in escapes HTML characters, which would change prompts
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """One compiled template plus the special-token text it may refer to."""

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source or CHATML_TEMPLATE
        self.is_fallback = not source
        self.bos_token, self.eos_token = bos_token, eos_token
        try:
            self.template = _environment().from_string(self.source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"the model's chat template does not compile: {e}") from e

    @classmethod
    def for_tokenizer(cls, tokenizer, source: str | None = None) -> ChatTemplate:
        """The tokenizer's template, or ``source`` instead (``--chat-template``),
        with the tokenizer's BOS and EOS text."""
        return cls(source or getattr(tokenizer, "chat_template", None),
                   bos_token=_token_text(tokenizer, getattr(tokenizer, "bos_id", None)),
                   eos_token=_token_text(tokenizer, getattr(tokenizer, "eos_id", None)))

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
               variables: Mapping[str, Any] | None = None, **kwargs: Any) -> str:
        """messages -> prompt text. ``variables`` (a client's chat_template_kwargs)
        and ``kwargs`` reach the template as variables (e.g. ``tools``,
        ``reasoning_effort``); none may replace RESERVED_VARIABLES. ``tools`` and
        ``documents`` are None when absent, as transformers passes them."""
        context = {"tools": None, "documents": None, **(variables or {}), **kwargs}
        for name in RESERVED_VARIABLES:
            if name in context:
                raise InvalidRequest(f"chat_template_kwargs: {name!r} is set by the server",
                                     field=f"chat_template_kwargs.{name}")
        context.update(messages=list(messages), bos_token=self.bos_token,
                       eos_token=self.eos_token, add_generation_prompt=add_generation_prompt)
        try:
            return self.template.render(context)
        except TemplateError:
            raise
        except jinja2.UndefinedError as e:
            raise TemplateError("the model's chat template needs a field these messages do not "
                                f"have ({e})", field="messages") from e
        except Exception as e:   # the template is model data run on client data: a 400
            raise TemplateError("the model's chat template cannot render these messages "
                                "(a field has a type or value it does not expect)",
                                field="messages") from e

    def prompt_ids(self, tokenizer, messages: Sequence[dict], **kwargs: Any) -> list[int]:
        """Render and tokenize. The template's special-token text becomes special
        tokens, the messages' stays text (SpecialTextGuard); a BOS the template
        already wrote is not added twice (llama.cpp strips it the same way).
        ``variables``: a client's chat_template_kwargs; ``max_chars``: the most
        characters of rendered prompt to tokenize."""
        guard = self.guard(tokenizer)
        variables = kwargs.pop("variables", None)
        max_chars = kwargs.pop("max_chars", None)
        masked, originals = guard.mask({"messages": list(messages),
                                        "variables": variables or {}, "kwargs": kwargs})
        text = self.render(masked["messages"], variables=masked["variables"], **masked["kwargs"])
        add_bos = bool(getattr(tokenizer, "add_bos", False))
        if add_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        if max_chars is not None and len(text) > max_chars:   # before the costly part
            raise InvalidRequest(f"the rendered chat prompt has {len(text)} characters; at "
                                 f"most {max_chars} are accepted", field="messages")
        return guard.encode(text, originals)

    def guard(self, tokenizer) -> SpecialTextGuard:
        """The tokenizer's guard, built once (it probes each control token)."""
        cached = getattr(self, "_guard", None)
        if cached is None or cached.tok is not tokenizer:
            cached = self._guard = SpecialTextGuard(tokenizer)
        return cached


class SpecialTextGuard:
    """Encodes a rendered chat so that only the template's special-token text
    becomes control tokens.

    ``mask`` replaces control-token text in every string a client sent with a
    placeholder (U+FDD0, k, U+FDD1; those two characters are masked too, so a
    client cannot forge one). The rendered prompt then holds control-token text
    only where the template wrote it. ``encode`` splits it there, as the
    tokenizer itself does, and encodes each piece between with special parsing
    off, placeholders put back: a piece is tokenized exactly as llama.cpp
    tokenizes the text between two special tokens, and a prompt without
    placeholders goes through one plain ``encode`` call.
    """

    OPEN, CLOSE = "\ufdd0", "\ufdd1"   # Unicode noncharacters: never in real text

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        specials = getattr(tokenizer, "special_tokens", None) or {}
        # control tokens: their text is a token only when special text is parsed
        self.control = {t: i for t, i in specials.items() if t and tokenizer.encode(
            t, add_special=False, parse_special=False) != [i]}
        by_length = sorted(self.control, key=len, reverse=True)
        self.split_re = _literals(by_length) if by_length else None
        self.mask_re = _literals([*by_length, self.OPEN, self.CLOSE])
        # ours count up from 0; one the template made up with more digits stays text
        self.restore_re = Scanner(f"{self.OPEN}(\\d{{1,20}}){self.CLOSE}", longest=22)
        self._strips: dict[str, bool] = {}   # filled once per token; then only read

    def mask(self, value: Any) -> tuple[Any, list[str]]:
        """``value`` with control-token text in every string (keys included)
        replaced by placeholders, and the texts they stand for."""
        originals: list[str] = []

        def placeholder(m: re.Match) -> str:
            originals.append(m.group(0))
            return f"{self.OPEN}{len(originals) - 1}{self.CLOSE}"

        def walk(v: Any) -> Any:
            if isinstance(v, str):
                return self.mask_re.sub(placeholder, v)
            if isinstance(v, dict):
                return {walk(k): walk(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [walk(x) for x in v]
            return v

        return walk(value), originals

    def encode(self, text: str, originals: Sequence[str] = ()) -> list[int]:
        if self.OPEN not in text:
            return self.tok.encode(text, add_special=True, parse_special=True)
        return self.encode_split(text, originals)

    def encode_split(self, text: str, originals: Sequence[str] = ()) -> list[int]:
        """``text`` split at control-token text, the pieces encoded as plain text
        (placeholders restored), BOS/EOS added as ``encode(add_special=True)`` does."""
        tok = self.tok
        ids = [tok.bos_id] if getattr(tok, "add_bos", False) and tok.bos_id is not None else []
        pos = 0
        for m in self.split_re.finditer(text) if self.split_re is not None else ():
            if m.start() < pos:   # inside whitespace a stripping token swallowed
                continue
            ids += self._plain(text[pos:m.start()], originals)
            ids.append(self.control[m.group(0)])
            pos = m.end()
            if self._rstrips(m.group(0)):
                pos = _SPACE.match(text, pos).end()
        ids += self._plain(text[pos:], originals)
        if getattr(tok, "add_eos", False) and tok.eos_id is not None:
            ids.append(tok.eos_id)
        return ids

    def _plain(self, piece: str, originals: Sequence[str]) -> list[int]:
        if not piece:
            return []
        text = self.restore_re.sub(lambda m: _original(originals, m), piece)
        return self.tok.encode(text, add_special=False, parse_special=False)

    def _rstrips(self, special: str) -> bool:
        """Whether the tokenizer swallows the whitespace after this token when it
        parses special text (llama.cpp's RSTRIP attribute, e.g. Phi-3's)."""
        if special not in self._strips:
            enc = self.tok.encode
            self._strips[special] = (enc(special + " a", add_special=False, parse_special=True)
                                     == enc(special + "a", add_special=False, parse_special=True))
        return self._strips[special]


#: characters one regex call scans (about): a scan holds the GIL, so a long prompt
#: is scanned in slices. One slice takes ~1.5 ms, under the interpreter's 5 ms switch
#: interval: a thread waiting for the GIL (the event loop) gets it as soon as from
#: Python code, however long the prompt (a 1M-character one took ~12 ms in one call)
SCAN_SLICE = 1 << 17


class Scanner:
    """A pattern whose matches are at most ``longest`` characters, matched in calls
    that each scan about ``slice_chars`` characters: the same matches as
    ``re.finditer`` and ``re.sub``, without holding the GIL through a long text."""

    def __init__(self, pattern: str, longest: int, slice_chars: int = SCAN_SLICE) -> None:
        self.re, self.longest, self.slice_chars = re.compile(pattern), longest, slice_chars

    def finditer(self, text: str) -> Iterator[re.Match]:
        pos, n = 0, len(text)
        while pos < n:
            end = min(n, pos + self.slice_chars)
            # a match that starts before ``end`` ends before end + longest: wholly seen
            m = self.re.search(text, pos, min(n, end + self.longest - 1))
            if m is None or m.start() >= end:
                pos = end
            else:
                yield m
                pos = m.end()

    def sub(self, repl: Callable[[re.Match], str], text: str) -> str:
        if len(text) <= self.slice_chars:
            return self.re.sub(repl, text)
        out, pos = [], 0
        for m in self.finditer(text):
            out += (text[pos:m.start()], repl(m))
            pos = m.end()
        out.append(text[pos:])
        return "".join(out)


def _literals(texts: list[str]) -> Scanner:
    """Leftmost-longest match of any of ``texts`` (longest first). The lookahead on
    their first characters lets the scan skip other positions at C speed."""
    first = "".join(sorted({re.escape(t[0]) for t in texts}))
    return Scanner(f"(?=[{first}])(?:{'|'.join(map(re.escape, texts))})",
                   longest=max(map(len, texts)))


_SPACE = re.compile(r"[ \t\n\v\f\r]*")   # what a stripping token swallows (C isspace)


def _original(originals: Sequence[str], m: re.Match) -> str:
    k = int(m.group(1))
    return originals[k] if k < len(originals) else ""   # a placeholder the template made up


def _token_text(tokenizer, token_id: int | None) -> str:
    if token_id is None:
        return ""
    for text, tid in (getattr(tokenizer, "special_tokens", None) or {}).items():
        if tid == token_id:
            return text
    try:
        return tokenizer.decode([token_id])
    except Exception:  # a tokenizer that refuses to decode specials: the template gets ""
        return ""


def _tool_calls(calls: Any, i: int) -> list:
    """OpenAI's tool calls carry ``arguments`` as JSON text; templates expect
    the object (transformers' convention; vLLM parses them the same way)."""
    if not isinstance(calls, list):
        raise InvalidRequest(f"messages[{i}].tool_calls must be a list", field="messages")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequest(f"messages[{i}].tool_calls[{j}] needs a function with a name",
                                 field="messages")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise InvalidRequest(f"messages[{i}].tool_calls[{j}].function.arguments is not "
                                     f"valid JSON", field="messages") from None
        out.append({**call, "function": {**fn, "arguments": args}})
    return out


def normalize_messages(messages: Sequence[Any]) -> list[dict]:
    """OpenAI messages -> plain dicts the templates expect: ``content`` as a
    string (text parts joined), tool-call arguments as objects, the reasoning
    under both names templates use (``reasoning_content`` and ``thinking``),
    other keys kept (name, tool_call_id…)."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"messages[{i}] needs a string 'role'", field="messages")
        msg = dict(m)
        content = msg.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise InvalidRequest(f"messages[{i}]: only text content parts are supported",
                                         field="messages")
                parts.append(part["text"])
            msg["content"] = "".join(parts)
        elif content is None:
            msg["content"] = ""
        elif not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string or a list of text parts",
                                 field="messages")
        if msg.get("tool_calls") is not None:
            msg["tool_calls"] = _tool_calls(msg["tool_calls"], i)
        for a, b in (("reasoning_content", "thinking"), ("thinking", "reasoning_content")):
            if isinstance(msg.get(a), str) and b not in msg:
                msg[b] = msg[a]
        out.append(msg)
    if not out:
        raise InvalidRequest("messages must not be empty", field="messages")
    return out
