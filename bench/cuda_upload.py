"""Upload throughput: a file of random bytes, mmapped, to device memory through
orcd.backends.cuda.upload's pinned double buffering, for a few chunk sizes.

    python3 bench/cuda_upload.py [--mib 512] [--repeat 3]

The file is written just before it is read, so it sits in the page cache:
this measures memory -> device, not the disk. Each row is one chunk size and
number of copy threads (each thread double-buffers); the ceiling beside it is
one cuMemcpyHtoD from a pinned buffer (the PCIe link's rate for this copy).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from orcd.backends.cuda.device import CudaDevice
from orcd.backends.cuda.driver import cu
from orcd.backends.cuda.memory import DeviceAllocator, to_host
from orcd.backends.cuda.upload import Uploader


def pinned_ceiling(dev: CudaDevice, dst: int, nbytes: int) -> float:
    host = int(cu("cuMemHostAlloc", nbytes, 0))
    try:
        cu("cuMemcpyHtoD", dst, host, nbytes)  # warm-up
        t = time.perf_counter()
        cu("cuMemcpyHtoD", dst, host, nbytes)
        return nbytes / (time.perf_counter() - t)
    finally:
        cu("cuMemFreeHost", host)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunks", default="1,4,16", help="chunk sizes in MiB")
    ap.add_argument("--threads", default="1,2,4,8", help="copy thread counts")
    args = ap.parse_args()
    nbytes = args.mib << 20
    dev = CudaDevice(0)
    alloc = DeviceAllocator(dev)
    dst = alloc.alloc(nbytes, "weights")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random.bin"
        rng = np.random.default_rng()
        with open(path, "wb") as f:
            for _ in range(args.mib // 64 or 1):
                f.write(rng.integers(0, 256, min(nbytes, 64 << 20), dtype=np.uint8).tobytes())
        src = np.memmap(path, dtype=np.uint8, mode="r")[:nbytes]
        ceiling = pinned_ceiling(dev, dst.ptr, 64 << 20)
        print(f"device: {dev.info.name}; {args.mib} MiB; pinned cuMemcpyHtoD ceiling "
              f"{ceiling / 1e9:.1f} GB/s")
        print("| card | bytes | chunk | copy threads | GB/s (median of %d) | pinned ceiling GB/s |"
              % args.repeat)
        for threads in (int(t) for t in args.threads.split(",")):
            for chunk_mib in (int(c) for c in args.chunks.split(",")):
                rates = []
                with Uploader(dev, chunk_bytes=chunk_mib << 20, copy_threads=threads) as up:
                    for _ in range(args.repeat):
                        t = time.perf_counter()
                        up.upload(src, dst.ptr)
                        rates.append(nbytes / (time.perf_counter() - t))
                print(f"| {dev.info.name} | {nbytes} | {chunk_mib} MiB | {threads} | "
                      f"{statistics.median(rates) / 1e9:.2f} | {ceiling / 1e9:.1f} |")
        tail = to_host(dev, dst.ptr + nbytes - 4096, 4096)
        assert np.array_equal(tail, np.asarray(src[-4096:])), "upload corrupted the data"
    alloc.free_all()
    dev.close()


if __name__ == "__main__":
    main()
