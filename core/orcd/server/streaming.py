"""SSE keep-alive: a comment frame whenever a stream has been quiet for a
while (queued behind another job, or in a long prefill), so proxies and load
balancers with idle timeouts keep the connection open. Clients ignore SSE
comments (the ``openai`` client among them)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, TypeVar

T = TypeVar("T")

KEEPALIVE_FRAME = b": keep-alive\n\n"


async def with_keepalive(events: AsyncIterator[T], interval_s: float) -> AsyncIterator[T | None]:
    """``events``, with None in between whenever ``interval_s`` passes without one."""
    it = events.__aiter__()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(it.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield None
                continue
            fut, pending = pending, None
            try:
                item = fut.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
