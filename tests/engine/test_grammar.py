"""orcd.grammar: llguidance matchers as engine constraints, on the tiny model."""

from __future__ import annotations

import json

import pytest

from orcd import grammar
from orcd.engine import Engine, GenerateRequest
from orcd.errors import InvalidRequest
from orcd.grammar import GrammarUnavailable, Grammars, schema_of
from orcd.load import load_model
from orcd.sampling import SamplingParams

pytest.importorskip("llguidance")

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["ok", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny(tiny_model, host):
    lm = load_model(tiny_model("qwen2-tiny"), host=host, device="cpu", n_ctx=128)
    yield Engine(lm), Grammars(lm.tokenizer, lm.hp.n_vocab)
    lm.close()


@pytest.mark.parametrize("seed", range(4))
def test_generation_under_a_schema_is_valid_json_and_ends_itself(tiny, seed):
    engine, grammars = tiny
    req = GenerateRequest([1, 2, 3], max_tokens=40, sampling=SamplingParams(seed=seed),
                          constraint=grammars.json_schema(SCHEMA))
    res = engine.generate(req)
    assert res.stop_reason == "eog"       # the grammar let the end through once complete
    obj = json.loads(res.text)
    assert set(obj) == {"ok", "n"} and isinstance(obj["ok"], bool) and 0 <= obj["n"] <= 9
    free = engine.generate(GenerateRequest([1, 2, 3], max_tokens=40,
                                           sampling=SamplingParams(seed=seed)))
    with pytest.raises(ValueError):       # the random model alone writes no such thing
        json.loads(free.text)


def test_json_object_mode_gives_an_object(tiny):
    engine, grammars = tiny
    m = grammars.json_schema(schema_of({"type": "json_object"}))
    res = engine.generate(GenerateRequest([4, 5], max_tokens=12,
                                          sampling=SamplingParams(temperature=0.0), constraint=m))
    assert res.text.startswith("{")


def test_bad_schemas_and_formats_are_invalid_requests(tiny):
    _, grammars = tiny
    with pytest.raises(InvalidRequest, match="response_format"):
        grammars.json_schema({"type": "bogus"})
    with pytest.raises(InvalidRequest, match="response_format.type"):
        schema_of({"type": "bogus"})
    with pytest.raises(InvalidRequest, match="json_schema"):
        schema_of({"type": "json_schema"})
    assert schema_of({"type": "text"}) is None
    assert schema_of({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}) == SCHEMA


def test_without_llguidance_a_grammar_request_is_a_clear_400(tiny, monkeypatch):
    _, grammars = tiny
    fresh = Grammars(grammars.tokenizer, grammars.n_vocab)
    monkeypatch.setattr(grammar, "_llguidance", lambda: None)
    with pytest.raises(GrammarUnavailable, match="llguidance") as e:
        fresh.json_schema(SCHEMA)
    assert e.value.http_status == 400
