"""Kernels built ahead of time, shipped in the package.

    python -m orcd.backends.cuda.aot [--arch sm_80,sm_86,sm_89,sm_90] [--out DIR]

compiles every kernel source the CUDA backend loads for the built-in formats
(orcd.backends.cuda.backend.kernel_sources) with NVRTC for each architecture into DIR
(default: the package's ``orcd/backends/cuda/aot``), under the keys KernelCompiler looks
up, so a worker on one of those GPUs starts without compiling: a first start on
an empty kernel cache loads cubins instead of spending seconds in NVRTC. A
release runs it before building the wheel (``python -m orcd.backends.cuda.aot && python
-m build``; the package data takes ``backends/cuda/aot/*.cubin``), where NVRTC is
installed; a GPU is not needed. Cubins from
another NVRTC version are not used (the key holds the version): such a worker
compiles, in parallel, as before.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")


def sources() -> list:
    from orcd.backends.cuda.backend import kernel_sources
    from orcd.backends.cuda.nvrtc import KernelSource
    from orcd.quant.builtin import builtin_table

    return [*kernel_sources(builtin_table()), KernelSource.from_package("orcd.backends.cuda.kernels", "gemm_simt.cu")]


def build(out: Path, archs=ARCHS) -> int:
    """Compile every source for every architecture into ``out``; returns the cubins written."""
    from orcd.backends.cuda.nvrtc import KernelCompiler

    srcs = sources()
    made = 0
    for arch in archs:
        comp = KernelCompiler(arch, cache=out, cuda_headers=True, shipped=None)
        for job in comp.prefetch(srcs):
            job.result()
        comp.close()
        made += comp.misses
    return made


def main(argv=None) -> int:
    from orcd.backends.cuda.nvrtc import shipped_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=",".join(ARCHS))
    ap.add_argument("--out", type=Path, default=shipped_dir())
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    n = build(args.out, [a for a in args.arch.split(",") if a])
    print(f"{n} cubins built into {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
