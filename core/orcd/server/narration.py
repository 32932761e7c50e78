"""Narration: one JSON line per lifecycle event on stderr.

Every line carries the worker's identity (worker_id, model_ref, gpu_device) so
logs from many workers can be merged. When stderr is a terminal the same event
is printed in a readable form instead. Prompts are never included unless the
operator passed ``--log-prompts``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, TextIO

EVENTS = ("startup", "model_load_start", "model_load_progress", "model_load_complete", "ready",
          "execute_start", "execute_end", "error", "shutdown", "residency_check_failed",
          "client_dropped", "client_refused", "warning", "device_lost")


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc, 10 ms steps), None elsewhere:
    the start-up narration's clock from the moment the user pressed enter."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])   # field 22: starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return round(max(0.0, uptime - started / os.sysconf("SC_CLK_TCK")), 3)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class Narrator:
    def __init__(self, *, worker_id: str, model_ref: str, gpu_device: str,
                 stream: TextIO | None = None, log_prompts: bool = False,
                 readable: bool | None = None) -> None:
        self.worker_id, self.model_ref, self.gpu_device = worker_id, model_ref, gpu_device
        self.stream = stream if stream is not None else sys.stderr
        self.log_prompts = log_prompts
        self.readable = _isatty(self.stream) if readable is None else readable
        self._lock = threading.Lock()  # the worker thread and the event loop both narrate

    def event(self, event: str, *, job_id: str | None = None, prompt: str | None = None,
              **fields: Any) -> None:
        record: dict[str, Any] = {
            "ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "event": event, "worker_id": self.worker_id, "job_id": job_id,
            "model_ref": self.model_ref, "gpu_device": self.gpu_device}
        if prompt is not None and self.log_prompts:
            record["prompt"] = prompt
        record.update(fields)
        line = self._readable(record) if self.readable else json.dumps(record, default=str)
        with self._lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # closed stderr must never break serving
                pass

    @staticmethod
    def _readable(r: dict[str, Any]) -> str:
        clock = time.strftime("%H:%M:%S")
        job = f" job={r['job_id']}" if r.get("job_id") else ""
        skip = {"ts", "event", "worker_id", "job_id", "model_ref", "gpu_device"}
        rest = " ".join(f"{k}={v}" for k, v in r.items() if k not in skip)
        return f"{clock} orcd {r['event']}{job} {rest}".rstrip()


class LoadProgress:
    """Turns a 0..1 load-progress callback into model_load_progress events at
    every 25 % step (0, 25, 50, 75, 100), each at most once. On a terminal
    (a readable narrator) it draws one bar, redrawn in place, instead."""

    BAR = 30

    def __init__(self, narrator: Narrator, step: int = 25) -> None:
        self.narrator, self.step, self.next = narrator, step, 0
        self._shown = -1

    def __call__(self, fraction: float) -> None:
        percent = int(max(0.0, min(1.0, fraction)) * 100)
        if self.narrator.readable:
            self._draw(percent)
            return
        while self.next <= percent:
            self.narrator.event("model_load_progress", percent=self.next)
            self.next += self.step

    def _draw(self, percent: int) -> None:
        if percent == self._shown:
            return
        self._shown = percent
        done = self.BAR * percent // 100
        line = f"\rloading weights [{'=' * done}{' ' * (self.BAR - done)}] {percent:3d}%"
        with self.narrator._lock:
            try:
                self.narrator.stream.write(line + ("\n" if percent == 100 else ""))
                self.narrator.stream.flush()
            except (OSError, ValueError):
                pass

    def finish(self) -> None:
        self(1.0)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
