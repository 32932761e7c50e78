"""GPT-OSS-20B's mixture of experts on the GPU: tokens grouped per expert
(prefill's path) against one GEMV per (token, expert) pair (decode's path), on
the same card, same weights and same routing.

    python3 bench/bench_moe.py [--tokens 1,8,64,512] [--out results.md]

One layer's experts at the real shape (32 experts of MXFP4 2880 x 2880 gate,
up and down, top-4), random blocks. Each number is the median of 10 runs of
CudaOps' expert part (routing excluded), timed with CUDA events after a
warm-up; the weights one run reads at most are 32 experts x 3 matrices.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from bench_gemv import Timer

N_EXPERT, K, D, N_FF = 32, 4, 2880, 2880


def experts(backend, host, rng):
    from orcd.backends.cuda.memory import from_host
    from orcd.backends.cuda.tensor import DeviceTensor, QWeight
    from orcd.ops.moe import Experts

    def put(arr):
        buf = backend.alloc.alloc(arr.nbytes, "test")
        from_host(backend.device, np.ascontiguousarray(arr), buf.ptr)
        return buf.ptr

    def dense(*shape):
        return DeviceTensor(put(rng.standard_normal(shape).astype(np.float32)), shape, np.dtype(np.float32))

    def mxfp4(shape):
        fmt = host.formats[39]
        raw = fmt.random_blocks(int(np.prod(shape)) // fmt.block_elems, rng, 0.05)
        return QWeight(put(fmt.to_vram(raw, shape[-1])), shape, 39, fmt)   # its VRAM layout

    router = rng.standard_normal((N_EXPERT, D)).astype(np.float32)   # F32 in the file
    router_w = QWeight(put(router), (N_EXPERT, D), 0, host.formats[0])
    return Experts(router_w, dense(N_EXPERT), mxfp4((N_EXPERT, N_FF, D)), dense(N_EXPERT, N_FF),
                   mxfp4((N_EXPERT, N_FF, D)), dense(N_EXPERT, N_FF), mxfp4((N_EXPERT, D, N_FF)),
                   dense(N_EXPERT, D))


def time_paths(backend, ex, T: int, rng, timer) -> tuple[float, float]:
    from orcd.backends.cuda.memory import from_host

    ops = backend.ops
    backend.scratch.reset()
    x = ops._empty((T, D))
    from_host(backend.device, rng.standard_normal((T, D)).astype(np.float32), x.ptr)
    ids, weights = ops._empty((T, K), np.int32), ops._empty((T, K))
    backend.moe_k.route(ops.linear(x, ex.router_w, ex.router_b), K, ids, weights)
    mark = backend.scratch.offset

    def run(path):
        def go():
            backend.scratch.offset = mark   # every run takes the same scratch
            path(x, ex, ids, 1.702, 7.0)
        go()
        return statistics.median(timer.ms(go) for _ in range(10))

    return run(ops._experts_grouped), run(ops._experts_per_pair)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8,64,512")
    ap.add_argument("--out", help="also write the markdown table here")
    args = ap.parse_args()

    from orcd.backends.cuda.backend import CudaBackend
    from orcd.plugins import PluginHost

    backend = CudaBackend(graphs=False)
    backend._grow_scratch(1 << 30)   # 512 tokens' activations, both paths
    rng = np.random.default_rng(0)
    ex = experts(backend, PluginHost(), rng)
    timer = Timer(backend.device)
    card = backend.device.info.name
    lines = [f"GPT-OSS-20B MoE layer (32 x MXFP4 {N_FF} x {D}, top-{K}) on **{card}**", "",
             "| card | tokens | grouped ms | per pair ms | per pair / grouped |", "| --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    for T in (int(t) for t in args.tokens.split(",")):
        grouped, per_pair = time_paths(backend, ex, T, rng, timer)
        lines.append(f"| {card} | {T} | {grouped:.3f} | {per_pair:.3f} | {per_pair / grouped:.1f}x |")
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    backend.close()


if __name__ == "__main__":
    main()
