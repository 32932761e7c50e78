"""HTTP plumbing shared by the orcd and OpenAI routes: bounded body reads and
error bodies in each API's own shape."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from orcd.errors import InvalidRequest, OrcdError, Unauthorized, Unavailable

_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                 409: "invalid_request_error", 413: "invalid_request_error",
                 503: "unavailable_error", 504: "timeout_error"}


class BodyTooLarge(InvalidRequest):
    http_status = 413


def openai_error(err: OrcdError) -> dict[str, Any]:
    return {"error": {"message": err.message,
                      "type": _OPENAI_TYPES.get(err.http_status, "server_error"),
                      "param": err.field, "code": err.code}}


def error_response(err: OrcdError, path: str) -> JSONResponse:
    """``{code, message, retriable, field}`` for the orcd API, OpenAI's
    ``{"error": {...}}`` under /v1."""
    headers = None
    if isinstance(err, Unavailable):
        headers = {"Retry-After": "1"}
    elif isinstance(err, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    body = openai_error(err) if path.startswith("/v1") else err.to_dict()
    return JSONResponse(body, status_code=err.http_status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes, whether
    announced by Content-Length or streamed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
