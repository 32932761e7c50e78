"""Sampling parameters at the API's edge: a temperature too small to divide the
logits by samples greedily, a repetition penalty of zero is a clear 400 (the
fuzzer found both dividing by zero in the sampler)."""

from __future__ import annotations

import uuid
import warnings

import httpx
import pytest

from orcd.devkit.server_testing import running_server
from orcd.server.schemas import ChatCompletionRequest, ExecuteRequest, parse
from orcd.server.state import ServerConfig

BODIES = {"/execute": {"job_id": "j", "prompt": "Hello"},
          "/v1/completions": {"prompt": "Hello"},
          "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}]}}


@pytest.fixture(scope="module")
def srv(tiny_model):
    cfg = ServerConfig(model_path=str(tiny_model("qwen2-tiny")), model_ref="qwen2-tiny",
                       worker_id=str(uuid.uuid4()), device="cpu", ctx_size=512)
    with running_server(cfg) as s:
        yield s


def completion(srv, **sampling) -> str:
    r = httpx.post(f"{srv.url}/v1/completions", timeout=60,
                   json={"prompt": "Hello", "max_tokens": 12, "seed": 7, **sampling})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize("t", [5e-324, 1e-50, 1e-40, 1e-6])
def test_tiny_temperature_samples_greedily(srv, t):
    greedy = completion(srv, temperature=0)
    with warnings.catch_warnings(record=True) as seen:   # the inference thread's too
        warnings.simplefilter("always")
        assert completion(srv, temperature=t) == greedy
        assert completion(srv, temperature=t, repetition_penalty=1.3) == \
            completion(srv, temperature=0, repetition_penalty=1.3)
    assert not [w for w in seen if issubclass(w.category, RuntimeWarning)]


def test_small_temperatures_above_the_epsilon_are_kept():
    body = b'{"job_id": "j", "prompt": "x", "temperature": 0.0001}'
    assert parse(ExecuteRequest, body).temperature == 0.0001
    assert parse(ExecuteRequest, body.replace(b"0.0001", b"1e-6")).temperature == 0.0


@pytest.mark.parametrize("path", list(BODIES))
@pytest.mark.parametrize("penalty", [0, -0.0, 5e-324, 1e-40, 1e-6, -1])
def test_repetition_penalty_must_be_positive(srv, path, penalty):
    r = httpx.post(f"{srv.url}{path}", timeout=30,
                   json={**BODIES[path], "repetition_penalty": penalty})
    assert r.status_code == 400, r.text
    err = r.json()["error"] if path.startswith("/v1") else r.json()
    assert err["message"].startswith("repetition_penalty: Input should be greater than or equal")
    param = err["param"] if path.startswith("/v1") else err["field"]
    assert param == "repetition_penalty"


def test_the_smallest_repetition_penalty_is_valid(srv):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for t in (0, 1e-5, 1.0):
            completion(srv, temperature=t, repetition_penalty=1e-5)
    assert not [w for w in seen if issubclass(w.category, RuntimeWarning)]
    req = ChatCompletionRequest.model_validate({**BODIES["/v1/chat/completions"],
                                                "repetition_penalty": 1e-5})
    assert req.repetition_penalty == 1e-5
