"""A request that leaves a sampling field unset gets the model file's
recommendation (``general.sampling.*``), else llama-server's default; an
explicit value, even a neutral one, is kept. Checked on /execute, both OpenAI
routes and ``orcd generate``."""

from __future__ import annotations

import dataclasses
import uuid

import httpx
import pytest

from orcd import cli
from orcd.devkit import testing
from orcd.devkit.server_testing import running_server
from orcd.sampling import LLAMA_SERVER_DEFAULTS, SamplingParams, request_defaults
from orcd.server.state import ServerConfig

LLAMA_SERVER = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
                "repetition_penalty": 1.0}
RECOMMENDED = {"general.sampling.temp": 0.5, "general.sampling.top_k": 7,
               "general.sampling.min_p": 0.125}


def values(p: SamplingParams) -> dict:
    """The fields a request may leave to the defaults (not the seed, the OpenAI extras)."""
    return {k: v for k, v in dataclasses.asdict(p).items() if k in LLAMA_SERVER}


def test_llama_server_defaults_where_the_file_recommends_nothing():
    assert dict(LLAMA_SERVER_DEFAULTS) == LLAMA_SERVER
    assert request_defaults({"general.name": "x"}) == LLAMA_SERVER


def test_the_file_recommendation_wins_and_bad_values_are_ignored():
    got = request_defaults({**RECOMMENDED, "general.sampling.top_p": 7.0,   # out of range
                            "general.sampling.penalty_repeat": "strong"})  # not a number
    assert got == {**LLAMA_SERVER, "temperature": 0.5, "top_k": 7, "min_p": 0.125}


def test_a_recommended_zero_penalty_is_ignored_and_a_tiny_temperature_is_greedy():
    # penalty 0 would divide the logits by zero; 1e-7 would overflow them
    got = request_defaults({"general.sampling.penalty_repeat": 0.0, "general.sampling.temp": 1e-7})
    assert got["repetition_penalty"] == LLAMA_SERVER["repetition_penalty"]
    p = SamplingParams.resolve(got)
    assert p.temperature == 1e-7 and p.greedy


def test_explicit_values_are_kept_even_when_neutral():
    p = SamplingParams.resolve(LLAMA_SERVER, seed=3, temperature=0.0, top_k=0, top_p=None)
    assert values(p) == {**LLAMA_SERVER, "temperature": 0.0, "top_k": 0} and p.seed == 3


@pytest.fixture(scope="module")
def recommending_model(tmp_path_factory, host):
    """qwen2-tiny whose GGUF recommends temperature 0.5, top-k 7, min-p 0.125."""
    preset = host.synth_presets["qwen2-tiny"]
    preset = dataclasses.replace(preset, name="qwen2-tiny-sampling",
                                 metadata={**preset.metadata, **RECOMMENDED})
    return testing.synthesize_preset(host, preset, tmp_path_factory.mktemp("s") / "m.gguf")


@pytest.fixture(scope="module")
def srv(recommending_model):
    cfg = ServerConfig(model_path=str(recommending_model), model_ref="m",
                       worker_id=str(uuid.uuid4()), device="cpu", ctx_size=256)
    with running_server(cfg) as s:
        yield s


@pytest.fixture
def submitted(srv, monkeypatch) -> list[SamplingParams]:
    """The sampling of every job the server queues."""
    seen, submit = [], srv.state.submit

    def spy(planned):
        seen.append(planned.sampling)
        return submit(planned)

    monkeypatch.setattr(srv.state, "submit", spy)
    return seen


FROM_FILE = {**LLAMA_SERVER, "temperature": 0.5, "top_k": 7, "min_p": 0.125}
ROUTES = [("/execute", {"job_id": "j", "prompt": "Hello", "max_tokens": 1}),
          ("/v1/completions", {"prompt": "Hello", "max_tokens": 1}),
          ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                    "max_tokens": 1})]


@pytest.mark.parametrize("route,body", ROUTES)
def test_unset_fields_take_the_file_defaults_on_every_route(srv, submitted, route, body):
    for extra in ({}, {"temperature": 1.2, "top_p": 1.0}):
        if route == "/execute":
            body = {**body, "job_id": uuid.uuid4().hex}
        assert httpx.post(srv.url + route, json={**body, **extra}, timeout=60).status_code == 200
    assert [values(p) for p in submitted] == [FROM_FILE,
                                              {**FROM_FILE, "temperature": 1.2, "top_p": 1.0}]


def test_execute_explicit_values_are_kept(srv, submitted):
    body = {"job_id": uuid.uuid4().hex, "prompt": "Hello", "max_tokens": 1,
            "temperature": 0, "top_k": 0}
    assert httpx.post(srv.url + "/execute", json=body, timeout=60).status_code == 200
    assert values(submitted[0]) == {**FROM_FILE, "temperature": 0.0, "top_k": 0}


def test_generate_unset_temperature_uses_the_defaults(tiny_model, recommending_model,
                                                      monkeypatch, capsys):
    from orcd.engine import Engine
    seen, generate = [], Engine.generate

    def spy(self, req, *args, **kwargs):
        seen.append(req.sampling)
        return generate(self, req, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", spy)
    base = ["generate", "--device", "cpu", "--prompt", "Hi", "--max-tokens", "2", "--quiet"]
    assert cli.main([*base, "--model", str(tiny_model("qwen2-tiny"))]) == 0
    assert cli.main([*base, "--model", str(recommending_model)]) == 0
    assert cli.main([*base, "--model", str(recommending_model), "--temperature", "0"]) == 0
    assert [values(p) for p in seen] == [LLAMA_SERVER, FROM_FILE, {**FROM_FILE, "temperature": 0.0}]
