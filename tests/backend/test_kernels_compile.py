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

from orcd.quant.builtin import FORMATS
from orcd.quant.device import HEADER, formats_header, with_device

ROOT = Path(__file__).resolve().parents[2] / "core" / "orcd"
SOURCES = sorted([*ROOT.glob("ops/*.cu"), *ROOT.glob("backends/cuda/kernels/*.cu")])
OWN_HEADERS = ({p.name for p in ROOT.glob("quant/*.cuh")} | {p.name for p in ROOT.glob("ops/*.cuh")}
               | {HEADER})   # formats.cuh is generated
TOOLKIT_HEADERS = {"cuda_fp16.h"}   # what the GPU machine's NVRTC headers are known to provide
NVCC = shutil.which("nvcc")


def test_there_are_kernel_sources():
    assert len(SOURCES) >= 9, SOURCES


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_includes_are_ones_nvrtc_can_resolve(src):
    for quoted, angled in re.findall(r'#include\s+(?:"([^"]+)"|<([^>]+)>)', src.read_text()):
        assert (quoted or angled) in OWN_HEADERS | TOOLKIT_HEADERS, f"{src.name} includes {quoted or angled}"


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    """src -> (nvcc's return code, stderr, PTX text), each source compiled once."""
    if NVCC is None:
        pytest.skip("no nvcc on this machine")
    out_dir, done = tmp_path_factory.mktemp("ptx"), {}
    (out_dir / HEADER).write_text(formats_header(FORMATS))   # the built-in table's dispatch

    def compile_(src: Path):
        if src not in done:
            out = out_dir / (src.stem + ".ptx")
            res = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "-ptx", "-I", str(ROOT / "quant"),
                                  "-I", str(out_dir), str(src), "-o", str(out)], capture_output=True, text=True)
            done[src] = (res.returncode, res.stderr, out.read_text() if res.returncode == 0 else "")
        return done[src]

    return compile_


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_compiles_for_sm90(src, ptx):
    rc, stderr, text = ptx(src)
    assert rc == 0, stderr[-3000:]
    assert ".entry" in text


def _quoted_includes(text: str, headers: dict[str, str], seen: set[str]) -> set[str]:
    for name in re.findall(r'#include\s+"([^"]+)"', text):
        if name not in seen:
            seen.add(name)
            _quoted_includes(headers.get(name, ""), headers, seen)
    return seen


def test_kernel_sources_bring_every_header_they_include():
    # NVRTC sees only the headers a KernelSource carries: what each .cu includes,
    # directly or through another header, must be among them
    from orcd.backends.cuda.aot import sources
    from orcd.ops.matmul_base import matmul_source

    own = {p.name: p.read_text() for p in [*ROOT.glob("quant/*.cuh"), *ROOT.glob("ops/*.cuh")]}
    own[HEADER] = formats_header(FORMATS)
    carried = {s.name: s.headers for s in sources()}
    carried["matmul.cu"] = matmul_source(FORMATS).headers
    for src in SOURCES:
        needed = _quoted_includes(src.read_text(), own, set())
        assert needed <= set(carried.get(src.name, {})), f"{src.name} needs {sorted(needed)}"


def test_every_kernel_the_launchers_name_exists(ptx):
    # the launchers build kernel names from tables (format suffixes, GEMV token
    # counts, head dims); a name missing from the module fails only on the GPU
    from orcd.ops.attention import PF_HEAD_DIMS
    from orcd.ops.matmul_base import GATED_Q8_TM, GEMV_Q8_TM, GEMV_TM

    def entries(name: str) -> set[str]:
        return set(re.findall(r"\.entry\s+(\w+)\(", ptx(ROOT / "ops" / name)[2]))

    matmul = entries("matmul.cu")
    for fmt in with_device(FORMATS):
        s = fmt.device.suffix
        wanted = {f"gemv_{s}_t{tm}" for tm in GEMV_TM} | {f"moe_gemv_{s}", f"moe_gemm_{s}", f"embed_{s}",
                                                        f"dequant_f16_{s}", f"dequant_bf16_{s}"}
        if fmt.device.int8:
            wanted |= {f"gemv_q8_{s}_t{tm}" for tm in GEMV_Q8_TM} | {f"gemv_q8_gated_{s}_t{tm}" for tm in GATED_Q8_TM}
            wanted |= {f"moe_gemv_q8_{s}", f"moe_gemm_q8_{s}", f"moe_gate_up_q8_{s}", f"moe_down_sum_q8_{s}"}
        assert wanted <= matmul, sorted(wanted - matmul)
    assert {"quantize_q8", "to_half", "from_half"} <= matmul
    assert {f"attn_prefill_tc_v{v}" for v in PF_HEAD_DIMS} <= entries("attention.cu")
    assert {"moe_route", "moe_group", "moe_gather", "moe_weighted_sum", "moe_norm_route_q8"} <= entries("moe.cu")
    assert {"gemv_fused", "gemv_fused_q8", "rms_norm_q8"} <= entries("fused.cu")
