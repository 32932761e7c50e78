"""Prometheus metrics, each app on its own CollectorRegistry (no process-global
state: two apps in one process, as in the tests, never share counters).

The request-level set follows vLLM's (``vllm:`` names in brackets): queue time
(request_queue_time_seconds), time to first token counted from arrival
(time_to_first_token_seconds), prefill and decode time
(request_prefill/decode_time_seconds), end-to-end latency
(e2e_request_latency_seconds), inter-token latency, running and waiting
requests (num_requests_running / _waiting, here ``orcd_queue_depth``), KV-cache
usage (kv_cache_usage_perc, a 0..1 ratio) and finished requests by
``finished_reason`` (request_success_total). Latency buckets start at 0.5 ms:
a decode step on an H200 takes about 1.1 ms. Continuous batching adds the KV
pool's blocks in use and in all, and how many sequences each decode step held.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

OUTCOMES = ("completed", "cancelled", "timeout", "error", "rejected")
#: GenerateResult.stop_reason -> OpenAI's (and vLLM's) finished_reason
FINISHED_REASONS = {"eog": "stop", "stop_sequence": "stop", "max_tokens": "length"}
#: per-token scale: 0.5 ms .. 1 s
TOKEN_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
                 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
#: sequences in one decode step (1 .. orcd.scheduler.MAX_BATCH)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
#: per-request scale: 1 ms .. 10 min
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.started = time.monotonic()
        self.requests = Counter("orcd_requests", "Inference requests by outcome",
                                ["outcome"], registry=r)
        for outcome in OUTCOMES:  # export zeros, so rates work from the first scrape
            self.requests.labels(outcome)
        self.finished = Counter("orcd_request_success", "Finished requests by finished_reason",
                                ["finished_reason"], registry=r)
        for reason in sorted(set(FINISHED_REASONS.values())):
            self.finished.labels(reason)
        self.prompt_tokens = Counter("orcd_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("orcd_generated_tokens", "Tokens generated", registry=r)

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, buckets=buckets, registry=r)
        self.ttft = hist("orcd_time_to_first_token_seconds",
                         "Time from the request's arrival to its first sampled token",
                         REQUEST_BUCKETS)
        self.inter_token = hist("orcd_inter_token_seconds", "Time between streamed tokens",
                                TOKEN_BUCKETS)
        self.queue_time = hist("orcd_request_queue_time_seconds",
                               "Time a request waited in the queue", REQUEST_BUCKETS)
        self.prefill_time = hist("orcd_request_prefill_time_seconds",
                                 "Time from a request's start to its first token (prefill)",
                                 REQUEST_BUCKETS)
        self.decode_time = hist("orcd_request_decode_time_seconds",
                                "Time from a request's first token to its last", REQUEST_BUCKETS)
        self.e2e = hist("orcd_e2e_request_latency_seconds",
                        "Time from a request's arrival to its end", REQUEST_BUCKETS)
        self.queue_depth = Gauge("orcd_queue_depth", "Jobs waiting to start (beyond the running)",
                                 registry=r)
        self.running = Gauge("orcd_requests_running", "Jobs running (decoded together)",
                             registry=r)
        self._n_running = 0
        self.kv_usage = Gauge("orcd_kv_cache_usage_ratio",
                              "KV cache in use: blocks reserved of the pool (one job alone: "
                              "positions of its context)", registry=r)
        self.kv_blocks_used = Gauge("orcd_kv_blocks_used",
                                    "KV-pool blocks reserved by running jobs", registry=r)
        self.kv_blocks_total = Gauge("orcd_kv_blocks_total", "KV-pool blocks in all", registry=r)
        self.batch_size = hist("orcd_batch_size", "Sequences decoded in one step", BATCH_BUCKETS)
        self.step_time = hist("orcd_step_seconds", "Wall time of one scheduler step (prompt "
                              "chunks, decode, taking the ids)", TOKEN_BUCKETS)
        self.vram_bytes = Gauge("orcd_vram_bytes", "Device memory in use by purpose",
                                ["purpose"], registry=r)
        self.residency_failures = Counter("orcd_residency_check_failures",
                                          "Failed checks that the weights are still resident",
                                          registry=r)
        uptime = Gauge("orcd_uptime_seconds", "Seconds since the worker started", registry=r)
        uptime.set_function(lambda: time.monotonic() - self.started)

    # -- one job's life (called on the inference thread) ----------------------------
    def job_started(self, arrived: float, now: float) -> None:
        self._n_running += 1
        self.running.set(self._n_running)
        self.queue_time.observe(max(0.0, now - arrived))

    def job_progress(self, positions: int, n_ctx: int) -> None:
        self.kv_usage.set(min(1.0, positions / n_ctx) if n_ctx else 0.0)

    def job_done(self, arrived: float, started: float | None, result=None) -> None:
        """``result``: the GenerateResult of a job that completed, else None."""
        now = time.monotonic()
        if started is not None:   # else it never ran (cancelled while queued)
            self._n_running -= 1
            self.running.set(self._n_running)
            if not self._n_running:
                self.kv_usage.set(0.0)
        self.e2e.observe(max(0.0, now - arrived))
        if result is None:
            return
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generated_tokens.inc(result.tokens_out)
        self.finished.labels(FINISHED_REASONS.get(result.stop_reason, "stop")).inc()
        queued = (started - arrived) if started is not None else 0.0
        self.ttft.observe(max(0.0, queued) + result.ttft_ms / 1000)
        self.prefill_time.observe(result.ttft_ms / 1000)
        self.decode_time.observe(result.decode_time_ms / 1000)

    def step(self, batch: int, blocks_used: int, blocks_total: int, seconds: float) -> None:
        """After a scheduler step: the decode batch it ran (0: none), the pool's
        state and the step's wall time."""
        if batch:
            self.batch_size.observe(batch)
        self.step_time.observe(seconds)
        self.kv_blocks_used.set(blocks_used)
        self.kv_blocks_total.set(blocks_total)
        self.kv_usage.set(blocks_used / blocks_total if blocks_total else 0.0)

    def set_memory(self, usage: dict[str, int]) -> None:
        for purpose, n in usage.items():
            self.vram_bytes.labels(purpose).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
