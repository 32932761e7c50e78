"""The reference sampler's OpenAI features: logit_bias, frequency and presence
penalties, a grammar's bitmask, logprobs, and where each sits in the order
(mask -> bias -> penalties -> [logprobs] -> temperature -> filters)."""

from __future__ import annotations

import numpy as np
import pytest

from orcd.ops.sampling import allowed_ids, mask_words, process, sample_ref, sample_step, transform

from orcd.sampling import LOGPROB_FLOOR, SamplingParams

NO_SEEN = np.zeros(0, dtype=np.int64)
GREEDY = SamplingParams(temperature=0.0)


def bitmask(ids, n_vocab: int) -> np.ndarray:
    words = np.zeros(mask_words(n_vocab), dtype=np.uint32)
    for i in ids:
        words[i // 32] |= np.uint32(1) << np.uint32(i % 32)
    return words.view(np.int32)


def test_bitmask_layout_is_llguidances():
    # bit i % 32 of int32 word i // 32, as llguidance.numpy fills it
    llg = pytest.importorskip("llguidance.numpy")
    n = 100
    m = bitmask([0, 31, 32, 99], n)
    assert np.flatnonzero(allowed_ids(m, n)).tolist() == [0, 31, 32, 99]
    logits = np.zeros((1, n), dtype=np.float32)
    llg.apply_token_bitmask_inplace(logits, m.copy())
    assert np.flatnonzero(np.isfinite(logits[0])).tolist() == [0, 31, 32, 99]


def test_mask_excludes_ids_whatever_their_logits():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(1000).astype(np.float32)
    best = int(np.argmax(logits))
    ok = [3, 500, 777]
    m = bitmask(ok, 1000)
    assert sample_ref(logits, GREEDY, NO_SEEN, rng, allowed=m) == ok[int(np.argmax(logits[ok]))]
    draws = {sample_ref(logits, SamplingParams(temperature=2.0), NO_SEEN, rng, allowed=m)
             for _ in range(200)}
    assert draws == set(ok) and best not in ok


def test_logit_bias_is_added_before_temperature():
    logits = np.array([0.0, 1.0, 2.0], dtype=np.float32)
    p = SamplingParams(temperature=0.5, logit_bias=((0, 5.0), (2, -1.0)))
    np.testing.assert_array_equal(transform(logits, p, NO_SEEN), np.float32([10.0, 2.0, 2.0]))
    assert sample_ref(logits, SamplingParams(temperature=0.0, logit_bias=((0, 5.0),)),
                      NO_SEEN, None) == 0
    banned = SamplingParams(temperature=1.0, logit_bias=((2, -100.0),))
    rng = np.random.default_rng(1)
    assert 2 not in {sample_ref(logits, banned, NO_SEEN, rng) for _ in range(300)}


def test_frequency_and_presence_penalise_the_output_only():
    logits = np.full(6, 10.0, dtype=np.float32)
    seen = np.array([0, 0, 1, 2, 2, 2, 3])          # prompt [0, 0, 1], output [2, 2, 2, 3]
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=1.0)
    x = process(logits, p, seen, n_prompt=3)
    np.testing.assert_array_equal(x, np.float32([10, 10, 10 - 1.5 - 1, 10 - 0.5 - 1, 10, 10]))
    # without a prompt/output split there is no output to count
    np.testing.assert_array_equal(process(logits, p, seen), logits)


def test_negative_presence_penalty_encourages_repeats():
    logits = np.array([1.0, 1.2], dtype=np.float32)
    p = SamplingParams(temperature=0.0, presence_penalty=-1.0)
    assert sample_ref(logits, p, np.array([7, 0]), None, n_prompt=1) == 0


def test_penalties_stack_in_order_repetition_then_frequency_presence():
    logits = np.array([4.0, -4.0], dtype=np.float32)
    seen = np.array([0, 1])
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5)
    np.testing.assert_array_equal(process(logits, p, seen, n_prompt=0),
                                  np.float32([4 / 2 - 1 - 0.5, -4 * 2 - 1 - 0.5]))


def test_process_leaves_the_callers_logits_alone():
    logits = np.arange(5, dtype=np.float32)
    before = logits.copy()
    process(logits, SamplingParams(logit_bias=((1, 3.0),), presence_penalty=1.0), np.array([1]),
            n_prompt=0, allowed=bitmask([1], 5))
    np.testing.assert_array_equal(logits, before)


def test_logprobs_are_log_softmax_of_the_processed_logits_before_temperature():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal(50).astype(np.float32)
    p = SamplingParams(temperature=0.3, logit_bias=((7, 2.0),), logprobs=5, seed=1)
    got = sample_step(logits, p, NO_SEEN, np.random.default_rng(1))
    x = logits.astype(np.float64)
    x[7] += 2.0
    ref = x - np.log(np.exp(x - x.max()).sum()) - x.max()
    assert got.logprob == pytest.approx(ref[got.id], abs=1e-6)
    best = np.argsort(-ref, kind="stable")[:5]
    assert [i for i, _ in got.top] == best.tolist()
    assert [lp for _, lp in got.top] == pytest.approx(ref[best].tolist(), abs=1e-6)
    # the draw is the one sample_ref makes with the same generator
    assert got.id == sample_ref(logits, p, NO_SEEN, np.random.default_rng(1))


def test_logprobs_zero_gives_the_chosen_only_and_masked_ids_sit_at_the_floor():
    logits = np.zeros(40, dtype=np.float32)
    p = SamplingParams(temperature=0.0, logprobs=0)
    got = sample_step(logits, p, NO_SEEN, None, allowed=bitmask([5, 6], 40))
    assert got.id == 5 and got.top == () and got.logprob == pytest.approx(np.log(0.5))
    got = sample_step(logits, SamplingParams(temperature=0.0, logprobs=3), NO_SEEN, None,
                      allowed=bitmask([5, 6], 40))
    assert [i for i, _ in got.top] == [5, 6, 0] and got.top[2][1] == LOGPROB_FLOOR


def test_without_logprobs_the_step_carries_none():
    got = sample_step(np.zeros(4, np.float32), GREEDY, NO_SEEN, None)
    assert got.id == 0 and got.logprob is None and got.top == ()
