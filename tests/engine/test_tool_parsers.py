"""Qwen's Hermes tool-call parser and the grammars that force a call."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from orcd.toolcalls import ToolCall
from orcd_qwen.tools import HermesParser, parser_factory

CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
         '</tool_call>\n<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call>\n')
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {
             "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}},
         {"type": "function", "function": {"name": "g"}}]


def parse(*chunks):
    p = HermesParser()
    out = []
    for ch, t in [x for c in chunks for x in p.feed(c)] + p.finish():
        if ch == "tool_call":
            assert isinstance(t, ToolCall) and t.id.startswith("call_")
            out.append((ch, t.name, json.loads(t.arguments), t.raw))
        elif out and out[-1][0] == ch:
            out[-1] = (ch, out[-1][1] + t)
        else:
            out.append((ch, t))
    return out


def test_calls_are_parsed_and_the_text_before_them_is_content():
    assert parse(CALLS) == [
        ("content", "Let me check.\n"),
        ("tool_call", "get_weather", {"city": "Paris"},
         '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
        ("tool_call", "f", {"x": 1}, '<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n'
                                     '</tool_call>')]


def test_any_split_gives_the_one_shot_result():
    whole = parse(CALLS)
    assert parse(*CALLS) == whole
    rng = random.Random(0)
    for _ in range(100):
        cuts = sorted(rng.sample(range(len(CALLS)), 6))
        assert parse(*[CALLS[a:b] for a, b in zip([0, *cuts], [*cuts, len(CALLS)])]) == whole


@pytest.mark.parametrize("text", [
    "plain answer with <tool and </tool_call> in it",
    '<tool_call>\n{"name": broken}\n</tool_call> tail',
    '<tool_call>\n{"arguments": {}}\n</tool_call>',          # no name
    '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',
    "<tool_ca",
])
def test_anything_else_is_content_verbatim(text):
    assert parse(text) == [("content", text)]


def test_a_call_cut_off_before_its_closing_tag_still_counts():
    assert parse('<tool_call>\n{"name": "g", "arguments": {}}') == [
        ("tool_call", "g", {}, '<tool_call>\n{"name": "g", "arguments": {}}')]


def test_the_factory_needs_the_tags_in_the_vocabulary():
    class Tok:
        special_tokens = {"<tool_call>": 5, "</tool_call>": 6}
    assert parser_factory(Tok()) is HermesParser
    Tok.special_tokens = {}
    assert parser_factory(Tok()) is None


def test_the_forced_call_grammar_yields_only_valid_calls(tiny_model, host):
    from orcd.grammar import Grammars
    from orcd.load import load_model
    from orcd.ops.sampling import allowed_ids

    pytest.importorskip("llguidance")
    lm = load_model(tiny_model("qwen2-tiny"), host=host, device="cpu", n_ctx=64)
    tok = lm.tokenizer
    grammars = Grammars(tok, lm.hp.n_vocab)
    rng = np.random.default_rng(0)
    seen = set()
    for name in (None, None, None, "f"):
        m = grammars.lark(HermesParser.call_grammar(TOOLS, name, tok), field="tool_choice")
        ids = []
        while len(ids) < 40:
            ok = np.flatnonzero(allowed_ids(m.allowed(), lm.hp.n_vocab))
            if set(ok.tolist()) <= tok.eog_ids:     # complete: only the end may follow
                break
            pick = int(rng.choice([i for i in ok if i not in tok.eog_ids]))
            m.accept(pick)
            ids.append(pick)
        assert ids[0] == tok.special_tokens["<tool_call>"]   # the token, not its spelling
        text = tok.decode(ids)
        if m.is_accepting():
            [(kind, name_, args, _)] = parse(text)
            assert kind == "tool_call" and name_ in ("f", "g")
            assert name is None or name_ == name
            if name_ == "f":
                assert isinstance(args["x"], int)
            seen.add(name_)
    lm.close()
    assert seen
