"""Issue 18's API surface through the official ``openai`` client (its models
validate every response and chunk) against a real worker serving the tiny
synthetic qwen2: structured output, tools, logprobs, penalties and bias, the
parameters refused with a 400, served names, keep-alive and metrics."""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion

from orcd.devkit.server_testing import running_server
from orcd.server.state import ServerConfig
from scripted import scripted_steps

pytest.importorskip("llguidance")

KEY = "test-key"
NAME = "tiny-served"
HI = [{"role": "user", "content": "Hello there"}]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "n": {"type": "integer", "enum": [1, 2, 3]}},
          "required": ["ok", "n"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {
             "name": "get_weather", "description": "Weather in a city",
             "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                            "required": ["city"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "noop", "parameters": {
             "type": "object", "properties": {}, "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def srv(tiny_model):
    cfg = ServerConfig(model_path=str(tiny_model("qwen2-tiny")), model_ref="qwen2-tiny",
                       worker_id=str(uuid.uuid4()), device="cpu", ctx_size=4096, api_key=KEY,
                       served_model_name=NAME, sse_keepalive_s=0.05)
    with running_server(cfg) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)


def chat(client, **kw):
    return client.chat.completions.create(model=NAME, messages=HI, **kw)


def streamed(client, **kw):
    return list(client.chat.completions.create(model=NAME, messages=HI, stream=True, **kw))


@pytest.fixture
def scripted(srv, monkeypatch):
    """``scripted(text)``: the model now writes ``text`` then ends, whatever it is asked."""
    lm = srv.state.loaded
    tok = lm.tokenizer

    def script(text: str) -> None:
        ids = tok.encode(text, add_special=False, parse_special=True) + [tok.eos_id]
        monkeypatch.setattr(lm.backend, "sample_step", scripted_steps(ids))
    return script



# -- names -------------------------------------------------------------------------------

def test_the_served_name_is_listed_and_reported(client):
    assert [m.id for m in client.models.list()] == [NAME]
    assert chat(client, max_tokens=2).model == NAME


def test_another_model_name_is_a_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="qwen2-tiny", messages=HI, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=2)


@pytest.mark.parametrize("api,kwargs,param,words", [
    ("chat", {"n": 17}, "n", "n must be between 1 and 16"),
    ("completions", {"best_of": 2}, "best_of", "best_of"),
    ("completions", {"suffix": "}"}, "suffix", "suffix"),
])
def test_what_orcd_cannot_honour_is_a_400_not_ignored(client, api, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        if api == "chat":
            chat(client, max_tokens=2, **kwargs)
        else:
            client.completions.create(model=NAME, prompt="x", max_tokens=2, **kwargs)
    assert e.value.body["param"] == param and words in e.value.body["message"]


# -- structured output ---------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_output_validates_and_streams_the_same(client, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    r = chat(client, response_format=fmt, seed=seed, max_tokens=40)
    assert r.choices[0].finish_reason == "stop"
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"ok", "n"} and isinstance(obj["ok"], bool) and obj["n"] in (1, 2, 3)
    chunks = streamed(client, response_format=fmt, seed=seed, max_tokens=40)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    free = chat(client, seed=seed, max_tokens=40)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)


def test_json_object_mode_and_completions_take_response_format(client):
    r = chat(client, response_format={"type": "json_object"}, seed=5, max_tokens=8)
    assert r.choices[0].message.content.startswith("{")
    c = client.completions.create(model=NAME, prompt="Answer:", max_tokens=40, seed=1,
                                  extra_body={"response_format": {
                                      "type": "json_schema",
                                      "json_schema": {"name": "a", "schema": SCHEMA}}})
    assert c.choices[0].finish_reason == "stop" and set(json.loads(c.choices[0].text)) == {"ok", "n"}


# -- tools -----------------------------------------------------------------------------------

@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_weather"}}])
def test_a_forced_call_comes_back_as_tool_calls_and_streams_as_deltas(client, choice):
    r = chat(client, tools=TOOLS, tool_choice=choice, seed=4, max_tokens=60)
    choice0 = r.choices[0]
    assert choice0.finish_reason == "tool_calls" and choice0.message.content is None
    [call] = choice0.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert args == {} if call.function.name == "noop" else args["city"] in ("Paris", "Oslo")
    chunks = streamed(client, tools=TOOLS, tool_choice=choice, seed=4, max_tokens=60)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].index == 0 and deltas[0].function.name == call.function.name
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments


def test_a_call_the_model_writes_is_parsed_under_auto_and_text_under_none(client, scripted):
    scripted('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
             '</tool_call>')
    r = chat(client, tools=TOOLS, max_tokens=300)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Checking.\n"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [
        ("get_weather", {"city": "Oslo"})]
    none = chat(client, tools=TOOLS, tool_choice="none", max_tokens=300)
    assert none.choices[0].finish_reason == "stop" and none.choices[0].message.tool_calls is None
    assert "<tool_call>" in none.choices[0].message.content
    # the call goes back into the history with OpenAI's string arguments
    follow = client.chat.completions.create(model=NAME, max_tokens=2, tools=TOOLS, messages=[
        *HI, msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "sunny"}])
    assert follow.usage.prompt_tokens > r.usage.prompt_tokens


# -- logprobs, penalties, bias ------------------------------------------------------------------

def test_chat_logprobs_cover_every_token_and_stream_the_same(client, srv):
    r = chat(client, logprobs=True, top_logprobs=3, temperature=0, max_tokens=8)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens == 8
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.top_logprobs[0].token == e.token            # greedy: the best is chosen
        assert [t.logprob for t in e.top_logprobs] == sorted(
            [t.logprob for t in e.top_logprobs], reverse=True)
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    chunks = streamed(client, logprobs=True, top_logprobs=3, temperature=0, max_tokens=8)
    got = [e for c in chunks if c.choices and c.choices[0].logprobs
           for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in got] == [e.model_dump() for e in entries]
    assert chat(client, max_tokens=2).choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_shape(client):
    r = client.completions.create(model=NAME, prompt="Hello", temperature=0, max_tokens=6,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 6
    whole = [t for t in lp.tokens if "\ufffd" not in t]   # a token may hold part of a character
    assert whole and all(t in r.choices[0].text for t in whole)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert tok in top and top[tok] == chosen and len(top) <= 3


def test_logit_bias_steers_greedy_decoding(client, srv):
    tok = srv.state.loaded.tokenizer
    target = tok.encode(" zebra", add_special=False)[0]
    r = chat(client, temperature=0, max_tokens=4, logit_bias={str(target): 100})
    assert r.choices[0].message.content == tok.decode([target] * 4)
    free = chat(client, temperature=0, max_tokens=4, logprobs=True)
    first = free.choices[0].logprobs.content[0]
    banned = [i for i in range(tok.vocab_size) if tok.token_bytes(i) == bytes(first.bytes)]
    steered = chat(client, temperature=0, max_tokens=4, logprobs=True,
                   logit_bias={str(i): -100 for i in banned})
    assert steered.choices[0].logprobs.content[0].token != first.token


def test_frequency_and_presence_penalties_break_greedy_loops(client):
    def distinct(**kw):
        r = chat(client, temperature=0, max_tokens=24, logprobs=True, **kw)
        return len({e.token for e in r.choices[0].logprobs.content})
    plain = distinct()
    assert distinct(frequency_penalty=2.0) > plain
    assert distinct(presence_penalty=2.0) > plain


# -- keep-alive and metrics ------------------------------------------------------------------------

def test_a_queued_stream_gets_keepalive_comments(srv, client, monkeypatch):
    lm = srv.state.loaded
    real = lm.backend.sample_step
    gate = threading.Event()

    def slow_first(*a, **kw):          # the first job holds the worker until released
        gate.wait(5)
        return real(*a, **kw)
    monkeypatch.setattr(lm.backend, "sample_step", slow_first)
    blocker = threading.Thread(target=lambda: chat(client, max_tokens=2))
    blocker.start()
    time.sleep(0.1)
    # greedy: a random draw ends the answer within 2 tokens now and then ("stop")
    body = {"model": NAME, "messages": HI, "max_tokens": 2, "stream": True, "temperature": 0}
    lines = []
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith(":") and not gate.is_set():
                gate.set()
    blocker.join()
    assert any(line.startswith(": keep-alive") for line in lines)
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert data[-1]["choices"][0]["finish_reason"] == "length"


def test_metrics_report_finished_reason_and_phases(srv, client):
    chat(client, max_tokens=3, temperature=0)
    text = httpx.get(f"{srv.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    assert values['orcd_request_success_total{finished_reason="length"}'] >= 1
    for name in ("orcd_request_queue_time_seconds_count", "orcd_request_prefill_time_seconds_count",
                 "orcd_request_decode_time_seconds_count", "orcd_e2e_request_latency_seconds_count"):
        assert values[name] >= 1, name
    assert values["orcd_requests_running"] == 0


def test_a_response_validates_against_the_clients_models(srv):
    raw = httpx.post(f"{srv.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": NAME, "messages": HI, "max_tokens": 100, "tools": TOOLS,
                           "tool_choice": "required", "logprobs": True, "top_logprobs": 2,
                           "seed": 4}).json()
    parsed = ChatCompletion.model_validate(raw)
    assert parsed.choices[0].message.tool_calls and parsed.choices[0].logprobs.content
