"""Every CUDA kernel source compiles for sm_90, where a CUDA toolkit is at hand.

No GPU is needed to compile: with ``nvcc`` on the PATH (the development and CI
machine has one), a syntax or type error in a .cu file or a format header fails
here, before a GPU run is spent finding it. NVRTC on the GPU machine compiles
the same sources at run time; its header set is smaller than nvcc's (no
``mma.h``), so the kernels include only ``cuda_fp16.h`` and orcd's own headers,
which this test also checks.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "core" / "orcd"
SOURCES = sorted([*ROOT.glob("ops/*.cu"), *ROOT.glob("cuda/kernels/*.cu")])
OWN_HEADERS = {p.name for p in ROOT.glob("quant/*.cuh")}
TOOLKIT_HEADERS = {"cuda_fp16.h"}   # what the GPU machine's NVRTC headers are known to provide
NVCC = shutil.which("nvcc")


def test_there_are_kernel_sources():
    assert len(SOURCES) >= 9, SOURCES


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_includes_are_ones_nvrtc_can_resolve(src):
    for quoted, angled in re.findall(r'#include\s+(?:"([^"]+)"|<([^>]+)>)', src.read_text()):
        assert (quoted or angled) in OWN_HEADERS | TOOLKIT_HEADERS, f"{src.name} includes {quoted or angled}"


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_compiles_for_sm90(src, tmp_path):
    out = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "-ptx", "-I", str(ROOT / "quant"), str(src),
                          "-o", str(tmp_path / "out.ptx")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "out.ptx").stat().st_size > 0


def _quoted_includes(text: str, headers: dict[str, str], seen: set[str]) -> set[str]:
    for name in re.findall(r'#include\s+"([^"]+)"', text):
        if name not in seen:
            seen.add(name)
            _quoted_includes(headers.get(name, ""), headers, seen)
    return seen


def test_kernel_sources_bring_every_header_they_include():
    # NVRTC sees only the headers a KernelSource carries: what each .cu includes,
    # directly or through another header, must be among them
    from orcd.ops import fused, matmul

    own = {p.name: p.read_text() for p in ROOT.glob("quant/*.cuh")}
    carried = {"matmul.cu": matmul._kernel_source().headers, "fused.cu": fused._kernel_source().headers}
    for src in SOURCES:
        needed = _quoted_includes(src.read_text(), own, set())
        assert needed <= set(carried.get(src.name, {})), f"{src.name} needs {sorted(needed)}"
