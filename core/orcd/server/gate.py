"""The gate every request passes before a route sees it (pure ASGI middleware:
it must not buffer SSE).

In order: the Host header (a worker bound to loopback answers only to loopback
names, so a DNS-rebinding page cannot reach it), then for everything but
/health the number of requests in progress (``max_connections``), the web
origin of state-changing requests (a browser page from another origin is
refused: it could otherwise POST /shutdown with a "simple" request), the JSON
content type of any request with a body, the bearer token, and the loading
gate.
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit

from orcd.errors import OrcdError, Unauthorized, Unavailable
from orcd.server.http import Forbidden, UnsupportedMediaType, error_response
from orcd.server.state import ServerState

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """Whether a bind address or Host name is this machine only."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    """``name:port`` / ``[v6]:port`` → the name."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    return host_header.rpartition(":")[0] if host_header.count(":") == 1 else host_header


class Gate:
    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state
        self.in_flight = 0
        # bound to loopback: only loopback Host names (anything else is a rebinding page)
        self.check_host = is_loopback(state.config.bind_host)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers, path = dict(scope["headers"]), scope["path"]
        err = self._refuse_host(headers)
        limit = self.state.config.max_connections
        if err is None and path != "/health":
            if self.in_flight >= limit:   # /health still answers in a flood
                err = Unavailable(f"too many requests in progress ({limit}, --max-connections); "
                                  f"try again")
                self.state.narrator.event("client_refused", path=path, reason="max_connections")
            else:
                err = self._refuse(scope, headers)
        if isinstance(err, Forbidden):
            self.state.narrator.event("client_refused", path=path, reason=err.field.lower())
        if err is not None:
            return await error_response(err, path)(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _refuse_host(self, headers: dict) -> OrcdError | None:
        if not self.check_host:
            return None
        host = headers.get(b"host", b"").decode("latin-1")
        if host and not is_loopback(_host_name(host)):
            return Forbidden(f"this worker is bound to loopback and does not answer to "
                             f"the host name {host!r}", field="Host")
        return None

    def _refuse(self, scope, headers: dict) -> OrcdError | None:
        cfg = self.state.config
        if scope["method"] not in _SAFE_METHODS:
            err = _refuse_origin(headers) or _refuse_media_type(headers)
            if err is not None:
                return err
        if cfg.api_key:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                       cfg.api_key.encode()):
                return Unauthorized("missing or wrong bearer token")
        if self.state.status == "loading":   # SIGTERM still stops a loading worker
            return Unavailable("the model is loading")
        return None


def _refuse_origin(headers: dict) -> OrcdError | None:
    """A browser names the page's origin on every cross-origin POST; only the
    worker's own origin (same host and port) may change state."""
    origin = headers.get(b"origin")
    if origin is None:
        return None
    origin_s = origin.decode("latin-1").strip()
    host = headers.get(b"host", b"").decode("latin-1").lower()
    try:
        netloc = urlsplit(origin_s).netloc.lower()
    except ValueError:
        netloc = ""
    if origin_s == "null" or not netloc or netloc != host:
        return Forbidden(f"requests from the web origin {origin_s!r} are refused "
                         f"(cross-origin browser requests cannot drive this worker)",
                         field="Origin")
    return None


def _refuse_media_type(headers: dict) -> OrcdError | None:
    """A body must be declared JSON: browsers send form and text bodies across
    origins without asking, but not JSON."""
    length = headers.get(b"content-length")
    if length in (None, b"0") and b"transfer-encoding" not in headers:
        return None   # no body (POST /shutdown)
    media = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
    if media != "application/json":
        return UnsupportedMediaType(
            f"the body must be JSON sent with 'Content-Type: application/json' "
            f"(got {media or 'none'}; with curl use --json or -H 'Content-Type: "
            f"application/json')", field="Content-Type")
    return None
