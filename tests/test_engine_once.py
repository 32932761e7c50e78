"""Without the server the engine still checks every request and draws the seed
of an unseeded one, once each (issue 19 item 8): Engine.generate, the
scheduler and ``orcd generate``. A request marked ``checked`` (the server's,
checked when planned) is not checked again."""

from __future__ import annotations

import argparse
import re

import pytest

from orcd import engine as engine_module
from orcd.commands import generate
from orcd.engine import Engine, GenerateRequest
from orcd.errors import InvalidRequest
from orcd.load import load_model
from orcd.ops.sampling import SamplingParams
from orcd.scheduler import Scheduler

DRAWN = 2**64 - 3


@pytest.fixture(scope="module")
def tiny(tiny_model, host):
    path = tiny_model("qwen2-tiny")
    lm = load_model(path, host=host, device="cpu", n_ctx=128)
    yield str(path), Engine(lm)
    lm.close()


@pytest.fixture
def counts(monkeypatch):
    calls = {"validate": 0, "seed": 0}
    validate = Engine._validate

    def counted_validate(self, req):
        calls["validate"] += 1
        return validate(self, req)

    def counted_seed():
        calls["seed"] += 1
        return DRAWN
    monkeypatch.setattr(Engine, "_validate", counted_validate)
    monkeypatch.setattr(engine_module, "fresh_seed", counted_seed)
    return calls


def unseeded(max_tokens: int = 4, **kw) -> GenerateRequest:
    return GenerateRequest([1, 2, 3], max_tokens, SamplingParams(temperature=1.0), **kw)


def test_generate_checks_and_seeds_once(tiny, counts):
    result = tiny[1].generate(unseeded())
    assert result.seed == DRAWN
    assert counts == {"validate": 1, "seed": 1}


def test_the_scheduler_checks_and_seeds_once(tiny, counts):
    sched = Scheduler(tiny[1], n_blocks=8, max_batch=2)
    seq = sched.add(unseeded())
    while sched.busy:
        sched.step()
    assert seq.error is None and seq.result.seed == DRAWN
    assert counts == {"validate": 1, "seed": 1}


def test_a_checked_request_is_not_checked_again_and_an_unchecked_one_is(tiny, counts):
    tiny[1].generate(unseeded(checked=True))
    assert counts["validate"] == 0
    with pytest.raises(InvalidRequest, match="exceeds the context length 128"):
        tiny[1].generate(unseeded(max_tokens=200))


def test_orcd_generate_prints_the_seed_it_drew_once(tiny, counts, capsys):
    p = argparse.ArgumentParser()
    generate.add_arguments(p)
    assert generate.run(p.parse_args(["--model", tiny[0], "--device", "cpu", "--prompt", "Hello",
                                      "--max-tokens", "4"])) == 0
    assert re.search(r"seed (\d+)", capsys.readouterr().err).group(1) == str(DRAWN)
    assert counts == {"validate": 1, "seed": 1}
