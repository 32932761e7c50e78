"""Where a prefill's time goes: GPU time by kernel, and the host's share of the wall time.

    python3 bench/prefill_profile.py MODEL.gguf [--tokens 512] [--top 25]

Runs the engine's runner on a prompt of --tokens ids twice to warm up (kernel
compiles, GEMM plans), then times one prefill with synchronized clocks, and
profiles another with torch.profiler (CUPTI sees every kernel of the process,
orcd's driver-API launches and cuBLASLt's alike). "GPU busy" is the sum of
kernel times: wall minus busy is time the GPU waited for the host.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--gemm", default="cublaslt", help="the prefill GEMM's backend (cublaslt, nvmath)")
    ap.add_argument("--host", action="store_true", help="also cProfile one prefill (host functions by own time)")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from orcd.devkit.bench import prompt_ids
    from orcd.engine import Engine
    from orcd.load import load_model
    from orcd.plugins import PluginHost

    lm = load_model(args.model, host=PluginHost(), device="cuda:0", n_ctx=args.tokens + 1, gemm=args.gemm)
    ids = prompt_ids(lm.hp.n_vocab, args.tokens)

    def prefill() -> float:
        runner = Engine(lm).new_runner()
        t0 = time.perf_counter()
        runner.forward(ids, 0)
        lm.backend.synchronize()
        return time.perf_counter() - t0

    prefill(), prefill()
    wall = min(prefill() for _ in range(3))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        prefill()
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            rec = by_name[ev.name[:70]]
            rec[0] += ev.time_range.elapsed_us() / 1e3     # a kernel event: its run on the device
            rec[1] += 1
    busy = sum(v[0] for v in by_name.values())
    print(f"{args.model} (GEMM {args.gemm}): prefill of {args.tokens} tokens, wall {wall * 1e3:.1f} ms "
          f"({args.tokens / wall:,.0f} tok/s), GPU busy {busy:.1f} ms, "
          f"{sum(v[1] for v in by_name.values())} kernels")
    print("| kernel | calls | ms | share of busy |\n|---|---|---|---|")
    for name, (ms, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"| {name} | {n} | {ms:.2f} | {ms / busy:.0%} |")
    if args.host:
        import cProfile
        import pstats

        prof_host = cProfile.Profile()
        prof_host.runcall(prefill)
        pstats.Stats(prof_host).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
