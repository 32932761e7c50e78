"""The numpy reference sampler (orcd.ops.sampling.sample_ref): what the CUDA
sampler is held to. Candidate sets are read exactly by probing the draw with
chosen uniforms (ProbeRng); frequencies are checked with a seeded PCG64."""

from __future__ import annotations

import numpy as np
import pytest

from orcd.ops.sampling import apply_repetition_penalty, sample_ref

from orcd.sampling import SamplingParams

NO_SEEN = np.zeros(0, dtype=np.int64)


class ProbeRng:
    """Stands in for numpy's Generator: random() returns the given uniform."""

    def __init__(self, u: float) -> None:
        self.u = u

    def random(self) -> float:
        return self.u


GRID = np.arange(10000) / 10000  # uniforms probing the draw's inverse CDF


def draw_measure(logits, p: SamplingParams, seen=NO_SEEN) -> dict[int, float]:
    """id -> fraction of GRID's uniforms that draw it: the kept set and its
    renormalised probabilities, to 1/len(GRID)."""
    ids = [sample_ref(logits, p, seen, ProbeRng(float(u))) for u in GRID]
    vals, counts = np.unique(ids, return_counts=True)
    return {int(v): c / len(GRID) for v, c in zip(vals, counts)}


def forced(probs, perm_seed=0):
    """Logits whose softmax is probs, scattered over a shuffled vocabulary;
    returns (logits, ids such that logits[ids[i]] has probability probs[i])."""
    probs = np.asarray(probs, dtype=np.float64)
    ids = np.random.default_rng(perm_seed).permutation(len(probs))
    logits = np.empty(len(probs), dtype=np.float32)
    logits[ids] = np.log(probs).astype(np.float32)
    return logits, ids


def assert_measure(measure, expected: dict[int, float], tol=2e-4):
    assert set(measure) == set(expected)
    for i, pr in expected.items():
        assert measure[i] == pytest.approx(pr, abs=tol), i


# -- greedy and determinism ----------------------------------------------------------

def test_greedy_is_argmax_with_lowest_id_on_ties():
    rng = np.random.default_rng()
    for n in (7, 1000, 32000):
        logits = rng.standard_normal(n).astype(np.float32)
        p = SamplingParams(temperature=0.0, seed=int(rng.integers(1 << 30)))
        assert sample_ref(logits, p, NO_SEEN, rng) == int(np.argmax(logits))
    logits = np.zeros(10, dtype=np.float32)
    logits[[3, 7]] = 2.0
    assert sample_ref(logits, SamplingParams(temperature=0.0), NO_SEEN, rng) == 3


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**63 + 5])
def test_top_k_1_is_greedy_for_any_seed(seed):
    logits = np.random.default_rng().standard_normal(5000).astype(np.float32)
    rng = np.random.Generator(np.random.PCG64(seed))
    p = SamplingParams(temperature=1.3, top_k=1, seed=seed)
    assert {sample_ref(logits, p, NO_SEEN, rng) for _ in range(20)} == {int(np.argmax(logits))}


def _draws(logits, p: SamplingParams, seed: int, n: int = 200) -> list[int]:
    rng = np.random.Generator(np.random.PCG64(seed))
    return [sample_ref(logits, p, NO_SEEN, rng) for _ in range(n)]


def test_same_seed_same_draws_and_other_seeds_differ():
    logits = np.random.default_rng().standard_normal(1000).astype(np.float32)
    p = SamplingParams(temperature=1.0, top_p=0.95)
    a, b, c = _draws(logits, p, 7), _draws(logits, p, 7), _draws(logits, p, 8)
    assert a == b
    assert a != c


# -- each filter keeps exactly its candidate set ---------------------------------------

PROBS = [0.35, 0.25, 0.15, 0.1, 0.08, 0.04, 0.02, 0.01]


def test_no_filter_keeps_everything_in_proportion():
    logits, ids = forced(PROBS)
    assert_measure(draw_measure(logits, SamplingParams()), dict(zip(ids.tolist(), PROBS)))


def test_top_k_keeps_the_k_most_probable():
    logits, ids = forced(PROBS, 1)
    kept = np.array(PROBS[:3]) / sum(PROBS[:3])
    assert_measure(draw_measure(logits, SamplingParams(top_k=3)), dict(zip(ids[:3].tolist(), kept)))


def test_top_k_breaks_ties_by_lowest_id():
    logits = np.full(6, np.log(0.1), dtype=np.float32)
    logits[4] = np.log(0.5)
    measure = draw_measure(logits, SamplingParams(top_k=3))
    assert set(measure) == {4, 0, 1}


@pytest.mark.parametrize("top_p, n_kept", [(0.3, 1), (0.5, 2), (0.61, 3), (0.76, 4),
                                           (0.9, 5), (0.995, 8)])
def test_top_p_keeps_the_smallest_prefix_reaching_top_p(top_p, n_kept):
    logits, ids = forced(PROBS, 2)
    kept = np.array(PROBS[:n_kept]) / sum(PROBS[:n_kept])
    measure = draw_measure(logits, SamplingParams(top_p=top_p))
    assert_measure(measure, dict(zip(ids[:n_kept].tolist(), kept)))


@pytest.mark.parametrize("min_p, n_kept", [(0.9, 1), (0.5, 2), (0.3, 3), (0.1, 6), (0.02, 8)])
def test_min_p_keeps_probabilities_at_least_min_p_of_the_best(min_p, n_kept):
    # 0.35 * min_p against PROBS: 0.9 -> 0.315 (1), 0.5 -> 0.175 (2), 0.3 -> 0.105 (3)...
    logits, ids = forced(PROBS, 3)
    kept = np.array(PROBS[:n_kept]) / sum(PROBS[:n_kept])
    assert_measure(draw_measure(logits, SamplingParams(min_p=min_p)), dict(zip(ids[:n_kept].tolist(), kept)))


def test_temperature_reshapes_before_the_filters():
    # T=0.5 squares the odds: 0.35^2, 0.25^2, ... renormalised; top_p=0.8 then keeps 2
    logits, ids = forced(PROBS, 4)
    sharp = np.array(PROBS) ** 2 / np.sum(np.array(PROBS) ** 2)
    assert np.cumsum(sharp)[0] < 0.8 <= np.cumsum(sharp)[1]
    kept = sharp[:2] / sharp[:2].sum()
    measure = draw_measure(logits, SamplingParams(temperature=0.5, top_p=0.8))
    assert_measure(measure, dict(zip(ids[:2].tolist(), kept)))


# -- order: temperature -> penalty -> top-k -> top-p -> min-p --------------------------

def test_top_p_is_measured_after_top_k():
    # top-k=2 renormalises [0.4, 0.3] to [0.571, 0.429]: top_p=0.5 keeps 1.
    # (top-p first would keep 2 of the full distribution.)
    logits, ids = forced([0.4, 0.3, 0.2, 0.1], 5)
    assert set(draw_measure(logits, SamplingParams(top_k=2, top_p=0.5))) == {int(ids[0])}


def test_min_p_comes_after_top_p():
    # top-p 0.84 of [0.5, 0.3, 0.15, 0.05] keeps 3; min-p 0.2 (>= 0.1) keeps all 3.
    # (min-p first would drop 0.05, renormalise, and top-p would keep only 2.)
    logits, ids = forced([0.5, 0.3, 0.15, 0.05], 6)
    measure = draw_measure(logits, SamplingParams(top_p=0.84, min_p=0.2))
    assert set(measure) == set(ids[:3].tolist())


def test_penalty_comes_before_top_k():
    # id 0 is best but seen; divided by 4 it drops below 1 and 2, so top-2 = {1, 2}
    logits = np.array([2.0, 1.5, 1.2, -3.0], dtype=np.float32)
    seen = np.array([0])
    p = SamplingParams(top_k=2, repetition_penalty=4.0)
    assert set(draw_measure(logits, p, seen)) == {1, 2}


def test_temperature_and_penalty_commute_up_to_rounding():
    # llama.cpp's penalty scales by a sign-dependent factor, temperature by 1/T > 0:
    # either order gives the same values; the reference divides by T first.
    logits = np.random.default_rng().standard_normal(100).astype(np.float32)
    seen = np.arange(0, 100, 3)
    a = apply_repetition_penalty(logits / np.float32(0.7), seen, 1.3)
    b = apply_repetition_penalty(logits, seen, 1.3) / np.float32(0.7)
    np.testing.assert_allclose(a, b, rtol=1e-6)


# -- repetition penalty as llama.cpp -------------------------------------------------

def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = np.array([2.0, -2.0, 3.0, -1.0, 0.0], dtype=np.float32)
    seen = np.array([0, 1, 1, 1, 4])          # repeats do not compound
    out = apply_repetition_penalty(logits, seen, 2.0)
    np.testing.assert_array_equal(out, np.array([1.0, -4.0, 3.0, -1.0, 0.0], dtype=np.float32))
    assert out is not logits and logits[0] == 2.0  # input untouched
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_repetition_penalty_over_prompt_and_output_changes_the_argmax():
    logits = np.array([1.0, 3.0, 2.5, -1.0], dtype=np.float32)
    greedy = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    rng = np.random.default_rng(0)
    assert sample_ref(logits, greedy, np.array([0]), rng) == 1         # 1 not seen
    assert sample_ref(logits, greedy, np.array([0, 1]), rng) == 2      # 3 / 1.5 = 2 < 2.5
    assert sample_ref(logits, greedy, np.array([1, 2]), rng) == 1      # 2.0 vs 1.67
    # all negative: -0.1 * 1.5 = -0.15 falls below -0.12
    neg = np.array([-0.1, -0.12, -5.0], dtype=np.float32)
    assert sample_ref(neg, greedy, np.array([0]), rng) == 1


# -- frequencies ---------------------------------------------------------------------

def test_draw_frequencies_match_the_filtered_distribution():
    # top_k=6 of 20 forced probabilities at T=0.8: a chi-square against the
    # renormalised tempered distribution, fixed seed (df 5: 0.9999 quantile 25.7).
    probs = np.linspace(1.0, 0.05, 20)
    probs /= probs.sum()
    logits, ids = forced(probs, 7)
    p = SamplingParams(temperature=0.8, top_k=6, seed=99)
    rng = np.random.Generator(np.random.PCG64(p.seed))
    n = 6000
    draws = np.array([sample_ref(logits, p, NO_SEEN, rng) for _ in range(n)])
    tempered = np.exp(np.log(probs[:6]) / 0.8)
    expected = n * tempered / tempered.sum()
    observed = np.array([(draws == i).sum() for i in ids[:6]])
    assert observed.sum() == n                       # nothing outside the top 6
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 25.7, (observed, expected)
