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
from orcd.server.jobstream import Inbox, JobStream
from orcd.server.schemas import UINT64_MAX
from orcd.server.state import Planned, ServerState


def jobs_for(one: Planned, n: int, constraint: Callable[[], Any]) -> list[Planned]:
    """``n`` jobs for the choices of ``one`` (whose job id is the response's id).
    ``constraint`` makes a fresh grammar (a matcher holds one generation's state)."""
    if n == 1:   # the job id stays the response id, which /cancel takes
        return [replace(one, constraint=constraint())]
    return [replace(one, job_id=f"{one.job_id}-{i}", constraint=constraint(),
                    sampling=replace(one.sampling, seed=(one.sampling.seed + i) % (UINT64_MAX + 1)))
            for i in range(n)]


def usage(results: Sequence[Any], per_prompt: int | None = None) -> dict[str, int]:
    """Each prompt counted once (its ``per_prompt`` choices, all of them by default, share
    it: choice i is of prompt i // per_prompt), completions summed."""
    step = per_prompt or len(results)
    prompt = sum(r.prompt_tokens for r in results[::step])
    completion = sum(r.tokens_out for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class Choices:
    """The queued jobs of one request's choices, in index order."""

    def __init__(self, streams: list[JobStream]) -> None:
        self.streams = streams
        self.index = {s: i for i, s in enumerate(streams)}
        self.running = len(streams)   # choices not yet ended
        self.inbox: Inbox | None = streams[0].inbox if streams else None
        if len(streams) > 1:
            # one inbox for all: one waiter, events merged in the order they came
            # (a choice's own order kept); any already delivered move over first
            self.inbox = Inbox(streams[0].loop)
            for s in streams:
                self.inbox.items.extend(s.inbox.items)
                s.inbox.items.clear()
                s.inbox = self.inbox

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
        if self.inbox is not None:
            self.inbox.close()

    async def take(self, timeout: float | None = None) -> list[tuple[int, str, Any]] | None:
        """Every (choice index, kind, payload) buffered now, in arrival order,
        waiting for one first: [] once each choice has ended, None if ``timeout``
        passed without an event. One wait per wakeup of the loop, however many
        events it brought: no Task, queue or pump per event or per choice."""
        inbox = self.inbox
        while self.running:
            if not inbox.items and not await inbox.wait(timeout):
                return None
            out = []
            items = inbox.items
            while items:
                stream, kind, payload = items.popleft()
                if not stream.accept(kind):
                    continue
                i = self.index[stream]
                out.append((i, kind, payload))
                if stream.ended:
                    self.running -= 1
                    if not stream.completed:
                        # cancelled on this side (a hang-up): the stream stopped at the
                        # next event, maybe a token still on its way, not the job's own
                        # last one; each choice must still end, or the request waits forever
                        out.append((i, "error", Cancelled("the request was cancelled")))
            if out:
                return out
        return []

    async def events(self) -> AsyncIterator[tuple[int, str, Any]]:
        """(choice index, kind, payload) of every job as they come, until each has
        ended. Leaving early (an error, a disconnect) cancels every job."""
        try:
            while batch := await self.take():
                for item in batch:
                    yield item
        finally:
            self.cancel()

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
