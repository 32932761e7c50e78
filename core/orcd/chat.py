"""Chat templates: the GGUF's jinja2 template rendered as Hugging Face and
llama.cpp render it.

The environment mirrors transformers' ``apply_chat_template``: an immutable
sandbox (templates come from model files, i.e. untrusted input), ``trim_blocks``
and ``lstrip_blocks``, the ``loopcontrols`` extension, and the globals templates
rely on: ``raise_exception``, ``strftime_now`` and a ``tojson`` filter that
keeps non-ASCII text as is.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Sequence

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
    def for_tokenizer(cls, tokenizer) -> ChatTemplate:
        return cls(getattr(tokenizer, "chat_template", None),
                   bos_token=_token_text(tokenizer, getattr(tokenizer, "bos_id", None)),
                   eos_token=_token_text(tokenizer, getattr(tokenizer, "eos_id", None)))

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
               **kwargs: Any) -> str:
        """messages -> prompt text. ``kwargs`` reach the template as variables
        (e.g. ``tools``, ``reasoning_effort``); ``tools`` and ``documents`` are
        None when absent, as transformers passes them."""
        variables = {"tools": None, "documents": None, **kwargs}
        try:
            return self.template.render(messages=list(messages), bos_token=self.bos_token,
                                        eos_token=self.eos_token,
                                        add_generation_prompt=add_generation_prompt, **variables)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template failed: {e}", field="messages") from e
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise TemplateError(f"chat template failed on these messages: "
                                f"{type(e).__name__}: {e}", field="messages") from e

    def prompt_ids(self, tokenizer, messages: Sequence[dict], **kwargs: Any) -> list[int]:
        """Render and tokenize. Special-token text in the rendering is parsed as
        special tokens; a BOS the template already wrote is not added twice
        (llama.cpp strips it the same way)."""
        text = self.render(messages, **kwargs)
        add_bos = bool(getattr(tokenizer, "add_bos", False))
        if add_bos and self.bos_token and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return tokenizer.encode(text, add_special=True, parse_special=True)


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
