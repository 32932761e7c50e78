"""A job's events, from the inference thread to the event loop, at a low cost
per token.

The inference thread emits the tokens of one scheduler step for every running
stream at once. Waking the event loop once per event (a self-pipe write, a
callback, a queue, a Task per item) made the loop's cost per streamed token
large enough to compete with the inference thread for the GIL, so:

- ``Mailbox`` (one per event loop) collects events under a lock and wakes the
  loop only when its list was empty: one wakeup per step, not per token.
- ``Inbox`` buffers delivered events on the loop for one consumer, which waits
  on a single future (with a timer only while it waits, for keep-alives):
  no Task per event, and every event already there is taken in one go.
- ``JobStream`` is one job's end of this, read through
  ``openai_choices.Choices`` (every route's reader: one stream for /execute, a
  request's ``n`` choices sharing one inbox for the OpenAI routes).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

TERMINAL = ("end", "error")
#: a wait's timer may fire this early (the loop runs timers due within its clock's
#: resolution); only one due later than that is moved on
TIMER_SLACK_S = 0.001


class Mailbox:
    """Hands (stream, kind, payload) from any thread to ``loop``, in order, with
    one loop wakeup per burst. Owned per loop (ServerState), never global."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[JobStream, str, Any]] = []

    def post(self, stream: JobStream, kind: str, payload: Any) -> None:
        with self._lock:
            wake = not self._pending   # a flush is already on its way otherwise
            self._pending.append((stream, kind, payload))
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._flush)
            except RuntimeError:   # the loop is gone (shutdown): nobody is listening
                with self._lock:
                    self._pending.clear()

    def _flush(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
        for item in items:
            item[0].inbox.put(item)


class Inbox:
    """Events delivered on the loop, (stream, kind, payload), for one consumer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: deque[tuple[JobStream, str, Any]] = deque()
        self._waiter: asyncio.Future | None = None
        # the wait's timeout: one timer, moved on lazily when it fires early, instead
        # of a timer made and cancelled for every wait (every token)
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def put(self, item: tuple[JobStream, str, Any]) -> None:
        self.items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, timeout: float | None = None) -> bool:
        """Until an event is buffered (True), or ``timeout`` seconds pass first (False)."""
        if self.items:
            return True
        waiter = self._waiter = self.loop.create_future()
        self._deadline = None if timeout is None else self.loop.time() + timeout
        if self._deadline is not None and (self._timer is None
                                           or self._timer.when() > self._deadline):
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(self._deadline, self._expire)
        try:
            await waiter
        finally:
            if self._waiter is waiter:
                self._waiter = None
        return bool(self.items)

    def _expire(self) -> None:
        self._timer = None
        waiter, deadline = self._waiter, self._deadline
        if waiter is None or waiter.done() or deadline is None:
            return   # nobody waits with a timeout: the next such wait arms a timer
        if deadline - self.loop.time() > TIMER_SLACK_S:   # a later wait moved it
            self._timer = self.loop.call_at(deadline, self._expire)
            return
        self._waiter = None
        waiter.set_result(None)

    def close(self) -> None:
        """Drop the timer (the consumer is done)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class JobStream:
    """Carries one job's events from the inference thread to the event loop.

    ``finished``: the job's terminal event was taken, or it was cancelled here.
    A job cancelled here still hands out the next event that arrives (as the
    consumer waiting for it would see it) and then ends, maybe without its own
    terminal event: ``ended`` then, with ``completed`` False."""

    def __init__(self, job_id: str, loop: asyncio.AbstractEventLoop, inference: Any,
                 mailbox: Mailbox | None = None) -> None:
        self.job_id, self.loop, self.inference = job_id, loop, inference
        self.mailbox = mailbox if mailbox is not None else Mailbox(loop)
        self.inbox = Inbox(loop)   # openai_choices may point several streams at one
        self.finished = False
        self.ended = False        # nothing more is handed out
        self.completed = False    # it ended with the job's own end/error event

    def sink(self, kind: str, payload: Any) -> None:
        """The job's sink (inference.Job.sink): any thread."""
        self.mailbox.post(self, kind, payload)

    def accept(self, kind: str) -> bool:
        """Bookkeeping for an event taken from the inbox: whether it is handed out."""
        if self.ended:   # after the end: nobody reads it
            return False
        if kind in TERMINAL:
            self.finished = self.ended = self.completed = True
        elif self.finished:   # the one event after a cancel here
            self.ended = True
        return True

    def cancel(self) -> None:
        if not self.finished:
            self.finished = True
            self.inference.cancel(self.job_id)
