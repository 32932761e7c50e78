"""A timeline of the engine's pipelined decode on a card (issue 14): is step k+1 queued
before id k reaches the host, and how long does the GPU wait between steps?

    python3 bench/decode_timeline.py MODEL.gguf [--prompt 512] [--tokens 64] [--show 12]
                                      [--cuda-option NAME=VALUE ...]

Decodes greedily as the engine does (orcd.engine.decode_tokens, after a warm-up that
captures the graphs), with CUDA events recorded on the stream around each step: before
its graph (the step starts), after it (the forward ends) and after its sampler and the
copy of its id (the step ends); host clocks when the step is queued and when its id
reaches the host. Device times go on the host clock through one event recorded and
waited for before decoding (~10 us of slack). The GPU's wait before step k+1 is its start
minus step k's end: near zero when step k+1 was queued while step k ran. The recorded
events themselves add a little to each step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

from orcd.commands._options import add_cuda_option_argument, cuda_options_of


@dataclass
class Step:
    """One decode step's clocks, in ms from the first step's queueing."""

    queued: float        # host: the step's graph launch was called
    start: float         # device: the step began (its inputs' copy and graph next in the stream)
    forward_end: float   # device: the graph ended
    end: float           # device: its sampler and the id's copy ended
    id_on_host: float    # host: the step's id was read


def summarize(steps: list[Step]) -> dict:
    """Per step the GPU's wait before it and whether it was queued before the previous
    id reached the host; medians and worst cases over the run."""
    waits = [b.start - a.end for a, b in zip(steps, steps[1:])]
    ahead = [b.queued < a.id_on_host for a, b in zip(steps, steps[1:])]
    lengths = [s.end - s.start for s in steps]
    return {"steps": len(steps),
            "step_ms": statistics.median(lengths) if lengths else 0.0,
            "forward_ms": statistics.median(s.forward_end - s.start for s in steps) if steps else 0.0,
            "wait_us_median": 1000 * statistics.median(waits) if waits else 0.0,
            "wait_us_max": 1000 * max(waits) if waits else 0.0,
            "queued_ahead": sum(ahead) / len(ahead) if ahead else 0.0,
            "host_lag_ms": statistics.median(s.id_on_host - s.end for s in steps) if steps else 0.0}


def table(steps: list[Step], show: int) -> str:
    lines = ["| step | queued (host) | start | forward end | end | id on host | GPU wait before, us |",
             "|---|---|---|---|---|---|---|"]
    for k, s in enumerate(steps[:show]):
        wait = "" if k == 0 else f"{1000 * (s.start - steps[k - 1].end):.1f}"
        lines.append(f"| {k} | {s.queued:.3f} | {s.start:.3f} | {s.forward_end:.3f} | {s.end:.3f} | "
                     f"{s.id_on_host:.3f} | {wait} |")
    r = summarize(steps)
    lines.append(f"\n{r['steps']} steps: step {r['step_ms']:.3f} ms (forward {r['forward_ms']:.3f}); GPU wait "
                 f"between steps median {r['wait_us_median']:.1f} us, max {r['wait_us_max']:.1f} us; "
                 f"{100 * r['queued_ahead']:.0f}% of steps queued before the previous id reached the host; "
                 f"an id reaches the host {r['host_lag_ms']:.3f} ms after its step ends (median)")
    return "\n".join(lines)


class Recorder:
    """Events and host clocks around the backend's decode steps (see the module's text)."""

    def __init__(self, backend, n: int, cu=None) -> None:
        if cu is None:   # (a test gives a fake driver)
            from orcd.backends.cuda.driver import cu

        self.b, self.cu = backend, cu
        self.pool = [cu("cuEventCreate", 0) for _ in range(3 * n + 1)]
        self.used = 0
        self.marks: list[list] = []   # per step: [queued, start ev, forward ev, end ev, id time]
        self.base = self._event()
        cu("cuEventSynchronize", self.base)
        self.t0 = time.perf_counter()
        step, sample = backend.decode_step, backend.sample_to_device

        def decode_step(*a, **k):
            queued, start = time.perf_counter(), self._event()
            out = step(*a, **k)
            self.marks.append([queued, start, self._event(), None, None])
            return out

        def sample_to_device(*a, **k):
            pending = sample(*a, **k)
            if pending is not None and self.marks and self.marks[-1][3] is None:
                mark = self.marks[-1]
                mark[3] = self._event()
                result = pending.result

                def timed_result():
                    out = result()
                    mark[4] = time.perf_counter()
                    return out
                pending.result = timed_result
            return pending

        backend.decode_step, backend.sample_to_device = decode_step, sample_to_device

    def _event(self):
        ev = self.pool[self.used]
        self.used += 1
        self.cu("cuEventRecord", ev, self.b.device.stream)
        return ev

    def _ms(self, ev) -> float:
        return float(self.cu("cuEventElapsedTime", self.base, ev))

    def steps(self) -> list[Step]:
        self.b.synchronize()
        done = [m for m in self.marks if m[3] is not None and m[4] is not None]
        if not done:
            return []
        zero = 1000 * (done[0][0] - self.t0)
        return [Step(1000 * (q - self.t0) - zero, self._ms(s) - zero, self._ms(f) - zero, self._ms(e) - zero,
                     1000 * (h - self.t0) - zero) for q, s, f, e, h in done]

    def close(self) -> None:
        del self.b.decode_step, self.b.sample_to_device   # the class's methods again
        for ev in self.pool:
            self.cu("cuEventDestroy", ev)


def run(path: str, prompt: int, tokens: int, **options) -> list[Step]:
    from orcd.devkit.bench import prompt_ids, time_generation
    from orcd.engine import Engine, decode_tokens
    from orcd.load import load_model
    from orcd.plugins import PluginHost
    from orcd.sampling import SamplingParams

    lm = load_model(path, host=PluginHost(), device="cuda:0", n_ctx=prompt + tokens + 8, **options)
    try:
        ids = prompt_ids(lm.hp.n_vocab, prompt)
        time_generation(lm, ids[:8], 4)        # compiles kernels, captures the decode graph
        runner = Engine(lm).new_runner()
        logits = runner.forward(ids, 0)
        lm.backend.synchronize()
        rec = Recorder(lm.backend, tokens)
        try:
            seen = np.zeros(0, np.int64)
            for _ in decode_tokens(lm.backend, runner, logits, SamplingParams(temperature=0.0),
                                   lambda k: seen, np.random.default_rng(0), prompt, tokens):
                pass
            return rec.steps()
        finally:
            rec.close()
    finally:
        lm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--show", type=int, default=12)
    add_cuda_option_argument(ap)
    args = ap.parse_args()
    options = cuda_options_of(ap, args.cuda_option)
    steps = run(args.model, args.prompt, args.tokens, **options)
    if not steps:
        sys.exit("no pipelined decode steps were seen (no device sampler for this model?)")
    print(table(steps, args.show), flush=True)


if __name__ == "__main__":
    main()
