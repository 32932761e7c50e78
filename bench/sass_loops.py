"""Machine instructions of the GEMV kernels, without a GPU: a proxy for instruction-bound kernels.

    python3 bench/sass_loops.py [--formats Q4_K,Q6_K] [--kernels REGEX] [--base DIR]

The decode GEMVs are bound by instructions, not bytes (RESULTS.md), so the number of
SASS instructions in a kernel's main loop says, before any card times it, whether a
change cut the work per weight piece. For each format, matmul.cu and fused.cu with that
format's kernels are compiled for sm_90 with nvcc (-cubin, as NVRTC would), disassembled
with cuobjdump, and for each kernel matching --kernels the table gives its instruction
count and the length of its longest backward branch (the unrolled piece loop, for the
GEMVs; a switch kernel's longest loop may be another part). With --base DIR (a checkout's
`core` folder, e.g. from `git archive REV core`), the same for that tree beside this one.

Needs nvcc and cuobjdump on PATH (cuobjdump ships in the CUDA toolkit and in the
`nvidia-cuda-cuobjdump` wheel). Instruction counts are not time: a card decides.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

KERNELS = r"^(gemv_q8_|gemv_fused|gemv_gated_q8_|moe_gate_up_q8|moe_down_sum_q8)"
SOURCES = (("orcd.ops.matmul_base", "matmul_source"), ("orcd.ops.fused", "_kernel_source"))


def write_sources(formats: list[str], out: str) -> list[str]:
    """Each (format, source) as a folder of the source and its headers; the folders."""
    import importlib

    from orcd.plugins import PluginHost

    host = PluginHost()
    by_name = host.formats.by_name
    dirs = []
    for name in formats:
        if name not in by_name:
            raise SystemExit(f"unknown format {name}; known: {', '.join(sorted(by_name))}")
        for module, fn in SOURCES:
            src = getattr(importlib.import_module(module), fn)([by_name[name]])
            d = os.path.join(out, f"{name}-{src.name.split('.')[0]}")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, src.name), "w") as f:
                f.write(src.source)
            for header, text in dict(src.headers).items():
                with open(os.path.join(d, header), "w") as f:
                    f.write(text)
            dirs.append(d)
    return dirs


def compile_one(d: str) -> str:
    src = next(f for f in os.listdir(d) if f.endswith(".cu"))
    subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-O3", "-I.", src, "-o", "k.cubin"], cwd=d, check=True,
                   stderr=subprocess.DEVNULL)
    return os.path.join(d, "k.cubin")


def sass_stats(cubin: str, pattern: re.Pattern) -> dict[str, tuple[int, int]]:
    """{kernel: (instructions, longest loop)} of the cubin's kernels matching pattern."""
    text = subprocess.run(["cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return parse_sass(text, pattern)


def parse_sass(text: str, pattern: re.Pattern) -> dict[str, tuple[int, int]]:
    """cuobjdump -sass output -> {kernel: (instructions, longest loop)}: a loop is a
    branch to an earlier address, its length the instructions from there to the branch."""
    stats = {}
    for part in text.split("Function : ")[1:]:
        name = part.split("\n", 1)[0].strip()
        if not pattern.search(name):
            continue
        code = [(int(m.group(1), 16), m.group(2)) for line in part.splitlines()
                for m in [re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*)", line)] if m]
        loops = [(at - int(m.group(1), 16)) // 16 + 1 for at, ins in code
                 for m in [re.search(r"BRA (0x[0-9a-f]+)", ins)] if m and int(m.group(1), 16) < at]
        stats[name] = (len(code), max(loops, default=0))
    return stats


def measure(formats: list[str], pattern: str) -> dict[str, dict[str, tuple[int, int]]]:
    """{folder (format-source): {kernel: (instructions, longest loop)}} for this tree."""
    work = tempfile.mkdtemp(prefix="orcd-sass-")
    try:
        dirs = write_sources(formats, work)
        with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            cubins = list(pool.map(compile_one, dirs))
        rx = re.compile(pattern)
        return {os.path.basename(d): sass_stats(c, rx) for d, c in zip(dirs, cubins)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(this: dict, base: dict | None) -> str:
    head = "| source | kernel | instructions | longest loop |"
    if base is not None:
        head = "| source | kernel | instructions base -> this | longest loop base -> this |"
    lines = [head, "|---|---|---|---|"]
    for src in sorted(this):
        for k in sorted(this[src]):
            n, loop = this[src][k]
            if base is None:
                lines.append(f"| {src} | {k} | {n} | {loop} |")
            elif k in base.get(src, {}):
                bn, bl = base[src][k]
                lines.append(f"| {src} | {k} | {bn} -> {n} ({n / bn - 1:+.0%}) | {bl} -> {loop}"
                             f"{f' ({loop / bl - 1:+.0%})' if bl else ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="Q4_K,Q5_K,Q6_K,Q4_0,Q5_0,Q8_0,MXFP4")
    ap.add_argument("--kernels", default=KERNELS, help="regular expression of kernel names")
    ap.add_argument("--base", help="another tree's core folder, measured the same way beside this one")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)   # the --base child's output
    args = ap.parse_args(argv)
    for tool in ("nvcc", "cuobjdump"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} is not on PATH (see the module's text)")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    this = measure(formats, args.kernels)
    if args.json:
        print(json.dumps(this))
        return 0
    base = None
    if args.base:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(args.base),
                                                           os.environ.get("PYTHONPATH", "")]))
        got = subprocess.run([sys.executable, os.path.abspath(__file__), "--json", "--formats", args.formats,
                              "--kernels", args.kernels], env=env, capture_output=True, text=True)
        if got.returncode:
            sys.stderr.write(got.stderr)
            return got.returncode
        base = json.loads(got.stdout)
    print(table(this, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
