"""HTTP plumbing shared by the orcd and OpenAI routes: bounded body reads and
error bodies in each API's own shape.

Every error a client can cause is a 4xx in its API's shape: ``{code, message,
retriable, field}`` for the orcd routes, OpenAI's ``{"error": {...}}`` under
/v1. Status codes beyond the stable error codes (404, 405, 408, 413, 415) keep
``INVALID_REQUEST`` as their code; only a refused browser request has its own
(``FORBIDDEN``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from orcd.errors import InvalidRequest, OrcdError, Unauthorized, Unavailable

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                 403: "permission_error", 404: "invalid_request_error",
                 405: "invalid_request_error", 408: "invalid_request_error",
                 409: "invalid_request_error", 413: "invalid_request_error",
                 415: "invalid_request_error", 503: "unavailable_error", 504: "timeout_error"}


class BodyTooLarge(InvalidRequest):
    http_status = 413


class BodyTimeout(InvalidRequest):
    """The client did not send the whole body in time (a slow or stalled client)."""
    http_status = 408


class ClientGone(InvalidRequest):
    """The client hung up before sending the whole body; nobody reads the answer."""


class UnsupportedMediaType(InvalidRequest):
    http_status = 415


class NotFound(InvalidRequest):
    http_status = 404


class MethodNotAllowed(InvalidRequest):
    http_status = 405


class Forbidden(OrcdError):
    """A browser request from another web origin, or for a host name this worker
    does not answer to (DNS rebinding)."""
    code = "FORBIDDEN"
    http_status = 403


#: errors after which the connection is closed rather than kept alive
_CLOSE = (BodyTooLarge, BodyTimeout, ClientGone, Unavailable)


def openai_error(err: OrcdError) -> dict[str, Any]:
    return {"error": {"message": err.message,
                      "type": _OPENAI_TYPES.get(err.http_status, "server_error"),
                      "param": err.field, "code": err.code}}


def error_response(err: OrcdError, path: str, *, close: bool = False) -> JSONResponse:
    """``{code, message, retriable, field}`` for the orcd API, OpenAI's
    ``{"error": {...}}`` under /v1."""
    headers: dict[str, str] = {}
    if isinstance(err, Unavailable):
        headers["Retry-After"] = "1"
    elif isinstance(err, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    if close or isinstance(err, _CLOSE):   # an unread body or a flood: free the connection
        headers["Connection"] = "close"
    body = openai_error(err) if path.startswith("/v1") else err.to_dict()
    return JSONResponse(body, status_code=err.http_status, headers=headers or None)


#: an oversized body up to this size is read and thrown away before the 413 goes
#: out: closing a socket with unread bytes in it resets the connection, and the
#: client then sees a broken pipe instead of the refusal (a lingering close)
DRAIN_LIMIT = 64 << 20


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes, whether
    announced by Content-Length or streamed, and (408) a body that takes longer
    than ``timeout_s`` to arrive. A client that hangs up mid-body is ClientGone."""
    declared = request.headers.get("content-length", "")
    announced = int(declared) if declared.isdigit() else None   # Content-Length, when sent
    too_large = BodyTooLarge(f"the request body is larger than {limit} bytes")

    async def receive() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > DRAIN_LIMIT:
                break
            if size <= limit:
                chunks.append(chunk)
        if size > limit:
            raise too_large
        return b"".join(chunks)

    if announced is not None and announced > DRAIN_LIMIT:
        raise too_large
    try:
        return await asyncio.wait_for(receive(), timeout_s)
    except asyncio.TimeoutError:
        if announced is not None and announced > limit:
            raise too_large from None
        raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
    except ClientDisconnect:
        raise ClientGone("the client disconnected before sending the whole body") from None
