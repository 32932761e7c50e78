"""Fuzzing the worker over HTTP (hypothesis): /execute, /cancel and the /v1
routes get hostile bodies; none may answer 5xx, every error must be in its
API's shape, every stream must end properly (tests/server/fuzz_bodies.py). A longer
run (10,000+ requests) is bench/fuzz_flood.py; its result is in bench/RESULTS.md."""

from __future__ import annotations

import uuid

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_bodies import PATHS, bodies, check
from orcd.devkit.server_testing import running_server
from orcd.server.state import ServerConfig


@pytest.fixture(scope="module")
def srv(tiny_model):
    # max_tokens_out 16: a fuzzed job that is valid runs a few tokens, not 2048
    cfg = ServerConfig(model_path=str(tiny_model("qwen2-tiny")), model_ref="qwen2-tiny",
                       worker_id=str(uuid.uuid4()), device="cpu", ctx_size=512,
                       max_tokens_out=16, queue_size=4)
    with running_server(cfg) as s:
        with httpx.Client(timeout=60) as client:
            yield s, client
        assert s.state.status == "healthy"   # nothing a client sent broke the worker


@pytest.mark.parametrize("path", PATHS)
def test_fuzzed_bodies_never_500(srv, path, recwarn):
    s, client = srv
    seen: set[int] = set()

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=st.data())
    def run(body):
        seen.add(check(client, s.url, path, body.draw(bodies(path))))

    run()
    assert 400 in seen                       # the fuzzer reached validation
    assert {200, 202} & seen                 # and got past it
    # recwarn sees the inference thread's warnings too: no division by zero in sampling
    assert not [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)]
