"""The worker under hostile and heavy traffic (issue 17), measured.

    python bench/fuzz_flood.py fuzz  --requests 10000   # hypothesis bodies, in-process worker
    python bench/fuzz_flood.py flood --seconds 30       # `orcd serve --device cpu` subprocess

fuzz: POSTs N hostile bodies spread over /execute, /cancel, /v1/completions and
/v1/chat/completions (tests/server/fuzz_bodies.py) to a worker serving the tiny
synthetic qwen2; counts answers by status; any 5xx, malformed error body or
unterminated stream is a failure, kept and listed at the end (the run goes on),
and so is every warning the worker raised (a division by zero in the sampler).

flood: CLIENTS threads POST 1 MB chat bodies in a loop while one /execute
stream runs and a prober (a process of its own) GETs /health every 20 ms;
reports /health p50/p99/max, the longest gap between stream tokens, and the
server's RSS before, at peak and after the flood (once the idle worker has
trimmed its heap).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "server"))


def tiny_model(where: Path) -> Path:
    from orcd.devkit.synth import synthesize
    from orcd.plugins import PluginHost
    return synthesize(PluginHost(), "qwen2-tiny", where / "qwen2-tiny.gguf", seed=0)


def fuzz(n: int) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from fuzz_bodies import PATHS, ServerError, bodies, check
    from orcd.devkit.server_testing import running_server
    from orcd.server.state import ServerConfig

    with tempfile.TemporaryDirectory() as d:
        cfg = ServerConfig(model_path=str(tiny_model(Path(d))), model_ref="qwen2-tiny",
                           worker_id=str(uuid.uuid4()), device="cpu", ctx_size=512,
                           max_tokens_out=16, queue_size=4)
        counts: Counter = Counter()
        failures: list[str] = []   # every bad answer, kept (not raised): the run goes on
        t0 = time.monotonic()
        with running_server(cfg) as s, httpx.Client(timeout=60) as client, \
                warnings.catch_warnings(record=True) as warned:   # the worker's threads' too
            warnings.simplefilter("always")

            def fuzz_path(path: str):
                @settings(max_examples=n // len(PATHS), deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
                @given(st.data())
                def run(data):
                    body = data.draw(bodies(path))
                    try:
                        status = check(client, s.url, path, body)
                    except (AssertionError, ValueError, KeyError, httpx.HTTPError) as e:
                        status = e.status if isinstance(e, ServerError) else "bad"
                        failures.append(f"{path} {body[:300]!r}: {type(e).__name__}: "
                                        f"{str(e)[:300]}")
                    counts[(path, status)] += 1
                    done = sum(counts.values())
                    if done % 500 == 0:
                        print(f"  ... {done} requests, {time.monotonic() - t0:.0f} s, "
                              f"{len(failures)} bad", flush=True)
                return run

            for path in PATHS:
                fuzz_path(path)()
            healthy = s.state.status == "healthy"
    total = sum(counts.values())
    n5xx = sum(k for (_, st_), k in counts.items() if isinstance(st_, int) and st_ >= 500)
    print(f"fuzz: {total} requests in {time.monotonic() - t0:.0f} s, 5xx: {n5xx}, "
          f"bad answers: {len(failures)}, worker healthy after: {healthy}")
    print(f"warnings: {len(warned)}")
    for (cat, msg), k in Counter((w.category.__name__, str(w.message)) for w in warned).items():
        print(f"  {k} x {cat}: {msg}")
    for (path, status), k in sorted(counts.items(), key=str):
        print(f"  {path:24s} {status}: {k}")
    for f in failures[:50]:
        print(f"  BAD {f}")
    return 0 if healthy and not failures else 1


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def flood(seconds: float, clients: int, model: str | None, chars: int, ctx: int) -> int:
    port = 18000 + os.getpid() % 1000
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as d:
        path = model or str(tiny_model(Path(d)))
        proc = subprocess.Popen([sys.executable, "-m", "orcd.cli", "serve", "--model", path,
                                 "--device", "cpu", "--port", str(port), "--ctx-size", str(ctx)],
                                stderr=subprocess.PIPE, text=True)
        try:
            return _flood(proc, url, seconds, clients, chars)
        finally:
            proc.terminate()
            proc.wait(30)
            log = proc.stderr.read()
            print(f"narration: {len(log.splitlines())} lines, "
                  f"{log.count('Traceback')} tracebacks")


def probe_health(url: str, seconds: float, results) -> None:
    """GET /health every 20 ms for ``seconds``; put the latencies on ``results``."""
    latencies = []
    with httpx.Client(timeout=30) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            c.get(f"{url}/health")
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.02)
    results.put(latencies)


def _flood(proc, url: str, seconds: float, clients: int, chars: int) -> int:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, "worker did not start"
        time.sleep(0.2)
    time.sleep(6)   # one idle trim
    before = rss_mb(proc.pid)
    body = json.dumps({"messages": [{"role": "user", "content": "hello world " * (chars // 12)}],
                       "max_tokens": 4}).encode()
    stop, peak, sent = threading.Event(), [before], Counter()

    def flooder():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(f"{url}/v1/chat/completions", content=body,
                           headers={"Content-Type": "application/json"})
                sent[r.status_code] += 1

    def rss_watcher():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(proc.pid))
            time.sleep(0.02)

    gaps: list[float] = []

    def streamer():
        while not stop.is_set():
            with httpx.stream("POST", f"{url}/execute", timeout=60, json={
                    "job_id": uuid.uuid4().hex, "prompt": "Hello", "temperature": 0,
                    "max_tokens": 2048}) as r:
                last = None
                for line in r.iter_lines():
                    if line.startswith("event: token"):
                        now = time.perf_counter()
                        if last is not None:
                            gaps.append(now - last)
                        last = now
                    if stop.is_set():
                        break

    # the prober is a process of its own: the flooders' and the streamer's threads here
    # must not add their GIL waits to the latency it measures
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    prober = spawn.Process(target=probe_health, args=(url, seconds, results), daemon=True)
    threads = [threading.Thread(target=f, daemon=True)
               for f in [flooder] * clients + [rss_watcher, streamer]]
    for t in threads:
        t.start()
    prober.start()
    health = results.get(timeout=seconds + 120)
    prober.join(30)
    stop.set()
    for t in threads:
        t.join(60)
    time.sleep(12)   # idle: the worker trims its heap every 5 s
    after = rss_mb(proc.pid)
    q = statistics.quantiles(health, n=100)
    print(f"flood: {clients} clients x {len(body) / 1e6:.2f} MB chat bodies for {seconds:.0f} s: "
          f"answers {dict(sent)}")
    print(f"/health: n={len(health)} p50={q[49] * 1000:.1f} ms p99={q[98] * 1000:.1f} ms "
          f"max={max(health) * 1000:.1f} ms")
    print(f"/execute stream: {len(gaps)} token gaps, max {max(gaps, default=0) * 1000:.1f} ms")
    print(f"RSS: before {before:.0f} MB, peak {peak[0]:.0f} MB, after {after:.0f} MB "
          f"({after - before:+.0f} MB)")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fuzz")
    f.add_argument("--requests", type=int, default=10_000)
    fl = sub.add_parser("flood")
    fl.add_argument("--seconds", type=float, default=30)
    fl.add_argument("--clients", type=int, default=2)
    fl.add_argument("--model", help="GGUF to serve (default: the tiny synthetic qwen2)")
    fl.add_argument("--chars", type=int, default=1_000_000, help="message characters a body")
    fl.add_argument("--ctx-size", type=int, default=4096)
    a = p.parse_args()
    if a.cmd == "fuzz":
        return fuzz(a.requests)
    return flood(a.seconds, a.clients, a.model, a.chars, a.ctx_size)


if __name__ == "__main__":
    sys.exit(main())
