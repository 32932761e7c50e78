"""engine.decode_steps, the loop for requests that need the host between
draws (a grammar, logprobs, output-count penalties): the order of masks,
draws, accepted ids and queued steps, on fake parts."""

from __future__ import annotations

import numpy as np

from orcd.engine import decode_steps
from orcd.sampling import Sampled, SamplingParams


class _Backend:
    def __init__(self, log):
        self.log = log

    def sample_step(self, logits, params, seen, rng, *, n_prompt=None, allowed=None):
        self.log.append(("sample", logits, len(seen), n_prompt, allowed))
        return Sampled(100 + len(self.log), logprob=-0.5)


class _Runner:
    def __init__(self, log):
        self.log = log

    def forward(self, ids, start):
        self.log.append(("step", ids[0], start))
        return f"logits@{start}"


class _Grammar:
    def __init__(self, log):
        self.log, self.n = log, 0

    def allowed(self):
        self.n += 1
        self.log.append(("mask", self.n))
        return f"mask{self.n}"

    def accept(self, tok):
        self.log.append(("accept", tok))


def test_each_mask_follows_the_accepted_id_and_the_queued_step():
    log: list = []
    grammar = _Grammar(log)
    seen = np.arange(10)
    steps = decode_steps(_Backend(log), _Runner(log), "prefill", SamplingParams(logprobs=0),
                         lambda k: seen[:4 + k], None, n_prompt=4, max_tokens=3,
                         interrupt=lambda: log.append(("check",)), constraint=grammar)
    got = []
    for s in steps:                     # the engine reports each kept id before pulling on
        grammar.accept(s.id)
        got.append(s)
    assert [s.logprob for s in got] == [-0.5] * 3
    t0, t1, t2 = (s.id for s in got)
    assert log == [("mask", 1), ("sample", "prefill", 4, 4, "mask1"), ("accept", t0),
                   ("check",), ("step", t0, 4), ("mask", 2), ("sample", "logits@4", 5, 4, "mask2"),
                   ("accept", t1),
                   ("check",), ("step", t1, 5), ("mask", 3), ("sample", "logits@5", 6, 4, "mask3"),
                   ("accept", t2)]              # no step past max_tokens


def test_without_a_grammar_no_mask_is_sent():
    log: list = []
    steps = decode_steps(_Backend(log), _Runner(log), "prefill", SamplingParams(),
                         lambda k: np.zeros(2 + k), None, 2, 2)
    assert len(list(steps)) == 2
    assert [e[4] for e in log if e[0] == "sample"] == [None, None]
