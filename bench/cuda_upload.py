"""Upload throughput: a file of random bytes, mmapped, to device memory through
orcd.backends.cuda.upload's pinned double buffering, for a few chunk sizes.

    python3 bench/cuda_upload.py [--mib 512] [--repeat 3]
    python3 bench/cuda_upload.py --format MXFP4 [--row 2880]   # into a planar VRAM layout

With ``--format`` the bytes are rows of that format and each row of the table is timed
twice: the planes made by the copy threads (numpy, ``QuantFormat.to_vram``) and by the
card (``orcd.ops.layout``, as the backend uploads).

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
from orcd.backends.cuda.upload import Uploader, staging_slots


def layout_kernels(dev: CudaDevice):
    """The kernels that make the planes on the card (as CudaBackend has them)."""
    from orcd.backends.cuda.launch import Launcher
    from orcd.backends.cuda.nvrtc import KernelCompiler
    from orcd.ops.layout import LayoutKernels

    return LayoutKernels(dev, KernelCompiler(dev.info.arch, cuda_headers=True), Launcher(dev))


def card_layout(repack, stage: int, chunk: int, threads: int) -> dict:
    """Uploader arguments for planes made on the card from device staging at ``stage``
    (as WeightLoading._upload passes them)."""
    n = staging_slots(2, threads)
    return dict(repack=repack, device_staging=[stage + i * chunk for i in range(n)])


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
    ap.add_argument("--format", help="a planar format's name (e.g. MXFP4): rows into its VRAM layout")
    ap.add_argument("--row", type=int, default=2880, help="values a row, with --format")
    args = ap.parse_args()
    nbytes = args.mib << 20
    fmt = None
    if args.format:
        from orcd.quant.builtin import builtin_table

        fmt = builtin_table().by_name[args.format]
        nbytes = nbytes // fmt.row_bytes(args.row) * fmt.row_bytes(args.row)
    dev = CudaDevice(0)
    alloc = DeviceAllocator(dev)
    dst_bytes = nbytes if fmt is None else nbytes // fmt.row_bytes(args.row) * fmt.vram_row_bytes(args.row)
    dst = alloc.alloc(dst_bytes, "weights")
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
        print("| card | bytes | layout | chunk | copy threads | GB/s (median of %d) | pinned ceiling GB/s |"
              % args.repeat)
        item = (src, dst.ptr) if fmt is None else (src, dst.ptr, fmt, args.row)
        thread_counts = [int(t) for t in args.threads.split(",")]
        chunk_sizes = [int(c) for c in args.chunks.split(",")]
        repack = stage = None
        if fmt is not None:   # one device staging area and one kernel set for every row of the table
            repack = layout_kernels(dev)
            stage = alloc.alloc(staging_slots(2, max(thread_counts)) * (max(chunk_sizes) << 20), "scratch")
        for threads in thread_counts:
            for chunk_mib in chunk_sizes:
                for where in ("as stored",) if fmt is None else (f"{fmt.name}: host", f"{fmt.name}: card"):
                    chunk, rates = chunk_mib << 20, []
                    extra = card_layout(repack, stage.ptr, chunk, threads) if where.endswith("card") else {}
                    with Uploader(dev, chunk_bytes=chunk, copy_threads=threads, **extra) as up:
                        for _ in range(args.repeat):
                            t = time.perf_counter()
                            up.upload_many([item])
                            rates.append(nbytes / (time.perf_counter() - t))
                    print(f"| {dev.info.name} | {nbytes} | {where} | {chunk_mib} MiB | {threads} | "
                          f"{statistics.median(rates) / 1e9:.2f} | {ceiling / 1e9:.1f} |")
                    if fmt is not None:   # the last rows, as the host lays them out
                        rows = max(1, 4096 // fmt.row_bytes(args.row))
                        want = fmt.to_vram(np.asarray(src[nbytes - rows * fmt.row_bytes(args.row):]), args.row)
                        got = to_host(dev, dst.ptr + dst_bytes - want.nbytes, want.nbytes)
                        assert np.array_equal(got, want), f"{where}: the layout is wrong"
        if fmt is None:
            tail = to_host(dev, dst.ptr + nbytes - 4096, 4096)
            assert np.array_equal(tail, np.asarray(src[-4096:])), "upload corrupted the data"
    alloc.free_all()
    dev.close()


if __name__ == "__main__":
    main()
