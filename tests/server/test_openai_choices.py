"""OpenAI's ``n`` through the official ``openai`` client (its models validate
every response and chunk) against a real worker serving the tiny synthetic
qwen2: n choices as n jobs batched together, seeds seed + i, per-choice
parsers and grammars, one usage and one [DONE], and every job cancelled when
one fails or the client leaves."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import openai
import pytest

from orcd.devkit.server_testing import running_server
from orcd.errors import Cancelled
from orcd.sampling import Sampled
from orcd.server.openai_choices import Choices
from orcd.server.state import JobStream, ServerConfig

KEY = "test-key"
HI = [{"role": "user", "content": "Hello there"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
        "required": ["city"], "additionalProperties": False}}}]
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def srv(tiny_model):
    cfg = ServerConfig(model_path=str(tiny_model("qwen2-tiny")), model_ref="qwen2-tiny",
                       worker_id=str(uuid.uuid4()), device="cpu", ctx_size=4096, api_key=KEY,
                       max_batch=4)
    with running_server(cfg) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(autouse=True)
def _idle_after(request):
    yield
    if "srv" in request.fixturenames:
        assert request.getfixturevalue("srv").state.inference.wait_idle(10)


def chat(client, **kw):
    return client.chat.completions.create(model="qwen2-tiny", messages=HI, **kw)


def sse_lines(srv, path: str, body: dict) -> list[str]:
    with httpx.stream("POST", f"{srv.url}/v1/{path}", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        return [line for line in r.iter_lines() if line and not line.startswith(":")]


def test_n_completions_are_n_choices_and_usage_sums_them(client):
    r = client.completions.create(model="qwen2-tiny", prompt="Hello", n=3, temperature=1.0,
                                  seed=7, max_tokens=12, logprobs=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    one = client.completions.create(model="qwen2-tiny", prompt="Hello", max_tokens=1)
    assert r.usage.prompt_tokens == one.usage.prompt_tokens   # counted once
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert len({c.text for c in r.choices}) > 1                # seeds 7, 8, 9 differ


def test_seeded_choices_reproduce_and_choice_i_is_a_single_request_with_seed_plus_i(client):
    kw = {"temperature": 1.0, "max_tokens": 12, "logprobs": True}
    runs = [chat(client, n=3, seed=41, **kw) for _ in range(2)]
    assert [c.model_dump() for c in runs[0].choices] == [c.model_dump() for c in runs[1].choices]
    assert runs[0].usage == runs[1].usage and runs[0].id != runs[1].id
    for i, choice in enumerate(runs[0].choices):
        alone = chat(client, seed=41 + i, **kw).choices[0]
        assert choice.model_dump() == alone.model_dump() | {"index": i}
    greedy = chat(client, n=2, temperature=0, max_tokens=8).choices
    assert greedy[0].message == greedy[1].message


def test_seed_plus_i_wraps_at_the_largest_seed(client):
    kw = {"temperature": 1.0, "max_tokens": 8}
    r = chat(client, n=2, seed=2**64 - 1, **kw)
    assert r.choices[1].message == chat(client, seed=0, **kw).choices[0].message


def test_a_stream_interleaves_the_choices_with_one_usage_and_one_done(srv, client):
    body = {"model": "qwen2-tiny", "prompt": "Hello", "n": 2, "seed": 5, "temperature": 1.0,
            "max_tokens": 10, "stream": True, "stream_options": {"include_usage": True}}
    lines = sse_lines(srv, "completions", body)
    assert lines.count("data: [DONE]") == 1 and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    *body_chunks, usage = chunks
    assert usage["choices"] == [] and all(c["usage"] is None for c in body_chunks)
    indices = [c["choices"][0]["index"] for c in body_chunks]
    assert set(indices) == {0, 1} and indices != sorted(indices)   # batched: interleaved
    finishes = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in body_chunks
                if c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [(0, "length"), (1, "length")]
    full = client.completions.create(model="qwen2-tiny", prompt="Hello", n=2, seed=5,
                                     temperature=1.0, max_tokens=10)
    for i in (0, 1):
        assert "".join(c["choices"][0]["text"] for c in body_chunks
                       if c["choices"][0]["index"] == i) == full.choices[i].text
    assert usage["usage"] == full.usage.model_dump(exclude_none=True)
    assert usage["usage"]["completion_tokens"] == 20


def test_chat_stream_of_n_choices_through_the_client(client):
    chunks = list(chat(client, n=2, seed=9, temperature=1.0, max_tokens=8, stream=True,
                       stream_options={"include_usage": True}))
    full = chat(client, n=2, seed=9, temperature=1.0, max_tokens=8)
    usage = chunks.pop()
    assert usage.choices == [] and usage.usage == full.usage
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert [c.finish_reason for c in mine] == [None] * (len(mine) - 1) + ["length"]
        assert "".join(c.delta.content or "" for c in mine) == full.choices[i].message.content


@pytest.mark.parametrize("api,kwargs", [
    ("chat", {"n": 0}), ("chat", {"n": 100}), ("completions", {"n": 5}),   # max_batch is 4
    ("chat", {"n": True}), ("completions", {"n": 1.5}),
    ("completions", {"n": 2, "best_of": 3}), ("completions", {"best_of": 2}),
])
def test_n_out_of_range_and_best_of_other_than_n_are_a_400(client, api, kwargs):
    with pytest.raises(openai.BadRequestError) as e:
        if api == "chat":
            chat(client, max_tokens=2, **kwargs)
        else:
            client.completions.create(model="qwen2-tiny", prompt="x", max_tokens=2, **kwargs)
    param = "best_of" if "best_of" in kwargs else "n"
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"


def test_best_of_equal_to_n_is_n(client):
    r = client.completions.create(model="qwen2-tiny", prompt="x", max_tokens=2, n=2, best_of=2)
    assert len(r.choices) == 2


def test_each_choice_has_its_own_grammar(client):
    pytest.importorskip("llguidance")
    r = chat(client, n=3, seed=4, tools=TOOLS, tool_choice="required", max_tokens=60)
    for i, choice in enumerate(r.choices):
        [call] = choice.message.tool_calls
        assert choice.finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
        alone = chat(client, seed=4 + i, tools=TOOLS, tool_choice="required", max_tokens=60)
        assert alone.choices[0].message.tool_calls[0].function == call.function


def test_each_choice_has_its_own_tool_call_parser(srv, client, monkeypatch):
    """The model writes the same call in every choice, token by token in lockstep:
    a parser shared between choices would see the pieces of both interleaved."""
    tok = srv.state.loaded.tokenizer
    ids = tok.encode('Hm.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
                     '</tool_call>', add_special=False, parse_special=True) + [tok.eos_id]
    monkeypatch.setattr(srv.state.loaded.backend, "sample_step",
                        lambda logits, params, seen, rng, n_prompt=None, allowed=None:
                        Sampled(ids[len(seen) - n_prompt]))
    r = chat(client, n=3, tools=TOOLS, max_tokens=300)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Hm.\n"
        assert [(c.function.name, json.loads(c.function.arguments))
                for c in choice.message.tool_calls] == [("get_weather", {"city": "Oslo"})]
    assert r.usage.completion_tokens == 3 * (len(ids) - 1)


def failing_choice(srv, monkeypatch, bad_seed: int, after: int) -> dict[int, int]:
    """The job seeded ``bad_seed`` draws an id outside the vocabulary at its step
    ``after`` + 1, which fails that sequence alone (the others would go on);
    returns the steps each seed drew."""
    real = srv.state.loaded.backend.sample_step
    drawn: dict[int, int] = {}

    def step(logits, params, seen, rng, n_prompt=None, allowed=None):
        drawn[params.seed] = drawn.get(params.seed, 0) + 1
        if params.seed == bad_seed and drawn[params.seed] > after:
            return Sampled(10**9)
        return real(logits, params, seen, rng, n_prompt=n_prompt, allowed=allowed)
    monkeypatch.setattr(srv.state.loaded.backend, "sample_step", step)
    return drawn


def test_one_failing_choice_fails_the_response_and_cancels_the_others(srv, client, monkeypatch):
    drawn = failing_choice(srv, monkeypatch, bad_seed=101, after=3)
    with pytest.raises(openai.APIStatusError) as e:
        chat(client, n=3, seed=100, temperature=1.0, max_tokens=1000, logprobs=True)
    assert "outside the vocabulary" in e.value.body["message"]
    assert srv.state.inference.wait_idle(10)
    assert drawn[101] == 4 and drawn[100] < 50 and drawn[102] < 50


def test_a_failing_choice_mid_stream_is_one_error_frame_then_done(srv, monkeypatch):
    drawn = failing_choice(srv, monkeypatch, bad_seed=201, after=3)
    body = {"model": "qwen2-tiny", "prompt": "Hello", "n": 3, "seed": 200, "temperature": 1.0,
            "max_tokens": 1000, "logprobs": 1, "stream": True}
    lines = sse_lines(srv, "completions", body)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1
    errors = [json.loads(line[6:]) for line in lines if line.startswith('data: {"error"')]
    assert len(errors) == 1 and lines[-2].startswith('data: {"error"')
    assert "outside the vocabulary" in errors[0]["error"]["message"]
    assert srv.state.inference.wait_idle(10)
    assert drawn[200] < 50 and drawn[202] < 50


def slow_sampler(srv, monkeypatch) -> None:
    real = srv.state.loaded.backend.sample_step

    def step(*a, **kw):
        time.sleep(0.01)   # 2000 tokens: 20 s, so only a cancel ends the jobs within 10 s
        return real(*a, **kw)
    monkeypatch.setattr(srv.state.loaded.backend, "sample_step", step)


def no_end(srv) -> dict[str, int]:
    """A logit_bias that bans the end of generation: the jobs run until cancelled."""
    return {str(t): -100 for t in srv.state.loaded.tokenizer.eog_ids}


def wait_running(srv, n: int) -> None:
    for _ in range(500):
        if srv.state.inference.running == n:
            return
        time.sleep(0.01)
    raise AssertionError(f"never {n} running")


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_hanging_up_cancels_every_choice(srv, monkeypatch, stream):
    slow_sampler(srv, monkeypatch)
    body = {"model": "qwen2-tiny", "prompt": "Hello", "n": 3, "max_tokens": 2000,
            "logit_bias": no_end(srv), "stream": stream}
    url = f"{srv.url}/v1/completions"
    if stream:
        with httpx.stream("POST", url, json=body, headers=AUTH) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
            wait_running(srv, 3)
    else:
        with pytest.raises(httpx.ReadTimeout):   # the client gives up and hangs up
            httpx.post(url, json=body, headers=AUTH, timeout=1.0)
    assert srv.state.inference.wait_idle(10)


def test_each_choice_is_its_own_job_and_cancelling_one_ends_the_response(srv, client,
                                                                        monkeypatch):
    slow_sampler(srv, monkeypatch)
    stream = client.completions.create(model="qwen2-tiny", prompt="Hello", n=2, max_tokens=2000,
                                       logit_bias=no_end(srv), stream=True)
    first = next(iter(stream))

    def cancel(job_id: str) -> str:
        r = httpx.post(f"{srv.url}/cancel", json={"job_id": job_id}, headers=AUTH)
        return r.json()["status"]
    assert cancel(first.id) == "unknown"     # the response id; its jobs are id-0 and id-1
    assert cancel(f"{first.id}-1") in ("cancelling", "cancelled")
    with stream, pytest.raises(openai.APIError) as e:
        for _ in stream:
            pass
    assert "cancel" in str(e.value).lower()


def test_choices_cancelled_here_still_end_once_each():
    """A hang-up cancels the jobs while tokens are still on their way: a
    JobStream then stops at the next event, which may be one of those tokens,
    and the job's own last event never comes through it. Each choice must still
    end (as cancelled), or the request would wait forever."""
    class Worker:
        def __init__(self):
            self.cancelled = []

        def cancel(self, job_id):
            self.cancelled.append(job_id)

    async def main():
        worker = Worker()
        loop = asyncio.get_running_loop()
        streams = [JobStream(f"j-{i}", loop, worker) for i in range(2)]
        jobs = Choices(streams)
        for s in streams:
            s.sink("token", "a")
        seen = []
        async for i, kind, payload in jobs.events():
            seen.append((i, kind, type(payload)))
            if len(seen) == 2:      # the client leaves; one more token each is in flight
                jobs.cancel()
                for s in streams:
                    s.sink("token", "b")
        return seen, worker.cancelled

    seen, cancelled = asyncio.run(asyncio.wait_for(main(), 5))
    ends = [(i, t) for i, kind, t in seen if kind in ("end", "error")]
    assert sorted(ends, key=str) == [(0, Cancelled), (1, Cancelled)]
    assert sorted(cancelled) == ["j-0", "j-1"]


# -- a list of prompts (vLLM's batched completions) and echo -------------------------------

def complete(client, **kw):
    return client.completions.create(model="qwen2-tiny", **kw)


def test_a_list_of_prompts_is_their_choices_in_order_each_a_request_alone(client):
    prompts, kw = ["Hello", "Once upon a time"], {"temperature": 1.0, "max_tokens": 6, "logprobs": 0}
    r = complete(client, prompt=prompts, n=2, seed=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for i, choice in enumerate(r.choices):   # choice i: prompt i // 2 with seed 3 + i % 2
        alone = complete(client, prompt=prompts[i // 2], seed=3 + i % 2, **kw)
        assert choice.model_dump() == alone.choices[0].model_dump() | {"index": i}
    alone = [complete(client, prompt=p, max_tokens=1) for p in prompts]
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)   # each once
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)


def test_prompts_as_lists_of_token_ids_are_the_texts_they_encode(srv, client):
    texts = ["Hello", "Once upon a time"]
    ids = [srv.state.encode(t) for t in texts]
    by_ids = complete(client, prompt=ids, temperature=0, max_tokens=6)
    by_text = complete(client, prompt=texts, temperature=0, max_tokens=6)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    assert by_ids.usage == by_text.usage


def test_echo_puts_each_prompt_before_its_completion_streamed_or_not(srv, client):
    kw = {"temperature": 1.0, "seed": 8, "max_tokens": 6}
    plain = complete(client, prompt=["Hello", "Once"], **kw)
    echoed = complete(client, prompt=["Hello", "Once"], echo=True, **kw)
    assert [c.text for c in echoed.choices] == ["Hello" + plain.choices[0].text,
                                                "Once" + plain.choices[1].text]
    assert echoed.usage == plain.usage
    body = {"model": "qwen2-tiny", "prompt": ["Hello", "Once"], "echo": True, "stream": True, **kw}
    chunks = [json.loads(line[6:]) for line in sse_lines(srv, "completions", body)[:-1]]
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["text"] == ["Hello", "Once"][i]                 # the prompt comes first
        assert "".join(c["text"] for c in mine) == echoed.choices[i].text
    ids = srv.state.encode("Hello")
    by_ids = complete(client, prompt=ids, echo=True, **kw)
    assert by_ids.choices[0].text == srv.state.loaded.tokenizer.decode(ids) + plain.choices[0].text


@pytest.mark.parametrize("kwargs,param", [
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),     # the prompt is not scored
    ({"prompt": ["a", "b", "c"], "n": 2}, "prompt"),            # 6 choices, max_batch is 4
    ({"prompt": ["a", ""]}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [[1, 2], "a"]}, "prompt"),
])
def test_prompts_and_echo_orcd_cannot_honour_are_a_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, max_tokens=2, **kwargs)
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
