"""Decode GEMV bandwidth: achieved GB/s of MatmulKernels.linear vs the card's copy bandwidth.

    python3 bench/bench_gemv.py [--replays 15] [--int8] [--out results.md]
    python3 bench/bench_gemv.py --batch 1,16,32    # a decode batch's int8 GEMVs
    python3 bench/bench_gemv.py --int8 --variant ORCD_GEMV_BATCH=4   # an experiment beside

Bytes counted per GEMV: the weight's blocks + x + out (each read or written
once). A GEMV of a few MB takes microseconds, far less than a Python launch,
so each measurement is a captured CUDA graph of many launches (rotating over
enough weight copies that they cannot all sit in L2), timed with CUDA events
around each replay after a warm-up replay; the median replay over its launch
count is the time per GEMV. Ceiling: a 1 GiB device-to-device copy (bytes read
+ written), median of 10.
"""

from __future__ import annotations

import argparse
import math
import statistics

import numpy as np

# (format, n_out, n_in, T): Qwen2.5-0.5B's output matrix and FFN shapes first, then
# every format at a size big enough to show the kernel's own bandwidth.
QWEN = [("Q8_0", 151936, 896, 1), ("Q8_0", 151936, 896, 8), ("Q5_0", 4864, 896, 1),
        ("Q4_K", 896, 4864, 1), ("Q6_K", 896, 4864, 1), ("Q5_0", 896, 896, 1)]
# Phi-3-mini's qkv and gate/up (Q4_K_M), GPT-OSS's expert matrix and output (MXFP4, Q8_0)
LARGER = [("Q4_K", 9216, 3072, 1), ("Q4_K", 16384, 3072, 1), ("Q6_K", 3072, 8192, 1),
          ("Q4_0", 16384, 3072, 1), ("MXFP4", 2880, 2880, 1), ("Q8_0", 201088, 2880, 1)]
BIG = [(name, 16384, 4096, 1) for name in
       ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4")]


class Timer:
    def __init__(self, dev):
        from orcd.backends.cuda.driver import cu

        self.dev, self.cu = dev, cu
        self.start, self.stop = cu("cuEventCreate", 0), cu("cuEventCreate", 0)

    def ms(self, fn) -> float:
        cu, stream = self.cu, self.dev.stream
        cu("cuEventRecord", self.start, stream)
        fn()
        cu("cuEventRecord", self.stop, stream)
        cu("cuEventSynchronize", self.stop)
        return float(cu("cuEventElapsedTime", self.start, self.stop))


def copy_gbps(dev, alloc, timer, nbytes=1 << 30) -> float:
    from orcd.backends.cuda.driver import cu

    a, b = alloc.alloc(nbytes, "test"), alloc.alloc(nbytes, "test")
    run = lambda: cu("cuMemcpyDtoDAsync", b.ptr, a.ptr, nbytes, dev.stream)  # noqa: E731
    run()
    times = [timer.ms(run) for _ in range(10)]
    alloc.free(a)
    alloc.free(b)
    return 2 * nbytes / (statistics.median(times) * 1e-3) / 1e9


def bench_case(dev, alloc, mk, timer, host, name, n_out, n_in, T, replays, int8=False, batch=False):
    from orcd.backends.cuda.graph import capture
    from orcd.backends.cuda.memory import from_host
    from orcd.backends.cuda.tensor import DeviceTensor, QWeight

    ids = {"F32": 0, "F16": 1, "BF16": 30, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
           "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "MXFP4": 39}
    fmt = host.formats[ids[name]]
    rng = np.random.default_rng(0)
    raw = fmt.to_vram(fmt.random_blocks(n_out * n_in // fmt.block_elems, rng, 0.05), n_in)  # VRAM layout
    copies = min(64, max(1, math.ceil(4 * dev.info.l2_bytes / raw.nbytes)))
    bufs = [alloc.alloc(raw.nbytes, "test") for _ in range(copies)]
    for buf in bufs:
        from_host(dev, raw, buf.ptr)
    ws = [QWeight(buf.ptr, (n_out, n_in), fmt.type_id, fmt) for buf in bufs]
    xb, ob = alloc.alloc(4 * T * n_in, "test"), alloc.alloc(4 * T * n_out, "test")
    from_host(dev, rng.standard_normal((T, n_in)).astype(np.float32), xb.ptr)
    x, out = DeviceTensor(xb.ptr, (T, n_in), np.float32), DeviceTensor(ob.ptr, (T, n_out), np.float32)
    launches = copies * max(1, 64 // copies)
    arena = None
    if int8:  # the GEMV alone: x quantized once, outside the timed graph
        from orcd.backends.cuda.tensor import Arena

        qb = alloc.alloc(2 * T * n_in + 4096, "test")
        arena = Arena(qb.ptr, qb.nbytes)
        x = mk.quantize(x, arena)

    # batch: the rows of a decode batch, as CudaOps.linear runs them (launches of up to
    # gemv_rows rows; 16 before the int8 GEMV took 32)
    step = getattr(mk, "gemv_rows", lambda _x: 16)(x) if batch else T

    def record():
        for i in range(launches):
            for s in range(0, T, step):
                e = min(T, s + step)
                if batch:
                    mk.gemv(x.rows(s, e), ws[i % copies], None, out.rows(s, e))
                else:
                    mk.linear(x, ws[i % copies], None, out)

    with capture(dev, record) as graph:
        graph.replay()
        dev.synchronize()
        times = [timer.ms(graph.replay) for _ in range(replays)]
    for buf in (*bufs, xb, ob, *([qb] if int8 else [])):
        alloc.free(buf)
    us = statistics.median(times) * 1e3 / launches
    nbytes = raw.nbytes + 4 * T * (n_in + n_out)
    return us, nbytes / (us * 1e-6) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replays", type=int, default=15)
    ap.add_argument("--out", help="also write the markdown table here")
    ap.add_argument("--int8", action="store_true",
                    help="also time the int8-activation (dp4a) GEMV of each integer format")
    ap.add_argument("--batch", help="time the int8 GEMVs of a decode batch at these row counts "
                    "(comma-separated) on Qwen2.5-0.5B's and Phi-3-mini's shapes instead")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=VALUE",
                    help="with --int8: also time the int8 GEMV built with this macro (an experiment "
                    "matmul.cu keeps behind #if, e.g. ORCD_GEMV_BATCH=4), beside the default, "
                    "in the same run")
    args = ap.parse_args()

    from orcd.backends.cuda.device import CudaDevice
    from orcd.backends.cuda.launch import Launcher
    from orcd.backends.cuda.memory import DeviceAllocator
    from orcd.backends.cuda.nvrtc import KernelCompiler
    from orcd.ops.matmul import MatmulKernels
    from orcd.plugins import PluginHost

    dev = CudaDevice(0)
    alloc = DeviceAllocator(dev)
    compiler, launcher = KernelCompiler(dev.info.arch), Launcher(dev, debug=False)
    mk = MatmulKernels(dev, compiler, launcher, int8="all")
    defines = dict(v.split("=", 1) for v in args.variant)
    variant = MatmulKernels(dev, compiler, launcher, int8="all", defines=defines) if defines else None
    timer, host = Timer(dev), PluginHost()
    ceiling = copy_gbps(dev, alloc, timer)
    card = dev.info.name
    lines = [f"Card: **{card}** ({dev.info.sm_count} SMs, L2 {dev.info.l2_bytes >> 20} MiB); "
             f"copy ceiling {ceiling:.0f} GB/s (1 GiB D2D, read + write).", "",
             "| card | format | n_out x n_in | T | us / GEMV | GB/s | % of copy | int8 us | int8 GB/s | fp32 / int8 |"
             + (f" int8 us, {' '.join(args.variant)} | % of copy | default / variant |" if variant else ""),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- | --- |" if variant else "")]
    if args.batch:
        lines += batch_table(dev, alloc, mk, timer, host, [int(t) for t in args.batch.split(",")], args.replays)
        return finish(lines, args.out, dev)
    print("\n".join(lines), flush=True)
    for name, n_out, n_in, T in QWEN + LARGER + BIG:
        us, gbps = bench_case(dev, alloc, mk, timer, host, name, n_out, n_in, T, args.replays)
        q8 = " | | |"
        if args.int8 and name not in ("F32", "F16", "BF16"):
            us8, gbps8 = bench_case(dev, alloc, mk, timer, host, name, n_out, n_in, T, args.replays, True)
            q8 = f" {us8:.2f} | {gbps8:.0f} | {us / us8:.2f}x |"
            if variant is not None:
                usv, gbpsv = bench_case(dev, alloc, variant, timer, host, name, n_out, n_in, T, args.replays, True)
                q8 += f" {usv:.2f} | {100 * gbpsv / ceiling:.0f}% | {us8 / usv:.2f}x |"
        line = (f"| {card} | {name} | {n_out} x {n_in} | {T} | {us:.2f} | {gbps:.0f} | "
                f"{100 * gbps / ceiling:.0f}% |{q8}")
        lines.append(line)
        print(line, flush=True)
    finish(lines, args.out, dev)


# Qwen2.5-0.5B's decode GEMVs (output, gate/up, down twice: Q4_K and Q6_K layers, q, o),
# then Phi-3-mini's qkv and down
BATCH = [("Q8_0", 151936, 896), ("Q5_0", 4864, 896), ("Q4_K", 896, 4864), ("Q6_K", 896, 4864),
         ("Q5_0", 896, 896), ("Q4_K", 9216, 3072), ("Q6_K", 3072, 8192)]


def batch_table(dev, alloc, mk, timer, host, rows, replays) -> list[str]:
    """us per batch GEMV at each row count and kernel (tensor-core MMA, dp4a), and
    its ratio to one row of the same kernel."""
    head = ["", f"Decode batch int8 GEMVs on {dev.info.name}: us per GEMV (x the 1-row time)", "",
            "| format | n_out x n_in | kernel | " + " | ".join(f"T={t}" for t in rows) + " |",
            "| --- | --- | --- |" + " --- |" * len(rows)]
    print("\n".join(head), flush=True)
    chosen = mk.mma
    for name, n_out, n_in in BATCH:
        for mma in (True, False):
            mk.mma = mma   # read at each gemv call, so at the graph's capture
            us = [bench_case(dev, alloc, mk, timer, host, name, n_out, n_in, t, replays, True, True)[0]
                  for t in rows]
            line = (f"| {name} | {n_out} x {n_in} | {'mma' if mma else 'dp4a'} | "
                    + " | ".join(f"{u:.2f} ({u / us[0]:.1f}x)" for u in us) + " |")
            head.append(line)
            print(line, flush=True)
    mk.mma = chosen
    return head


def finish(lines, out, dev) -> None:
    if out:
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")
    dev.close()


if __name__ == "__main__":
    main()
