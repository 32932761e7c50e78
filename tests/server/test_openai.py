"""The OpenAI-compatible API driven by the official ``openai`` client, unchanged,
against a real uvicorn worker serving the tiny synthetic qwen2."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from orcd.chat import ChatTemplate
from orcd.devkit.server_testing import running_server
from orcd.server.openai_api import OutputSplitter
from orcd.server.state import ServerConfig

openai = pytest.importorskip("openai")   # the dev extra's oracle; absent on a bare GPU machine

KEY = "test-key"
HI = [{"role": "user", "content": "Hello there"}]


def config(path, ref: str) -> ServerConfig:
    return ServerConfig(model_path=str(path), model_ref=ref, worker_id=str(uuid.uuid4()),
                        device="cpu", ctx_size=4096, api_key=KEY)


@pytest.fixture(scope="module")
def srv(tiny_model):
    with running_server(config(tiny_model("qwen2-tiny"), "qwen2-tiny")) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)


def test_models(client):
    assert [m.id for m in client.models.list()] == ["qwen2-tiny"]


def test_chat_non_stream(client, srv):
    r = client.chat.completions.create(model="qwen2-tiny", messages=HI, temperature=0,
                                       max_tokens=8)
    assert r.object == "chat.completion" and r.model == "qwen2-tiny"
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    tok = srv.state.loaded.tokenizer
    n_prompt = len(ChatTemplate.for_tokenizer(tok).prompt_ids(tok, HI))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 8)
    assert r.usage.total_tokens == n_prompt + 8


def test_chat_stream_chunks_match_the_non_streamed_answer(client):
    full = client.chat.completions.create(model="qwen2-tiny", messages=HI, temperature=0, max_tokens=8)
    chunks = list(client.chat.completions.create(model="qwen2-tiny", messages=HI, temperature=0,
                                                 max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last, usage = chunks
    assert all(c.choices[0].finish_reason is None for c in body)
    assert last.choices[0].finish_reason == "length"
    assert last.choices[0].delta.content is None and last.choices[0].delta.role is None
    assert usage.choices == [] and usage.usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in body) == full.choices[0].message.content


def test_raw_wire_format(srv):
    body = {"model": "qwen2-tiny", "messages": HI, "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert all('"usage"' not in line for line in lines)   # only with include_usage
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]


def test_completions_stream_and_non_stream_agree(client):
    full = client.completions.create(model="qwen2-tiny", prompt="Hello", temperature=0, max_tokens=10)
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 10
    chunks = list(client.completions.create(model="qwen2-tiny", prompt="Hello", temperature=0,
                                            max_tokens=10, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].choices[0].text == ""
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text


def test_seed_makes_sampling_reproducible(client):
    runs = [client.chat.completions.create(model="qwen2-tiny", messages=HI, temperature=1.0, seed=1234,
                                           max_tokens=12).choices[0].message.content
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_stop_strings(client):
    free = client.completions.create(model="qwen2-tiny", prompt="Hello", temperature=0, max_tokens=12)
    text = free.choices[0].text
    stop = text[3:5]
    r = client.completions.create(model="qwen2-tiny", prompt="Hello", temperature=0, max_tokens=12,
                                  stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[:text.index(stop)]


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": 3.0}, "temperature"), ({"n": 0}, "n"), ({"n": 100}, "n"),
    ({"top_p": -1}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"max_tokens": 5000}, "max_tokens"),
    ({"top_logprobs": 3}, "top_logprobs"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"top_logprobs": 21, "logprobs": True}, "logprobs"),
    ({"logit_bias": {"512": 1}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"response_format": {"type": "bogus"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "bogus"}}}}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"tools": [{"type": "function"}]}, "tools.0"),
])
def test_errors_in_openai_shape(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen2-tiny", messages=HI, **kwargs)
    assert e.value.status_code == 400
    assert e.value.body["code"] == "INVALID_REQUEST" and e.value.body["param"] == param
    assert e.value.body["type"] == "invalid_request_error"


def test_bad_messages(client, srv):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="qwen2-tiny", messages=[])
    r = httpx.post(f"{srv.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_cancel_mid_stream_reaches_the_client_as_an_error(client, srv):
    stream = client.completions.create(model="qwen2-tiny", prompt="Hello", temperature=0,
                                       max_tokens=2000, stream=True)
    seen = 0
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            seen += 1
            if seen == 1:   # the chunk id is the job id
                r = httpx.post(f"{srv.url}/cancel", json={"job_id": chunk.id},
                               headers={"Authorization": f"Bearer {KEY}"})
                assert r.json()["status"] == "cancelling"
    assert "cancel" in str(e.value).lower() and seen < 2000


class FakeHarmony:
    """Stands in for a plugin parser: text before '|' is reasoning."""

    def __init__(self):
        self.buf, self.done = "", False

    def feed(self, text):
        if self.done:
            return [("content", text)]
        self.buf += text
        if "|" in self.buf:
            self.done = True
            head, tail = self.buf.split("|", 1)
            return [("reasoning", head), ("content", tail)]
        return []

    def finish(self):
        return [] if self.done else [("content", self.buf)]


def test_output_splitter_routes_channels():
    s = OutputSplitter(FakeHarmony)
    pieces = s.feed("think") + s.feed("ing|ans") + s.feed("wer") + s.finish()
    assert pieces == [("reasoning_content", "thinking"), ("content", "ans"), ("content", "wer")]
    plain = OutputSplitter(None)
    assert plain.feed("x") == [("content", "x")] and plain.finish() == []
    unfinished = OutputSplitter(FakeHarmony)
    assert unfinished.feed("no marker") == [] and unfinished.finish() == [("content", "no marker")]


def test_gpt_oss_chat_never_500s(tiny_model):
    """Random output of the tiny GPT-OSS is malformed harmony: it must come back as text."""
    with running_server(config(tiny_model("gpt-oss-tiny"), "gpt-oss-tiny")) as s:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key=KEY, max_retries=0)
        r = c.chat.completions.create(model="gpt-oss-tiny", messages=HI, temperature=1.0, seed=3,
                                      max_tokens=16)
        assert r.choices[0].finish_reason in ("stop", "length")
        chunks = list(c.chat.completions.create(model="gpt-oss-tiny", messages=HI, temperature=1.0,
                                                seed=3, max_tokens=16, stream=True))
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
