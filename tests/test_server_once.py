"""A request through the server is checked against the model once and its seed
drawn once (issue 19 item 8), run alone (--max-batch 1, Engine.generate) or
batched (the scheduler): the server checks when it plans the job and draws the
seed it reports; the inference thread repeats neither. A bad request is still
a 400 with the same error, and the worker serves on."""

from __future__ import annotations

import uuid

import httpx
import pytest

from orcd import engine as engine_module
from orcd.devkit.server_testing import SSEStream, running_server
from orcd.engine import Engine
from orcd.server.state import ServerConfig

CTX = 256
DRAWN = 2**63 + 12345   # the seed the counted draw hands out: the one reported


@pytest.fixture(scope="module", params=[1, 2], ids=["alone", "batched"])
def srv(request, tiny_model):
    cfg = ServerConfig(model_path=str(tiny_model("qwen2-tiny")), model_ref="qwen2-tiny",
                       worker_id=str(uuid.uuid4()), device="cpu", ctx_size=CTX,
                       max_batch=request.param)
    with running_server(cfg) as s:
        yield s


@pytest.fixture
def counts(monkeypatch):
    """How often the engine's checks ran and a seed was drawn."""
    calls = {"validate": 0, "seed": 0}
    validate = Engine._validate

    def counted_validate(self, req):
        calls["validate"] += 1
        return validate(self, req)

    def counted_seed():
        calls["seed"] += 1
        return DRAWN
    monkeypatch.setattr(Engine, "_validate", counted_validate)
    monkeypatch.setattr(engine_module, "fresh_seed", counted_seed)
    return calls


def execute(s, **body) -> list:
    return SSEStream(f"{s.url}/execute", {"job_id": uuid.uuid4().hex, **body}).join()


def test_execute_checks_once_and_draws_the_reported_seed_once(srv, counts):
    events = execute(srv, prompt="Hello", temperature=1.0, max_tokens=6)
    assert events[0][0] == "started" and events[-1][0] == "end"
    assert events[0][1]["seed"] == DRAWN
    assert counts == {"validate": 1, "seed": 1}


def test_a_seeded_request_draws_none(srv, counts):
    events = execute(srv, prompt="Hello", temperature=1.0, max_tokens=6, seed=7)
    assert events[0][1]["seed"] == 7
    assert counts == {"validate": 1, "seed": 0}


def test_n_choices_are_checked_and_seeded_once(srv, counts):
    n = srv.state.config.max_batch
    r = httpx.post(f"{srv.url}/v1/completions", timeout=60,
                   json={"prompt": "Hello", "temperature": 1.0, "max_tokens": 4, "n": n})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == n
    assert counts == {"validate": 1, "seed": 1}


def test_a_prompt_past_the_context_is_still_a_400_and_the_worker_serves_on(srv, counts):
    r = httpx.post(f"{srv.url}/execute", json={"job_id": "too-long", "prompt": "Hello",
                                                "max_tokens": CTX})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["code"] == "INVALID_REQUEST" and body["field"] == "max_tokens"
    assert f"exceeds the context length {CTX}" in body["message"]
    assert counts["validate"] == 1
    assert execute(srv, prompt="Hello", temperature=0, max_tokens=3)[-1][0] == "end"


def test_an_id_outside_the_vocabulary_is_still_a_400_in_openai_shape(srv, counts):
    r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": [1, 10**6], "max_tokens": 2})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "INVALID_REQUEST" and err["param"] == "prompt"
    assert "token id 1000000 outside the vocabulary" in err["message"]
    assert counts["validate"] == 1
