"""The single inference thread and its bounded FIFO.

One thread runs the model. With a scheduler (orcd.scheduler, ``--max-batch``
N > 1) it admits queued jobs oldest first while one of the N slots and the KV
blocks for the job's prompt + max_tokens are free, and steps them together;
without one (``--max-batch 1``) it runs one job at a time through
``Engine.generate``, as before batching. The asyncio side submits ``Job``s and
receives events through each job's ``sink`` (called on the inference thread;
the sink hands them to the event loop thread-safely). Cancellation is a
per-job ``threading.Event`` polled between tokens (between steps).

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
from orcd.errors import (Cancelled, DuplicateJob, InferenceTimeout, OrcdError, Unavailable,
                         as_orcd_error, device_lost)
from orcd.sampling import SamplingParams

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
    checked: bool = False            # passed Engine.check already (ServerState.plan)

    @property
    def n_positions(self) -> int:
        """KV positions it may need: prompt + max_tokens."""
        return len(self.prompt_ids) + self.max_tokens

    def request(self) -> GenerateRequest:
        # the deadline starts when the job starts running, not while it waits
        return GenerateRequest(self.prompt_ids, self.max_tokens, self.sampling, self.stop,
                               cancelled=self.cancel_flag.is_set,
                               deadline=time.monotonic() + self.timeout_s,
                               constraint=self.constraint, checked=self.checked)


def outcome_of(err: OrcdError | None) -> str:
    if err is None:
        return "completed"
    if isinstance(err, Cancelled):
        return "cancelled"
    if isinstance(err, InferenceTimeout):
        return "timeout"
    return "error"


class InferenceThread:
    """Owns the engine. ``scheduler``: run up to its ``max_batch`` jobs together
    (None: one at a time). ``queue_size``: how many jobs may wait beyond the
    running ones."""

    def __init__(self, engine, *, queue_size: int, metrics, narrator,
                 idle_task: Callable[[], None] | None = None, idle_interval: float = 30.0,
                 scheduler=None, on_device_lost: Callable[[OrcdError], None] | None = None) -> None:
        self.engine, self.queue_size, self.scheduler = engine, queue_size, scheduler
        #: the error that left the GPU context unusable (errors.device_lost), once one has
        self.lost: OrcdError | None = None
        self.on_device_lost = on_device_lost
        self.max_batch = scheduler.max_batch if scheduler is not None else 1
        self.metrics, self.narrator = metrics, narrator
        self.idle_task, self.idle_interval = idle_task, idle_interval
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}      # queued and running, by job_id
        self._running: dict[str, Job] = {}   # running, oldest first
        self._stopping = False
        self._last_idle = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="orcd-inference", daemon=True)

    # -- the asyncio side -----------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> int:
        """Queue ``job``; returns how many jobs are ahead of it. A job larger than
        the whole KV pool is refused here (VRAM_OOM), before it waits."""
        with self._cv:
            if self._stopping:
                raise Unavailable("the worker is shutting down")
            if self.lost is not None:
                raise Unavailable(f"the GPU failed ({self.lost.message}); this worker must be restarted")
            if job.job_id in self._jobs:
                raise DuplicateJob(f"job {job.job_id!r} is already running or queued",
                                   field="job_id")
            if len(self._jobs) >= self.max_batch + self.queue_size:
                self.metrics.requests.labels("rejected").inc()
                raise Unavailable(f"the queue is full ({self.queue_size} waiting)")
            if self.scheduler is not None:
                self.scheduler.check_fits(job.n_positions)
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
            if job_id in self._running:
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
        """The oldest running job."""
        return next(iter(list(self._running)), None)

    @property
    def running(self) -> int:
        return len(self._running)

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
                while not self._queue and not self._running and not self._stopping:
                    if self._warming() or not self._cv.wait(timeout=self.idle_interval):
                        break
                if self._stopping and not self._queue and not self._running:
                    break
                warm = self._warming() and not self._queue and not self._running
            if self.scheduler is None:
                self._run_next()
            elif warm:
                self._warm_next()
            else:
                self._step()
        if self.scheduler is not None:
            self.scheduler.close()

    def _warming(self) -> bool:
        return self.scheduler is not None and self.scheduler.warming

    def _warm_next(self) -> None:
        # start-up captures, one per turn while no job runs: a job that arrives waits
        # for one capture at most
        try:
            self.scheduler.warm_next()
        except Exception as e:  # the step it would have readied captures its graph itself
            self.narrator.event("error", where="warm_up", message=f"{type(e).__name__}: {e}")

    def _idle(self) -> None:
        self._last_idle = time.monotonic()
        if self.idle_task is None:
            return
        try:
            self.idle_task()
        except Exception as e:  # a failing check must not kill the inference thread
            self.narrator.event("error", where="idle_task", message=f"{type(e).__name__}: {e}")
            if device_lost(e):   # seen first by the memory or residency check
                self._device_lost(as_orcd_error(e))

    # one job at a time (--max-batch 1)
    def _run_next(self) -> None:
        with self._cv:
            job = self._queue.popleft() if self._queue else None
            if job is not None:
                self._running[job.job_id] = job
            self.metrics.queue_depth.set(len(self._queue))
        if job is not None:
            self._run(job)
            self._release(job)
        self._idle()

    def _run(self, job: Job) -> None:
        if job.cancel_flag.is_set():
            self._finish(job, job.cancel_as(_cancel_message(job.cancel_as)))
            return
        self._start(job)
        try:
            result = self.engine.generate(job.request(), self._token_sink(job, progress=True))
        except Exception as e:  # an engine bug becomes an INTERNAL error event, never a hang
            self._finish(job, self._error(job, e))
        else:
            self._finish(job, None, result)

    # continuous batching
    def _step(self) -> None:
        self._admit()
        t0 = time.perf_counter()
        try:
            ended = self.scheduler.step()
        except Exception as e:  # a fault in the scheduler itself: end its jobs, keep serving
            ended = self.scheduler.abort(as_orcd_error(e, "scheduling"))
        for seq in ended:
            job = seq.tag
            self._finish(job, None if seq.error is None else self._error(job, seq.error),
                         seq.result)
            self._release(job)
        s = self.scheduler
        self.metrics.step(s.batch_size, s.blocks.n_used, s.blocks.n_blocks, time.perf_counter() - t0)
        if (ended and not self._running) or time.monotonic() - self._last_idle >= self.idle_interval:
            self._idle()

    def _admit(self) -> None:
        """Hand the scheduler each queued job, oldest first, while it can start at
        once: a job that must wait for KV blocks waits here, still cancellable as
        queued, and holds the ones behind it back."""
        admitted = []
        with self._cv:
            while self._queue and self.scheduler.can_start(self._queue[0].n_positions):
                job = self._queue.popleft()
                self._running[job.job_id] = job
                try:
                    self.scheduler.add(job.request(), self._token_sink(job), tag=job)
                    admitted.append((job, None))
                except Exception as e:  # checked when planned and submitted: a bug
                    admitted.append((job, as_orcd_error(e)))
            self.metrics.queue_depth.set(len(self._queue))
        for job, err in admitted:
            self._start(job)
            if err is not None:
                self._finish(job, err)
                self._release(job)

    # -- one job's events -----------------------------------------------------
    def _start(self, job: Job) -> None:
        self.narrator.event("execute_start", job_id=job.job_id, prompt=job.prompt_text,
                            prompt_tokens=len(job.prompt_ids), max_tokens=job.max_tokens,
                            seed=job.sampling.seed)
        job.started = time.monotonic()
        self.metrics.job_started(job.arrived, job.started)
        job.sink("started", {"started_at": datetime.now(timezone.utc).isoformat()})

    def _token_sink(self, job: Job, progress: bool = False) -> Callable[[TokenEvent], None]:
        """``on_token`` for ``job``: the inter-token histogram, then the sink.
        ``progress``: also the KV usage of a job alone in its own cache."""
        last = [0.0]
        n_ctx = getattr(getattr(self.engine, "lm", None), "n_ctx", 0)

        def on_token(ev: TokenEvent) -> None:
            now = time.perf_counter()
            if last[0]:
                self.metrics.inter_token.observe(now - last[0])
            last[0] = now
            if progress:
                self.metrics.job_progress(len(job.prompt_ids) + ev.index + 1, n_ctx)
            job.sink("token", ev)
        return on_token

    def _error(self, job: Job, e: BaseException) -> OrcdError:
        if isinstance(e, Cancelled):   # as the canceller said: plain, or shutdown (retriable)
            return job.cancel_as(_cancel_message(job.cancel_as))
        err = as_orcd_error(e)
        if device_lost(err):
            self._device_lost(err)
        return err

    def _device_lost(self, err: OrcdError) -> None:
        """A kernel faulted and the context is gone: every job on it fails, none may
        start again; the job's error is retriable (another worker can run it), and the
        app marks the worker unhealthy so that a supervisor restarts it."""
        err.retriable = True
        if self.lost is not None:
            return
        self.lost = err
        self.narrator.event("device_lost", code=err.code, message=err.message)
        if self.on_device_lost is not None:
            self.on_device_lost(err)

    def _release(self, job: Job) -> None:
        with self._cv:
            self._running.pop(job.job_id, None)
            self._jobs.pop(job.job_id, None)
            self._cv.notify_all()

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
