"""Prometheus metrics, each app on its own CollectorRegistry (no process-global
state: two apps in one process, as in the tests, never share counters)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

OUTCOMES = ("completed", "cancelled", "timeout", "error", "rejected")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.started = time.monotonic()
        self.requests = Counter("orcd_requests", "Inference requests by outcome",
                                ["outcome"], registry=r)
        for outcome in OUTCOMES:  # export zeros, so rates work from the first scrape
            self.requests.labels(outcome)
        self.prompt_tokens = Counter("orcd_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("orcd_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("orcd_time_to_first_token_seconds",
                              "Time from job start to the first sampled token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("orcd_inter_token_seconds", "Time between streamed tokens",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("orcd_queue_depth", "Jobs waiting for the inference thread",
                                 registry=r)
        self.vram_bytes = Gauge("orcd_vram_bytes", "Device memory in use by purpose",
                                ["purpose"], registry=r)
        self.residency_failures = Counter("orcd_residency_check_failures",
                                          "Failed checks that the weights are still resident",
                                          registry=r)
        uptime = Gauge("orcd_uptime_seconds", "Seconds since the worker started", registry=r)
        uptime.set_function(lambda: time.monotonic() - self.started)

    def set_memory(self, usage: dict[str, int]) -> None:
        for purpose, n in usage.items():
            self.vram_bytes.labels(purpose).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
