"""A stream's events as SSE bytes, batch by batch.

Whatever events the loop finds waiting when a stream wakes (the tokens of one
scheduler step, or more if the loop fell behind) become one piece of bytes:
one ASGI send and one socket write, the bytes the same as frame by frame.

SSE keep-alive: a comment frame whenever a stream has been quiet for a
while (queued behind another job, or in a long prefill), so proxies and load
balancers with idle timeouts keep the connection open. Clients ignore SSE
comments (the ``openai`` client among them)."""

from __future__ import annotations

from typing import Any, AsyncIterator, Awaitable, Callable

KEEPALIVE_FRAME = b": keep-alive\n\n"


async def frame_batches(take: Callable[[], Awaitable[list | None]],
                        render: Callable[[Any, list[bytes]], None]) -> AsyncIterator[bytes]:
    """The frames of the events ``take()`` returns: a list of events (``[]``: the
    end), or None when a keep-alive interval passed without one (a comment frame
    then). ``render(event, out)`` appends an event's frames to ``out``. An error
    it raises goes on after the frames rendered before it were sent, as frame by
    frame."""
    while True:
        batch = await take()
        if batch is None:
            yield KEEPALIVE_FRAME
            continue
        if not batch:
            return
        out: list[bytes] = []
        try:
            for event in batch:
                render(event, out)
        except Exception:
            if out:
                yield b"".join(out)
            raise
        if out:
            yield out[0] if len(out) == 1 else b"".join(out)
