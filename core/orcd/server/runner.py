"""Running the app under uvicorn with orcd's shutdown semantics.

uvicorn's own signal handling stops accepting connections at once and, after
shutting down, re-raises the signal (so the exit status would not be 0). The
worker instead treats SIGTERM / SIGINT like POST /shutdown: new work gets 503,
the running job may finish within the deadline and is then cancelled, the
model is freed, and ``serve`` returns 0. A second signal forces the exit.
"""

from __future__ import annotations

import signal
import sys

import uvicorn

from orcd.server.app import begin_shutdown, create_app
from orcd.server.state import ServerConfig, ServerState


class WorkerServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.signals: list[int] = []

    def handle_exit(self, sig: int, frame) -> None:
        # Runs inside a signal handler: only record; the event loop acts on it in on_tick.
        # Not appended to uvicorn's _captured_signals, so nothing is re-raised afterwards.
        self.signals.append(sig)
        if len(self.signals) > 1:
            self.force_exit = self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.signals and self.state.shutdown_task is None:
            begin_shutdown(self.state, signal.Signals(self.signals[0]).name)
        return bool(await super().on_tick(counter))


def build_server(config: ServerConfig, host: str, port: int, **app_options) -> WorkerServer:
    app = create_app(config, **app_options)
    state: ServerState = app.state.orcd
    uv = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                        lifespan="on", timeout_graceful_shutdown=config.shutdown_deadline_s + 5)
    server = WorkerServer(uv, state)
    state.request_exit = lambda: setattr(server, "should_exit", True)
    return server


def serve(config: ServerConfig, host: str, port: int) -> int:
    server = build_server(config, host, port)
    server.run()
    err = server.state.load_error
    if err is not None:
        message = getattr(err, "message", None) or f"{type(err).__name__}: {err}"
        code = getattr(err, "code", "MODEL_LOAD_FAILED")
        print(f"orcd serve: error [{code}]: {message}", file=sys.stderr)
        return 1
    return 0
