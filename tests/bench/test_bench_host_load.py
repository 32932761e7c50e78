"""bench/host_load.py runs the whole serving path over a simulated GPU on the CPU:
a smoke run, and the simulated device's arithmetic."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

HOST_LOAD = Path(__file__).resolve().parents[2] / "bench" / "host_load.py"


@pytest.fixture
def host_load(bench_module):
    return bench_module("host_load")


def test_smoke_never_beats_the_simulated_ceiling(tiny_model):
    cmd = [sys.executable, str(HOST_LOAD), "--model", str(tiny_model("qwen2-tiny")), "--concurrency", "1,3",
           "--rounds", "1", "--max-tokens", "6", "--step-ms", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| clients")}
    assert set(rows) == {"1", "3"}
    for c, cells in rows.items():
        assert float(cells[5]) == int(c) * 1000 / 4            # the ceiling: c rows every 4 ms
        assert 0 < float(cells[6]) <= 1.05                    # a clock cannot be beaten
        assert float(cells[2]) >= 4 * 0.95                    # no gap shorter than a step
    assert "failed requests" not in done.stderr


def test_the_simulated_device_queues_its_work(host_load):
    gpu = host_load.SimulatedGpu(step_s=0.02, prompt_s=0.01, token=7)
    t0 = time.perf_counter()
    gpu.forward_batch(None, None, None, None, [1], [0], 64, batched=False, last_only=True)   # a prompt chunk
    logits = gpu.forward_batch(None, None, None, None, [1, 2], [3, 4], 64, batched=True, last_only=False)
    assert logits.shape[0] == 2
    pending = gpu.launch_rows(logits, [object(), object()])
    assert time.perf_counter() - t0 < 0.01                    # queued, not waited for
    got = pending.result()
    assert time.perf_counter() - t0 >= 0.03                   # ready when both had run
    assert [s.id for s in got] == [7, 7]
