"""Where a decode step's time goes: per-op kernels and graph time (issue 9).

    python3 bench/decode_profile.py MODEL.gguf [--n-ctx 2048] [--positions 100,600,1000]
                                    [--bench] [--kernels] [--json out.json]
                                    [--cuda-option NAME=VALUE ...]

The decode step is captured as a CUDA graph, as the backend replays it, and
timed by CUDA events over many replays (median of batches). Per op type the
step is captured again with every call of that op made twice ("doubling"):
the extra graph time is what that op's kernels cost inside the step, launch
gaps included. Kernel counts come from one eager step through a counting
proxy. The KV cache holds a real prefill of random tokens up to the last
position. Runs against any orcd checkout on PYTHONPATH (the same script times
the baseline and the current code on the same card). ``--bench`` adds the
engine's decode tok/s (orcd.devkit.bench.run_bench: prompt 512, 128 tokens, 3 runs).
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

from orcd.commands._options import add_cuda_option_argument, cuda_options_of


def op_key(name: str, args) -> str:
    """The op's name; the vocabulary projection apart from the layers' linears."""
    if name.startswith("linear") and len(args) > 1:
        ws = args[1] if isinstance(args[1], (tuple, list)) else (args[1],)
        if any(getattr(w, "shape", (0,))[0] >= 32768 for w in ws):
            return name + "/vocab"
    return name


class Counting:
    """Forwards every op, counting calls and kernel launches per op name."""

    def __init__(self, ops, launcher) -> None:
        self.ops, self.launcher = ops, launcher
        self.calls: dict[str, int] = {}
        self.kernels: dict[str, int] = {}

    def __getattr__(self, name):
        fn = getattr(self.ops, name)

        def counted(*a, **k):
            before = self.launcher.launches
            out = fn(*a, **k)
            key = op_key(name, a)
            self.calls[key] = self.calls.get(key, 0) + 1
            self.kernels[key] = self.kernels.get(key, 0) + self.launcher.launches - before
            return out
        return counted


class Twice:
    """Forwards every op; ``target`` runs twice (attention's second run keeps the arena)."""

    def __init__(self, ops, backend, target: str) -> None:
        self.ops, self.b, self.target = ops, backend, target

    def __getattr__(self, name):
        fn = getattr(self.ops, name)
        if not self.target.startswith(name):
            return fn

        def twice(*a, **k):
            out = fn(*a, **k)
            if op_key(name, a) != self.target:
                return out
            scratch = self.b.scratch
            scratch.flip = lambda: None          # no second layer boundary
            try:
                fn(*a, **k)
            finally:
                del scratch.flip
            return out
        return twice


class Step:
    def __init__(self, lm, n_ctx: int, last_pos: int) -> None:
        from orcd.backends.cuda.driver import cu

        self.lm, self.b, self.model = lm, lm.backend, lm.model
        hp = lm.hp
        self.cache = self.b.new_kv_cache(hp.n_layer, n_ctx, hp.n_head_kv, hp.head_dim,
                                         hp.get("head_dim_v"))
        ids = np.random.default_rng(0).integers(0, hp.n_vocab, last_pos + 1).tolist()
        for s in range(0, len(ids), 512):   # prefill: the cache holds real keys up to last_pos
            self.b.eager(self.model, self.cache, ids[s:s + 512], s)
        self.b.synchronize()
        self.cu = cu
        self.ev0, self.ev1 = cu("cuEventCreate", 0), cu("cuEventCreate", 0)

    def set_pos(self, pos: int, token: int = 17) -> None:
        from orcd.backends.cuda.memory import from_host

        from_host(self.b.device, np.array([token, pos], np.int32), self.b.step_ids.ptr)

    def forward(self, ops):
        from orcd.backends.cuda.backend import ScratchFull

        b = self.b
        while True:
            b.scratch.reset()
            try:
                return self.model.forward(ops, b.step_ids, b.step_pos, self.cache)
            except ScratchFull as e:
                b._grow_scratch(e.args[0])

    def graph(self, ops):
        from orcd.backends.cuda.graph import capture

        self.forward(ops)                 # sizes the scratch, builds tables
        self.b.synchronize()
        self.b.scratch.reset()
        return capture(self.b.device, lambda: self.model.forward(ops, self.b.step_ids,
                                                                 self.b.step_pos, self.cache))

    def ms(self, graph, replays: int = 100, batches: int = 7) -> float:
        cu, stream = self.cu, self.b.device.stream
        graph.replay()
        times = []
        for _ in range(batches):
            cu("cuEventRecord", self.ev0, stream)
            for _ in range(replays):
                graph.replay()
            cu("cuEventRecord", self.ev1, stream)
            cu("cuEventSynchronize", self.ev1)
            times.append(float(cu("cuEventElapsedTime", self.ev0, self.ev1)) / replays)
        return statistics.median(times)


def sampler_ms(step) -> float | None:
    """Graph time of the device sampler's kernels (greedy) on this step's logits."""
    from orcd.backends.cuda.graph import capture
    from orcd.sampling import SamplingParams

    b = step.b
    logits = step.forward(b.ops)
    b.sample(logits, SamplingParams(temperature=0.0), np.zeros(0, np.int64), np.random.default_rng(0))
    if getattr(b, "sampler", None) is None:
        return None
    s = b.sampler
    with capture(b.device, lambda: s.kernels.launch(logits.view(-1), s.out_id)) as g:
        return step.ms(g)


def profile(path: str, n_ctx: int, positions: list[int], kernels: bool = False, **options) -> dict:
    from orcd.load import load_model
    from orcd.plugins import PluginHost

    lm = load_model(path, host=PluginHost(), device="cuda:0", n_ctx=n_ctx, **options)
    try:
        step = Step(lm, n_ctx, max(positions))
        b = step.b
        res = {"card": b.device.info.name, "positions": {}, "ops": {}}
        mid = positions[len(positions) // 2]
        step.set_pos(mid)
        counting = Counting(b.ops, b.launcher)
        step.forward(counting)
        b.synchronize()
        res["kernels_per_step"] = sum(counting.kernels.values())
        for pos in positions:
            step.set_pos(pos)
            with step.graph(b.ops) as g:
                base = step.ms(g)
            with step.graph(Twice(b.ops, b, "attention")) as g:
                att = step.ms(g) - base
            res["positions"][pos] = {"step_ms": base, "attention_ms": att}
        step.set_pos(mid)
        with step.graph(b.ops) as g:
            base = step.ms(g)
            if kernels:   # printed now: the table below is the ops' (doubling), this the kernels'
                from kernel_times import print_kernel_times
                print_kernel_times(g.replay, f"one replayed step at position {mid}", top=25)
        res["step_ms"] = base
        res["sampler_ms"] = sampler_ms(step)
        for name in sorted(counting.kernels, key=lambda n: -counting.kernels[n]):
            if counting.kernels[name] == 0:
                continue
            with step.graph(Twice(b.ops, b, name)) as g:
                extra = step.ms(g) - base
            res["ops"][name] = {"calls": counting.calls[name], "kernels": counting.kernels[name],
                                "ms": extra, "us_per_call": 1000 * extra / counting.calls[name]}
        return res
    finally:
        lm.close()


def bench(path: str, **options) -> dict:
    from orcd.devkit.bench import run_bench
    from orcd.plugins import PluginHost

    r = run_bench(path, host=PluginHost(), device="cuda:0", prompt_tokens=512, gen_tokens=128, repeat=3,
                  **options)
    return {"prefill_tok_s": r.prefill_tok_s, "decode_tok_s": r.decode_tok_s, "ttft_ms": r.ttft_ms}


def table(res: dict) -> str:
    lines = [f"card {res['card']}: {res['kernels_per_step']} kernels/step, "
             f"graph step {res['step_ms']:.3f} ms"]
    if res.get("sampler_ms") is not None:
        lines.append(f"  device sampler (greedy) {res['sampler_ms']:.3f} ms")
    for pos, r in res["positions"].items():
        lines.append(f"  pos {pos}: step {r['step_ms']:.3f} ms, attention {r['attention_ms']:.3f} ms")
    lines.append(f"  {'op':<14}{'calls':>6}{'kernels':>8}{'ms/step':>9}{'us/call':>9}{'share':>7}")
    for name, r in res["ops"].items():
        lines.append(f"  {name:<14}{r['calls']:>6}{r['kernels']:>8}{r['ms']:>9.3f}{r['us_per_call']:>9.2f}"
                     f"{100 * r['ms'] / res['step_ms']:>6.0f}%")
    total = sum(r["ms"] for r in res["ops"].values())
    lines.append(f"  sum of ops {total:.3f} ms of {res['step_ms']:.3f}")
    if "bench" in res:
        tok_s = res["bench"]["decode_tok_s"]
        lines.append(f"  engine: decode {tok_s:.0f} tok/s ({1000 / tok_s:.3f} ms/token), "
                     f"prefill {res['bench']['prefill_tok_s']:.0f} tok/s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--positions", default="100,600,1000")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--kernels", action="store_true",
                    help="also list the kernels of one replayed step by GPU time (torch.profiler)")
    add_cuda_option_argument(ap)
    args = ap.parse_args()
    options = cuda_options_of(ap, args.cuda_option)
    res = profile(args.model, args.n_ctx, [int(p) for p in args.positions.split(",")], args.kernels, **options)
    if args.bench:
        res["bench"] = bench(args.model, **options)
    print(table(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
