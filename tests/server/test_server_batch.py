"""Continuous batching through HTTP: concurrent streams decoded together give
each exactly what it gives alone; /health and /metrics show the batch; cancel,
VRAM_OOM and shutdown touch only the jobs concerned.

The model sits behind a gate: while it is shut the inference thread waits in
its first forward, so the test can queue every request first and know they
run together once it opens (no sleeps, no timing assertions)."""

from __future__ import annotations

import json
import threading
import uuid

import httpx
import pytest

from orcd.devkit.server_testing import SSEStream, running_server
from orcd.server.app import load_for_serving
from orcd.server.state import ServerConfig

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog. " * 12,
           "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 6,
           "a b c d e f g h i j k l m n o p " * 14]


class Gated:
    """The model, each forward waiting until ``gate`` is open."""

    def __init__(self, model, gate: threading.Event) -> None:
        self.model, self.gate = model, gate

    def forward(self, *args, **kwargs):
        self.gate.wait(60)
        return self.model.forward(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def gated(gate: threading.Event):
    def load(config, progress):
        lm = load_for_serving(config, progress)
        lm.model = Gated(lm.model, gate)
        return lm
    return load


def config(path, **kw) -> ServerConfig:
    kw.setdefault("ctx_size", 2048)
    return ServerConfig(model_path=str(path), model_ref="qwen2-tiny", worker_id=str(uuid.uuid4()),
                        device="cpu", **kw)


@pytest.fixture(scope="module")
def gate():
    g = threading.Event()
    g.set()
    return g


@pytest.fixture(scope="module")
def srv(tiny_model, gate):
    cfg = config(tiny_model("qwen2-tiny"), max_batch=4, queue_size=8)
    with running_server(cfg, loader=gated(gate)) as s:
        yield s


@pytest.fixture(autouse=True)
def _open_and_idle(request, gate):
    yield
    gate.set()
    if "srv" in request.fixturenames:
        s = request.getfixturevalue("srv")
        s.state.inference.cancel_all()
        assert s.state.inference.wait_idle(30)


def health(s) -> dict:
    return httpx.get(f"{s.url}/health", timeout=10).json()


def wait_health(s, **want) -> dict:
    """Poll /health until its fields equal ``want`` (the queue state after submits)."""
    for _ in range(1500):
        h = health(s)
        if all(h[k] == v for k, v in want.items()):
            return h
        threading.Event().wait(0.02)
    raise AssertionError(f"/health never showed {want}: {h}")


def execute(s, body) -> SSEStream:
    return SSEStream(f"{s.url}/execute", {"job_id": uuid.uuid4().hex, **body})


def text_of(events) -> str:
    assert events[-1][0] == "end", events[-3:]
    return "".join(d["t"] for k, d in events if k == "token")


def metric(s, name: str) -> float:
    for line in httpx.get(f"{s.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {name} in /metrics")


def hold(s, gate, start, n: int) -> list:
    """Shut the gate, ``start(0)`` and wait until that job holds the model in its
    first forward, then start 1..n-1 and wait until all of them queue."""
    gate.clear()
    first = start(0)
    wait_health(s, running=1, waiting=0)
    rest = [start(i) for i in range(1, n)]
    wait_health(s, running=1, waiting=n - 1)
    return [first, *rest]


def together(s, gate, bodies) -> list[SSEStream]:
    """Every body queued while the model waits, then run as one batch."""
    streams = hold(s, gate, lambda i: execute(s, bodies[i]), len(bodies))
    gate.set()
    return streams


def test_concurrent_greedy_streams_equal_each_alone(srv, gate):
    bodies = [{"prompt": p, "temperature": 0, "max_tokens": 20 + 3 * i} for i, p in enumerate(PROMPTS)]
    tok = srv.state.loaded.tokenizer
    assert max(len(tok.encode(p)) for p in PROMPTS) > 2 * srv.state.loaded.backend.prefill_chunk
    alone = [text_of(execute(srv, b).join()) for b in bodies]
    steps_before = metric(srv, "orcd_batch_size_count")
    timed_before = metric(srv, "orcd_step_seconds_count")
    single_before = metric(srv, 'orcd_batch_size_bucket{le="1.0"}')
    streams = together(srv, gate, bodies)
    assert [text_of(st.join()) for st in streams] == alone
    # some decode steps held more than one sequence
    assert metric(srv, "orcd_batch_size_count") - steps_before > \
        metric(srv, 'orcd_batch_size_bucket{le="1.0"}') - single_before
    # every step is timed, decoding or not
    assert metric(srv, "orcd_step_seconds_count") - timed_before >= \
        metric(srv, "orcd_batch_size_count") - steps_before > 0
    h = health(srv)
    assert (h["running"], h["waiting"], h["max_batch"]) == (0, 0, 4)
    assert metric(srv, "orcd_kv_blocks_used") == 0 and metric(srv, "orcd_kv_blocks_total") > 0


def test_max_batch_is_respected_and_the_rest_waits(srv, gate):
    bodies = [{"prompt": "Hello", "temperature": 0, "max_tokens": 12}] * 7
    streams = together(srv, gate, bodies)
    seen = []
    while not all(st.kinds and st.kinds[-1] in ("end", "error") for st in streams):
        h = health(srv)
        seen.append((h["running"], h["waiting"]))
        if len(seen) > 3000:
            break
    texts = [text_of(st.join()) for st in streams]
    assert len(set(texts)) == 1                     # the same request, the same text, batched or not
    assert all(r <= 4 for r, _ in seen)
    assert health(srv)["running"] == 0


def test_seeded_sampling_is_the_same_alone_and_batched(srv, gate):
    mine = {"prompt": "Once upon a time", "temperature": 1.0, "seed": 99, "max_tokens": 24}
    alone = text_of(execute(srv, mine).join())
    others = [{"prompt": p, "temperature": 1.0, "max_tokens": 24} for p in PROMPTS[1:]]
    streams = together(srv, gate, [others[0], mine, *others[1:]])
    assert text_of(streams[1].join()) == alone
    for st in streams:
        st.join()


def test_cancelling_one_stream_leaves_the_others_intact(srv, gate):
    long = {"prompt": "Hello", "temperature": 0, "max_tokens": 1500}
    keep = [{"prompt": p, "temperature": 0, "max_tokens": 16} for p in PROMPTS[1:3]]
    alone = [text_of(execute(srv, b).join()) for b in keep]
    streams = together(srv, gate, [long, *keep])
    victim = streams[0]
    victim.wait_for("token")
    gate.clear()                                    # the victim cannot finish meanwhile
    job_id = victim.body["job_id"]
    r = httpx.post(f"{srv.url}/cancel", json={"job_id": job_id})
    assert r.json()["status"] == "cancelling"
    gate.set()
    assert victim.join()[-1] == ("error", {**victim.events[-1][1], "code": "CANCELLED"})
    assert [text_of(st.join()) for st in streams[1:]] == alone
    assert metric(srv, "orcd_kv_blocks_used") == 0


def chat(s, content: str) -> str:
    body = {"messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": 12, "stream": True}
    out = []
    with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                out.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
    return "".join(out)


def test_chat_completions_streams_together_equal_each_alone(srv, gate):
    asks = ["Tell me about ducks", "Tell me about the sea", "Tell me about primes " * 20]
    alone = [chat(srv, a) for a in asks]
    results: list = [None] * len(asks)
    threads = []

    def start(i):
        t = threading.Thread(target=lambda: results.__setitem__(i, chat(srv, asks[i])))
        t.start()
        threads.append(t)
    hold(srv, gate, start, len(asks))
    gate.set()
    for t in threads:
        t.join(60)
    assert results == alone


def test_a_request_larger_than_the_kv_pool_is_vram_oom_and_others_are_served(tiny_model,
                                                                              monkeypatch):
    import orcd.vram
    monkeypatch.setattr(orcd.vram, "kv_pool_blocks", lambda *a, **kw: 3)   # 192 positions
    with running_server(config(tiny_model("qwen2-tiny"), max_batch=4)) as s:
        ok = execute(s, {"prompt": "Hello", "temperature": 0, "max_tokens": 30})
        big = httpx.post(f"{s.url}/execute", timeout=30,
                         json={"job_id": "big", "prompt": "Hello", "max_tokens": 400})
        assert big.status_code == 507
        assert big.json()["code"] == "VRAM_OOM" and big.json()["retriable"] is True
        assert text_of(ok.join())
        assert metric(s, "orcd_kv_blocks_total") == 3 and metric(s, "orcd_kv_blocks_used") == 0


def test_max_batch_1_runs_one_job_at_a_time_with_the_same_text(tiny_model, srv, gate):
    body = {"prompt": PROMPTS[1], "temperature": 0, "max_tokens": 16}
    batched = text_of(execute(srv, body).join())
    g = threading.Event()
    with running_server(config(tiny_model("qwen2-tiny"), max_batch=1, queue_size=2),
                        loader=gated(g)) as s:
        assert s.state.inference.scheduler is None          # Engine.generate, as before batching
        streams = [execute(s, body) for _ in range(3)]
        wait_health(s, running=1, waiting=2, max_batch=1)
        full = httpx.post(f"{s.url}/execute", json={"job_id": "x", **body})
        assert full.status_code == 503                   # 1 running + 2 queued
        g.set()
        assert [text_of(st.join()) for st in streams] == [batched] * 3


def test_shutdown_cancels_every_running_job_past_the_deadline(tiny_model):
    cfg = config(tiny_model("qwen2-tiny"), max_batch=4, shutdown_deadline_s=0.5)
    g = threading.Event()
    g.set()
    with running_server(cfg, loader=gated(g)) as s:
        long = {"prompt": "Hello", "temperature": 0, "max_tokens": 1900}
        streams = [execute(s, long) for _ in range(3)]
        for st in streams:
            st.wait_for("token")
        g.clear()                                   # none can finish before the deadline
        assert httpx.post(f"{s.url}/shutdown").status_code == 202
        s.narration.wait_for(event="shutdown", phase="cancel")
        g.set()
        for st in streams:
            err = st.join()[-1]
            assert err[0] == "error" and err[1]["code"] == "CANCELLED" and err[1]["retriable"]
        assert s.wait_exit(15)


def test_start_up_captures_left_for_idle_time_yield_to_a_request(tiny_model, srv):
    """The server warms lazily (Scheduler.warm_up(lazy=True)): the first of the
    backend's warm tasks before it is ready, the others one at a time while idle;
    a request that arrives meanwhile is served before the next task runs, and
    streams what it streams on a warmed server."""
    body = {"prompt": PROMPTS[2], "temperature": 0, "max_tokens": 12}
    want = text_of(execute(srv, body).join())
    log, hold = [], threading.Event()

    def load(cfg, progress):
        lm = load_for_serving(cfg, progress)

        def task(i):
            def run():
                log.append(("task", i))
                if i == 2:
                    hold.wait(30)        # the thread sits in this one while the request arrives
            return run

        lm.backend.warm_tasks = lambda model, pool, max_rows, n_ctx: [task(i) for i in range(5)]
        model = lm.model
        forward = model.forward
        model.forward = lambda *a, **k: log.append(("forward",)) or forward(*a, **k)
        return lm

    with running_server(config(tiny_model("qwen2-tiny"), max_batch=4), loader=load) as s:
        assert log[0] == ("task", 0)             # before ready
        for _ in range(1500):
            if ("task", 2) in log:
                break
            threading.Event().wait(0.01)
        stream = execute(s, body)
        wait_health(s, waiting=1)
        hold.set()
        assert text_of(stream.join()) == want
        for _ in range(1500):
            if ("task", 4) in log:
                break
            threading.Event().wait(0.01)
        tasks = [e[1] for e in log if e[0] == "task"]
        assert tasks == [0, 1, 2, 3, 4]
        assert log.index(("forward",)) < log.index(("task", 3))   # the request went first
