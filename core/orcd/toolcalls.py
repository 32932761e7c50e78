"""Tool calls as output parsers report them.

An output parser (hook ``orcd_output_parser``) may emit ``("tool_call",
ToolCall)`` pieces besides ``("content", text)`` and ``("reasoning", text)``.
A parser class may also offer ``call_grammar(tools, name, tokenizer) -> str``:
a Lark grammar (llguidance's dialect) that forces the model to call one of
``tools`` (or the one named), used for ``tool_choice`` "required" / named.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str          # JSON text, as OpenAI's ``function.arguments``
    raw: str                # the text as generated: the content when tools are off
    id: str = field(default_factory=_call_id)


def arguments_text(args: Any) -> str | None:
    """A parsed call's arguments as OpenAI's JSON string, or None if they are
    not a JSON object (then the text was no call after all)."""
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return json.dumps(args, ensure_ascii=False) if isinstance(args, dict) else None


def function_schema(tool: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """An OpenAI tool -> (name, parameters schema)."""
    fn = tool.get("function") or {}
    params = fn.get("parameters")
    return fn["name"], params if isinstance(params, dict) else {"type": "object"}


def json_rule(schema: dict[str, Any]) -> str:
    """A Lark rule body for JSON valid under ``schema``, laid out as
    orcd.grammar.JSON_STYLE."""
    from orcd.grammar import JSON_STYLE
    return f"%json {json.dumps({**schema, 'x-guidance': JSON_STYLE})}"


def lark_literal(text: str, tokenizer) -> str:
    """``text`` in a Lark grammar: the token itself (``<[id]>``) when it is a
    special token of ``tokenizer``, else a quoted string."""
    tid = (getattr(tokenizer, "special_tokens", None) or {}).get(text)
    return f"<[{tid}]>" if tid is not None else json.dumps(text)
