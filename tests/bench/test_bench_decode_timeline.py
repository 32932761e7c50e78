"""bench/decode_timeline.py's reading of a run's clocks (the run itself needs a card)."""

from __future__ import annotations


def test_waits_and_queueing_ahead_from_the_clocks(bench_module):
    tl = bench_module("decode_timeline")
    Step = tl.Step
    # step 1 queued while step 0 ran (before id 0 reached the host), the GPU idle 5 us;
    # step 2 queued only after id 1 came back: the GPU waited 200 us for it
    steps = [Step(queued=0.0, start=0.010, forward_end=0.900, end=1.000, id_on_host=1.050),
             Step(queued=0.500, start=1.005, forward_end=1.900, end=2.000, id_on_host=2.040),
             Step(queued=2.100, start=2.200, forward_end=3.100, end=3.200, id_on_host=3.250)]
    r = tl.summarize(steps)
    assert r["steps"] == 3
    assert abs(r["wait_us_median"] - 102.5) < 1e-6 and abs(r["wait_us_max"] - 200.0) < 1e-6
    assert r["queued_ahead"] == 0.5
    assert abs(r["step_ms"] - 0.995) < 1e-9 and abs(r["forward_ms"] - 0.895) < 1e-9
    assert abs(r["host_lag_ms"] - 0.05) < 1e-9
    text = tl.table(steps, show=2)
    assert "| 1 | 0.500 | 1.005 |" in text and "| 2 |" not in text
    assert "50% of steps queued before the previous id reached the host" in text


def test_the_recorder_times_each_step_and_the_read_of_its_own_id(bench_module, monkeypatch):
    # a fake driver whose events read a fake device clock, and a backend driven in the
    # engine's pipelined order: step k+1 queued, then id k read
    import types

    tl = bench_module("decode_timeline")
    clock = {"device": 0.0, "host": 0.0}
    monkeypatch.setattr(tl.time, "perf_counter", lambda: clock["host"])
    events = {}

    def cu(name, *args):
        if name == "cuEventCreate":
            events[len(events)] = None
            return len(events) - 1
        if name == "cuEventRecord":
            events[args[0]] = clock["device"]
        if name == "cuEventElapsedTime":
            return events[args[1]] - events[args[0]]

    class Pending:
        def __init__(self, k):
            self.k = k

        def result(self):
            return self.k

    class Backend:
        device = types.SimpleNamespace(stream=0)
        n = 0

        def decode_step(self, *a):
            clock["device"] += 1.0                  # the forward
            return "logits"

        def sample_to_device(self, logits, *a, **k):
            clock["device"] += 0.25                 # the sampler and the id's copy
            self.n += 1
            return Pending(self.n)

        def synchronize(self):
            pass

    b = Backend()
    rec = tl.Recorder(b, 8, cu=cu)
    first = b.sample_to_device("prompt logits")    # the prompt's draw: no step of its own
    pending = first
    for k in range(3):
        clock["host"] = 0.001 * (10 * k + 1)         # queued ...
        nxt = b.sample_to_device(b.decode_step())
        clock["host"] = 0.001 * (10 * k + 5)         # ... then the previous id read
        pending.result()
        pending = nxt
    clock["host"] = 0.040
    pending.result()
    steps = rec.steps()
    assert len(steps) == 3
    # on the host's clock from step 0's queueing (1 ms after the base event): the fake
    # device ran its prompt draw from 0 to 0.25 ms, then each step for 1.25 ms
    assert [round(s.start, 3) for s in steps] == [-0.75, 0.5, 1.75]
    assert [round(s.forward_end - s.start, 3) for s in steps] == [1.0] * 3
    assert [round(s.end - s.start, 3) for s in steps] == [1.25] * 3
    assert [round(s.queued, 3) for s in steps] == [0.0, 10.0, 20.0]
    assert [round(s.id_on_host, 3) for s in steps] == [14.0, 24.0, 39.0]   # its own id, read a step later
    rec.close()
    assert "decode_step" not in vars(b) and "sample_to_device" not in vars(b)
