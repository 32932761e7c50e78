"""The device sampler (orcd.ops.sampling.CudaSampler) against the numpy
reference, on fresh random logits (pytest marker ``cuda``).

Greedy and top_k=1 must equal the reference exactly; for the filters the set
the device chose among (``kept_ids``) must equal the reference's, with
parameters placed halfway between two candidates so that float32 against
float64 rounding cannot move a cut; draws must stay inside that set with the
reference's frequencies. The device's draw is its own counter-based stream, so
ids are compared with the reference's probabilities, not its draws.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpu_rig import SIMULATED, sized

from orcd.ops.sampling import apply_repetition_penalty, sample_ref, transform

from orcd.sampling import SamplingParams

pytestmark = [pytest.mark.cuda, pytest.mark.sim]

VOCABS = sized((32000, 151936, 201088), (32000, 40000))
NO_SEEN = np.zeros(0, dtype=np.int64)


# -- fixtures (dev, alloc, compiler, launcher: conftest.py) ------------------------------

class Rig:
    """A sampler for one vocabulary, a logits tensor and a poisoned out_id."""

    def __init__(self, dev, alloc, sampler, n):
        from orcd.backends.cuda.tensor import DeviceTensor

        self.dev, self.sampler, self.n = dev, sampler, n
        self.bufs = [alloc.alloc(4 * n, "test"), alloc.alloc(4, "test")]
        self.logits = DeviceTensor(self.bufs[0].ptr, (1, n), np.dtype(np.float32))
        self.out = DeviceTensor(self.bufs[1].ptr, (1,), np.dtype(np.int32))

    def put(self, logits: np.ndarray) -> None:
        from orcd.backends.cuda.memory import from_host

        from_host(self.dev, np.ascontiguousarray(logits, dtype=np.float32), self.logits.ptr)

    def draw(self, p: SamplingParams, step: int = 0) -> int:
        from orcd.backends.cuda.memory import fill_bytes, to_host

        fill_bytes(self.dev, self.out.ptr, 0xFF, 4)              # poison: -1
        self.sampler.sample(self.logits, p, step, self.out)
        tok = int(to_host(self.dev, self.out.ptr, 4).view(np.int32)[0])
        assert 0 <= tok < self.n
        return tok


@pytest.fixture(scope="module")
def rig(dev, alloc, compiler, launcher):
    from orcd.ops.sampling import CudaSampler

    made: dict[int, Rig] = {}

    def get(n: int) -> Rig:
        if n not in made:
            made[n] = Rig(dev, alloc, CudaSampler(dev, compiler, launcher, n, allocator=alloc), n)
        made[n].sampler.reset(())
        return made[n]

    yield get
    for r in made.values():
        r.sampler.close()
        for buf in r.bufs:   # the allocator lives for the session
            alloc.free(buf)


# -- the reference's view ---------------------------------------------------------------

class ProbeRng:
    def __init__(self, u: float) -> None:
        self.u = u

    def random(self) -> float:
        return self.u


def ref_x(logits, p: SamplingParams, seen=NO_SEEN) -> np.ndarray:
    """The reference's logits after the penalty and temperature."""
    return transform(logits, p, seen)


def ref_kept(logits, p: SamplingParams, seen=NO_SEEN) -> np.ndarray:
    """The reference's candidate set (ascending ids): its draw at u=1 is the last kept."""
    last = sample_ref(logits, p, seen, ProbeRng(1.0))
    order = np.argsort(-ref_x(logits, p, seen), kind="stable")
    return np.sort(order[:int(np.flatnonzero(order == last)[0]) + 1])


def set_probs(x: np.ndarray, top_k: int = 0) -> np.ndarray:
    """float64 probabilities of the top-k set, best first."""
    order = np.argsort(-x, kind="stable")
    v = x[order[:top_k] if top_k else order].astype(np.float64)
    w = np.exp(v - v[0])
    return w / w.sum()


def top_p_keeping(x, n_kept: int, top_k: int = 0) -> float:
    """A top_p (float32-exact) halfway between the cumulative masses that keep
    n_kept - 1 and n_kept candidates: the reference keeps exactly n_kept."""
    cum = np.cumsum(set_probs(x, top_k))
    return float(np.float32((cum[n_kept - 2] + cum[n_kept - 1]) / 2))


def min_p_keeping(x, n_kept: int) -> float:
    """A min_p halfway (in log) between the n_kept-th and next probability ratio."""
    r = np.sort(np.exp(x.astype(np.float64) - x.max()))[::-1]
    j = n_kept - 1
    while r[j + 1] > r[j] * (1 - 1e-4):   # step past ties and near-ties
        j += 1
    return float(np.float32(np.sqrt(r[j] * r[j + 1])))


def fresh(n: int, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng().standard_normal(n) * scale).astype(np.float32)


# -- greedy ------------------------------------------------------------------------------

@pytest.mark.parametrize("n", VOCABS)
def test_greedy_is_argmax_of_the_reference(rig, n):
    r = rig(n)
    for trial in range(3):
        logits = fresh(n)
        if trial == 2:                        # a tie: the lowest id wins
            hi = np.sort(np.random.default_rng().choice(n, 3, replace=False))
            logits[hi] = logits.max() + 1
        r.put(logits)
        tok = r.draw(SamplingParams(temperature=0.0, seed=trial))
        assert tok == int(np.argmax(logits))
        assert r.sampler.seen_mask()[tok] == 1


@pytest.mark.parametrize("n", VOCABS)
def test_greedy_with_repetition_penalty_matches_the_reference(rig, n):
    r = rig(n)
    logits = fresh(n)
    prompt = np.random.default_rng().choice(n, 500)
    prompt[:3] = np.argsort(-logits)[:3]      # the three best are penalised...
    others = np.setdiff1d(np.arange(n), prompt)
    best_other = logits[others].max()         # ...and sit just above the best unpenalised one
    logits[prompt[:3]] = best_other + np.array([0.3, 0.2, 0.1], np.float32)
    r.sampler.reset(prompt)
    r.put(logits)
    p = SamplingParams(temperature=0.0, repetition_penalty=1.3)
    ref = int(np.argmax(apply_repetition_penalty(logits, prompt, 1.3)))
    assert ref != int(np.argmax(logits))
    assert r.draw(p) == ref
    mask = np.zeros(n, dtype=np.int32)
    mask[prompt] = 1
    mask[ref] = 1
    np.testing.assert_array_equal(r.sampler.seen_mask(), mask)


def test_penalty_steps_follow_the_reference_as_ids_are_marked(rig):
    # the same logits every step: each chosen id is penalised and the next best
    # comes up, as the reference with seen = prompt + output
    n = 32000
    r = rig(n)
    logits = np.abs(fresh(n))
    logits[:10] = -np.abs(logits[:10])        # some negative ones among the best too
    prompt = [int(np.argmax(logits))]
    r.sampler.reset(prompt)
    r.put(logits)
    p = SamplingParams(temperature=0.0, repetition_penalty=1.8)
    out: list[int] = []
    for step in range(25):
        ref = sample_ref(logits, p, np.asarray(prompt + out), None)
        assert r.draw(p, step) == ref
        out.append(ref)
    assert len(set(out)) > 5


@pytest.mark.parametrize("seed", [0, 7, 2**64 - 1])
def test_top_k_1_is_greedy(rig, seed):
    r = rig(151936)
    logits = fresh(151936)
    r.put(logits)
    p = SamplingParams(temperature=0.8, top_k=1, seed=seed)
    assert {r.draw(p, step) for step in range(5)} == {int(np.argmax(logits))}


def test_transformed_logits_are_the_reference_bitwise(rig):
    n = 151936
    r = rig(n)
    logits = fresh(n)
    prompt = np.random.default_rng().choice(n, 2000)
    r.sampler.reset(prompt)
    r.put(logits)
    p = SamplingParams(temperature=0.7, repetition_penalty=1.3, top_k=50, seed=3)
    r.draw(p)
    np.testing.assert_array_equal(r.sampler.filtered(), ref_x(logits, p, prompt))


# -- the candidate sets ----------------------------------------------------------------------

def _case(name: str, n: int):
    """(logits, params, prompt, expect_slow) for one named filter case, fresh data."""
    rng = np.random.default_rng()
    none = NO_SEEN
    if name == "temperature":
        return fresh(n), SamplingParams(temperature=1.2, seed=1), none, False
    if name == "top_k":
        return fresh(n), SamplingParams(temperature=0.8, top_k=40, seed=2), none, False
    if name == "top_k_ties":                   # many equal values at the k-th
        return np.round(fresh(n), 0), SamplingParams(top_k=700, seed=3), none, False
    if name == "top_p":
        x = fresh(n)
        return x, SamplingParams(top_p=top_p_keeping(x, 60), seed=4), none, False
    if name == "top_k_big_top_p":              # top-k set beyond the sorted candidates
        x = fresh(n, 1.0)
        return x, SamplingParams(top_k=9000, top_p=top_p_keeping(x, 300, 9000), seed=5), none, False
    if name == "top_p_slow":                   # the cut lies beyond 4096 candidates
        x = fresh(n, 0.3)
        return x, SamplingParams(top_p=top_p_keeping(x, 7000), seed=6), none, True
    if name == "top_p_slow_ties":              # ... and inside a run of equal values
        x = np.round(fresh(n, 0.5), 1)
        keep = 9000 + int(rng.integers(500))
        return x, SamplingParams(top_p=top_p_keeping(x, keep), seed=7), none, True
    if name == "top_p_slow_tie_run":          # ... inside one value's run of > 4096 ties
        x = np.round(fresh(n, 0.5), 0)
        keep = 9000 + int(rng.integers(500))
        return x, SamplingParams(top_p=top_p_keeping(x, keep), seed=10), none, True
    if name == "min_p":
        x = fresh(n)
        return x, SamplingParams(min_p=min_p_keeping(x, 120), seed=8), none, False
    if name == "all":                          # every filter and the penalty; min-p the tightest
        logits = fresh(n)
        prompt = np.concatenate([np.argsort(-logits)[:20:2], rng.choice(n, 300)])
        base = SamplingParams(temperature=0.9, repetition_penalty=1.2, seed=9)
        x = ref_x(logits, base, prompt)
        p = SamplingParams(temperature=0.9, repetition_penalty=1.2, top_k=200,
                           top_p=top_p_keeping(x, 80, 200), min_p=min_p_keeping(x, 30), seed=9)
        return logits, p, prompt, False
    raise KeyError(name)


CASES = [("temperature", 32000), ("top_k", 151936), ("top_k_ties", 32000), ("top_p", 201088),
         ("top_k_big_top_p", 32000), ("top_p_slow", 32000), ("top_p_slow_ties", 32000),
         ("top_p_slow_tie_run", 32000), ("min_p", 201088), ("all", 151936)]
if SIMULATED:   # the simulator runs each draw's 1,024-thread select block serially: smaller vocabularies
    CASES = [(name, min(n, 32000)) for name, n in CASES]


@pytest.mark.parametrize("name, n", CASES)
def test_kept_set_equals_the_reference(rig, name, n):
    r = rig(n)
    logits, p, prompt, slow = _case(name, n)
    want = ref_kept(logits, p, prompt) if name != "temperature" else np.arange(n)
    r.put(logits)
    draws = set()
    for step in range(20):                    # each draw from the prompt's seen mask alone
        r.sampler.reset(prompt)
        draws.add(r.draw(p, step))
    got = r.sampler.kept_ids()
    info = r.sampler.info()
    assert info["slow"] == int(slow)
    assert info["n_kept"] == len(got)
    assert len(got) == len(want) and np.array_equal(got, want), \
        (name, len(got), len(want), np.setxor1d(got, want)[:10])
    assert draws <= set(want.tolist())


# -- frequencies ----------------------------------------------------------------------------

def _chi2(observed, expected) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.gpu_only   # thousands of draws: the simulator takes a tenth of a second per draw
def test_draws_over_seeds_follow_the_top_k_distribution(rig):
    # 8 planted candidates, top_k=8, T=0.9, one draw per seed; chi-square df 7
    # (0.9999 quantile 29.9)
    n = 151936
    r = rig(n)
    logits = fresh(n, 1.0)
    ids = np.random.default_rng().choice(n, 8, replace=False)
    logits[ids] = np.array([9.0, 8.8, 8.5, 8.3, 8.0, 7.8, 7.5, 7.0], dtype=np.float32)
    p0 = SamplingParams(temperature=0.9, top_k=8)
    kept = ref_kept(logits, p0)
    assert set(kept.tolist()) == set(ids.tolist())
    r.put(logits)
    N = 6000
    draws = np.array([r.draw(SamplingParams(temperature=0.9, top_k=8, seed=s)) for s in range(N)])
    expected = N * set_probs(ref_x(logits, p0), 8)
    order = np.argsort(-ref_x(logits, p0), kind="stable")[:8]
    observed = np.array([(draws == i).sum() for i in order])
    assert observed.sum() == N
    assert _chi2(observed, expected) < 29.9, (observed, expected)


@pytest.mark.gpu_only
def test_draws_over_steps_follow_the_full_distribution(rig):
    # no filter: 10 planted tokens and "the rest" as 11 categories; chi-square df 10
    # (0.9999 quantile 35.6)
    n = 32000
    r = rig(n)
    logits = fresh(n, 1.0)
    ids = np.random.default_rng().choice(n, 10, replace=False)
    logits[ids] = np.linspace(7.0, 6.1, 10).astype(np.float32)
    x = logits.astype(np.float64)
    prob = np.exp(x - x.max())
    prob /= prob.sum()
    r.put(logits)
    N = 8000
    p = SamplingParams(temperature=1.0, seed=12345)
    draws = np.array([r.draw(p, step) for step in range(N)])
    observed = np.array([(draws == i).sum() for i in ids] + [(~np.isin(draws, ids)).sum()])
    expected = N * np.append(prob[ids], 1 - prob[ids].sum())
    assert _chi2(observed, expected) < 35.6, (observed, expected)


# -- determinism and graphs ------------------------------------------------------------------

def _run_request(r, rows, p, prompt) -> list[int]:
    r.sampler.reset(prompt)
    out = []
    for step, row in enumerate(rows):
        r.put(row)
        out.append(r.draw(p, step))
    return out


@pytest.mark.gpu_only   # 200 s on the simulator
def test_same_seed_same_ids_other_seed_differs(rig):
    n = 151936
    r = rig(n)
    rows = [fresh(n, 2.0) for _ in range(40)]
    prompt = np.random.default_rng().choice(n, 100)
    p = SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.2, seed=1234)
    a = _run_request(r, rows, p, prompt)
    b = _run_request(r, rows, p, prompt)
    c = _run_request(r, rows, SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.2,
                                             seed=1235), prompt)
    assert a == b
    assert a != c


@pytest.mark.gpu_only
def test_graph_replay_gives_the_eager_ids(rig, dev):
    from orcd.backends.cuda.graph import capture
    from orcd.backends.cuda.memory import to_host

    n = 151936
    r = rig(n)
    r.put(fresh(n, 2.0))
    p = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
                       repetition_penalty=1.1, seed=77)
    prompt = np.arange(0, n, 997)
    r.sampler.reset(prompt)
    eager = [r.draw(p, step) for step in range(30)]
    r.sampler.reset(prompt)
    r.sampler.set_params(p, 0)
    graph = capture(dev, lambda: r.sampler.launch(r.logits, r.out))
    replayed = []
    with graph:
        for step in range(30):
            r.sampler.set_params(p, step)
            graph.replay()
            replayed.append(int(to_host(dev, r.out.ptr, 4).view(np.int32)[0]))
    assert replayed == eager


def test_a_batch_of_rows_draws_what_each_sampler_draws_alone(dev, alloc, compiler, launcher):
    # sampling_rows: B rows in two launches must give each row the id (and leave the
    # seen mask and counts) that its sampler gives sampling the same row by itself
    from orcd.backends.cuda.memory import from_host, to_host
    from orcd.backends.cuda.tensor import DeviceTensor
    from orcd.ops.sampling import CudaSampler, mask_words
    from orcd.ops.sampling_rows import Row, RowBatch

    n = VOCABS[0]
    rng = np.random.default_rng()
    words = mask_words(n)
    allowed = rng.integers(0, 2**31 - 1, words, dtype=np.int64).astype(np.int32)
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.3),
              SamplingParams(temperature=0.9, top_k=40, seed=int(rng.integers(1 << 30))),
              SamplingParams(temperature=1.1, top_p=0.9, min_p=0.02, seed=5),
              SamplingParams(temperature=0.7, frequency_penalty=0.5, presence_penalty=0.3,
                             logit_bias=((7, 5.0), (11, -100.0)), seed=9)]
    masks = [None, None, None, allowed]
    B = len(params)
    prompts = [rng.choice(n, 50) for _ in range(B)]
    make = lambda: [CudaSampler(dev, compiler, launcher, n, allocator=alloc) for _ in range(B)]  # noqa: E731
    together, alone = make(), make()
    batch = RowBatch(dev, compiler, launcher, n, alloc)
    bufs = [alloc.alloc(4 * B * n, "test"), alloc.alloc(4 * B, "test"), alloc.alloc(4 * B, "test")]
    logits_all = DeviceTensor(bufs[0].ptr, (B, n), np.dtype(np.float32))
    i32 = np.dtype(np.int32)
    try:
        for i in range(B):
            together[i].reset(prompts[i], 50)
            alone[i].reset(prompts[i], 50)
        for step in range(3):
            from_host(dev, fresh(n * B, 2.0).astype(np.float32), logits_all.ptr)
            batch.launch([Row(together[i], logits_all.ptr + 4 * n * i, bufs[1].ptr + 4 * i, params[i],
                              step, masks[i]) for i in range(B)])
            for i in range(B):
                alone[i].sample(logits_all.rows(i, i + 1), params[i], step,
                                DeviceTensor(bufs[2].ptr + 4 * i, (1,), i32), masks[i])
            got = to_host(dev, bufs[1].ptr, 4 * B).view(np.int32).tolist()
            want = to_host(dev, bufs[2].ptr, 4 * B).view(np.int32).tolist()
            assert got == want
            assert all(0 <= t < n for t in got)
            if masks[3] is not None:   # the grammar's row kept to its mask
                assert (allowed[got[3] // 32] >> (got[3] % 32)) & 1
        for a, b in zip(together, alone):
            np.testing.assert_array_equal(a.seen_mask(), b.seen_mask())
            np.testing.assert_array_equal(a.output_counts(), b.output_counts())
    finally:
        batch.close()
        for s in together + alone:
            s.close()
        for buf in bufs:
            alloc.free(buf)
