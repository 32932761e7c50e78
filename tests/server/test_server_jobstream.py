"""The path of a job's events from the inference thread to the SSE bytes:
a burst of events costs one loop wakeup, each stream keeps its order, a quiet
stream still gets its keep-alive, leaving early still cancels the job, and a
batch of events joined into one write is the same bytes as frame by frame."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

from orcd.errors import Cancelled
from orcd.server.jobstream import Inbox, JobStream, Mailbox
from orcd.server.openai_api import _chat_chunks, _chunk, _Chunks, _completion_chunks
from orcd.server.openai_choices import Choices
from orcd.server.openai_format import ChatAnswer, OutputSplitter
from orcd.server.sse import sse_event
from orcd.server.streaming import KEEPALIVE_FRAME


class FakeWorker:
    def __init__(self):
        self.cancelled = []

    def cancel(self, job_id):
        self.cancelled.append(job_id)
        return "cancelling"


def run(coro, timeout=10):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def counting_wakeups(loop) -> list:
    calls = []
    real = loop.call_soon_threadsafe

    def call_soon_threadsafe(cb, *args, **kw):
        calls.append(cb)
        return real(cb, *args, **kw)
    loop.call_soon_threadsafe = call_soon_threadsafe
    return calls


def test_a_burst_of_events_wakes_the_loop_once():
    async def main():
        loop = asyncio.get_running_loop()
        wakeups = counting_wakeups(loop)
        mailbox, worker = Mailbox(loop), FakeWorker()
        streams = [JobStream(f"j{k}", loop, worker, mailbox) for k in range(16)]
        for step in range(10):       # the loop runs nothing in between: one burst
            for s in streams:
                s.sink("token", step)
        got = [[(k, p) for _, k, p in await Choices([s]).take()] for s in streams]
        return len(wakeups), got

    wakeups, got = run(main())
    assert wakeups == 1
    assert all(g == [("token", step) for step in range(10)] for g in got)


def test_events_from_the_inference_thread_cost_far_fewer_wakeups_in_order():
    n_streams, n_steps = 16, 200

    async def main():
        loop = asyncio.get_running_loop()
        wakeups = counting_wakeups(loop)
        mailbox, worker = Mailbox(loop), FakeWorker()
        streams = [JobStream(f"j{k}", loop, worker, mailbox) for k in range(n_streams)]

        def inference():   # as the scheduler: each step's tokens for every stream at once
            for step in range(n_steps):
                for s in streams:
                    s.sink("token", step)
                time.sleep(0.0005)
            for s in streams:
                s.sink("end", None)
        thread = threading.Thread(target=inference)
        thread.start()

        async def consume(s):
            seen = []
            async for _, kind, payload in Choices([s]).events():
                seen.append((kind, payload))
            return seen
        seen = await asyncio.gather(*(consume(s) for s in streams))
        thread.join()
        return len(wakeups), seen, worker.cancelled

    wakeups, seen, cancelled = run(main(), 30)
    events = n_streams * (n_steps + 1)
    assert wakeups <= events // 4, (wakeups, events)
    for s in seen:
        assert s == [("token", step) for step in range(n_steps)] + [("end", None)]
    assert cancelled == []   # every job ended on its own


def test_a_closed_loop_drops_events_quietly():
    loop = asyncio.new_event_loop()
    stream = JobStream("j", loop, FakeWorker(), Mailbox(loop))
    loop.close()
    stream.sink("token", 1)     # the inference thread after shutdown: no error
    stream.sink("token", 2)
    assert not stream.mailbox._pending


def test_a_quiet_stream_times_out_and_a_busy_one_does_not():
    async def main():
        loop = asyncio.get_running_loop()
        stream = JobStream("j", loop, FakeWorker())
        jobs = Choices([stream])
        t0 = time.monotonic()
        assert await jobs.take(0.05) is None                 # quiet: keep-alive due
        quiet = time.monotonic() - t0

        async def feed():
            for k in range(8):
                await asyncio.sleep(0.02)
                stream.sink("token", k)
        feeder = asyncio.ensure_future(feed())
        got = []
        while len(got) < 8:
            batch = await jobs.take(0.15)    # events come faster than the timeout
            assert batch is not None
            got += [p for _, _, p in batch]
        await feeder
        t0 = time.monotonic()
        assert await jobs.take(0.15) is None                 # quiet again
        later = time.monotonic() - t0
        t0 = time.monotonic()
        assert await jobs.take(0.03) is None                 # a shorter timeout is kept
        shorter = time.monotonic() - t0
        stream.sink("end", None)
        assert await jobs.take(0.15) == [(0, "end", None)]
        assert await jobs.take(0.15) == []                   # every choice ended
        jobs.cancel()
        return quiet, got, later, shorter

    quiet, got, later, shorter = run(main())
    assert 0.045 <= quiet < 1.0
    assert got == list(range(8))
    assert 0.14 <= later < 1.0
    assert 0.025 <= shorter < 0.12


def test_one_choice_runs_without_extra_tasks():
    async def main():
        loop = asyncio.get_running_loop()
        stream = JobStream("j", loop, FakeWorker())
        jobs = Choices([stream])
        for k in range(3):
            stream.sink("token", k)
        stream.sink("end", "done")
        seen, before, tasks = [], asyncio.all_tasks(), set()
        async for item in jobs.events():
            seen.append(item)
            tasks |= asyncio.all_tasks()
        return seen, tasks - before

    seen, extra = run(main())
    assert seen == [(0, "token", 0), (0, "token", 1), (0, "token", 2), (0, "end", "done")]
    assert not extra   # no pump, no Task per event


def test_choices_merge_in_arrival_order_and_keep_each_order():
    async def main():
        loop = asyncio.get_running_loop()
        mailbox = Mailbox(loop)
        streams = [JobStream(f"j-{i}", loop, FakeWorker(), mailbox) for i in range(3)]
        streams[2].sink("started", None)      # delivered before the merge: kept
        await asyncio.sleep(0)
        jobs = Choices(streams)
        for step in range(3):
            for i in (2, 0, 1):
                streams[i].sink("token", step)
        for s in streams:
            s.sink("end", None)
        return [item async for item in jobs.events()]

    seen = run(main())
    assert seen[0] == (2, "started", None)
    assert seen[1:4] == [(2, "token", 0), (0, "token", 0), (1, "token", 0)]
    for i in range(3):
        mine = [(k, p) for j, k, p in seen if j == i and k != "started"]
        assert mine == [("token", 0), ("token", 1), ("token", 2), ("end", None)]


def test_leaving_early_cancels_the_jobs():
    async def main():
        loop = asyncio.get_running_loop()
        worker = FakeWorker()
        one = JobStream("one", loop, worker)
        one.sink("token", 0)
        async for _ in Choices([one]).events():
            break                              # a client error, a disconnect
        await asyncio.sleep(0)                 # the generator's finally has run
        streams = [JobStream(f"n-{i}", loop, worker) for i in range(2)]
        jobs = Choices(streams)
        streams[0].sink("token", 0)
        events = jobs.events()
        await events.__anext__()
        await events.aclose()
        return worker.cancelled

    assert run(main()) == ["one", "n-0", "n-1"]


def test_a_stream_cancelled_while_waiting_ends_at_the_next_event():
    async def main():
        loop = asyncio.get_running_loop()
        worker = FakeWorker()
        stream = JobStream("j", loop, worker)
        jobs = Choices([stream])
        waiting = asyncio.ensure_future(jobs.take())
        await asyncio.sleep(0.01)
        jobs.cancel()                        # a hang-up while the consumer waits
        stream.sink("token", "late")
        stream.sink("token", "later")
        first = await waiting
        return first, await jobs.take(), worker.cancelled

    first, rest, cancelled = run(main())
    assert first[0] == (0, "token", "late")
    assert first[1][:2] == (0, "error") and isinstance(first[1][2], Cancelled)
    assert len(first) == 2 and rest == [] and cancelled == ["j"]


def test_a_stream_wait_can_be_cancelled():
    async def main():
        inbox = Inbox(asyncio.get_running_loop())
        task = asyncio.ensure_future(inbox.wait(5))
        await asyncio.sleep(0.01)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        inbox.close()
        return inbox._waiter, inbox._timer

    assert run(main()) == (None, None)


# -- the bytes -------------------------------------------------------------------------

META = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}


def test_a_chunk_encoded_with_the_shared_head_is_the_same_bytes():
    for meta in (META, {**META, "usage": None}):
        enc = _Chunks(meta)
        for choice in ({"index": 0, "text": "héllo \"wörld\"\n✓", "logprobs": None,
                        "finish_reason": None},
                       {"index": 3, "delta": {"content": "\u2028x"},
                        "logprobs": {"content": [{"token": "x", "logprob": -0.5}]},
                        "finish_reason": "stop"}):
            assert enc(choice) == _chunk(meta, choice)


def token(text):
    return SimpleNamespace(text=text, logprobs=None)


def result(reason="max_tokens", n=3):
    return SimpleNamespace(stop_reason=reason, prompt_tokens=5, tokens_out=n)


async def collect_bytes(gen) -> tuple[bytes, int]:
    pieces = [piece async for piece in gen]
    return b"".join(pieces), len(pieces)


def test_a_buffered_batch_is_one_write_with_the_frame_by_frame_bytes():
    async def main():
        loop = asyncio.get_running_loop()
        worker = FakeWorker()
        mailbox = Mailbox(loop)
        streams = [JobStream(f"c-{i}", loop, worker, mailbox) for i in range(2)]
        jobs = Choices(streams)
        meta = {**META, "usage": None}
        for i, s in enumerate(streams):
            s.sink("started", {"started_at": "t"})
            for t in ("a", "é", "c"):
                s.sink("token", token(f"{t}{i}"))
            s.sink("end", result())
        return await collect_bytes(_completion_chunks(jobs, meta, [None, None], ["", ""], 2, True, 5.0))

    body, writes = run(main())
    meta = {**META, "usage": None}
    want = []
    for i in range(2):
        for t in ("a", "é", "c"):
            want.append(_chunk(meta, {"index": i, "text": f"{t}{i}", "logprobs": None,
                                      "finish_reason": None}))
        want.append(_chunk(meta, {"index": i, "text": "", "logprobs": None,
                                  "finish_reason": "length"}))
    want.append(_chunk(meta, None, {"prompt_tokens": 5, "completion_tokens": 6,
                                    "total_tokens": 11}))
    want.append(sse_event(None, "[DONE]"))
    assert body == b"".join(want)
    assert writes == 3   # the whole burst, the usage chunk, [DONE]


def test_an_error_mid_batch_sends_what_came_before_it_then_the_error():
    async def main():
        loop = asyncio.get_running_loop()
        worker = FakeWorker()
        stream = JobStream("c", loop, worker)
        jobs = Choices([stream])
        meta = {**META, "object": "chat.completion.chunk"}
        stream.sink("token", token("hi"))
        stream.sink("error", Cancelled("the request was cancelled"))
        answers = [ChatAnswer(OutputSplitter(None), None)]
        return await collect_bytes(_chat_chunks(jobs, meta, answers, False, 5.0)), worker

    (body, _), worker = run(main())
    lines = [ln for ln in body.decode().split("\n\n") if ln]
    assert json.loads(lines[0][6:])["choices"][0]["delta"] == {"role": "assistant",
                                                              "content": ""}
    assert json.loads(lines[1][6:])["choices"][0]["delta"] == {"content": "hi"}
    assert "error" in json.loads(lines[2][6:])
    assert lines[3] == "data: [DONE]"
    assert worker.cancelled == []   # it had ended already


def test_keepalive_frames_interleave_with_a_slow_stream():
    async def main():
        loop = asyncio.get_running_loop()
        stream = JobStream("c", loop, FakeWorker())
        jobs = Choices([stream])

        async def later():
            await asyncio.sleep(0.12)
            stream.sink("token", token("x"))
            stream.sink("end", result(n=1))
        feeder = asyncio.ensure_future(later())
        pieces = [p async for p in _completion_chunks(jobs, META, [None], [""], 1, False, 0.05)]
        await feeder
        return pieces

    pieces = run(main())
    assert pieces[:2] == [KEEPALIVE_FRAME, KEEPALIVE_FRAME]
    assert pieces[-1] == b"data: [DONE]\n\n"
