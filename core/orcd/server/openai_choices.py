"""OpenAI's ``n``: a request's choices, each its own job, batched together by
the scheduler and merged back into one response or one stream.

Choice i is the request's job with seed + i (mod 2**64), so the choices differ
but the whole response is reproducible from its seed, and choice i is what a
single request with seed + i gives. Each has its own grammar state and its own
job id (the response's id, then ``-i`` when n > 1). One choice failing, or the
client hanging up, cancels them all: the response is one answer or one error.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import replace
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import Request

from orcd.errors import Cancelled
from orcd.server.schemas import UINT64_MAX
from orcd.server.state import JobStream, Planned, ServerState


def jobs_for(one: Planned, n: int, constraint: Callable[[], Any]) -> list[Planned]:
    """``n`` jobs for the choices of ``one`` (whose job id is the response's id).
    ``constraint`` makes a fresh grammar (a matcher holds one generation's state)."""
    if n == 1:   # the job id stays the response id, which /cancel takes
        return [replace(one, constraint=constraint())]
    return [replace(one, job_id=f"{one.job_id}-{i}", constraint=constraint(),
                    sampling=replace(one.sampling, seed=(one.sampling.seed + i) % (UINT64_MAX + 1)))
            for i in range(n)]


def usage(results: Sequence[Any]) -> dict[str, int]:
    """The prompt counted once (every choice has the same), completions summed."""
    prompt, completion = results[0].prompt_tokens, sum(r.tokens_out for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class Choices:
    """The queued jobs of one request's choices, in index order."""

    def __init__(self, streams: list[JobStream]) -> None:
        self.streams = streams

    @classmethod
    def submit(cls, state: ServerState, jobs: list[Planned]) -> Choices:
        """Queue every job, or none: a refusal (queue full, shutting down) cancels
        the ones already queued before it is raised."""
        streams: list[JobStream] = []
        try:
            for p in jobs:
                streams.append(state.submit(p))
        except Exception:
            cls(streams).cancel()
            raise
        return cls(streams)

    def __len__(self) -> int:
        return len(self.streams)

    def cancel(self) -> None:
        for s in self.streams:
            s.cancel()

    async def events(self) -> AsyncIterator[tuple[int, str, Any]]:
        """(choice index, kind, payload) of every job as they come, until each has
        ended. Leaving early (an error, a disconnect) cancels every job."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: JobStream) -> None:
            kind = None
            async for kind, payload in stream.events():
                merged.put_nowait((i, kind, payload))
            if kind not in ("end", "error"):
                # cancelled on this side (a hang-up): JobStream.events() then stops at the
                # next event, maybe a token still on its way, not the job's own last one;
                # each choice must still end, or the request waits forever
                merged.put_nowait((i, "error", Cancelled("the request was cancelled")))

        pumps = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        running = len(self.streams)
        try:
            while running:
                i, kind, payload = await merged.get()
                if kind in ("end", "error"):
                    running -= 1
                yield i, kind, payload
        finally:
            self.cancel()
            for p in pumps:
                p.cancel()

    async def collect(self, request: Request, on_token: Callable[[int, Any], None]) -> list[Any]:
        """A non-streamed response's jobs: ``on_token(i, event)`` for each token,
        then every choice's GenerateResult. A choice's error is raised (the others
        cancelled); the client hanging up cancels them all."""
        async def hung_up() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.cancel()

        watcher = asyncio.ensure_future(hung_up())
        results: list[Any] = [None] * len(self)
        try:
            async with aclosing(self.events()) as events:
                async for i, kind, payload in events:
                    if kind == "token":
                        on_token(i, payload)
                    elif kind == "end":
                        results[i] = payload
                    elif kind == "error":
                        raise payload
        finally:
            watcher.cancel()
        return results
