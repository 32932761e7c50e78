"""Server-sent events with client-disconnect detection.

Starlette's StreamingResponse notices a disconnect only on some ASGI servers
and only when it next writes; an SSE stream that waits in a queue or in a long
prefill must notice at once, so the job is cancelled. This response runs the
event stream and a disconnect listener side by side and calls ``on_disconnect``
when the client goes away first.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send


#: json.dumps(..., ensure_ascii=False, separators=(",", ":")), the same text, without
#: building an encoder for every frame (it is stateless, so one serves every stream)
JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def sse_event(event: str | None, data: Any) -> bytes:
    """One SSE frame. ``data`` is JSON-encoded unless it is already a string."""
    payload = data if isinstance(data, str) else JSON.encode(data)
    if event:
        return f"event: {event}\ndata: {payload}\n\n".encode()
    return f"data: {payload}\n\n".encode()


class SSEResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[bytes], on_disconnect: Callable[[], None]) -> None:
        super().__init__(status_code=200, media_type=self.media_type,
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        # a stream has no length: drop the Content-Length: 0 Response adds for no body
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.frames, self.on_disconnect = frames, on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        pump = asyncio.ensure_future(self._pump(send))
        listen = asyncio.ensure_future(self._wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({pump, listen}, return_when=asyncio.FIRST_COMPLETED)
            if listen in done and pump not in done:
                self.on_disconnect()
                pump.cancel()
            else:
                listen.cancel()
            await asyncio.gather(pump, listen, return_exceptions=True)
            if pump.done() and not pump.cancelled() and pump.exception() is not None:
                raise pump.exception()
        finally:
            for t in (pump, listen):
                t.cancel()
            aclose = getattr(self.frames, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _pump(self, send: Send) -> None:
        async for frame in self.frames:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _wait_disconnect(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
