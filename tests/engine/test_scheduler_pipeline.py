"""Pipelined scheduler steps on the numpy reference (the GPU's way, switched on
here): step k+1 is queued before the ids of step k reach the host, and every
stream still gives exactly the tokens it gives from synchronous steps."""

from __future__ import annotations

import numpy as np
import pytest

from orcd.engine import Engine, GenerateRequest
from orcd.errors import Cancelled
from orcd.load import load_model
from orcd.ops.sampling import mask_words
from orcd.sampling import SamplingParams
from orcd.scheduler import Scheduler

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def engine(tiny_model, host):
    lm = load_model(tiny_model("qwen2-tiny"), host=host, device="cpu", n_ctx=512)
    yield Engine(lm)
    lm.close()


@pytest.fixture(params=["unfolded", "folded", "last-in-batch"])
def pipelined(engine, monkeypatch, request):
    """The engine with pipelined steps, prompts folded into the batch or not, or
    (the GPU's unfolded way) run but for their last token, which is the
    sequence's first decode row."""
    b = engine.lm.backend
    monkeypatch.setattr(b, "pipelined_rows", True, raising=False)
    if request.param == "folded":
        monkeypatch.setattr(b, "prefill_in_batch", True, raising=False)
    if request.param == "last-in-batch":
        monkeypatch.setattr(b, "prompt_last_in_batch", True, raising=False)
    if request.param != "unfolded":
        monkeypatch.setattr(b, "batch_prefill_chunk", 16, raising=False)
    return engine


def request(n_prompt: int, seed: int, max_tokens: int = 12, sampling=GREEDY, **kw):
    ids = np.random.default_rng(seed).integers(1, 500, n_prompt).tolist()
    return GenerateRequest(ids, max_tokens, sampling, **kw)


def drain(sched: Scheduler, limit: int = 2000) -> None:
    for _ in range(limit):
        if not sched.busy:
            return
        sched.step()
    raise AssertionError("the scheduler did not finish")


def synchronous(engine, req, monkeypatch):
    """req alone, through synchronous steps: (result, token events)."""
    with monkeypatch.context() as m:
        m.setattr(engine.lm.backend, "pipelined_rows", False, raising=False)
        s = Scheduler(engine, 64, 1)
        assert not s.pipelined
        events = []
        seq = s.add(req, events.append)
        drain(s)
    assert seq.error is None, seq.error
    return seq.result, events


class EvenIds:
    """A grammar stand-in (engine.TokenConstraint): only even ids, forever. Like any
    grammar it needs the host between draws."""

    def __init__(self, n_vocab: int) -> None:
        self.words = np.full(mask_words(n_vocab), 0x55555555, np.uint32).view(np.int32)
        self.taken = []

    def allowed(self):
        return self.words

    def accept(self, tok: int) -> None:
        self.taken.append(tok)


def test_pipelined_streams_equal_synchronous_ones(pipelined, monkeypatch):
    # greedy, seeded with a repetition penalty (chained draws: the backend's own view
    # of the id in flight), a stop string, and two kinds that make the steps they
    # share synchronous again (logprobs; a grammar joining later)
    warm = SamplingParams(temperature=0.9, top_k=40, seed=77, repetition_penalty=1.3)
    base = request(12, 90, max_tokens=30)
    text = synchronous(pipelined, base, monkeypatch)[0].text
    reqs = [request(n, seed=i, max_tokens=8 + 3 * i) for i, n in enumerate((3, 40, 17))]
    reqs += [request(25, seed=9, max_tokens=20, sampling=warm),
             GenerateRequest(base.prompt_ids, 30, GREEDY, stop=[text[6:9]]),
             request(7, seed=11, max_tokens=10, sampling=SamplingParams(temperature=0.0, logprobs=2))]
    late = request(9, seed=12, max_tokens=6)
    sched = Scheduler(pipelined, n_blocks=64, max_batch=8)
    assert sched.pipelined
    events = [[] for _ in reqs]
    seqs = [sched.add(r, events[i].append) for i, r in enumerate(reqs)]
    for _ in range(6):
        sched.step()
    late.constraint = EvenIds(pipelined.lm.hp.n_vocab)
    late_seq = sched.add(late)
    drain(sched)
    for i, (seq, req) in enumerate(zip(seqs, reqs)):
        solo, solo_events = synchronous(pipelined, req, monkeypatch)
        assert seq.error is None and seq.result.token_ids == solo.token_ids, i
        assert seq.result.stop_reason == solo.stop_reason
        assert "".join(e.text for e in events[i]) == seq.result.text == solo.text
    assert seqs[4].result.stop_reason == "stop_sequence"
    late.constraint = EvenIds(pipelined.lm.hp.n_vocab)
    assert late_seq.result.token_ids == synchronous(pipelined, late, monkeypatch)[0].token_ids
    assert late_seq.result.token_ids and all(t % 2 == 0 for t in late_seq.result.token_ids)
    assert sched.blocks.n_used == 0 and not sched.busy


@pytest.mark.parametrize("pipelined", ["folded"], indirect=True)   # the prompt rides in step 1
def test_the_next_forward_is_queued_before_the_ids_are_read(pipelined, monkeypatch):
    b = pipelined.lm.backend
    log = []
    real_forward, real_launch = b.forward_batch, b.launch_rows

    def forward(*args, **kw):
        log.append(("forward", "follow" in kw))
        return real_forward(*args, **kw)

    def launch(logits, draws):
        handle = real_launch(logits, draws)
        got = handle.result

        def result():
            log.append(("result", None))
            return got()
        handle.result = result
        log.append(("launch", tuple(d.chained for d in draws)))
        return handle
    monkeypatch.setattr(b, "forward_batch", forward)
    monkeypatch.setattr(b, "launch_rows", launch)
    sched = Scheduler(pipelined, 64, 4)
    seq = sched.add(request(5, 61, max_tokens=4))      # a 5-token prompt: one chunk either way
    sched.step()
    assert log[-1] == ("launch", (False,)) and seq.gen.ids == []     # drawn, not yet taken
    log.clear()
    sched.step()
    # step 2 reads token 1 on the device, queues its draw, then takes token 1
    assert log == [("forward", True), ("launch", (True,)), ("result", None)]
    assert len(seq.gen.ids) == 1
    drain(sched)
    # max_tokens = 4: the prompt's step and three decodes make the 4 draws; the fourth
    # is its last, so no fifth row is ever run (3 forwards and draws since step 2)
    kinds = [kind for kind, _ in log]
    assert kinds.count("forward") == 3 and kinds.count("launch") == 3 and kinds.count("result") == 4
    assert seq.result.tokens_out == 4 and seq.result.stop_reason == "max_tokens"


def test_cancel_under_pipelining_stops_the_stream_within_one_step(pipelined, monkeypatch):
    flag = {"stop": False}
    victim = request(20, 3, max_tokens=200, cancelled=lambda: flag["stop"])
    keep = request(8, 48, max_tokens=25)
    sched = Scheduler(pipelined, 64, 4)
    v, k = sched.add(victim), sched.add(keep)
    while len(v.gen.ids if v.gen else []) < 5:
        sched.step()
    flag["stop"] = True
    ended = sched.step()
    assert v in ended and isinstance(v.error, Cancelled) and not v.blocks
    n = len(v.gen.ids)
    drain(sched)
    assert len(v.gen.ids) == n                      # its draw in flight was dropped
    assert k.result.token_ids == synchronous(pipelined, keep, monkeypatch)[0].token_ids
    assert sched.blocks.n_used == 0
