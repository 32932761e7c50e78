"""The single inference thread and its bounded FIFO.

The engine is blocking and serves one request at a time (batch 1), so exactly
one thread runs it. The asyncio side submits ``Job``s and receives events
through each job's ``sink`` (called on the inference thread; the sink hands
them to the event loop thread-safely). Cancellation is a per-job
``threading.Event`` the engine polls between tokens.

Events a sink receives, in order: ``("started", {"started_at": iso})``, then
``("token", TokenEvent)`` …, then exactly one of ``("end", GenerateResult)`` or
``("error", OrcdError)``. A job cancelled while queued gets only the error.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from orcd.engine import GenerateRequest, GenerateResult, TokenEvent
from orcd.errors import (Cancelled, DuplicateJob, InferenceTimeout, InternalError, OrcdError,
                         Unavailable)
from orcd.ops.sampling import SamplingParams

Sink = Callable[[str, Any], None]


class ShutdownCancelled(Cancelled):
    """Cancelled because the worker is shutting down: another worker can run it."""
    retriable = True


@dataclass
class Job:
    job_id: str
    prompt_ids: Sequence[int]
    max_tokens: int
    sampling: SamplingParams
    sink: Sink
    stop: Sequence[str] = ()
    timeout_s: float = 300.0
    prompt_text: str | None = None   # only for narration with --log-prompts
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    cancel_as: type[Cancelled] = Cancelled   # the error a cancelled job ends with
    constraint: Any = None           # engine.TokenConstraint (a grammar), or None
    arrived: float = field(default_factory=time.monotonic)   # for queue time and TTFT
    started: float | None = None     # when the inference thread took it

    def request(self) -> GenerateRequest:
        # the deadline starts when the job starts running, not while it waits
        return GenerateRequest(self.prompt_ids, self.max_tokens, self.sampling, self.stop,
                               cancelled=self.cancel_flag.is_set,
                               deadline=time.monotonic() + self.timeout_s,
                               constraint=self.constraint)


def outcome_of(err: OrcdError | None) -> str:
    if err is None:
        return "completed"
    if isinstance(err, Cancelled):
        return "cancelled"
    if isinstance(err, InferenceTimeout):
        return "timeout"
    return "error"


class Worker:
    """Owns the engine. ``queue_size`` is how many jobs may wait behind the
    running one."""

    def __init__(self, engine, *, queue_size: int, metrics, narrator,
                 idle_task: Callable[[], None] | None = None, idle_interval: float = 30.0) -> None:
        self.engine, self.queue_size = engine, queue_size
        self.metrics, self.narrator = metrics, narrator
        self.idle_task, self.idle_interval = idle_task, idle_interval
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}      # queued and running, by job_id
        self._running: Job | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="orcd-inference", daemon=True)

    # -- the asyncio side -----------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> int:
        """Queue ``job``; returns how many jobs are ahead of it."""
        with self._cv:
            if self._stopping:
                raise Unavailable("the worker is shutting down")
            if job.job_id in self._jobs:
                raise DuplicateJob(f"job {job.job_id!r} is already running or queued",
                                   field="job_id")
            if len(self._jobs) > self.queue_size:
                self.metrics.requests.labels("rejected").inc()
                raise Unavailable(f"the queue is full ({self.queue_size} waiting)")
            ahead = len(self._jobs)
            self._jobs[job.job_id] = job
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cv.notify_all()
            return ahead

    def cancel(self, job_id: str, why: type[Cancelled] = Cancelled) -> str:
        """Cancel a queued or running job: "cancelled" (was queued, now gone),
        "cancelling" (running; it stops at the next token) or "unknown". The job
        ends with a ``why`` error (ShutdownCancelled: retriable)."""
        with self._cv:
            job = self._jobs.get(job_id)
            if job is None:
                return "unknown"
            if not job.cancel_flag.is_set():
                job.cancel_as = why
            job.cancel_flag.set()
            if job is self._running:
                return "cancelling"
            self._queue.remove(job)
            del self._jobs[job_id]
            self.metrics.queue_depth.set(len(self._queue))
            self._cv.notify_all()
        self._finish(job, job.cancel_as(_cancel_message(job.cancel_as, "while queued")))
        return "cancelled"

    def cancel_queued(self, why: type[Cancelled] = Cancelled) -> None:
        with self._cv:
            ids = [job.job_id for job in self._queue]
        for job_id in ids:
            self.cancel(job_id, why)

    def cancel_all(self, why: type[Cancelled] = Cancelled) -> None:
        with self._cv:
            ids = list(self._jobs)
        for job_id in ids:
            self.cancel(job_id, why)

    @property
    def running_job_id(self) -> str | None:
        job = self._running
        return job.job_id if job else None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def wait_idle(self, timeout: float) -> bool:
        """Block until no job is queued or running; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._jobs, timeout=timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything, then end the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self.cancel_all(ShutdownCancelled)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the inference thread -------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    if not self._cv.wait(timeout=self.idle_interval):
                        break
                if self._stopping and not self._queue:
                    return
                job = self._queue.popleft() if self._queue else None
                self._running = job
                self.metrics.queue_depth.set(len(self._queue))
            if job is not None:
                self._run(job)
                with self._cv:
                    self._running = None
                    self._jobs.pop(job.job_id, None)
                    self._cv.notify_all()
            self._idle()

    def _idle(self) -> None:
        if self.idle_task is None:
            return
        try:
            self.idle_task()
        except Exception as e:  # a failing check must not kill the inference thread
            self.narrator.event("error", where="idle_task", message=f"{type(e).__name__}: {e}")

    def _run(self, job: Job) -> None:
        if job.cancel_flag.is_set():
            self._finish(job, job.cancel_as(_cancel_message(job.cancel_as)))
            return
        self.narrator.event("execute_start", job_id=job.job_id, prompt=job.prompt_text,
                            prompt_tokens=len(job.prompt_ids), max_tokens=job.max_tokens,
                            seed=job.sampling.seed)
        job.started = time.monotonic()
        self.metrics.job_started(job.arrived, job.started)
        job.sink("started", {"started_at": datetime.now(timezone.utc).isoformat()})
        last = [0.0]
        n_ctx = getattr(getattr(self.engine, "lm", None), "n_ctx", 0)

        def on_token(ev: TokenEvent) -> None:
            now = time.perf_counter()
            if last[0]:
                self.metrics.inter_token.observe(now - last[0])
            last[0] = now
            self.metrics.job_progress(len(job.prompt_ids) + ev.index + 1, n_ctx)
            job.sink("token", ev)

        try:
            result = self.engine.generate(job.request(), on_token)
        except Cancelled:
            self._finish(job, job.cancel_as(_cancel_message(job.cancel_as)))
        except OrcdError as e:
            self._finish(job, e)
        except Exception as e:  # an engine bug becomes an INTERNAL error event, never a hang
            self._finish(job, InternalError(f"inference failed: {type(e).__name__}: {e}"))
        else:
            self._finish(job, None, result)

    def _finish(self, job: Job, err: OrcdError | None, result: GenerateResult | None = None) -> None:
        outcome = outcome_of(err)
        self.metrics.requests.labels(outcome).inc()
        self.metrics.job_done(job.arrived, job.started, result)
        if result is not None:
            self.narrator.event("execute_end", job_id=job.job_id, outcome=outcome,
                                tokens_out=result.tokens_out, stop_reason=result.stop_reason,
                                ttft_ms=round(result.ttft_ms, 1),
                                decode_time_ms=round(result.decode_time_ms, 1))
            job.sink("end", result)
        else:
            self.narrator.event("execute_end", job_id=job.job_id, outcome=outcome)
            if outcome == "error":
                self.narrator.event("error", job_id=job.job_id, **err.to_dict())
            job.sink("error", err)


def _cancel_message(why: type[Cancelled], when: str = "") -> str:
    what = ("the worker is shutting down; the request was cancelled"
            if issubclass(why, ShutdownCancelled) else "the request was cancelled")
    return f"{what} {when}".rstrip()
