"""bench/sass_loops.py: the SASS parser (kernels, instructions, longest backward
branch) on a hand-written disassembly, the sources it writes per format, and the
table's ratios."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

# two kernels as cuobjdump -sass prints them (addresses in bytes, 16 a instruction)
SASS = """
        code for sm_90
                Function : gemv_q8_q4_k_t1
        .headerflags    @"EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_TID.X ;                     /* 0x0000000000007919 */
        /*0020*/                   IADD3 R2, R0, 0x1, RZ ;                /* 0x0000000100027810 */
        /*0030*/                   IDP.4A.S8.S8 R3, R2, R2, R3 ;          /* 0x0000000202037226 */
        /*0040*/                   ISETP.GE.AND P0, PT, R2, 0x8, PT ;     /* 0x000000080200780c */
        /*0050*/               @!P0 BRA 0x20 ;                            /* 0xfffffffc00f08947 */
        /*0060*/                   IADD3 R4, R3, 0x1, RZ ;                /* 0x0000000103047810 */
        /*0070*/               @!P0 BRA 0x10 ;                            /* 0xfffffffc00f08947 */
        /*0080*/                   EXIT ;                                 /* 0x000000000000794d */
                ..........
                Function : quantize_q8
        .headerflags    @"EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0010*/                   EXIT ;                                 /* 0x000000000000794d */
"""


@pytest.fixture
def sass_loops(bench_module):
    return bench_module("sass_loops")


def test_the_longest_backward_branch_is_the_loop(sass_loops):
    got = sass_loops.parse_sass(SASS, re.compile(sass_loops.KERNELS))
    # 9 instructions; loops 0x20..0x50 (4) and 0x10..0x70 (7): the longest is 7,
    # and quantize_q8 does not match the GEMV pattern
    assert got == {"gemv_q8_q4_k_t1": (9, 7)}
    everything = sass_loops.parse_sass(SASS, re.compile("."))
    assert everything["quantize_q8"] == (2, 0)


def test_each_format_gets_its_matmul_and_fused_sources(sass_loops, tmp_path):
    dirs = sass_loops.write_sources(["Q4_K", "MXFP4"], str(tmp_path))
    assert sorted(Path(d).name for d in dirs) == ["MXFP4-fused", "MXFP4-matmul", "Q4_K-fused", "Q4_K-matmul"]
    formats = (tmp_path / "Q4_K-matmul" / "formats.cuh").read_text()
    assert "FmtQ4_K" in formats and "FmtMXFP4" not in formats      # only the format asked for
    assert (tmp_path / "Q4_K-matmul" / "matmul.cu").exists() and (tmp_path / "Q4_K-fused" / "fused.cu").exists()
    with pytest.raises(SystemExit, match="unknown format Q9_X"):
        sass_loops.write_sources(["Q9_X"], str(tmp_path))


def test_the_table_gives_base_to_this_with_the_change(sass_loops):
    this = {"Q4_K-matmul": {"gemv_q8_q4_k_t1": (552, 192), "new_kernel": (10, 0)}}
    base = {"Q4_K-matmul": {"gemv_q8_q4_k_t1": (592, 240)}}
    lines = sass_loops.table(this, base).splitlines()
    assert lines[2] == "| Q4_K-matmul | gemv_q8_q4_k_t1 | 592 -> 552 (-7%) | 240 -> 192 (-20%) |"
    assert len(lines) == 3                  # a kernel only this tree has gets no ratio row
    assert sass_loops.table(this, None).splitlines()[2] == "| Q4_K-matmul | gemv_q8_q4_k_t1 | 552 | 192 |"
