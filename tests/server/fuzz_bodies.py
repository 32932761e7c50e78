"""Hypothesis strategies for hostile requests to the worker, and the check every
answer must pass: never a 5xx, every error in its API's own shape, every stream
closed by exactly one terminal event. Used by tests/server/test_fuzz.py (a few hundred
requests in CI) and bench/fuzz_flood.py (10,000+)."""

from __future__ import annotations

import json
from typing import Any

import httpx
from hypothesis import strategies as st

from orcd.devkit.server_testing import parse_sse

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "\ufdd0", "\ufdd1", "\x00", "😀",
           "\ud800", "{{ raise_exception('x') }}", "{% for %}"]

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
           | st.sampled_from(SPECIAL))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                           max_leaves=12)
texts = st.text(max_size=60) | st.sampled_from(SPECIAL) | st.lists(
    st.sampled_from(SPECIAL) | st.text(max_size=8), max_size=6).map("".join)
small_ints = st.integers(-3, 3000) | st.sampled_from([0, 1, 2**63, 2**64, -2**64])
unit = st.floats(-0.5, 2.5) | st.sampled_from([0, 1, 1e308, -0.0])

parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "text", "image_url"]),
                                        "text": texts}), max_size=3)
content = st.one_of(texts, texts, texts, parts, json_values)   # mostly valid: reach the template
roles = st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]), json_values)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.one_of(roles.filter(lambda r: isinstance(r, str)), roles)},
    optional={"content": content, "name": texts, "tool_calls": json_values}), max_size=4)

COMMON = {"max_tokens": small_ints, "temperature": unit, "top_p": unit, "top_k": small_ints,
          "min_p": unit, "repetition_penalty": unit, "seed": small_ints,
          "stop": texts | st.lists(texts, max_size=5)}
FIELDS: dict[str, dict[str, Any]] = {
    "/execute": {"job_id": texts, "prompt": texts, **COMMON},
    "/cancel": {"job_id": texts},
    "/v1/completions": {"prompt": texts | st.lists(st.integers(-5, 600), max_size=5)
                        | st.lists(texts, max_size=2), "stream": st.booleans(),
                        "echo": st.booleans(), "n": small_ints, "logprobs": json_values,
                        "stream_options": json_values, **COMMON},
    "/v1/chat/completions": {"messages": messages, "stream": st.booleans(),
                             "chat_template_kwargs": st.dictionaries(
                                 st.sampled_from(["add_generation_prompt", "messages", "self",
                                                  "tokenizer", "tools", "x"]), json_values),
                             "tools": json_values, "reasoning_effort": json_values,
                             "max_completion_tokens": small_ints, **COMMON},
    "/tokenize": {"prompt": texts, "content": texts, "messages": messages,
                  "add_special_tokens": st.booleans(), "add_special": st.booleans(),
                  "add_generation_prompt": st.booleans(), "return_token_strs": st.booleans(),
                  "with_pieces": st.booleans(), "tools": json_values,
                  "chat_template_kwargs": st.dictionaries(st.sampled_from(["messages", "x"]),
                                                          json_values)},
    "/detokenize": {"tokens": st.lists(st.integers(-5, 600) | st.sampled_from([2**31, 2**63, -2**63]),
                                       max_size=6)},
}
PATHS = list(FIELDS)


@st.composite
def bodies(draw, path: str) -> bytes:
    """A body for ``path``: mostly its own fields with hostile values, sometimes
    any JSON, sometimes bytes that are not JSON."""
    kind = draw(st.sampled_from(["fields", "fields", "fields", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    fields = FIELDS[path]
    # a few fields at a time: one bad value already ends validation, so many at once
    # would rarely reach the template, the tokenizer or the engine
    chosen = draw(st.lists(st.sampled_from(sorted(fields)), unique=True,
                           max_size=draw(st.sampled_from([2, 3, len(fields)]))))
    obj = {k: draw(fields[k] | json_values) if draw(st.integers(0, 9)) == 0 else draw(fields[k])
           for k in chosen}
    if draw(st.booleans()):   # make it likely to pass validation and run a job
        obj = {**VALID[path], **obj}
    return json.dumps(obj).encode()


VALID = {"/execute": {"job_id": "j", "prompt": "Hello"}, "/cancel": {"job_id": "j"},
         "/v1/completions": {"prompt": "Hello"},
         "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}]},
         "/tokenize": {"prompt": "Hello"}, "/detokenize": {"tokens": [1, 2]}}


class ServerError(AssertionError):
    """A 5xx answer (``status``): the worker failed where the client was at fault."""

    def __init__(self, status: int, detail: tuple) -> None:
        super().__init__(detail)
        self.status = status


def check(client: httpx.Client, url: str, path: str, body: bytes) -> int:
    """POST ``body``; assert the answer is well formed; return the status."""
    with client.stream("POST", f"{url}{path}", content=body,
                       headers={"Content-Type": "application/json"}) as r:
        raw = r.read()
    if r.status_code >= 500:
        raise ServerError(r.status_code, (path, body[:300], r.status_code, raw[:300]))
    if r.status_code >= 400:
        _check_error(path, json.loads(raw))
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        _check_stream(path, raw.decode("utf-8"))
    return r.status_code


def _check_error(path: str, body: dict) -> None:
    if path.startswith("/v1"):
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], body
    else:
        assert {"code", "message", "retriable"} <= set(body) and body["message"], body
        assert set(body) <= {"code", "message", "retriable", "field"}, body


def _check_stream(path: str, text: str) -> None:
    events = list(parse_sse(iter(text.split("\n"))))
    if path == "/execute":
        terminal = [k for k, _ in events if k in ("end", "error")]
        assert len(terminal) == 1 and events[-1][0] == terminal[0], events[-3:]
    else:
        assert events[-1] == (None, "[DONE]"), events[-3:]
        for _, data in events[:-1]:
            if "error" in data:
                _check_error(path, data)
