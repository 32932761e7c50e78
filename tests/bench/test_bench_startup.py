"""bench/startup.py starts orcd serve on the CPU (a tiny model) as it does on a card:
fresh processes, /health polled, the narrated phases gathered. No speed is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

STARTUP = Path(__file__).resolve().parents[2] / "bench" / "startup.py"
CORE = STARTUP.parents[1] / "core"


def test_startup_benchmark_smoke_on_cpu(tiny_model, tmp_path):
    cmd = [sys.executable, str(STARTUP), "--model", str(tiny_model("qwen2-tiny")), "--device", "cpu",
           "--runs", "1", "--base", str(CORE), "--max-batch", "2", "--logs", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines[1:])}
    assert set(rows) == {"this", "base"}
    for phase in ("startup.process", "startup.validate", "load", "load.tokenizer",
                  "ready.server_imports", "ready.since_process_start_s"):
        assert phase in head, head
    for cells in rows.values():
        cold, warm = float(cells[1]), float(cells[2])
        ready = float(cells[head.index("ready.since_process_start_s")])
        assert cold > 0 and warm > 0 and 0 < ready   # measured (not a speed)
    assert sorted(p.name for p in tmp_path.glob("startup-*.log")) == [
        "startup-base-0.log", "startup-base-1.log", "startup-this-0.log", "startup-this-1.log"]


def test_phases_of_a_start(bench_module):
    startup = bench_module("startup")
    events = [{"event": "startup", "phases": {"process": 0.4, "validate": 0.1}},
              {"event": "model_load_start"},
              {"event": "model_load_complete", "seconds": 1.1, "phases": {"tokenizer": 0.6}},
              {"event": "ready", "since_process_start_s": 2.0, "phases": {"server_imports": 0.9}}]
    assert startup.phases_of(events) == {
        "startup.process": 0.4, "startup.validate": 0.1, "load": 1.1, "load.tokenizer": 0.6,
        "ready.since_process_start_s": 2.0, "ready.server_imports": 0.9}
    md = startup.table({"this": [9.0, 2.0, 4.0, 3.0]},
                       {"this": [{"load": 5.0}, {"load": 1.0}, {"load": 3.0}, {"load": 2.0}]})
    row = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    assert row == ["this", "9.00", "3.00", "2.000"]   # the cold start apart; warm medians
