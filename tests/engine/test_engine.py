"""The generation loop on real models: stopping, cancellation, seeds, the haiku."""

from __future__ import annotations

import time

import numpy as np
import pytest

from orcd.engine import Engine, GenerateRequest, StopMatcher
from orcd.errors import Cancelled, InferenceTimeout, InvalidRequest
from orcd.load import load_model
from orcd.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny(tiny_model, host):
    lm = load_model(tiny_model("qwen2-tiny"), host=host, device="cpu", n_ctx=64)
    yield Engine(lm)
    lm.close()


def sampled(seed):
    return SamplingParams(temperature=1.0, seed=seed)


def test_stop_matcher_holds_back_across_token_boundaries():
    m = StopMatcher(["</end>", "STOP"])
    assert m.push("abc</") == ("abc", False)      # "</" could start "</end>": held back
    assert m.push("e") == ("", False)
    assert m.push("nd> tail") == ("", True)       # matched: nothing of it or after it
    m = StopMatcher(["</end>"])
    assert m.push("a</b") == ("a</b", False)      # "</b" cannot become "</end>"
    assert m.push("x</en") == ("x", False)
    assert m.flush() == "</en"                    # end of generation releases the rest
    m = StopMatcher([])
    assert m.push("xy") == ("xy", False)


def test_max_tokens_and_events(tiny):
    events = []
    res = tiny.generate(GenerateRequest([1, 2, 3], max_tokens=5, sampling=sampled(1)), events.append)
    assert res.stop_reason in ("max_tokens", "eog")
    assert res.tokens_out <= 5 and res.prompt_tokens == 3
    assert "".join(e.text for e in events) == res.text
    assert all(e.text for e in events)                    # only non-empty pieces are emitted
    if res.stop_reason == "max_tokens":
        assert res.tokens_out == 5


def test_same_seed_same_tokens_other_seed_differs(tiny):
    def run(seed):
        return tiny.generate(GenerateRequest([5, 6, 7], max_tokens=12, sampling=sampled(seed))).token_ids
    a, b = run(42), run(42)
    assert a == b
    assert any(run(s) != a for s in (1, 2, 3))


def test_stop_string_truncates_output(tiny):
    full = tiny.generate(GenerateRequest([9, 8, 7], max_tokens=20, sampling=sampled(7)))
    if len(full.text) < 4:
        pytest.skip("sample too short to cut")
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 2]
    cut = tiny.generate(GenerateRequest([9, 8, 7], max_tokens=20, sampling=sampled(7), stop=[stop]))
    assert cut.stop_reason == "stop_sequence"
    assert cut.text == full.text[:full.text.find(stop)]


def test_context_overflow_is_refused_before_work(tiny):
    with pytest.raises(InvalidRequest, match="exceeds the context length 64"):
        tiny.generate(GenerateRequest(list(range(10)), max_tokens=60))
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        tiny.generate(GenerateRequest([10**6], max_tokens=1))


def test_cancel_and_deadline_between_tokens(tiny):
    seen = []
    req = GenerateRequest([1, 2], max_tokens=30, sampling=sampled(3),
                          cancelled=lambda: len(seen) >= 2)
    with pytest.raises(Cancelled):
        tiny.generate(req, seen.append)
    assert len(seen) == 2
    with pytest.raises(InferenceTimeout):
        tiny.generate(GenerateRequest([1, 2], max_tokens=30, deadline=time.monotonic() - 1))


@pytest.mark.slow
def test_haiku_on_the_real_qwen(real_qwen, host):
    from orcd.chat import ChatTemplate

    lm = load_model(real_qwen, host=host, device="cpu", n_ctx=256)
    try:
        engine = Engine(lm)
        ids = ChatTemplate.for_tokenizer(lm.tokenizer).prompt_ids(
            lm.tokenizer, [{"role": "user", "content": "Write a haiku about GPU computing"}])
        greedy = [engine.generate(GenerateRequest(ids, 60, SamplingParams(temperature=0.0)))
                  for _ in range(2)]
        assert greedy[0].token_ids == greedy[1].token_ids
        assert greedy[0].stop_reason == "eog"
        lines = [ln for ln in greedy[0].text.strip().splitlines() if ln.strip()]
        assert len(lines) == 3, greedy[0].text
        assert any(w in greedy[0].text.lower() for w in ("gpu", "comput", "parallel", "core"))
        warm = [engine.generate(GenerateRequest(ids, 60, SamplingParams(temperature=0.7, seed=11)))
                for _ in range(2)]
        assert warm[0].token_ids == warm[1].token_ids
    finally:
        lm.close()


def test_kv_cache_is_sized_per_request():
    from orcd.engine import cache_size
    assert cache_size(10, 4096) == 256
    assert cache_size(257, 4096) == 512
    assert cache_size(3000, 4096) == 4096
    assert cache_size(5000, 4096) == 4096


def test_a_request_gets_a_cache_for_its_own_length(tiny_model, host):
    lm = load_model(tiny_model("qwen2-tiny"), host=host, device="cpu", n_ctx=1024)
    sizes = []
    real = lm.backend.new_kv_cache

    def spy(n_layer, n_ctx, *rest):
        sizes.append(n_ctx)
        return real(n_layer, n_ctx, *rest)

    lm.backend.new_kv_cache = spy
    engine = Engine(lm)
    engine.generate(GenerateRequest([1, 2, 3], max_tokens=2))
    engine.generate(GenerateRequest(list(range(1, 301)), max_tokens=2))
    engine.generate(GenerateRequest([1, 2], max_tokens=1000))
    lm.close()
    assert sizes == [256, 512, 1024]


def test_unseeded_request_draws_a_seed_that_reproduces_it(tiny):
    a = tiny.generate(GenerateRequest([4, 5, 6], max_tokens=10, sampling=SamplingParams(1.0)))
    b = tiny.generate(GenerateRequest([4, 5, 6], max_tokens=10, sampling=SamplingParams(1.0)))
    assert a.seed is not None and b.seed is not None and a.seed != b.seed
    again = tiny.generate(GenerateRequest([4, 5, 6], max_tokens=10, sampling=sampled(a.seed)))
    assert again.token_ids == a.token_ids and again.seed == a.seed


def test_repetition_penalty_sees_prompt_and_every_output_id(tiny):
    """Greedy with a strong penalty, against a loop that recomputes the penalty
    from prompt + output ids at every step."""
    from orcd.ops.sampling import apply_repetition_penalty
    prompt, n = [7, 8, 9, 7], 12
    got = tiny.generate(GenerateRequest(prompt, n, SamplingParams(temperature=0.0,
                                                                  repetition_penalty=2.0)))
    lm, want = tiny.lm, []
    b = lm.backend
    cache = b.new_kv_cache(lm.hp.n_layer, lm.n_ctx, lm.hp.n_head_kv, lm.hp.head_dim)
    logits = lm.model.forward(b.ops, b.ids(prompt), b.positions(0, len(prompt)), cache)
    for _ in range(len(got.token_ids)):
        seen = np.array(prompt + want)
        tok = int(np.argmax(apply_repetition_penalty(b.to_host(logits).reshape(-1), seen, 2.0)))
        want.append(tok)
        logits = lm.model.forward(b.ops, b.ids([tok]), b.positions(len(prompt) + len(want) - 1, 1),
                                  cache)
    assert got.token_ids == want
    assert len(set(want)) > 1


class _SlowPrefill:
    """The model with a sleep per prompt token fed, counting the tokens fed."""

    def __init__(self, model, per_token: float) -> None:
        self.model, self.per_token, self.fed = model, per_token, 0

    def forward(self, ops, ids, positions, cache):
        self.fed += len(ids)
        time.sleep(self.per_token * len(ids))
        return self.model.forward(ops, ids, positions, cache)


def test_deadline_is_enforced_inside_prefill(tiny_model, host):
    """A long prompt overruns the deadline by at most one of the backend's chunks
    (the CPU reference states a small one), not by the whole prompt."""
    lm = load_model(tiny_model("qwen2-tiny"), host=host, device="cpu", n_ctx=1024)
    try:
        chunk = lm.backend.prefill_chunk
        assert chunk <= 64
        slow = lm.model = _SlowPrefill(lm.model, per_token=0.002)   # 1 ms a token
        prompt = [i % 500 + 1 for i in range(505)]
        t0 = time.monotonic()
        with pytest.raises(InferenceTimeout):
            Engine(lm).generate(GenerateRequest(prompt, max_tokens=4,
                                                deadline=t0 + 0.1))
        # by the deadline ~50 tokens were fed; one more chunk may start before the check
        assert slow.fed <= 0.1 / 0.002 + 2 * chunk < len(prompt), slow.fed
    finally:
        lm.close()


# -- decode_tokens: the pipelined decode loop ---------------------------------------------

class _Pending:
    def __init__(self, log, k, tok):
        self.log, self.k, self.tok = log, k, tok

    def result(self):
        self.log.append(("read", self.k))
        return self.tok


class _DeviceBackend:
    """Records the order of queued steps, samples and host reads (what CudaBackend does
    with the GPU): sample k is the k-th id; the next step reads it on the device."""

    def __init__(self):
        self.log, self.k = [], 0

    def sample_to_device(self, logits, params, seen=None, chained=False):
        self.log.append(("sample", self.k, chained))
        p = _Pending(self.log, self.k, 100 + self.k)
        self.k += 1
        return p


class _DeviceRunner:
    def __init__(self, log):
        self.log = log

    def forward_pending(self, pos):
        self.log.append(("step", pos))
        return "logits"


def test_decode_tokens_queues_the_next_step_before_reading_the_id():
    from orcd.engine import decode_tokens

    b = _DeviceBackend()
    checks = []
    got = list(decode_tokens(b, _DeviceRunner(b.log), "prefill", SamplingParams(), lambda k: [], None,
                             n_prompt=10, max_tokens=3, interrupt=lambda: checks.append(1)))
    assert got == [100, 101, 102]
    assert b.log == [("sample", 0, False),
                     ("step", 10), ("sample", 1, True), ("read", 0),     # step 1 queued before id 0 is read
                     ("step", 11), ("sample", 2, True), ("read", 1),
                     ("read", 2)]                                          # no step past max_tokens
    assert len(checks) == 2                                                # before each queued step


def test_decode_tokens_stops_when_the_caller_stops():
    from orcd.engine import decode_tokens

    b = _DeviceBackend()
    tokens = decode_tokens(b, _DeviceRunner(b.log), "prefill", SamplingParams(), lambda k: [], None, 10, 100)
    assert next(tokens) == 100
    tokens.close()          # an end-of-generation id: one step ran past it, nothing more is queued
    assert [e for e in b.log if e[0] == "step"] == [("step", 10)]
