"""The worker over real HTTP: uvicorn on loopback, the tiny synthetic qwen2,
driven by httpx.

Jobs that must still be running when a test acts (cancel, disconnect, queue)
use a paced model: the real tiny model with a sleep before each forward, so
"still running" does not depend on this machine's speed. "Hello" at
temperature 0 runs > 1000 tokens on qwen2-tiny without an end-of-generation
token, so those jobs end only when the test ends them.
"""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from orcd.devkit.server_testing import SSEStream, running_server
from orcd.server.app import load_for_serving
from orcd.server.state import ServerConfig

LONG = {"prompt": "Hello", "temperature": 0, "max_tokens": 2048}


class Paced:
    """The model with a sleep before each forward."""

    def __init__(self, model, delay: float) -> None:
        self.model, self.delay = model, delay

    def forward(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.model.forward(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def paced(delay: float = 0.02):
    def load(config, progress):
        lm = load_for_serving(config, progress)
        lm.model = Paced(lm.model, delay)
        return lm
    return load


def config(path, **kw) -> ServerConfig:
    kw.setdefault("ctx_size", 4096)
    return ServerConfig(model_path=str(path), model_ref="qwen2-tiny", worker_id=str(uuid.uuid4()),
                        device="cpu", **kw)


@pytest.fixture(scope="module")
def srv(tiny_model):
    with running_server(config(tiny_model("qwen2-tiny"), queue_size=1, max_batch=2),
                        loader=paced()) as s:
        yield s


@pytest.fixture(autouse=True)
def _idle_worker(request):
    """A failed test must not leave a long job running into the next one."""
    yield
    if "srv" in request.fixturenames:
        s = request.getfixturevalue("srv")
        s.state.inference.cancel_all()
        assert s.state.inference.wait_idle(10)


def execute(s, job_id=None, **body) -> SSEStream:
    return SSEStream(f"{s.url}/execute", {"job_id": job_id or uuid.uuid4().hex, **body})


def terminal(events):
    return [(k, d) for k, d in events if k in ("end", "error")]


# -- the stream ----------------------------------------------------------------

def test_sse_order_and_exactly_one_terminal_event(srv):
    st = execute(srv, "order-1", prompt="Hello", temperature=0, max_tokens=12)
    events = st.join()
    assert st.status == 200
    kinds = [k for k, _ in events]
    assert kinds[0] == "started" and kinds[-1] == "end"
    assert set(kinds[1:-1]) <= {"token"} and len(terminal(events)) == 1
    started, end = events[0][1], events[-1][1]
    assert started["job_id"] == "order-1" and started["model"] == "qwen2-tiny"
    assert isinstance(started["seed"], int) and 0 <= started["seed"] < 2**64
    assert started["started_at"].endswith("+00:00")
    assert [d["i"] for k, d in events if k == "token"] == list(range(len(kinds) - 2))
    assert end["tokens_out"] == 12 and end["stop_reason"] == "max_tokens"
    assert end["decode_time_ms"] >= 0
    # the same greedy job through /v1/completions gives the same text
    text = "".join(d["t"] for k, d in events if k == "token")
    r = httpx.post(f"{srv.url}/v1/completions",
                   json={"prompt": "Hello", "temperature": 0, "max_tokens": 12}, timeout=60)
    assert r.json()["choices"][0]["text"] == text


def test_generated_seed_is_reported_and_reproduces_the_run(srv):
    first = execute(srv, prompt="Hello", temperature=1.0, max_tokens=10).join()
    seed = first[0][1]["seed"]
    again = execute(srv, prompt="Hello", temperature=1.0, max_tokens=10, seed=seed).join()
    assert again[0][1]["seed"] == seed
    assert [d for k, d in first if k == "token"] == [d for k, d in again if k == "token"]


def test_stop_string_ends_the_stream_with_stop_sequence(srv):
    free = execute(srv, prompt="Hello", temperature=0, max_tokens=12).join()
    text = "".join(d["t"] for k, d in free if k == "token")
    stop = text[4:6]
    events = execute(srv, prompt="Hello", temperature=0, max_tokens=12, stop=[stop]).join()
    assert events[-1] == ("end", {**events[-1][1], "stop_reason": "stop_sequence"})
    assert "".join(d["t"] for k, d in events if k == "token") == text[:text.index(stop)]


def test_utf8_safety_with_cjk_and_emoji(srv):
    prompt = "日本語のテキスト 😀🎉 中文字符 한국어 👩‍👩‍👧"
    with httpx.stream("POST", f"{srv.url}/execute", timeout=60,
                      json={"job_id": "utf8", "prompt": prompt, "temperature": 1.0, "seed": 7,
                            "max_tokens": 40}) as r:
        raw = r.read()
    text = raw.decode("utf-8")   # strict: the stream is valid UTF-8 throughout
    assert "event: end" in text
    tok = srv.state.loaded.tokenizer
    assert f'"prompt_tokens":{len(tok.encode(prompt))}' in text
    for line in text.splitlines():
        if line.startswith("data:"):
            line.encode("utf-8")   # no lone surrogates in any piece


def test_special_token_text_in_the_prompt_is_the_special_token(srv):
    prompt = "<|im_start|>user\nHi<|im_end|>"
    tok = srv.state.loaded.tokenizer
    special = tok.encode(prompt, add_special=True, parse_special=True)
    assert len(special) < len(tok.encode(prompt, add_special=True, parse_special=False))
    events = execute(srv, prompt=prompt, temperature=0, max_tokens=2).join()
    assert events[-1][1]["prompt_tokens"] == len(special)


# -- cancel, disconnect, queue ---------------------------------------------------

def test_cancel_running_job(srv):
    st = execute(srv, "run-1", **LONG)
    st.wait_for("token")
    r = httpx.post(f"{srv.url}/cancel", json={"job_id": "run-1"})
    assert r.status_code == 202 and r.json()["status"] == "cancelling"
    events = st.join()
    assert terminal(events) == [("error", {"code": "CANCELLED", "message": events[-1][1]["message"],
                                           "retriable": False})]
    assert events[-1][0] == "error"
    again = httpx.post(f"{srv.url}/cancel", json={"job_id": "run-1"})   # idempotent
    assert again.status_code == 202


def test_queue_full_duplicate_and_cancel_queued(srv):
    a = execute(srv, "qa", **LONG)
    a2 = execute(srv, "qa2", **LONG)     # two run together (max_batch 2)
    a.wait_for("started")
    a2.wait_for("started")
    b = execute(srv, "qb", **LONG)       # waits behind them (queue size 1)
    assert b.wait_status() == 200
    full = httpx.post(f"{srv.url}/execute", json={"job_id": "qc", **LONG})
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert full.json()["code"] == "UNAVAILABLE" and full.json()["retriable"] is True
    for dup in ("qa", "qb"):
        r = httpx.post(f"{srv.url}/execute", json={"job_id": dup, **LONG})
        assert r.status_code == 409 and r.json()["code"] == "DUPLICATE_JOB"
    assert httpx.post(f"{srv.url}/cancel", json={"job_id": "qb"}).json()["status"] == "cancelled"
    assert [k for k, _ in b.join()] == ["error"] and b.events[0][1]["code"] == "CANCELLED"
    for st in (a, a2):   # both still run: a token arrives and nothing ended them
        st.wait_for("token")          # (a2 may not have sampled its first token yet)
        assert st.kinds[-1] == "token"
    for job_id, st in (("qa", a), ("qa2", a2)):
        httpx.post(f"{srv.url}/cancel", json={"job_id": job_id})
        assert st.join()[-1][1]["code"] == "CANCELLED"


def test_client_disconnect_cancels_its_job(srv):
    st = SSEStream(f"{srv.url}/execute", {"job_id": "gone", **LONG}, disconnect_after=3)
    st.join()
    ev = srv.narration.wait_for(event="execute_end", job_id="gone")
    assert ev["outcome"] == "cancelled"


# -- validation --------------------------------------------------------------------

OK = {"job_id": "v", "prompt": "Hello"}
BAD = [
    ({"prompt": "Hello"}, "job_id"), ({"job_id": "v"}, "prompt"),
    ({**OK, "job_id": ""}, "job_id"), ({**OK, "job_id": "  "}, "job_id"),
    ({**OK, "job_id": 5}, "job_id"), ({**OK, "prompt": ""}, "prompt"),
    ({**OK, "prompt": 123}, "prompt"), ({**OK, "prompt": "x" * 32_769}, "prompt"),
    ({**OK, "max_tokens": 0}, "max_tokens"), ({**OK, "max_tokens": 10**6}, "max_tokens"),
    ({**OK, "max_tokens": "5"}, "max_tokens"), ({**OK, "max_tokens": 5.5}, "max_tokens"),
    ({**OK, "temperature": -0.1}, "temperature"), ({**OK, "temperature": 2.01}, "temperature"),
    ({**OK, "temperature": "hot"}, "temperature"), ({**OK, "top_p": 1.5}, "top_p"),
    ({**OK, "top_p": -0.1}, "top_p"), ({**OK, "top_k": -1}, "top_k"),
    ({**OK, "top_k": 513}, "top_k"), ({**OK, "min_p": 1.01}, "min_p"),
    ({**OK, "min_p": -1}, "min_p"), ({**OK, "repetition_penalty": 2.5}, "repetition_penalty"),
    ({**OK, "repetition_penalty": -0.5}, "repetition_penalty"),
    ({**OK, "stop": ["a", "b", "c", "d", "e"]}, "stop"), ({**OK, "stop": "a"}, "stop"),
    ({**OK, "stop": [""]}, "stop"), ({**OK, "stop": ["😀" * 40]}, "stop"),
    ({**OK, "stop": [1]}, "stop.0"), ({**OK, "seed": -1}, "seed"), ({**OK, "seed": 2**64}, "seed"),
    ({**OK, "seed": "7"}, "seed"), ({**OK, "unknown": 1}, "unknown"),
]


@pytest.mark.parametrize("body,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_invalid_request_fields(srv, body, field):
    r = httpx.post(f"{srv.url}/execute", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "INVALID_REQUEST" and r.json()["field"] == field
    assert r.json()["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
def test_invalid_json_bodies(srv, raw):
    r = httpx.post(f"{srv.url}/execute", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "INVALID_REQUEST"


def test_ten_megabyte_body_is_refused(srv):
    body = b'{"job_id": "big", "prompt": "' + b"x" * (10 << 20) + b'"}'
    r = httpx.post(f"{srv.url}/execute", content=body, timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["code"] == "INVALID_REQUEST"


def test_streamed_body_over_the_limit_is_refused_and_the_worker_serves_on(srv):
    def chunks():   # no Content-Length: the limit is found while reading
        yield b'{"job_id": "big", "prompt": "'
        for _ in range(40):
            yield b"x" * (64 << 10)
        yield b'"}'
    r = httpx.post(f"{srv.url}/execute", content=chunks(), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["message"]
    assert httpx.get(f"{srv.url}/health").json()["status"] == "healthy"


def test_cancel_request_is_validated(srv):
    assert httpx.post(f"{srv.url}/cancel", json={}).status_code == 400
    assert httpx.post(f"{srv.url}/cancel", json={"job_id": "never-seen"}).status_code == 202


# -- health, metrics, narration -------------------------------------------------------

def test_health_from_cached_state(srv):
    h = httpx.get(f"{srv.url}/health").json()
    assert h["status"] == "healthy" and h["resident"] is True
    assert h["model"] == "qwen2-tiny" and h["device"] == "cpu-reference"
    assert h["vocab_size"] == 512 and h["context_length"] == 4096
    assert h["tokenizer_kind"] == "gguf-bpe" and h["quant_kind"] == "Q4_K_M"
    assert h["worker_id"] == srv.state.config.worker_id and h["uptime_seconds"] > 0
    for key in ("vram_bytes_used", "sm", "cuda_runtime_version"):
        assert key in h


def test_metrics_are_prometheus_text_prefixed_orcd(srv):
    execute(srv, prompt="Hello", temperature=0, max_tokens=3).join()
    text = httpx.get(f"{srv.url}/metrics").text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    assert names and all(n.startswith("orcd_") and "-" not in n for n in names)
    for want in ("orcd_requests_total", "orcd_prompt_tokens_total", "orcd_generated_tokens_total",
                 "orcd_time_to_first_token_seconds_bucket", "orcd_inter_token_seconds_bucket",
                 "orcd_queue_depth", "orcd_residency_check_failures_total", "orcd_uptime_seconds"):
        assert want in names, want
    completed = [line for line in text.splitlines()
                 if line.startswith('orcd_requests_total{outcome="completed"}')]
    assert float(completed[0].split()[-1]) >= 1


def test_narration_lines_and_no_prompt_logged(srv):
    execute(srv, "narrated", prompt="a secret prompt", temperature=0, max_tokens=2).join()
    start = srv.narration.wait_for(event="execute_start", job_id="narrated")
    end = srv.narration.wait_for(event="execute_end", job_id="narrated")
    for ev in (start, end):
        assert ev["worker_id"] == srv.state.config.worker_id
        assert ev["model_ref"] == "qwen2-tiny" and ev["gpu_device"] == "cpu"
    assert end["outcome"] == "completed" and end["tokens_out"] == 2
    assert "a secret prompt" not in srv.narration.getvalue()
    events = srv.narration.events()
    assert [e["percent"] for e in events if e["event"] == "model_load_progress"] == [0, 25, 50, 75, 100]
    order = [e["event"] for e in events]
    assert order.index("startup") < order.index("model_load_start") < \
        order.index("model_load_complete") < order.index("ready")
    # every start-up phase named with its seconds, in the order they ran
    complete = next(e for e in events if e["event"] == "model_load_complete")
    phases = complete["phases"]
    # the tokenizer is built beside backend and weights: the others follow each other
    assert [p for p in phases if p != "tokenizer"] == ["open", "backend", "weights", "build",
                                                       "chat_template", "kv_pool", "batch_graphs"]
    assert "tokenizer" in phases and all(v >= 0 for v in phases.values())
    assert sum(v for p, v in phases.items() if p != "tokenizer") <= complete["seconds"] + 0.01
