"""The worker's life: loading (503 but /health), load failure, bearer auth,
the inference timeout, the context limit, and shutdown during a job."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from orcd.devkit.server_testing import SSEStream, running_server
from orcd.errors import ModelLoadFailed
from orcd.server.app import load_for_serving
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
                             ("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                             ("POST", "/shutdown")]:
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
        assert events[-1][1]["retriable"] is True   # another worker can run it
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


# -- KV budget, callback, residency, narration forms ---------------------------------

def test_kv_cache_budget_caps_the_context(tiny_model):
    # qwen2-tiny: 2 layers x 2 KV heads x (64 + 64) dims x 2 bytes = 1 KiB a token
    cfg = config(tiny_model("qwen2-tiny"), kv_cache_mb=1)
    with running_server(cfg) as s:
        assert httpx.get(f"{s.url}/health").json()["context_length"] == 1024


def test_callback_is_posted_when_ready(tiny_model):
    import json
    from http.server import BaseHTTPRequestHandler, HTTPServer

    got = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    receiver = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.handle_request, daemon=True).start()
    cfg = config(tiny_model("qwen2-tiny"),
                 callback_url=f"http://127.0.0.1:{receiver.server_port}/ready",
                 public_url="http://127.0.0.1:9999")
    try:
        with running_server(cfg) as s:
            s.narration.wait_for(event="ready", callback_status=204)
    finally:
        receiver.server_close()
    assert got == [{"worker_id": cfg.worker_id, "model": "qwen2-tiny", "vram_bytes": 0,
                    "url": "http://127.0.0.1:9999"}]


def test_failed_residency_check_marks_the_worker_unhealthy(tiny_model):
    def evicted(cfg, progress):
        lm = load_for_serving(cfg, progress)
        lm.backend.check_residency = lambda: False   # as if the weights were evicted
        return lm

    with running_server(config(tiny_model("qwen2-tiny")), loader=evicted, wait=None) as s:
        s.narration.wait_for(event="residency_check_failed")
        h = s.wait_status("unhealthy")
        assert h["resident"] is False
        r = httpx.post(f"{s.url}/execute", json={"job_id": "r", "prompt": "Hello"})
        assert r.status_code == 503
        metrics = httpx.get(f"{s.url}/metrics").text
        assert "orcd_residency_check_failures_total 1.0" in metrics


class Faulting:
    """The model, whose forwards raise ``error`` once ``armed`` is set (a kernel that
    faulted: the driver reports it at the next call)."""

    def __init__(self, model, error) -> None:
        self.model, self.error, self.armed = model, error, threading.Event()

    def __getattr__(self, name):
        got = getattr(self.model, name)
        if not name.startswith("forward"):
            return got

        def forward(*args, **kwargs):
            if self.armed.is_set():
                raise self.error
            return got(*args, **kwargs)
        return forward


def faulting(error, holder: list):
    def load(cfg, progress):
        lm = load_for_serving(cfg, progress)
        lm.model = Faulting(lm.model, error)
        holder.append(lm.model)
        return lm
    return load


@pytest.mark.parametrize("max_batch", [1, 4])   # one job at a time, and the scheduler's steps
def test_a_gpu_fault_ends_the_job_retriably_and_the_worker_for_good(tiny_model, max_batch):
    from orcd.errors import CudaError

    lost = CudaError("cuStreamSynchronize failed: CUDA_ERROR_ILLEGAL_ADDRESS",
                     cuda_error="CUDA_ERROR_ILLEGAL_ADDRESS", call="cuStreamSynchronize")
    models: list = []
    with running_server(config(tiny_model("qwen2-tiny"), max_batch=max_batch),
                        loader=faulting(lost, models)) as s:
        models[0].armed.set()
        events = SSEStream(f"{s.url}/execute", {"job_id": "f", "prompt": "Hello", "max_tokens": 8}).join()
        assert events[-1] == ("error", {"code": "CUDA_ERROR", "retriable": True, "message": lost.message})
        s.narration.wait_for(event="device_lost")
        h = s.wait_status("unhealthy")
        assert h["status"] == "unhealthy"
        r = httpx.post(f"{s.url}/execute", json={"job_id": "g", "prompt": "Hello"})
        assert r.status_code == 503 and r.json()["code"] == "UNAVAILABLE"
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 503


def test_a_gpu_fault_seen_by_the_idle_check_ends_the_worker_too(tiny_model):
    from orcd.errors import CudaError

    armed = threading.Event()

    def checked(cfg, progress):
        lm = load_for_serving(cfg, progress)

        def check():
            if armed.is_set():
                raise CudaError("cuMemGetInfo failed: CUDA_ERROR_LAUNCH_FAILED",
                                cuda_error="CUDA_ERROR_LAUNCH_FAILED", call="cuMemGetInfo")
            return True
        lm.backend.check_residency = check
        return lm

    with running_server(config(tiny_model("qwen2-tiny"), residency_interval_s=0.2), loader=checked) as s:
        armed.set()
        s.narration.wait_for(event="device_lost")
        assert s.wait_status("unhealthy")["status"] == "unhealthy"
        assert httpx.post(f"{s.url}/execute", json={"job_id": "g", "prompt": "Hello"}).status_code == 503


def test_a_cuda_error_that_spares_the_context_fails_only_its_job(tiny_model):
    from orcd.errors import CudaError

    err = CudaError("cuLaunchKernel failed: CUDA_ERROR_INVALID_VALUE",
                    cuda_error="CUDA_ERROR_INVALID_VALUE", call="cuLaunchKernel")
    models: list = []
    with running_server(config(tiny_model("qwen2-tiny")), loader=faulting(err, models)) as s:
        models[0].armed.set()
        events = SSEStream(f"{s.url}/execute", {"job_id": "f", "prompt": "Hello", "max_tokens": 8}).join()
        assert events[-1] == ("error", {"code": "CUDA_ERROR", "retriable": False, "message": err.message})
        models[0].armed.clear()
        events = SSEStream(f"{s.url}/execute", {"job_id": "g", "prompt": "Hello", "max_tokens": 4}).join()
        assert events[-1][0] == "end"
        assert s.wait_status("healthy")["status"] == "healthy"
        assert not [e for e in s.narration.events() if e["event"] == "device_lost"]


def test_residency_is_checked_periodically_at_the_configured_interval(tiny_model):
    import time
    calls = []

    def counted(cfg, progress):
        lm = load_for_serving(cfg, progress)
        lm.backend.check_residency = lambda: calls.append(time.monotonic()) or True
        return lm

    with running_server(config(tiny_model("qwen2-tiny"), residency_interval_s=0.3),
                        loader=counted) as s:
        deadline = time.monotonic() + 10
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(calls) >= 3, calls
        assert all(b - a >= 0.29 for a, b in zip(calls, calls[1:])), calls
        assert s.wait_status("healthy")["resident"] is True


def test_narration_forms():
    import io
    import json

    from orcd.server.narration import Narrator

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream, log_prompts in ((tty, False), (pipe, True)):
        n = Narrator(worker_id="w", model_ref="m", gpu_device="cuda:0", stream=stream,
                     log_prompts=log_prompts)
        n.event("execute_start", job_id="j1", prompt="the prompt", prompt_tokens=3)
    assert "execute_start job=j1 prompt_tokens=3" in tty.getvalue()
    assert "the prompt" not in tty.getvalue() and not tty.getvalue().startswith("{")
    line = json.loads(pipe.getvalue())
    assert line["prompt"] == "the prompt" and line["gpu_device"] == "cuda:0"
    assert line["event"] == "execute_start" and line["job_id"] == "j1" and line["worker_id"] == "w"


def test_broken_chat_template_fails_only_chat(tiny_model):
    def broken_template(cfg, progress):
        lm = load_for_serving(cfg, progress)
        lm.tokenizer.chat_template = "{% for message in messages %}"   # unclosed block
        return lm

    with running_server(config(tiny_model("qwen2-tiny")), loader=broken_template) as s:
        chat = httpx.post(f"{s.url}/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert chat.status_code == 400 and "chat template" in chat.json()["error"]["message"]
        done = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
        assert done.status_code == 200
        assert s.narration.wait_for(event="error", where="chat_template")


def test_explicit_tokenizer_json_wins_and_health_says_hf_json(tiny_model, host, tmp_path):
    from orcd.gguf_file import ModelFile
    path = tiny_model("qwen2-tiny")
    with ModelFile.open(path) as mf:
        host.tokenizer(mf)._tok.save(str(tmp_path / "tok.json"))   # the same vocab, as JSON
    with running_server(config(path, tokenizer_path=str(tmp_path / "tok.json"))) as s:
        h = s.wait_status("healthy")
        assert h["tokenizer_kind"] == "hf-json"
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hello",
                                                          "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200, r.text


def test_load_progress_is_a_bar_on_a_terminal_and_events_elsewhere():
    import io

    from orcd.server.narration import LoadProgress, Narrator

    tty = io.StringIO()
    bar = LoadProgress(Narrator(worker_id="w", model_ref="m", gpu_device="cpu", stream=tty, readable=True))
    for f in (0.0, 0.3, 0.3, 0.75, 1.0):
        bar(f)
    bar.finish()
    out = tty.getvalue()
    assert out.count("\r") == 4 and out.endswith("100%\n")     # redrawn in place, once per change
    assert "model_load_progress" not in out
    log = io.StringIO()
    events = LoadProgress(Narrator(worker_id="w", model_ref="m", gpu_device="cpu", stream=log, readable=False))
    for f in (0.0, 0.3, 0.75, 1.0):
        events(f)
    assert [line.count("model_load_progress") for line in log.getvalue().splitlines()] == [1] * 5
