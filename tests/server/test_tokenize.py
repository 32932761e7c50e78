"""POST /tokenize and /detokenize (vLLM's routes, llama-server's field names too) against
a real worker serving the tiny synthetic qwen2: the ids are what a request is charged,
messages render as a chat request renders them, ids come back as their text, and every
bad input is a 400 with the worker still serving."""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest

from orcd.devkit.server_testing import running_server
from orcd.server.state import ServerConfig

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def srv(tiny_model):
    cfg = ServerConfig(model_path=str(tiny_model("qwen2-tiny")), model_ref="qwen2-tiny",
                       worker_id=str(uuid.uuid4()), device="cpu", ctx_size=4096, api_key=KEY)
    with running_server(cfg) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)


def post(srv, path: str, body: dict, headers=AUTH) -> httpx.Response:
    return httpx.post(f"{srv.url}{path}", json=body, headers=headers, timeout=30)


def test_a_prompts_tokens_are_what_a_completion_is_charged_for(srv, client):
    r = post(srv, "/tokenize", {"prompt": "Once upon a time"})
    assert r.status_code == 200
    got = r.json()
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == 4096
    assert got["tokens"] == srv.state.encode("Once upon a time")
    used = client.completions.create(model="qwen2-tiny", prompt="Once upon a time", max_tokens=1)
    assert got["count"] == used.usage.prompt_tokens


def test_messages_are_rendered_as_a_chat_request_renders_them(srv, client):
    got = post(srv, "/tokenize", {"messages": HI}).json()
    used = client.chat.completions.create(model="qwen2-tiny", messages=HI, max_tokens=1)
    assert got["count"] == used.usage.prompt_tokens
    bare = post(srv, "/tokenize", {"messages": HI, "add_generation_prompt": False}).json()
    assert bare["count"] < got["count"] and got["tokens"][:bare["count"]] == bare["tokens"]


def test_llama_server_field_names_and_defaults(srv):
    tok = srv.state.loaded.tokenizer
    text = "Hello there"
    got = post(srv, "/tokenize", {"content": text, "with_pieces": True}).json()   # no BOS by default
    ids = tok.encode(text, add_special=False, parse_special=True)
    assert [p["id"] for p in got["tokens"]] == ids
    assert "".join(p["piece"] for p in got["tokens"]) == text
    assert post(srv, "/tokenize", {"content": text, "add_special": True}).json()["tokens"] == \
        tok.encode(text, add_special=True, parse_special=True)
    strs = post(srv, "/tokenize", {"prompt": text, "add_special_tokens": False,
                                   "return_token_strs": True}).json()
    assert strs["tokens"] == ids and "".join(strs["token_strs"]) == text


@pytest.mark.parametrize("body,special", [
    ({"prompt": "a"}, True), ({"content": "a"}, False),                  # vLLM's, llama-server's default
    ({"prompt": "a", "add_special_tokens": False}, False), ({"content": "a", "add_special": True}, True),
])
def test_special_tokens_follow_each_servers_default_unless_asked(srv, monkeypatch, body, special):
    tok, asked = srv.state.loaded.tokenizer, []
    encode = tok.encode

    def recording(text, *, add_special=True, parse_special=True):
        asked.append(add_special)
        return encode(text, add_special=add_special, parse_special=parse_special)
    monkeypatch.setattr(tok, "encode", recording)
    assert post(srv, "/tokenize", body).status_code == 200
    assert asked == [special]


def test_ids_come_back_as_their_text(srv):
    ids = post(srv, "/tokenize", {"prompt": "Hello there", "add_special_tokens": False}).json()["tokens"]
    r = post(srv, "/detokenize", {"tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": "Hello there", "content": "Hello there"}
    assert post(srv, "/detokenize", {"tokens": []}).json()["prompt"] == ""


@pytest.mark.parametrize("path,body,status,field", [
    ("/tokenize", {}, 400, "prompt"),                                        # nothing to tokenize
    ("/tokenize", {"prompt": "a", "messages": HI}, 400, "messages"),         # two things
    ("/tokenize", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ("/tokenize", {"prompt": "a", "model": "gpt-4o"}, 404, "model"),
    ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": [1, -1]}, 400, "tokens"),
    ("/detokenize", {"tokens": [1, True]}, 400, "tokens.1"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
])
def test_bad_input_is_refused_and_the_worker_still_serves(srv, path, body, status, field):
    r = post(srv, path, body)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["field"] == field and err["message"] and not err["retriable"]
    assert post(srv, "/tokenize", {"prompt": "ok"}).status_code == 200


def test_the_routes_need_the_api_key(srv):
    assert post(srv, "/tokenize", {"prompt": "a"}, headers={}).status_code == 401
    assert post(srv, "/detokenize", {"tokens": [1]}, headers={}).status_code == 401
