"""The CUDA format structs (core/orcd/quant/*.cuh) built as host C++ and checked
against the numpy references, so CI without a GPU still tests the device code.

core/orcd/cudasim/builtins.h (the simulator's per-thread builtins) stands in for the CUDA ones; driver.cpp runs every
piece of every block through ``F::load`` (and ``F::dot8`` for the INT8 formats).
``load`` must give exactly the numpy dequantizer's values (equal as floats; only
the sign of MXFP4's zero differs): the structs follow ggml's float expressions in
ggml's order, and the host build forbids FMA contraction (-ffp-contract=off) as
numpy does. (nvcc does contract ``d * q + m``, so on the GPU the affine formats
may differ in the last bit.) ``dot8`` must match the float64 dot of the numpy
values with the q8 activations, piece by piece and summed per block.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from orcd.ops.matmul import quantize_q8_ref
from orcd.quant.builtin import FORMATS
from orcd.quant.device import HEADER, formats_header, header_texts, with_device
from orcd.quant.mxfp4 import KVALUES

pytestmark = pytest.mark.skipif(shutil.which("g++") is None,
                                reason="g++ not found: the host build of the CUDA format structs needs it")

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "kernel_host" / "driver.cpp"
QUANT = ROOT / "core" / "orcd" / "quant"
BUILTINS = ROOT / "core" / "orcd" / "cudasim"

# every built-in format with device code, by name; the plain floats are read 8
# values to a "block" by the kernels (their DeviceFormat.qk), the rest a whole block
TYPE_IDS = {f.name: f.type_id for f in with_device(FORMATS)}
INT8_NAMES = [f.name for f in with_device(FORMATS) if f.device.int8]
N_BLOCKS = 400
DOT_RTOL = 1e-5     # dot8's error, relative to sum |w * x| of the piece


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("kernel_host")
    for name, text in {**header_texts(FORMATS), HEADER: formats_header(FORMATS)}.items():
        (d / name).write_text(text)
    exe = d / "driver"
    build = subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Wno-unknown-pragmas",
                            "-ffp-contract=off", f"-I{d}", f"-I{BUILTINS}", "-o", str(exe), str(DRIVER)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return exe


@dataclass
class Result:
    positions: np.ndarray     # [PIECES, RUNS * RUN] where each piece's values sit in a block
    values: np.ndarray        # [n, QK] F::load
    dots: np.ndarray | None   # [n, PIECES] F::dot8


def cuda_qk(fmt) -> int:
    """Values per block of the device struct (the plain floats are read 8 at a time)."""
    return fmt.device.qk


def run_driver(exe: Path, fmt, blocks: np.ndarray,
               xq: np.ndarray | None = None, xd: np.ndarray | None = None) -> Result:
    """Run the host build of ``fmt``'s struct on raw ``blocks`` (and q8 activations),
    given to it as one row in the format's VRAM layout (QuantFormat.to_vram)."""
    qk = cuda_qk(fmt)
    nbytes = fmt.block_bytes * qk // fmt.block_elems        # bytes of one device block
    n = len(blocks) // nbytes
    row = fmt.to_vram(blocks, n * qk)
    payload = row.tobytes()
    if xq is not None:
        payload += np.ascontiguousarray(xq, np.int8).tobytes() + np.ascontiguousarray(xd, np.float32).tobytes()
    out = subprocess.run([str(exe), fmt.device.suffix, str(n), str(row.nbytes)], input=payload, capture_output=True)
    assert out.returncode == 0, out.stderr.decode()
    raw = out.stdout
    got_qk, got_bytes, pieces, per, int8 = (int(v) for v in np.frombuffer(raw, np.int32, 5))
    assert (got_qk, got_bytes) == (qk, nbytes)
    assert bool(int8) == fmt.device.int8, f"{fmt.name}: F::INT8 disagrees with the row's DeviceFormat.int8"
    assert pieces == fmt.device.pieces, f"{fmt.name}: F::PIECES disagrees with the row"
    positions = np.frombuffer(raw, np.int32, pieces * per, 20).reshape(pieces, per)
    at = 20 + 4 * pieces * per
    values = np.frombuffer(raw, np.float32, n * qk, at).reshape(n, qk)
    dots = np.frombuffer(raw, np.float32, n * pieces, at + 4 * n * qk).reshape(n, pieces) if int8 else None
    assert len(raw) == at + 4 * n * qk + (4 * n * pieces if int8 else 0)
    return Result(positions, values, dots)


def q8_activations(rng: np.random.Generator, n_values: int) -> tuple[np.ndarray, np.ndarray]:
    """Random normal x quantized as the int8 GEMVs see it: (xq int8 [n], xd float32 [n / 32])."""
    return quantize_q8_ref(rng.standard_normal(n_values, dtype=np.float32))


def check_load(fmt, blocks: np.ndarray, got: Result) -> None:
    """Pieces partition the block, and F::load gives numpy's values exactly (as
    floats: MXFP4's code 8 is -0.0 on the device and +0.0 in ggml's table)."""
    assert np.array_equal(np.sort(got.positions.reshape(-1)), np.arange(cuda_qk(fmt)))
    want = fmt.dequantize(blocks).reshape(got.values.shape)
    np.testing.assert_array_equal(got.values, want, err_msg=fmt.name)


def check_dot8(fmt, w: np.ndarray, xq: np.ndarray, xd: np.ndarray, got: Result) -> None:
    """Every piece's dot8 against the float64 dot of its values w [n, QK] with x = xq * xd."""
    n, qk = w.shape
    x = xq.astype(np.float64).reshape(n, qk // 32, 32) * xd.astype(np.float64).reshape(n, -1, 1)
    terms = w.astype(np.float64) * x.reshape(n, qk)               # [n, QK]
    want = terms[:, got.positions].sum(axis=-1)                    # [n, PIECES]
    scale = np.abs(terms)[:, got.positions].sum(axis=-1)
    err = np.abs(got.dots - want)
    bad = np.argwhere(err > DOT_RTOL * scale)
    assert len(bad) == 0, (f"{fmt.name}: {len(bad)} pieces off, first block {bad[0][0]} piece {bad[0][1]}: "
                           f"dot8 {got.dots[tuple(bad[0])]!r} want {want[tuple(bad[0])]!r}")
    # and the per-block sum that the GEMV forms from the pieces
    block_err = np.abs(got.dots.astype(np.float64).sum(axis=-1) - terms.sum(axis=-1))
    assert np.all(block_err <= DOT_RTOL * np.abs(terms).sum(axis=-1)), fmt.name


# -- every format on random blocks ----------------------------------------------------

@pytest.mark.parametrize("name", list(TYPE_IDS))
def test_random_blocks(driver, host, name):
    fmt = host.formats[TYPE_IDS[name]]
    rng = np.random.default_rng(TYPE_IDS[name])
    qk = cuda_qk(fmt)
    blocks = fmt.random_blocks(N_BLOCKS * qk // fmt.block_elems, rng, 0.05)
    if name not in INT8_NAMES:
        check_load(fmt, blocks, run_driver(driver, fmt, blocks))
        return
    xq, xd = q8_activations(rng, N_BLOCKS * qk)
    got = run_driver(driver, fmt, blocks, xq, xd)
    check_load(fmt, blocks, got)
    check_dot8(fmt, fmt.dequantize(blocks).reshape(N_BLOCKS, qk), xq, xd, got)


@pytest.mark.parametrize("name", INT8_NAMES)
def test_dot8_of_zero_activations_is_zero(driver, host, name):
    """An all-zero x block has xd = 0: dot8 must be exactly 0, not NaN."""
    fmt = host.formats[TYPE_IDS[name]]
    rng = np.random.default_rng(1)
    blocks = fmt.random_blocks(4, rng, 0.05)
    xq, xd = quantize_q8_ref(np.zeros(4 * fmt.block_elems, np.float32))
    got = run_driver(driver, fmt, blocks, xq, xd)
    assert np.array_equal(got.dots, np.zeros_like(got.dots))


# -- edge cases -------------------------------------------------------------------------

MXFP4_SCALES = (0, 1, 2, 127, 254)   # subnormal 2^-128 / 2^-127, smallest normal, 1/2, 2^126


def mxfp4_all_codes(scales) -> np.ndarray:
    """One block per scale byte: value j < 16 has code j, value 16 + j code 15 - j."""
    j = np.arange(16, dtype=np.uint8)
    qs = j | ((15 - j) << np.uint8(4))
    return np.stack([np.concatenate([[e], qs]).astype(np.uint8) for e in scales]).reshape(-1)


def test_mxfp4_every_code_and_extreme_scales(driver, host):
    fmt = host.formats[39]
    blocks = mxfp4_all_codes(MXFP4_SCALES)
    # x scaled per block so that dot8's (d * xd) * s stays a normal float32: with
    # x ~ 1 the product 2^-128 * xd is subnormal for scale bytes <= 2 and loses up to
    # ~1e-5 of relative precision (harmless on weights ~1e-38, but not what this
    # checks), and 2^126 * 12 * x would overflow
    x_scale = np.exp2(np.array([10, 10, 10, 0, -120], np.float32))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((len(MXFP4_SCALES), 32), dtype=np.float32) * x_scale[:, None]
    xq, xd = quantize_q8_ref(x.reshape(-1))
    got = run_driver(driver, fmt, blocks, xq, xd)
    with np.errstate(over="ignore"):
        check_load(fmt, blocks, got)    # includes the float32 infinities of codes +-4.. at 2^126
    # float64 values: 2^126 * 12 is finite here, unlike in float32
    e = blocks.reshape(-1, 17)[:, 0].astype(np.float64)
    codes = np.concatenate([np.arange(16), 15 - np.arange(16)])
    w = KVALUES[codes].astype(np.float64)[None, :] * np.exp2(e - 128)[:, None]
    check_dot8(fmt, w, xq, xd, got)


def test_q8_0_with_minus_128(driver, host):
    """int8 -128 is a valid Q8_0 quant: all of it, and alternating with 127."""
    fmt = host.formats[8]
    d = np.array([0.01], np.float16).view(np.uint8)
    qs = [np.full(32, -128, np.int8), np.where(np.arange(32) % 2, -128, 127).astype(np.int8)]
    blocks = np.concatenate([np.concatenate([d, q.view(np.uint8)]) for q in qs])
    # x at +-127 too: the largest products dp4a sums
    x = np.stack([np.full(32, -1, np.float32), np.where(np.arange(32) % 3, 1, -1).astype(np.float32)])
    xq, xd = quantize_q8_ref(x.reshape(-1))
    got = run_driver(driver, fmt, blocks, xq, xd)
    check_load(fmt, blocks, got)
    assert got.values[0, 0] == np.float32(np.float16(0.01)) * -128
    check_dot8(fmt, fmt.dequantize(blocks).reshape(2, 32), xq, xd, got)


def test_shim_half_conversions(driver, host):
    """builtins.h's f16/bf16 conversions against numpy: every bit pattern to float32, and
    float32 to half with round-to-nearest-even through ties, subnormals and overflow."""
    rng = np.random.default_rng(3)
    bits = np.arange(1 << 16, dtype=np.uint32)
    f16 = bits.astype(np.uint16).view(np.float16).astype(np.float32)
    # exact ties between neighbouring halves, both directions of rounding, and random floats
    finite = np.isfinite(f16)
    ties = (f16[finite][:-1].astype(np.float64) + np.diff(f16[finite].astype(np.float64)) / 2)
    x = np.concatenate([f16[finite], ties[np.isfinite(ties)].astype(np.float32),
                        np.ldexp(rng.standard_normal(1 << 14), rng.integers(-30, 18, 1 << 14)).astype(np.float32),
                        np.float32([65519.99, 65520.0, 1e30, -1e30, np.inf, -np.inf, 0.0, -0.0])])
    out = subprocess.run([str(driver), "halves"], input=x.tobytes(), capture_output=True, check=True).stdout
    n = len(x)
    to_f16 = np.frombuffer(out, np.uint16, n)
    to_bf16 = np.frombuffer(out, np.uint16, n, 2 * n)
    from_f16 = np.frombuffer(out, np.float32, 1 << 16, 4 * n)
    from_bf16 = np.frombuffer(out, np.float32, 1 << 16, 4 * n + 4 * (1 << 16))
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(to_f16, x.astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(to_bf16, host.formats[30].quantize(x).view(np.uint16))
    nan = np.isnan(f16)
    assert np.array_equal(np.isnan(from_f16), nan)
    np.testing.assert_array_equal(from_f16.view(np.uint32)[~nan], f16.view(np.uint32)[~nan])
    np.testing.assert_array_equal(from_bf16.view(np.uint32), bits << np.uint32(16))


def test_quantize_group_is_quantize_q8_ref(driver):
    """The device's activation quantizer against the reference the dot8 tests use:
    random groups at many scales, an all-zero group, and groups of exact halves
    (x / d = k + 0.5, where round-half-even and round-half-away differ)."""
    rng = np.random.default_rng(4)
    x = np.ldexp(rng.standard_normal((300, 32)), rng.integers(-20, 20, (300, 1))).astype(np.float32)
    x[0] = 0
    x[1] = np.arange(32)                                                          # d = 31 / 127
    x[2] = np.concatenate([[127.0], np.arange(31) + 0.5]).astype(np.float32)      # d = 1: ties
    out = subprocess.run([str(driver), "q8"], input=x.tobytes(), capture_output=True, check=True).stdout
    q = np.frombuffer(out, np.int8, x.size)
    d = np.frombuffer(out, np.float32, len(x), x.size)
    want_q, want_d = quantize_q8_ref(x.reshape(-1))
    np.testing.assert_array_equal(d.view(np.uint32), want_d.view(np.uint32))
    np.testing.assert_array_equal(q, want_q)
