"""vLLM's request metrics on orcd's registry: what each histogram measures."""

from __future__ import annotations

import time
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from orcd.server.metrics import TOKEN_BUCKETS, Metrics


def samples(m: Metrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: Metrics, name: str, **labels) -> float:
    return samples(m)[(name, tuple(sorted(labels.items())))]


def test_ttft_counts_the_queue_and_each_phase_has_its_histogram():
    m = Metrics()
    arrived = time.monotonic() - 2.0            # waited 2 s in the queue
    started = arrived + 2.0
    m.job_started(arrived, started)
    assert value(m, "orcd_requests_running") == 1
    m.job_progress(300, 1000)
    assert value(m, "orcd_kv_cache_usage_ratio") == 0.3
    result = SimpleNamespace(prompt_tokens=5, tokens_out=7, stop_reason="max_tokens",
                             ttft_ms=250.0, decode_time_ms=700.0)
    m.job_done(arrived, started, result)
    assert value(m, "orcd_request_queue_time_seconds_sum") == 2.0
    assert abs(value(m, "orcd_time_to_first_token_seconds_sum") - 2.25) < 1e-9
    assert value(m, "orcd_request_prefill_time_seconds_sum") == 0.25
    assert value(m, "orcd_request_decode_time_seconds_sum") == 0.7
    assert value(m, "orcd_e2e_request_latency_seconds_sum") >= 2.0
    assert value(m, "orcd_request_success_total", finished_reason="length") == 1
    assert value(m, "orcd_request_success_total", finished_reason="stop") == 0
    assert value(m, "orcd_requests_running") == 0 and value(m, "orcd_kv_cache_usage_ratio") == 0


def test_a_job_cancelled_in_the_queue_leaves_the_running_gauge_alone():
    m = Metrics()
    now = time.monotonic()
    m.job_started(now, now)                      # one job runs...
    m.job_done(now, None)                        # ...another is cancelled while queued
    assert value(m, "orcd_requests_running") == 1
    assert value(m, "orcd_e2e_request_latency_seconds_count") == 1
    assert value(m, "orcd_time_to_first_token_seconds_count") == 0


def test_token_latency_buckets_resolve_a_gpu_decode_step():
    # an H200 decode step takes ~1.1 ms: it must not share the first bucket with 0
    assert TOKEN_BUCKETS[0] <= 0.0005 and any(0.001 < b <= 0.0015 for b in TOKEN_BUCKETS)
    m = Metrics()
    m.inter_token.observe(0.0011)
    assert value(m, "orcd_inter_token_seconds_bucket", le="0.001") == 0
    assert value(m, "orcd_inter_token_seconds_bucket", le="0.0015") == 1
