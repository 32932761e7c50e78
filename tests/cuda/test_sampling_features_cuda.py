"""The device sampler's OpenAI features against the numpy reference (marker
``cuda``): a grammar's bitmask, logit_bias, frequency/presence penalties over
the output counted on the device, and the top-N logprobs (sample_logprobs +
sample_logprob_pick), eager and inside a captured graph."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_rig import sized
from test_sampling_cuda import fresh, rig  # noqa: F401  (rig: the shared fixture)

from orcd.ops.sampling import mask_words, process, sample_ref, sample_step, transform

from orcd.sampling import SamplingParams

pytestmark = [pytest.mark.cuda, pytest.mark.sim]
BIG = sized(151936, 32000)   # the simulator runs a 1,024-thread block serially


def random_mask(n: int, keep: float, rng) -> np.ndarray:
    bits = rng.random(n) < keep
    words = np.zeros(mask_words(n) * 32, dtype=np.uint8)
    words[:n] = bits
    return np.packbits(words, bitorder="little").view(np.int32).copy()


def test_processed_logits_are_the_reference_bitwise(rig):
    n = BIG
    r = rig(n)
    rng = np.random.default_rng()
    logits = fresh(n)
    seen = rng.choice(n, 3000)                            # prompt 2000, output 1000 (repeats)
    bias = tuple((int(i), float(b)) for i, b in zip(rng.choice(n, 300, replace=False),
                                                    rng.uniform(-100, 100, 300)))
    allowed = random_mask(n, 0.7, rng)
    p = SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.4,
                       frequency_penalty=0.3, logit_bias=bias, top_k=50, seed=3)
    r.sampler.reset(seen, 2000)
    r.put(logits)
    r.sampler.sample(r.logits, p, 0, r.out, allowed)
    np.testing.assert_array_equal(r.sampler.filtered(),
                                  transform(logits, p, seen, 2000, allowed))


def test_mask_restricts_greedy_and_sampled_draws(rig):
    n = 32000
    r = rig(n)
    rng = np.random.default_rng()
    logits = fresh(n)
    allowed = random_mask(n, 0.01, rng)
    r.put(logits)
    greedy = SamplingParams(temperature=0.0)
    r.sampler.sample(r.logits, greedy, 0, r.out, allowed)
    assert r.sampler.info()["xmax"] == transform(logits, greedy, [], None, allowed).max()
    want = sample_ref(logits, greedy, np.zeros(0, np.int64), None, allowed=allowed)
    from orcd.backends.cuda.memory import to_host
    assert int(to_host(r.dev, r.out.ptr, 4).view(np.int32)[0]) == want
    ok = set(np.flatnonzero(np.unpackbits(allowed.view(np.uint8), bitorder="little")[:n]).tolist())
    for step in range(50):
        r.sampler.sample(r.logits, SamplingParams(temperature=1.5, seed=step), step, r.out, allowed)
        assert int(to_host(r.dev, r.out.ptr, 4).view(np.int32)[0]) in ok


def test_frequency_and_presence_steps_follow_the_reference(rig):
    # greedy over the same logits: each chosen id loses frequency per use, the
    # device counts them itself; the prompt is not counted
    n = 32000
    r = rig(n)
    logits = fresh(n)
    best = np.argsort(-logits)[:5]
    logits[best] = logits[best[0]] + np.float32(0.1) * np.arange(5, 0, -1, dtype=np.float32)
    prompt = [int(best[0])] * 4
    p = SamplingParams(temperature=0.0, frequency_penalty=0.15, presence_penalty=0.05)
    r.sampler.reset(prompt, len(prompt))
    r.put(logits)
    out: list[int] = []
    for step in range(20):
        ref = sample_ref(logits, p, np.asarray(prompt + out), None, n_prompt=len(prompt))
        assert r.draw(p, step) == ref, step
        out.append(ref)
    assert len(set(out)) > 2
    counts = np.zeros(n, np.int32)
    np.add.at(counts, out, 1)
    np.testing.assert_array_equal(r.sampler.output_counts(), counts)


@pytest.mark.parametrize("n", sized([32000, 151936, 201088], [32000, 40000]))
def test_logprobs_match_the_reference(rig, n):
    r = rig(n)
    rng = np.random.default_rng()
    logits = fresh(n)
    seen = rng.choice(n, 500)
    p = SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.1, frequency_penalty=0.2,
                       logit_bias=((7, 3.0),), logprobs=20, seed=11)
    r.sampler.reset(seen, 400)
    r.put(logits)
    tok = r.draw(p, 0)
    got = r.sampler.logprobs()
    want = sample_step(logits, p, seen, np.random.default_rng(0), 400)   # its draw differs; top-N not
    x = process(logits, p, seen, 400)
    assert got.id == tok
    assert [i for i, _ in got.top] == [i for i, _ in want.top]
    assert [v for _, v in got.top] == pytest.approx([v for _, v in want.top], abs=2e-4)
    lse = np.log(np.exp(x.astype(np.float64) - x.max()).sum()) + x.max()
    assert got.logprob == pytest.approx(float(x[tok] - lse), abs=2e-4)


@pytest.mark.gpu_only   # graph capture needs the driver
def test_graph_replay_with_mask_and_logprobs_gives_the_eager_results(rig, dev):
    from orcd.backends.cuda.graph import capture
    from orcd.backends.cuda.memory import to_host

    n = 151936
    r = rig(n)
    rng = np.random.default_rng()
    r.put(fresh(n, 2.0))
    masks = [random_mask(n, 0.3, rng) for _ in range(10)]
    p = SamplingParams(temperature=0.9, top_k=40, presence_penalty=0.5, logprobs=5, seed=5)
    r.sampler.reset([], 0)
    eager = []
    for step, m in enumerate(masks):
        r.sampler.sample(r.logits, p, step, r.out, m)
        eager.append(r.sampler.logprobs())
    r.sampler.reset([], 0)
    r.sampler.set_params(p, 0, masks[0])
    graph = capture(dev, lambda: r.sampler.launch(r.logits, r.out, logprobs=True))
    replayed = []
    with graph:
        for step, m in enumerate(masks):
            r.sampler.set_params(p, step, m)
            graph.replay()
            replayed.append(r.sampler.logprobs())
            assert replayed[-1].id == int(to_host(dev, r.out.ptr, 4).view(np.int32)[0])
    assert replayed == eager
