"""Helpers to run a real worker on loopback in-process (tests, benchmarks).

``running_server`` starts uvicorn on 127.0.0.1 with an ephemeral port on a
thread and waits until HTTP answers; ``SSEStream`` reads one /execute stream
on a thread so a test can act (cancel, disconnect, shut down) mid-stream.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import httpx

from orcd.server.narration import Narrator
from orcd.server.process import WorkerServer, build_server
from orcd.server.state import ServerConfig, ServerState


class Narration(io.StringIO):
    """A narration sink that tests can read while the server writes."""

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.getvalue().splitlines() if line.strip()]

    def wait_for(self, timeout: float = 10.0, **match: Any) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events():
                if all(ev.get(k) == v for k, v in match.items()):
                    return ev
            time.sleep(0.02)
        raise AssertionError(f"no narration event matching {match} within {timeout} s")


@dataclass
class RunningServer:
    url: str
    server: WorkerServer
    thread: threading.Thread
    narration: Narration

    @property
    def state(self) -> ServerState:
        return self.server.state

    def wait_status(self, status: str = "healthy", timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = httpx.get(f"{self.url}/health", timeout=5).json()
            if h["status"] == status:
                return h
            time.sleep(0.02)
        raise AssertionError(f"the worker did not become {status} within {timeout} s: {h}")

    def wait_exit(self, timeout: float = 30.0) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


@contextmanager
def running_server(config: ServerConfig, *, wait: str | None = "healthy",
                   **app_options: Any) -> Iterator[RunningServer]:
    narration = Narration()
    narrator = Narrator(worker_id=config.worker_id, model_ref=config.model_ref,
                        gpu_device=config.device, stream=narration,
                        log_prompts=config.log_prompts, readable=False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))       # an ephemeral port, held from the start: no race
    port = sock.getsockname()[1]
    server = build_server(config, "127.0.0.1", port, narrator=narrator, **app_options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive():
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    running = RunningServer(f"http://127.0.0.1:{port}", server, thread, narration)
    try:
        if wait:
            running.wait_status(wait)
        yield running
    finally:
        server.should_exit = True
        thread.join(30)


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str | None, Any]]:
    """SSE lines → (event, data) with data JSON-decoded unless it is [DONE]."""
    event, data = None, []
    for line in lines:
        if line == "":
            if data:
                raw = "\n".join(data)
                yield event, raw if raw == "[DONE]" else json.loads(raw)
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        raw = "\n".join(data)
        yield event, raw if raw == "[DONE]" else json.loads(raw)


@dataclass
class SSEStream:
    """POST ``body`` to ``url`` and record the SSE events on a thread."""

    url: str
    body: dict
    headers: dict = field(default_factory=dict)
    status: int | None = None
    events: list = field(default_factory=list)
    error_body: Any = None
    disconnect_after: int | None = None      # close the connection after this many events

    def __post_init__(self) -> None:
        self._got = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, headers=self.headers,
                              timeout=60) as r:
                with self._got:
                    self.status = r.status_code
                    self._got.notify_all()
                if r.status_code != 200:
                    self.error_body = json.loads(r.read())
                    return
                for ev in parse_sse(r.iter_lines()):
                    with self._got:
                        self.events.append(ev)
                        self._got.notify_all()
                    if self.disconnect_after is not None and len(self.events) >= self.disconnect_after:
                        return   # leaving the context closes the connection mid-stream
        finally:
            with self._got:
                self.status = self.status or -1
                self._done = True
                self._got.notify_all()

    def wait_for(self, kind: str, timeout: float = 30.0) -> dict:
        with self._got:
            ok = self._got.wait_for(lambda: any(k == kind for k, _ in self.events)
                                    or self._done, timeout)
        for k, data in self.events:
            if k == kind:
                return data
        raise AssertionError(f"no {kind!r} event (ok={ok}); got {self.events[-3:]}, "
                             f"status {self.status}, body {self.error_body}")

    def wait_status(self, timeout: float = 30.0) -> int:
        with self._got:
            self._got.wait_for(lambda: self.status is not None, timeout)
        return self.status

    def join(self, timeout: float = 60.0) -> list:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not end"
        return self.events

    @property
    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]
