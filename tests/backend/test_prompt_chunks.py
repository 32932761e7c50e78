"""The scheduler's prompt chunks on the GPU (prefill graphs through a sequence's
block table, padding first): the padding of every chunk the scheduler makes
lands in blocks the sequence reserved, so no chunk falls back to an eager
forward (tens of ms of launches from Python) and no padding row overwrites a
key. Pure logic: runs on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from orcd.backends.cuda.prefill import UNFOLDED_CHUNK, bucket, padding_is_safe
from orcd.engine import Engine, GenerateRequest
from orcd.load import load_model
from orcd.sampling import SamplingParams
from orcd.scheduler import Scheduler


def test_padding_is_safe_only_inside_distinct_blocks():
    table = np.array([5, 6, 5, 5], np.int32)          # blocks 5 and 6 reserved, then the first again
    assert padding_is_safe(table, 64, 60, 64)          # positions 64..127: block 6
    assert padding_is_safe(table, 0, 10, 16)
    assert not padding_is_safe(table, 100, 20, 32)     # 120..131 reaches block 5 again: keys 0..3
    assert not padding_is_safe(table[:2], 64, 60, 128)  # past the table


@pytest.fixture(scope="module")
def engine(tiny_model, host):
    lm = load_model(tiny_model("qwen2-tiny"), host=host, device="cpu", n_ctx=2048)
    yield Engine(lm)
    lm.close()


def test_every_chunk_the_scheduler_makes_pads_inside_its_own_blocks(engine, monkeypatch):
    b = engine.lm.backend
    monkeypatch.setattr(b, "prompt_last_in_batch", True, raising=False)       # the GPU's scheduling
    monkeypatch.setattr(b, "batch_prefill_chunk", UNFOLDED_CHUNK, raising=False)
    rng = np.random.default_rng(3)
    checked = 0
    for n_prompt in [*range(1, 300), *rng.integers(300, 1900, 60).tolist()]:
        for max_tokens in (1, 2, 63, 64, 65):
            sched = Scheduler(engine, n_blocks=40, max_batch=2)
            # another sequence first, so this one's blocks are not 0, 1, 2, ...
            sched.add(GenerateRequest([1] * 70, 1, SamplingParams(temperature=0.0)))
            seq = sched.add(GenerateRequest([1] * n_prompt, max_tokens, SamplingParams(temperature=0.0)))
            assert seq in sched.running and seq.table is not None     # admitted: its blocks reserved
            while seq.prefilling:
                start, n = sched._next_chunk(seq)
                assert 0 < n <= UNFOLDED_CHUNK and start % UNFOLDED_CHUNK + n <= UNFOLDED_CHUNK
                assert padding_is_safe(seq.table, start, n, bucket(n)), (n_prompt, max_tokens, start, n)
                seq.n_cached += n
                checked += 1
    assert checked > 1500
