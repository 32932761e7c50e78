"""Connections that never finish their request headers (slowloris): closed after
--header-timeout-sec with a 408 and one narration line, at most
--max-connections of them at once (the oldest goes), /health answering all
the while (server/protocol.py)."""

from __future__ import annotations

import json
import logging
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from orcd.devkit.server_testing import running_server
from test_server import config
from test_server_hardening import LogRecords

TIMEOUT = 0.5


@pytest.fixture(scope="module")
def srv(tiny_model):
    cfg = config(tiny_model("qwen2-tiny"), header_timeout_s=TIMEOUT, body_timeout_s=5.0,
                 max_connections=8)
    with running_server(cfg) as s:
        yield s


def connect(url: str, data: bytes = b"") -> socket.socket:
    u = urlsplit(url)
    s = socket.create_connection((u.hostname, u.port))
    s.sendall(data)
    return s


def read_to_close(s: socket.socket, timeout: float = 10.0) -> tuple[bytes, float]:
    """Everything the worker sends until it closes the connection, and when it closed."""
    s.settimeout(timeout)
    reply = b""
    while chunk := s.recv(4096):
        reply += chunk
    s.close()
    return reply, time.monotonic()


def read_response(s: socket.socket) -> bytes:
    """One response on a kept-alive connection (its headers and Content-Length body)."""
    s.settimeout(5)
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += s.recv(4096)
    head, _, body = reply.partition(b"\r\n\r\n")
    length = int(head.lower().partition(b"content-length: ")[2].split(b"\r\n")[0])
    while len(body) < length:
        body += s.recv(4096)
    return head + b"\r\n\r\n" + body


def json_body(reply: bytes) -> dict:
    return json.loads(reply.partition(b"\r\n\r\n")[2])


PARTIAL = {"/execute": b"POST /execute HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty",
           "/v1/chat/completions": b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.",
           "/health": b"GET /health HTT"}


def test_unfinished_headers_are_closed_after_the_timeout_and_health_answers(srv):
    before = len(srv.narration.events())
    with LogRecords() as logs:
        t0 = time.monotonic()
        partial = {path: connect(srv.url, head) for path, head in PARTIAL.items()}
        silent = connect(srv.url)
        for _ in range(5):   # the loop is free: /health answers at once, again and again
            assert httpx.get(f"{srv.url}/health", timeout=TIMEOUT / 2).status_code == 200
        for path, s in partial.items():
            reply, closed = read_to_close(s)
            assert TIMEOUT <= closed - t0 < TIMEOUT + 3
            assert reply.startswith(b"HTTP/1.1 408 ") and b"connection: close" in reply
            body = json_body(reply)
            err = body["error"] if path.startswith("/v1") else body
            assert "headers did not arrive within 0.5 s" in err["message"]
        reply, closed = read_to_close(silent)
        assert reply == b"" and closed - t0 < TIMEOUT + 3    # nothing sent: closed silently
        time.sleep(0.2)
    new = srv.narration.events()[before:]
    assert sorted((e["event"], e["path"]) for e in new) == \
        sorted(("client_dropped", p) for p in PARTIAL)
    assert not [r for r in logs.records if r.levelno >= logging.WARNING]
    assert not srv.server.header_watch.waiting


def test_headers_trickled_in_time_are_served_and_bodies_keep_their_own_timeout(srv):
    s = connect(srv.url, b"GET /health HTTP/1.1\r\n")
    time.sleep(TIMEOUT / 2)
    s.sendall(b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert read_to_close(s)[0].startswith(b"HTTP/1.1 200 ")
    body = b'{"job_id": "x"}'
    s = connect(srv.url, b"POST /cancel HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % len(body))
    time.sleep(2 * TIMEOUT)   # waiting for the body: --body-timeout-sec (5 s) applies
    s.sendall(body)
    reply = read_to_close(s)[0]
    assert reply.startswith(b"HTTP/1.1 202 "), reply[:200]


def test_a_kept_alive_connection_has_the_timeout_for_its_next_headers(srv):
    s = connect(srv.url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert read_response(s).startswith(b"HTTP/1.1 200 ")
    t0 = time.monotonic()
    s.sendall(b"POST /cancel HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    reply, closed = read_to_close(s)
    assert reply.startswith(b"HTTP/1.1 408 ") and TIMEOUT <= closed - t0 < TIMEOUT + 3
    assert json_body(reply)["code"] == "INVALID_REQUEST"


def test_beyond_the_limit_the_oldest_waiting_connection_is_closed(tiny_model):
    cfg = config(tiny_model("qwen2-tiny"), header_timeout_s=60.0, max_connections=3)
    with running_server(cfg) as srv:
        held = [connect(srv.url, b"GET /health HTTP/1.1\r\nX-%d: " % i) for i in range(3)]
        time.sleep(0.2)
        newest = connect(srv.url, b"GET /heal")    # the fourth: the first is closed
        reply, _ = read_to_close(held[0], timeout=5)
        assert reply.startswith(b"HTTP/1.1 408 ")
        assert "waiting to send their request headers" in json_body(reply)["message"]
        srv.narration.wait_for(event="client_dropped", path="/health")
        for s in held[1:] + [newest]:   # the others still wait (60 s)
            s.settimeout(0.2)
            with pytest.raises(socket.timeout):
                s.recv(1)
        assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200
        for s in held[1:] + [newest]:
            s.close()
