"""The worker's life: loading (503 but /health), load failure, bearer auth,
the inference timeout, the context limit, and shutdown during a job."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from orcd.errors import ModelLoadFailed
from orcd.server.app import load_for_serving
from orcd.server.testing import SSEStream, running_server
from test_server import LONG, config, paced

KEY = "sekrit-key"


@pytest.fixture(scope="module")
def guarded(tiny_model):
    """Bearer auth, a 0.5 s inference timeout and a 64-token context."""
    cfg = config(tiny_model("qwen2-tiny"), api_key=KEY, inference_timeout_s=0.5, ctx_size=64)
    with running_server(cfg, loader=paced(0.05)) as s:
        yield s


def auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


# -- loading -----------------------------------------------------------------------

def test_every_endpoint_but_health_is_503_while_loading(tiny_model):
    release = threading.Event()

    def slow_loader(cfg, progress):
        release.wait(30)
        return load_for_serving(cfg, progress)

    with running_server(config(tiny_model("qwen2-tiny")), loader=slow_loader, wait=None) as s:
        h = httpx.get(f"{s.url}/health").json()
        assert h["status"] == "loading" and h["model"] == "qwen2-tiny" and h["resident"] is False
        for method, path in [("POST", "/execute"), ("GET", "/metrics"), ("POST", "/cancel"),
                             ("GET", "/v1/models"), ("POST", "/v1/chat/completions")]:
            r = httpx.request(method, f"{s.url}{path}", json={"job_id": "x", "prompt": "p"})
            assert r.status_code == 503, path
            assert r.headers["retry-after"] == "1"
            code = r.json()["error"]["code"] if path.startswith("/v1") else r.json()["code"]
            assert code == "UNAVAILABLE"
        release.set()
        s.wait_status("healthy")
        assert httpx.get(f"{s.url}/metrics").status_code == 200


def test_load_failure_is_narrated_and_stops_the_server(tiny_model):
    def broken(cfg, progress):
        raise ModelLoadFailed("tensor blk.0.attn_q.weight is mis-shaped")

    with running_server(config(tiny_model("qwen2-tiny")), loader=broken, wait=None) as s:
        assert s.wait_exit(15)
        err = s.narration.wait_for(event="error", where="model_load")
        assert err["code"] == "MODEL_LOAD_FAILED" and "mis-shaped" in err["message"]
        assert isinstance(s.state.load_error, ModelLoadFailed)


# -- auth, timeout, context ------------------------------------------------------------

def test_bearer_auth_on_every_endpoint_but_health(guarded):
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    body = {"job_id": "a1", "prompt": "Hello", "max_tokens": 1}
    for headers in ({}, auth("wrong"), {"Authorization": KEY}):
        r = httpx.post(f"{guarded.url}/execute", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["code"] == "UNAUTHORIZED"
        assert httpx.get(f"{guarded.url}/metrics", headers=headers).status_code == 401
    v1 = httpx.get(f"{guarded.url}/v1/models")
    assert v1.status_code == 401 and v1.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{guarded.url}/metrics", headers=auth()).status_code == 200
    st = SSEStream(f"{guarded.url}/execute", body, headers=auth())
    assert st.join()[-1][0] == "end"


def test_inference_timeout(guarded):
    st = SSEStream(f"{guarded.url}/execute", {"job_id": "slow", "prompt": "Hello",
                                              "temperature": 0, "max_tokens": 50},
                   headers=auth())
    events = st.join()
    assert events[0][0] == "started"
    assert events[-1] == ("error", {"code": "INFERENCE_TIMEOUT", "retriable": True,
                                    "message": events[-1][1]["message"]})
    assert [k for k, _ in events].count("error") == 1


def test_prompt_plus_max_tokens_beyond_the_context_is_400(guarded):
    r = httpx.post(f"{guarded.url}/execute", headers=auth(),
                   json={"job_id": "ctx", "prompt": "Hello " * 30, "max_tokens": 60})
    assert r.status_code == 400 and r.json()["field"] == "max_tokens"
    assert "context" in r.json()["message"]


# -- shutdown ------------------------------------------------------------------------------

def test_shutdown_cancels_a_job_that_outlives_the_deadline(tiny_model):
    cfg = config(tiny_model("qwen2-tiny"), shutdown_deadline_s=0.5)
    with running_server(cfg, loader=paced()) as s:
        st = SSEStream(f"{s.url}/execute", {"job_id": "long", **LONG})
        st.wait_for("token")
        r = httpx.post(f"{s.url}/shutdown")
        assert r.status_code == 202
        late = httpx.post(f"{s.url}/execute", json={"job_id": "late", **LONG})
        assert late.status_code == 503 and late.json()["code"] == "UNAVAILABLE"
        events = st.join()
        assert events[-1][0] == "error" and events[-1][1]["code"] == "CANCELLED"
        assert s.wait_exit(15)
        phases = [e["phase"] for e in s.narration.events() if e["event"] == "shutdown"]
        assert phases == ["begin", "cancel", "done"]
        assert s.state.loaded is None   # the model was freed


def test_shutdown_lets_the_running_job_finish(tiny_model):
    with running_server(config(tiny_model("qwen2-tiny")), loader=paced()) as s:
        st = SSEStream(f"{s.url}/execute", {"job_id": "short", "prompt": "Hello",
                                           "temperature": 0, "max_tokens": 20})
        st.wait_for("started")
        assert httpx.post(f"{s.url}/shutdown").status_code == 202
        events = st.join()
        assert events[-1][0] == "end" and events[-1][1]["tokens_out"] == 20
        assert s.wait_exit(15)
        phases = [e["phase"] for e in s.narration.events() if e["event"] == "shutdown"]
        assert phases == ["begin", "done"]
