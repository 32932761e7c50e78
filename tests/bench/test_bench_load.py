"""bench/load.py runs end to end on the CPU (a tiny model, few tokens): it
starts orcd serve, drives concurrent streaming clients and prints one row per
concurrency. No speed is asserted; the table's shape and ratios are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

LOAD = Path(__file__).resolve().parents[2] / "bench" / "load.py"


@pytest.fixture
def load(bench_module):
    return bench_module("load")


def test_load_benchmark_smoke_on_cpu(tiny_model, tmp_path):
    cmd = [sys.executable, str(LOAD), "--model", str(tiny_model("qwen2-tiny")), "--device", "cpu",
           "--concurrency", "1,4", "--max-tokens", "4", "--rounds", "1", "--slots", "4",
           "--ctx-size", "256", "--settle", "0", "--logs", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| clients")}
    assert set(rows) == {"1", "4"}
    for line in rows.values():
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 5
        assert float(cells[1]) > 0                  # tokens came back (not a speed)
    assert "failed requests" not in done.stderr
    assert "server: " in done.stderr and " steps of " in done.stderr   # orcd's step counters
    assert (tmp_path / "load-orcd.log").exists()


def test_table_ratios_against_the_peer(load):
    orcd = {1: load.Row(100.0, 10.0, 20.0, 50.0, 64, 0), 4: load.Row(300.0, 12.0, 30.0, 80.0, 256, 0)}
    peer = {1: load.Row(200.0, 5.0, 10.0, 25.0, 64, 0)}
    md = load.table(orcd, peer)
    lines = md.splitlines()
    assert "peer tok/s" in lines[0] and "tok/s orcd/peer" in lines[0]
    one = [c.strip() for c in lines[2].strip("|").split("|")]
    assert one[0] == "1" and one[1] == "100.0" and one[5] == "200.0"
    assert one[9:] == ["0.50", "2.00", "2.00", "2.00"]        # orcd / peer per column
    four = [c.strip() for c in lines[3].strip("|").split("|")]
    assert four[5] == "n/a" and four[9] == "n/a"               # no peer row at 4


def test_summary_of_streams(load):
    s1 = load.Sample(sent=0.0, first=0.1, gaps=[0.01, 0.03], tokens=3)
    s2 = load.Sample(sent=0.0, first=0.3, gaps=[0.02], tokens=2)
    bad = load.Sample(sent=0.0, error="HTTP 503")
    row = load.summarize([s1, s2, bad], wall_s=0.5)
    assert row.tokens == 5 and row.tok_s == 10.0 and row.errors == 1
    assert abs(row.itl_p50_ms - 20.0) < 1e-9 and abs(row.ttft_p50_ms - 200.0) < 1e-9


def test_step_line_says_where_the_wall_went(load):
    before = load.np.array([10.0, 0.5, 8.0, 16.0])
    after = load.np.array([110.0, 0.9, 88.0, 1296.0])     # 100 steps, 0.4 s, 80 decodes of 1280 rows
    line = load.step_line(before, after, wall_s=0.8)
    assert line == "; server: 100 steps of 4.00 ms, 16.0 decode rows, busy 50%"
    assert load.step_line(None, after, 0.8) == "" and load.step_line(after, after, 0.8) == ""
