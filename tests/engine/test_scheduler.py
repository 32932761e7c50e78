"""The continuous-batching scheduler on the numpy reference: each stream of a
batch gives exactly the tokens it gives alone; cancel, deadline, failures and
KV admission touch only the sequence concerned; blocks always come back."""

from __future__ import annotations

import time

import numpy as np
import pytest

from orcd.engine import Engine, GenerateRequest
from orcd.errors import Cancelled, InferenceTimeout, InternalError, VramOom
from orcd.kvcache import blocks_for
from orcd.load import load_model
from orcd.sampling import SamplingParams
from orcd.scheduler import Scheduler

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def engine(tiny_model, host):
    lm = load_model(tiny_model("qwen2-tiny"), host=host, device="cpu", n_ctx=512)
    assert lm.backend.prefill_chunk == 64     # the long prompts below take several chunks
    yield Engine(lm)
    lm.close()


def prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, 500, n).tolist()


def request(n_prompt: int, seed: int, max_tokens: int = 12, sampling=GREEDY, **kw):
    return GenerateRequest(prompt(n_prompt, seed), max_tokens, sampling, **kw)


def drain(sched: Scheduler, limit: int = 2000) -> list:
    """Step until nothing is left; the sequences in the order they ended."""
    ended = []
    for _ in range(limit):
        if not sched.busy:
            return ended
        ended += sched.step()
    raise AssertionError("the scheduler did not finish")


def alone(engine, req, n_blocks=64):
    s = Scheduler(engine, n_blocks, max_batch=1)
    seq = s.add(req)
    drain(s)
    assert seq.error is None, seq.error
    return seq.result


def texts(events) -> str:
    return "".join(e.text for e in events)


LENGTHS = (3, 70, 150, 9, 200, 33)   # 150 and 200: three and four prefill chunks


def test_greedy_streams_together_equal_each_alone_and_the_engine(engine):
    reqs = [request(n, seed=i, max_tokens=10 + i) for i, n in enumerate(LENGTHS)]
    sched = Scheduler(engine, n_blocks=64, max_batch=8)
    events = [[] for _ in reqs]
    seqs = [sched.add(r, events[i].append) for i, r in enumerate(reqs)]
    drain(sched)
    for i, (seq, req) in enumerate(zip(seqs, reqs)):
        assert seq.error is None
        solo = alone(engine, req)
        assert seq.result.token_ids == solo.token_ids and seq.result.text == solo.text
        assert seq.result.stop_reason == solo.stop_reason
        assert texts(events[i]) == seq.result.text
        # the single-request engine (orcd generate, --max-batch 1) gives the same ids
        assert engine.generate(req).token_ids == seq.result.token_ids
    assert len({tuple(s.result.token_ids) for s in seqs}) == len(seqs)   # not one stream copied
    assert sum(s.result.tokens_out for s in seqs) > 40                   # most ran a while


def test_seeded_sampling_penalties_and_logprobs_are_the_same_alone_and_batched(engine):
    warm = SamplingParams(temperature=0.9, top_k=40, seed=1234, frequency_penalty=0.5,
                          presence_penalty=0.3, repetition_penalty=1.1, logprobs=2)
    mine = request(40, seed=7, max_tokens=16, sampling=warm)
    others = [request(n, seed=20 + n, max_tokens=20, sampling=SamplingParams(temperature=1.0))
              for n in (5, 90, 12)]
    sched = Scheduler(engine, n_blocks=64, max_batch=4)
    got = []
    for r in others[:2]:
        sched.add(r)
    seq = sched.add(mine, got.append)
    sched.add(others[2])
    drain(sched)
    solo_events = []
    s = Scheduler(engine, 64, 1)
    solo = s.add(mine, solo_events.append)
    drain(s)
    assert seq.result.token_ids == solo.result.token_ids and seq.result.seed == 1234
    lps = [[(lp.id, lp.logprob) for lp in e.logprobs] for e in got]
    assert lps == [[(lp.id, lp.logprob) for lp in e.logprobs] for e in solo_events]
    assert sum(len(e.logprobs) for e in got) == seq.result.tokens_out


def test_an_unseeded_request_draws_a_seed_and_reports_it(engine):
    sched = Scheduler(engine, 16, 2)
    seq = sched.add(request(5, 1, sampling=SamplingParams(temperature=1.0)))
    drain(sched)
    seed = seq.result.seed
    assert isinstance(seed, int)
    again = alone(engine, request(5, 1, sampling=SamplingParams(temperature=1.0, seed=seed)))
    assert again.token_ids == seq.result.token_ids


def test_cancelling_one_stream_stops_only_it_within_one_step(engine):
    flag = {"stop": False}
    victim = request(20, 3, max_tokens=200, cancelled=lambda: flag["stop"])
    keep = [request(n, seed=40 + n, max_tokens=25) for n in (8, 130)]
    sched = Scheduler(engine, 64, 4)
    v = sched.add(victim)
    kept = [sched.add(r) for r in keep]
    while len(v.gen.ids if v.gen else []) < 5:
        sched.step()
    used = sched.blocks.n_used
    flag["stop"] = True
    ended = sched.step()
    assert v in ended and isinstance(v.error, Cancelled) and v.result is None
    assert v not in sched.running and not v.blocks
    assert sched.blocks.n_used == used - blocks_for(v.n_positions)
    drain(sched)
    for seq, req in zip(kept, keep):
        assert seq.error is None and seq.result.token_ids == alone(engine, req).token_ids
    assert sched.blocks.n_used == 0


def test_a_deadline_ends_only_its_sequence(engine):
    late = request(10, 5, max_tokens=50, deadline=time.monotonic() - 1)
    ok = request(10, 6, max_tokens=8)
    sched = Scheduler(engine, 16, 4)
    a, b = sched.add(late), sched.add(ok)
    drain(sched)
    assert isinstance(a.error, InferenceTimeout)
    assert b.result.token_ids == alone(engine, ok).token_ids
    assert sched.blocks.n_used == 0


def test_a_request_larger_than_the_pool_is_vram_oom_and_others_are_served(engine):
    sched = Scheduler(engine, n_blocks=3, max_batch=4)       # 192 positions in all
    small = request(20, 8, max_tokens=10)
    first = sched.add(small)
    with pytest.raises(VramOom) as e:
        sched.add(request(150, 9, max_tokens=60))          # 210 positions: never fits
    assert e.value.code == "VRAM_OOM" and "pool" in e.value.message
    drain(sched)
    assert first.result.token_ids == alone(engine, small).token_ids
    assert sched.blocks.n_used == 0 and not sched.busy


def test_a_request_that_does_not_fit_yet_waits_and_blocks_hold_back_later_ones(engine):
    sched = Scheduler(engine, n_blocks=4, max_batch=8)       # 256 positions
    big = [request(100, 10 + i, max_tokens=60) for i in range(3)]   # 3 blocks each
    tiny = request(4, 30, max_tokens=4)                       # 1 block: fits beside one big
    seqs = [sched.add(r) for r in big] + [sched.add(tiny)]
    assert len(sched.running) == 1 and len(sched.waiting) == 3
    assert not sched.can_start(10)                            # someone waits: join the queue
    peak = 0
    while sched.busy:
        peak = max(peak, sched.blocks.n_used)
        assert sched.blocks.n_used <= sched.blocks.n_blocks
        sched.step()
    assert peak <= 4
    for seq, req in zip(seqs, big + [tiny]):
        assert seq.result.token_ids == alone(engine, req).token_ids


def test_max_batch_is_respected_and_the_rest_waits_in_order(engine):
    sched = Scheduler(engine, 64, max_batch=2)
    reqs = [request(6 + i, 50 + i, max_tokens=6 + 2 * i) for i in range(5)]
    seqs = [sched.add(r) for r in reqs]
    assert [s in sched.running for s in seqs] == [True, True, False, False, False]
    seen_batches, order = set(), []
    while sched.busy:
        assert len(sched.running) <= 2
        order += sched.step()
        seen_batches.add(sched.batch_size)
    assert max(seen_batches) == 2
    assert order == seqs                                     # first in, first out here
    for seq, req in zip(seqs, reqs):
        assert seq.result.token_ids == alone(engine, req).token_ids


def spy_forwards(b, monkeypatch, record) -> list:
    """The backend's forward_batch calls, each as ``record(batched, ids, pos)`` appended."""
    calls = []
    real = b.forward_batch

    def spy(model, pool, tables, seq, ids, pos, n_ctx, batched, last_only, **kw):
        calls.append(record(batched, ids, pos))
        return real(model, pool, tables, seq, ids, pos, n_ctx, batched, last_only, **kw)
    monkeypatch.setattr(b, "forward_batch", spy)
    return calls


def test_one_prefill_chunk_per_step_while_others_decode(engine, monkeypatch):
    b = engine.lm.backend
    calls = spy_forwards(b, monkeypatch, lambda batched, ids, pos: (batched, len(ids)))
    sched = Scheduler(engine, 64, 4)
    short = sched.add(request(5, 61, max_tokens=30))           # no end-of-generation in 30
    sched.step()                                             # its prefill and first token
    long = sched.add(request(300, 61, max_tokens=4))          # five chunks of 64
    produced = []
    while long.prefilling:
        calls.clear()
        before = len(short.gen.ids)
        sched.step()
        assert [c for c in calls if not c[0]] in ([(False, 64)], [(False, 300 - 256)])
        produced.append(len(short.gen.ids) - before)
    assert len(produced) == 5 and all(n == 1 for n in produced)   # the stream never stalled


def test_warm_up_readies_the_sampling_state_of_a_full_batch(engine, monkeypatch):
    calls = []
    monkeypatch.setattr(engine.lm.backend, "warm_rows", calls.append, raising=False)
    sched = Scheduler(engine, 64, max_batch=6)
    assert sched.warm_up() == 0 and calls == [6]    # the reference compiles and captures nothing


def test_lazy_warm_up_runs_the_first_task_now_and_the_rest_one_at_a_time(engine, monkeypatch):
    ran, asked = [], []

    def warm_tasks(model, pool, max_rows, n_ctx):
        asked.append((max_rows, n_ctx))
        return [lambda i=i: ran.append(i) for i in range(4)]

    monkeypatch.setattr(engine.lm.backend, "warm_tasks", warm_tasks, raising=False)
    sched = Scheduler(engine, 64, max_batch=6)
    assert sched.warm_up(lazy=True) == 1 and ran == [0] and sched.warming
    assert asked == [(6, sched.n_ctx)]
    seq = sched.add(request(5, 61, max_tokens=3))
    drain(sched)                         # requests are served meanwhile: steps never warm
    assert seq.result.tokens_out == 3 and ran == [0]
    for i in (1, 2, 3):
        sched.warm_next()
        assert ran == list(range(i + 1)) and sched.warming == (i < 3)
    sched.warm_next()                    # nothing left: nothing runs
    assert ran == [0, 1, 2, 3]
    eager = Scheduler(engine, 64, max_batch=6)
    assert eager.warm_up() == 4 and not eager.warming and ran == [0, 1, 2, 3] * 2


def scheduled_the_gpu_way(engine, monkeypatch, fold: bool):
    """The engine scheduled as on the GPU, in chunks of 16 tokens: prompts folded into
    the decode batch (``fold_prompts=on``), or (the GPU's default) run in forwards of
    their own with each prompt's last token its sequence's first decode row."""
    b = engine.lm.backend
    monkeypatch.setattr(b, "prefill_in_batch" if fold else "prompt_last_in_batch", True, raising=False)
    monkeypatch.setattr(b, "batch_prefill_chunk", 16, raising=False)
    return engine


@pytest.fixture
def folding(engine, monkeypatch):
    return scheduled_the_gpu_way(engine, monkeypatch, fold=True)


@pytest.fixture
def last_in_batch(engine, monkeypatch):
    return scheduled_the_gpu_way(engine, monkeypatch, fold=False)


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "last-in-batch"])
def test_the_gpus_scheduling_gives_each_stream_what_it_gets_alone(engine, monkeypatch, fold):
    gpu_way = scheduled_the_gpu_way(engine, monkeypatch, fold)
    warm = SamplingParams(temperature=0.9, top_k=40, seed=77, repetition_penalty=1.1, logprobs=2)
    reqs = [request(n, seed=i, max_tokens=8 + i) for i, n in enumerate((1, 3, 40, 17, 70))]
    reqs.append(request(25, seed=9, max_tokens=12, sampling=warm))
    sched = Scheduler(gpu_way, n_blocks=64, max_batch=8)
    assert sched.fold == fold and sched.last_in_batch != fold and sched.chunk == 16
    events = [[] for _ in reqs]
    seqs = [sched.add(r, events[i].append) for i, r in enumerate(reqs)]
    drain(sched)
    for i, (seq, req) in enumerate(zip(seqs, reqs)):
        solo_events = []
        s = Scheduler(gpu_way, 64, 1)
        solo = s.add(req, solo_events.append)
        drain(s)
        assert seq.error is None and seq.result.token_ids == solo.result.token_ids
        assert seq.result.stop_reason == solo.result.stop_reason
        assert texts(events[i]) == seq.result.text == solo.result.text
        assert [[(lp.id, lp.logprob) for lp in e.logprobs] for e in events[i]] == \
            [[(lp.id, lp.logprob) for lp in e.logprobs] for e in solo_events]
    assert sum(s.result.tokens_out for s in seqs) > 30 and sched.blocks.n_used == 0


def test_a_folded_prompt_takes_one_chunk_per_step_beside_every_decode(folding, monkeypatch):
    b = folding.lm.backend
    calls = spy_forwards(b, monkeypatch, lambda batched, ids, pos: (batched, list(pos)))
    sched = Scheduler(folding, 64, 4)
    short = sched.add(request(5, 61, max_tokens=30))
    sched.step()                                   # its prompt and first token in one step
    assert len(short.gen.ids) == 1 and calls == [(True, list(range(5)))]
    long = sched.add(request(50, 62, max_tokens=4))   # chunks 0-15, 16-31, 32-47, 48-49
    for start, end in ((0, 16), (16, 32), (32, 48), (48, 50)):
        calls.clear()
        before = len(short.gen.ids)
        sched.step()
        # one forward: the prompt rows first, then the decode
        assert calls == [(True, list(range(start, end)) + [5 + before - 1])]
        assert len(short.gen.ids) == before + 1                              # never stalled
    assert not long.prefilling and len(long.gen.ids) == 1


def test_last_in_batch_prompts_share_a_chunk_and_their_last_token_is_a_decode_row(
        last_in_batch, monkeypatch):
    b = last_in_batch.lm.backend
    calls = spy_forwards(b, monkeypatch, lambda batched, ids, pos: (batched, list(ids), list(pos)))
    sched = Scheduler(last_in_batch, 64, 4)
    a, c = request(6, 71, max_tokens=5), request(9, 72, max_tokens=5)
    long = request(40, 73, max_tokens=5)
    seqs = [sched.add(r) for r in (a, c, long)]
    sched.step()
    # one chunk of tokens in all: a's 5 and c's 8 prompt rows, each in a forward of its
    # own (long's first 16 do not fit: it waits), then one decode row each from its
    # prompt's last token at its last position
    assert calls == [(False, a.prompt_ids[:5], list(range(5))), (False, c.prompt_ids[:8], list(range(8))),
                     (True, [a.prompt_ids[-1], c.prompt_ids[-1]], [5, 8])]
    assert [len(s.gen.ids) for s in seqs] == [1, 1, 0]
    calls.clear()
    sched.step()
    assert calls[0] == (False, long.prompt_ids[:16], list(range(16)))   # then 16-31, 32-38
    drain(sched)
    assert all(s.result.tokens_out == 5 for s in seqs)


def test_a_larger_prompt_step_runs_more_prompts_chunks_a_step_with_the_same_streams(
        last_in_batch, monkeypatch):
    # batch_prompt_tokens (the GPU's prompt_step option) above the chunk: a burst's prompts
    # each take a chunk in the same step, oldest first, at the same chunk boundaries, so
    # each stream is what it is with one chunk a step
    b = last_in_batch.lm.backend
    reqs = [request(n, 80 + i, max_tokens=6) for i, n in enumerate((40, 20, 33, 9))]
    one = Scheduler(last_in_batch, 64, 4)
    want = [one.add(r) for r in reqs]
    drain(one)
    monkeypatch.setattr(b, "batch_prompt_tokens", 48, raising=False)
    calls = spy_forwards(b, monkeypatch, lambda batched, ids, pos: (batched, list(pos)))
    sched = Scheduler(last_in_batch, 64, 4)
    assert sched.chunk == 16 and sched.step_tokens == 48
    got = [sched.add(r) for r in reqs]
    sched.step()
    # 16 of the first, 16 of the second, 16 of the third: 48; the fourth waits its turn
    assert [(p[0], p[-1]) for batched, p in calls if not batched] == [(0, 15), (0, 15), (0, 15)]
    drain(sched)
    assert [s.result.token_ids for s in got] == [s.result.token_ids for s in want]
    folded = Scheduler(scheduled_the_gpu_way(last_in_batch, monkeypatch, fold=True), 64, 4)
    assert folded.step_tokens == folded.chunk      # folded rows: the graphs' one chunk


def test_a_failing_forward_ends_its_sequences_and_the_scheduler_goes_on(engine, monkeypatch):
    b = engine.lm.backend
    real = b.forward_batch
    boom = {"on": False}

    def flaky(model, pool, tables, seq, ids, pos, n_ctx, batched, last_only, **kw):
        if batched and boom["on"]:
            boom["on"] = False
            raise RuntimeError("device fault")
        return real(model, pool, tables, seq, ids, pos, n_ctx, batched, last_only, **kw)
    monkeypatch.setattr(b, "forward_batch", flaky)
    sched = Scheduler(engine, 32, 4)
    hit = [sched.add(request(5 + i, 70 + i, max_tokens=20)) for i in range(2)]
    sched.step()
    sched.step()
    boom["on"] = True
    ended = sched.step()
    assert set(ended) == set(hit)
    for seq in hit:
        assert isinstance(seq.error, InternalError) and "device fault" in seq.error.message
    assert sched.blocks.n_used == 0
    after = request(9, 72, max_tokens=7)
    seq = sched.add(after)
    drain(sched)
    assert seq.result.token_ids == alone(engine, after).token_ids


def test_a_failing_callback_ends_only_its_sequence(engine):
    def broken(ev):
        raise ValueError("sink gone")
    sched = Scheduler(engine, 32, 4)
    bad = sched.add(request(5, 80, max_tokens=10), broken)
    good_req = request(6, 81, max_tokens=10)
    good = sched.add(good_req)
    drain(sched)
    assert isinstance(bad.error, InternalError) and "sink gone" in bad.error.message
    assert good.result.token_ids == alone(engine, good_req).token_ids
    assert sched.blocks.n_used == 0


def test_stop_strings_and_eog_end_a_sequence_as_the_engine_does(engine):
    base = request(12, 90, max_tokens=30)
    text = alone(engine, base).text
    stop = text[6:9]
    cut = GenerateRequest(base.prompt_ids, 30, GREEDY, stop=[stop])
    sched = Scheduler(engine, 32, 4)
    seq = sched.add(cut)
    other = sched.add(request(40, 91, max_tokens=30))
    drain(sched)
    ref = engine.generate(cut)
    assert seq.result.stop_reason == ref.stop_reason == "stop_sequence"
    assert seq.result.text == ref.text == text[:text.index(stop)]
    assert other.result.tokens_out == 30 and sched.blocks.n_used == 0


@pytest.mark.cuda
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "prefill-graphs"])
def test_on_the_gpu_streams_together_equal_each_alone(tiny_model, host, fold):
    """The same property on CUDA: prompts folded into replayed decode graphs
    (fold_prompts=on: per-row kernels) or run as prefill graphs of their own (the
    default: their last token a decode row), each row drawn by the device sampler with
    its own state."""
    import os
    lm = load_model(tiny_model("qwen2-tiny"), host=host, n_ctx=512, fold_prompts=fold,
                    device=f"cuda:{os.environ.get('ORCD_TEST_GPU', '0')}")
    try:
        engine = Engine(lm)
        warm = SamplingParams(temperature=0.8, seed=5, repetition_penalty=1.1, logprobs=3)
        chained = SamplingParams(temperature=0.8, seed=6, repetition_penalty=1.2)
        reqs = [request(n, seed=i, max_tokens=16) for i, n in enumerate(LENGTHS + (1, 300))]
        reqs.append(request(30, seed=98, max_tokens=24, sampling=chained))
        reqs.append(request(50, seed=99, max_tokens=16, sampling=warm))
        assert lm.backend.pipelined_rows     # the default (--cuda-option pipelined_steps=on)
        sched = Scheduler(engine, n_blocks=64, max_batch=8)
        assert sched.pipelined and sched.fold == fold and sched.last_in_batch != fold
        # folded, 8 graphs: rows 1, 2, 4, 8, 16, 24, 32 and 48 >= 8 decodes + a 32-token
        # chunk; else rows 1, 2, 4, 8 and the prefill buckets 16 .. 256 (backends/cuda/prefill.py)
        assert sched.warm_up() == (8 if fold else 4 + 8)
        graphs = dict(lm.backend.batch._graphs)
        samplers = lm.backend.rows_sampler                      # made by warm_up, one a sequence
        assert len(samplers.spare) == 8 and not samplers.by_key
        seqs = [sched.add(r) for r in reqs]
        drain(sched)
        # every step replayed a graph captured before serving: none was made mid-stream;
        # and every draw had a sampler made then (none loaded or cleared mid-stream)
        assert lm.backend.batch._graphs.keys() == graphs.keys()
        assert len(samplers.spare) == 8 and not samplers.by_key
        sched.close()
        # alone and through synchronous steps: the pipelined steps (ids read on the
        # device, draws chained by the device sampler) give the same tokens
        lm.backend.pipelined_rows = False
        for seq, req in zip(seqs, reqs):
            s = Scheduler(engine, 16, 1)
            solo = s.add(req)
            drain(s)
            s.close()
            assert seq.error is None and seq.result.token_ids == solo.result.token_ids
    finally:
        lm.close()


@pytest.mark.cuda
def test_on_the_gpu_lazy_warm_up_streams_what_a_warmed_scheduler_streams(tiny_model, host):
    """warm_up(lazy=True), as the server starts: only the one-row step is captured;
    a step whose graph is still missing captures it (an eager forward first, which
    gives the replays' bits); warm_next then captures the rest, skipping those."""
    import os
    lm = load_model(tiny_model("qwen2-tiny"), host=host, n_ctx=512,
                    device=f"cuda:{os.environ.get('ORCD_TEST_GPU', '0')}")
    try:
        engine = Engine(lm)
        reqs = [request(n, seed=i, max_tokens=12) for i, n in enumerate(LENGTHS)]
        reqs.append(request(40, seed=7, max_tokens=12, sampling=SamplingParams(temperature=0.8, seed=3)))
        warmed = Scheduler(engine, n_blocks=64, max_batch=8)
        n_all = warmed.warm_up()
        # a graph's key opens with id(model), id(pool): the two schedulers' pools differ
        keys = {k[2:] for k in lm.backend.batch._graphs}
        want = [warmed.add(r) for r in reqs]
        drain(warmed)
        warmed.close()
        lm.backend.batch.drop_graphs()
        lazy = Scheduler(engine, n_blocks=64, max_batch=8)
        assert lazy.warm_up(lazy=True) == 1 and lazy.warming and len(lm.backend.batch._graphs) == 1
        got = [lazy.add(r) for r in reqs]
        drain(lazy)
        assert [s.result.token_ids for s in got] == [s.result.token_ids for s in want]
        n = 1
        while lazy.warming:
            lazy.warm_next()
            n += 1
        assert n == n_all and {k[2:] for k in lm.backend.batch._graphs} >= keys
        lazy.close()
    finally:
        lm.close()
