"""A request is checked against the model once and an unseeded one's seed drawn
once (issue 19 item 8). Without the server the engine does both: Engine.generate,
the scheduler and ``orcd generate``; a request marked ``checked`` is not checked
again. Through the server, run alone (--max-batch 1) or batched, the server checks
when it plans the job and draws the seed it reports; the inference thread repeats
neither. A bad request is still a 400 with the same error, and the worker serves on."""

from __future__ import annotations

import argparse
import re
import uuid

import httpx
import pytest

from orcd import engine as engine_module
from orcd.commands import generate
from orcd.devkit.server_testing import SSEStream, running_server
from orcd.engine import Engine, GenerateRequest
from orcd.errors import InvalidRequest
from orcd.load import load_model
from orcd.sampling import SamplingParams
from orcd.scheduler import Scheduler
from orcd.server.state import ServerConfig

CTX = 256
DRAWN = 2**64 - 3   # the seed the counted draw hands out: the one reported


@pytest.fixture(scope="module")
def tiny(tiny_model, host):
    path = tiny_model("qwen2-tiny")
    lm = load_model(path, host=host, device="cpu", n_ctx=128)
    yield str(path), Engine(lm)
    lm.close()


@pytest.fixture
def counts(monkeypatch):
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


def unseeded(max_tokens: int = 4, **kw) -> GenerateRequest:
    return GenerateRequest([1, 2, 3], max_tokens, SamplingParams(temperature=1.0), **kw)


def test_generate_checks_and_seeds_once(tiny, counts):
    result = tiny[1].generate(unseeded())
    assert result.seed == DRAWN
    assert counts == {"validate": 1, "seed": 1}


def test_the_scheduler_checks_and_seeds_once(tiny, counts):
    sched = Scheduler(tiny[1], n_blocks=8, max_batch=2)
    seq = sched.add(unseeded())
    while sched.busy:
        sched.step()
    assert seq.error is None and seq.result.seed == DRAWN
    assert counts == {"validate": 1, "seed": 1}


def test_a_checked_request_is_not_checked_again_and_an_unchecked_one_is(tiny, counts):
    tiny[1].generate(unseeded(checked=True))
    assert counts["validate"] == 0
    with pytest.raises(InvalidRequest, match="exceeds the context length 128"):
        tiny[1].generate(unseeded(max_tokens=200))


def test_orcd_generate_prints_the_seed_it_drew_once(tiny, counts, capsys):
    p = argparse.ArgumentParser()
    generate.add_arguments(p)
    assert generate.run(p.parse_args(["--model", tiny[0], "--device", "cpu", "--prompt", "Hello",
                                      "--max-tokens", "4"])) == 0
    assert re.search(r"seed (\d+)", capsys.readouterr().err).group(1) == str(DRAWN)
    assert counts == {"validate": 1, "seed": 1}


# -- through the server --------------------------------------------------------

@pytest.fixture(scope="module", params=[1, 2], ids=["alone", "batched"])
def srv(request, tiny_model):
    cfg = ServerConfig(model_path=str(tiny_model("qwen2-tiny")), model_ref="qwen2-tiny",
                       worker_id=str(uuid.uuid4()), device="cpu", ctx_size=CTX,
                       max_batch=request.param)
    with running_server(cfg) as s:
        yield s


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
