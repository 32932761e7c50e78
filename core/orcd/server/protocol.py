"""Connections that never finish their request headers (slowloris clients).

uvicorn closes idle keep-alive connections and the routes time out bodies
(``--body-timeout-sec``), but a connection that sends nothing, or its request
line and headers a byte at a time, is held forever: it is not yet a request,
so neither the gate's ``--max-connections`` nor any timeout sees it. Enough of
them use up the worker's file descriptors.

``HeaderWatch`` (one per server) bounds that state: the request line and
headers must arrive within ``header_timeout_s`` of the connection opening (or,
on a kept-alive connection, of the next request's first byte); at most
``limit`` connections may be waiting for theirs, a new one closing the one
that has waited longest (an honest client sends its headers at once, so it is
almost never the oldest). A dropped connection that had sent part of a request
gets a 408 in its API's shape and costs one ``client_dropped`` narration line;
one that sent nothing is closed silently, like an idle keep-alive connection.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from orcd.errors import InvalidRequest
from orcd.server.http import openai_error
from orcd.server.narration import Narrator

#: bytes of a partial request kept to name its path in the 408 and the narration
_HEAD_KEPT = 256


class HeaderTimeout(InvalidRequest):
    http_status = 408


class HeaderWatch:
    """The connections of one server that are waiting for request headers."""

    def __init__(self, timeout_s: float, limit: int, narrator: Narrator) -> None:
        self.timeout_s, self.limit, self.narrator = timeout_s, limit, narrator
        self.waiting: dict[WatchedH11Protocol, None] = {}   # oldest first (insertion order)

    def protocol(self) -> Any:
        """The protocol factory for ``uvicorn.Config(http=...)``."""
        return functools.partial(WatchedH11Protocol, watch=self)

    def start(self, conn: WatchedH11Protocol) -> None:
        while len(self.waiting) >= self.limit:
            oldest = next(iter(self.waiting))
            oldest.drop(f"more than {self.limit} connections were waiting to send their "
                        f"request headers (--max-connections); this one waited longest")
        self.waiting[conn] = None

    def stop(self, conn: WatchedH11Protocol) -> None:
        self.waiting.pop(conn, None)


class WatchedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the request line and headers."""

    def __init__(self, *args: Any, watch: HeaderWatch, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.watch = watch
        self.header_timer: asyncio.TimerHandle | None = None
        self.head = b""   # the start of the request still waiting for its headers

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:   # (part of) a request line and headers
            self._await_headers()
            if len(self.head) < _HEAD_KEPT:
                self.head += data[:_HEAD_KEPT - len(self.head)]
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:   # the headers are in: a request now
            self._headers_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_done()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        if self.header_timer is None:
            self.watch.start(self)
            self.header_timer = self.loop.call_later(
                self.watch.timeout_s, self.drop,
                f"the request headers did not arrive within {self.watch.timeout_s:g} s")

    def _headers_done(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        self.watch.stop(self)
        self.head = b""

    def drop(self, reason: str) -> None:
        """Close a connection still waiting for its headers: a 408 and one narration
        line if it sent part of a request, nothing if it sent nothing."""
        head = self.head
        self._headers_done()
        if self.transport.is_closing():
            return
        if head:
            path = _path(head)
            err = HeaderTimeout(reason)
            body = json.dumps(openai_error(err) if path.startswith("/v1")
                              else err.to_dict()).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\n"
                                 b"content-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                                 % (len(body), body))
            self.watch.narrator.event("client_dropped", path=path or None, reason=reason)
        self.transport.close()


def _path(head: bytes) -> str:
    """The path of a partial request line (``POST /v1/chat/com``…), or ""."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) < 2 or not parts[1].startswith(b"/"):
        return ""
    return parts[1].split(b"?", 1)[0].decode("latin-1")
