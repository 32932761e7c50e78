"""Running the app under uvicorn with orcd's shutdown semantics.

uvicorn's own signal handling stops accepting connections at once and, after
shutting down, re-raises the signal (so the exit status would not be 0). The
worker instead treats SIGTERM / SIGINT like POST /shutdown: new work gets 503,
the running job may finish within the deadline and is then cancelled, the
model is freed, and ``serve`` returns 0. A second signal cancels the running
job at once (its stream still ends with an ``error`` event, retriable) and the
same orderly exit follows; only a third forces the exit.
"""

from __future__ import annotations

import dataclasses
import signal
import sys

import uvicorn

from orcd.server.app import begin_shutdown, create_app, hurry_shutdown
from orcd.server.protocol import HeaderWatch
from orcd.server.state import ServerConfig, ServerState


class WorkerServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.signals: list[int] = []
        self.hurried = False
        self.header_watch: HeaderWatch | None = None   # set by build_server

    def handle_exit(self, sig: int, frame) -> None:
        # Runs inside a signal handler: only record; the event loop acts on it in on_tick.
        # Not appended to uvicorn's _captured_signals, so nothing is re-raised afterwards.
        self.signals.append(sig)
        if len(self.signals) > 2:
            self.force_exit = self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.signals and self.state.shutdown_task is None:
            begin_shutdown(self.state, signal.Signals(self.signals[0]).name)
        if len(self.signals) == 2 and not self.hurried:
            self.hurried = True
            hurry_shutdown(self.state)
        return bool(await super().on_tick(counter))


def build_server(config: ServerConfig, host: str, port: int, **app_options) -> WorkerServer:
    config = dataclasses.replace(config, bind_host=host)
    app = create_app(config, **app_options)
    state: ServerState = app.state.orcd
    # requests in progress are limited by the gate; connections still sending headers here
    headers = HeaderWatch(config.header_timeout_s, config.max_connections, state.narrator)
    uv = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                        lifespan="on", timeout_graceful_shutdown=config.shutdown_deadline_s + 5,
                        http=headers.protocol())
    server = WorkerServer(uv, state)
    server.header_watch = headers
    state.request_exit = lambda: setattr(server, "should_exit", True)
    return server


def serve(config: ServerConfig, host: str, port: int, **app_options) -> int:
    """Serve until shut down; 1 if the model failed to load. ``app_options``: create_app's
    (``orcd serve`` passes its narrator and the load it started)."""
    # requests in progress, as many connections still sending headers, and some to spare
    _raise_open_file_limit(2 * config.max_connections + 256)
    server = build_server(config, host, port, **app_options)
    server.run()
    err = server.state.load_error
    if err is not None:
        message = getattr(err, "message", None) or f"{type(err).__name__}: {err}"
        code = getattr(err, "code", "MODEL_LOAD_FAILED")
        print(f"orcd serve: error [{code}]: {message}", file=sys.stderr)
        return 1
    return 0


def _raise_open_file_limit(want: int) -> None:
    """Every connection is a file descriptor: lift the soft limit (often 1024)
    toward the hard one so --max-connections, not EMFILE, is what refuses."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < want:
            top = want if hard == resource.RLIM_INFINITY else min(want, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
    except (ImportError, ValueError, OSError):   # not POSIX, or not allowed: keep the limit
        pass
