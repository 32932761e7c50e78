"""The numpy reference quantization formats against gguf-py's reference.

Random data is fresh every run; the seed is in every failure message.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import quants as gq
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from orcd.quant.builtin import orcd_quant_formats

FORMATS = {f.name: f for f in orcd_quant_formats()}
NAMES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4"]
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
# byte offsets of each block's fp16 fields
F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
              "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@pytest.fixture
def rng():
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed={seed}")   # shown by pytest on failure
    return np.random.default_rng(seed)


def _finite_f16(bits: np.ndarray) -> np.ndarray:
    """Random uint16 fp16 patterns -> finite ones (exponent 31 loses its top bit)."""
    return np.where((bits >> 10) & 31 == 31, bits & np.uint16(0xBFFF), bits)


def valid_random_blocks(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes with every float field finite: scales span the whole fp16 range,
    subnormals included; MXFP4 scales from 2^-128 up to where 12 * d stays finite."""
    fmt = FORMATS[name]
    raw = rng.integers(0, 256, (n, fmt.block_bytes), dtype=np.uint8)
    if name == "F32":
        bits = raw.view(np.uint32)
        return np.where((bits >> 23) & 255 == 255, bits & np.uint32(0xBFFFFFFF), bits).view(np.uint8).reshape(-1)
    if name == "BF16":
        bits = raw.view(np.uint16)
        return np.where((bits >> 7) & 255 == 255, bits & np.uint16(0xBFFF), bits).view(np.uint8).reshape(-1)
    if name == "F16":
        return _finite_f16(raw.view(np.uint16)).view(np.uint8).reshape(-1)
    if name == "MXFP4":
        raw[:, 0] %= 251
    for off in F16_FIELDS.get(name, ()):
        field = np.ascontiguousarray(raw[:, off:off + 2]).view(np.uint16)
        raw[:, off:off + 2] = _finite_f16(field).view(np.uint8)
    return raw.reshape(-1)


def gguf_dequantize(name: str, raw: np.ndarray) -> np.ndarray:
    fmt = FORMATS[name]
    return gq.dequantize(raw.reshape(-1, fmt.block_bytes), T[name]).reshape(-1).astype(np.float32)


def assert_bits_equal(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.dtype == np.float32 and a.shape == b.shape, what
    diff = np.flatnonzero(a.view(np.uint32) != b.view(np.uint32))
    assert diff.size == 0, f"{what}: {diff.size} values differ, first at {diff[0]}: {a[diff[0]]} vs {b[diff[0]]}"


# -- layout --------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_layout_matches_ggml(name):
    fmt = FORMATS[name]
    assert fmt.type_id == T[name].value
    assert (fmt.block_elems, fmt.block_bytes) == GGML_QUANT_SIZES[T[name]]


def test_plugin_host_provides_all_formats(host):
    assert {f.name for f in host.formats} >= set(NAMES)
    for name in NAMES:
        assert host.formats[T[name].value].name == name


def test_partial_block_is_rejected():
    with pytest.raises(ValueError, match="whole number"):
        FORMATS["Q4_K"].dequantize(np.zeros(145, np.uint8))
    with pytest.raises(ValueError, match="whole number"):
        FORMATS["Q8_0"].quantize(np.zeros(33, np.float32))


# -- dequantize: bit-exact against gguf-py ---------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_dequantize_is_bit_exact(name, rng):
    fmt = FORMATS[name]
    # 9000 blocks crosses the dequantizer's chunk boundary for every format
    for n in (1, 37, 9000):
        raw = valid_random_blocks(name, n, rng)
        with np.errstate(over="ignore"):
            ours = fmt.dequantize(raw)
            ref = gguf_dequantize(name, raw)
        assert ours.size == n * fmt.block_elems
        assert_bits_equal(ours, ref, f"{name} x {n} blocks")


def test_dequantize_tensor_shape():
    fmt = FORMATS["Q6_K"]
    raw = fmt.random_blocks(6, np.random.default_rng(0), 1.0)
    out = fmt.dequantize_tensor(raw, (3, 512))
    assert out.shape == (3, 512) and out.dtype == np.float32
    assert_bits_equal(out.reshape(-1), fmt.dequantize(raw), "Q6_K tensor")


# -- quantize ------------------------------------------------------------------------

def sample_values(rng: np.random.Generator, n_blocks: int, block: int) -> np.ndarray:
    """Gaussian blocks whose scales span 1e-2..1e2, plus awkward blocks: all zero,
    all positive, all negative, constant, one outlier."""
    x = rng.standard_normal((n_blocks, block)).astype(np.float32)
    x *= (10.0 ** rng.uniform(-2, 2, (n_blocks, 1))).astype(np.float32)
    x[0] = 0
    x[1] = np.abs(x[1]) + 1
    x[2] = -np.abs(x[2]) - 1
    x[3] = 0.75
    x[4, 5] = 50 * np.abs(x[4]).max()
    return x.reshape(-1)


def k_steps(name: str, raw: np.ndarray) -> np.ndarray:
    """The quantization step d * sc of every sub-block, decoded with gguf-py's own
    scale unpacking -> [n, sub-blocks, 1]."""
    b = raw.reshape(-1, FORMATS[name].block_bytes)
    if name == "Q6_K":
        d = b[:, 208:210].copy().view(np.float16).astype(np.float32)
        return (d * b[:, 192:208].copy().view(np.int8).astype(np.float32))[..., None]
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    sc, _ = gq.Q4_K.get_scale_min(b[:, 4:16].copy())
    return (d * sc.astype(np.float32))[..., None]


def error_bound(name: str, x: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Largest allowed |x - dequantize(quantize(x))| per value, and why."""
    fmt = FORMATS[name]
    blocks = x.reshape(-1, fmt.block_elems)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    tiny = 1e-6 * amax + 2.0 ** -24        # float32 arithmetic and fp16 subnormal scales
    if name == "F32":
        return np.zeros_like(blocks)
    if name in ("F16", "BF16"):           # round to nearest: half an ulp, 2^-p relative
        return np.abs(blocks) * (2.0 ** -11 if name == "F16" else 2.0 ** -8) + 2.0 ** -25
    if name in ("Q4_0", "Q5_0"):
        # d = max / -(L/2): half a step, except x = -max (the level +L/2 does not
        # exist) which lands a full step away; plus fp16 rounding of d over L/2 levels
        d = amax / (8 if name == "Q4_0" else 16)
        return d * (1 + 2.0 ** -6) + tiny
    if name in ("Q4_1", "Q5_1"):
        # step = range / (L - 1), half a step of rounding; fp16 d and min add at most
        # (L - 1) * step * 2^-11 and |min| * 2^-11
        levels = 16 if name == "Q4_1" else 32
        step = np.ptp(blocks, axis=-1, keepdims=True) / (levels - 1)
        return step * (0.5 + levels * 2.0 ** -11) + amax * 2.0 ** -11 + tiny
    if name == "Q8_0":                     # half a step of amax / 127, fp16 d over 127 levels
        return amax / 127 * (0.5 + 127 * 2.0 ** -11) + tiny
    if name in K_QUANTS:
        # scales are rounded up so every value lies inside its sub-block's grid:
        # at most half a step d * sc_j off
        steps = k_steps(name, raw)
        sub = steps.shape[1]
        bound = steps / 2 * (1 + 1e-5) + tiny[:, None]
        return np.broadcast_to(bound, (len(blocks), sub, fmt.block_elems // sub)).reshape(blocks.shape)
    if name == "MXFP4":
        # d = 2^(E-3), E = floor(log2 amax): levels up to 12 d = 1.5 * 2^E, spaced at
        # most 4 d apart (half-gap 2^(E-2)); values above 1.5 * 2^E clip to it
        e = np.floor(np.log2(np.where(amax > 0, amax, 1)))
        top = 1.5 * 2.0 ** e
        return np.maximum(2.0 ** (e - 2), np.abs(blocks) - top) * (1 + 1e-6)
    raise AssertionError(name)


# RMS error on unit Gaussians, relative: rounding to a grid of step s leaves s / sqrt(12);
# e.g. Q4_0's step is amax/8 (~2.1 sigma / 8 on 32 samples) -> ~0.08, Q8_0's amax/127 -> ~0.005
RMS_BOUND = {"F32": 0.0, "F16": 3e-4, "BF16": 2.5e-3, "Q4_0": 0.1, "Q4_1": 0.09, "Q5_0": 0.05,
             "Q5_1": 0.045, "Q8_0": 0.007, "Q4_K": 0.09, "Q5_K": 0.045, "Q6_K": 0.025, "MXFP4": 0.13}


@pytest.mark.parametrize("name", NAMES)
def test_quantize_error_within_bound(name, rng):
    fmt = FORMATS[name]
    x = sample_values(rng, 400, fmt.block_elems if fmt.block_elems > 1 else 32)
    raw = fmt.quantize(x)
    assert raw.dtype == np.uint8 and raw.size == fmt.tensor_bytes(x.shape)
    y = fmt.dequantize(raw)
    assert np.isfinite(y).all()
    err = np.abs(x - y).reshape(-1, fmt.block_elems)
    over = err > error_bound(name, x, raw)
    assert not over.any(), f"{name}: {over.sum()} values over the bound, worst err {err[over].max()}"

    g = rng.standard_normal(fmt.block_elems * 2000 if fmt.block_elems > 1 else 64000).astype(np.float32)
    rms = np.sqrt(np.mean((g - fmt.dequantize(fmt.quantize(g))) ** 2))
    assert rms <= RMS_BOUND[name], f"{name}: relative RMS error {rms:.4f}"


@pytest.mark.parametrize("name", ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4"])
def test_quantize_matches_ggml_reference(name, rng):
    """Where gguf-py implements ggml's reference quantizer, ours gives the same bytes."""
    fmt = FORMATS[name]
    x = sample_values(rng, 300, 32)
    ref = gq.quantize(x.reshape(-1, 32), T[name]).reshape(-1).view(np.uint8)
    assert np.array_equal(fmt.quantize(x), ref)


# -- random_blocks ---------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("std", [0.02, 1.0])
def test_random_blocks_are_valid_zero_mean_of_given_std(name, std, rng):
    fmt = FORMATS[name]
    n = 200_000 // fmt.block_elems
    raw = fmt.random_blocks(n, rng, std)
    assert raw.dtype == np.uint8 and raw.shape == (n * fmt.block_bytes,)
    y = fmt.dequantize(raw)
    assert_bits_equal(y, gguf_dequantize(name, raw), f"{name} random blocks")
    assert np.isfinite(y).all()
    assert abs(y.mean()) < 0.02 * std, f"{name}: mean {y.mean():.3g} for std {std}"
    assert 0.9 * std < y.std() < 1.1 * std, f"{name}: std {y.std():.4g}, asked {std}"


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K"])
def test_random_k_blocks_centre_every_sub_block(name, rng):
    """The min of each sub-block cancels its quants' mean, to within m's rounding
    (dmin / 2), and the super-block scale takes both signs."""
    fmt = FORMATS[name]
    raw = fmt.random_blocks(2000, rng, 1.0)
    b = raw.reshape(-1, fmt.block_bytes)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    sub_means = fmt.dequantize(raw).reshape(len(b), 8, 32).mean(axis=-1)
    assert (np.abs(sub_means) <= np.abs(dmin) * 0.5 * 1.001 + 1e-6).all()
    assert 0.4 < (d > 0).mean() < 0.6


def test_random_mxfp4_scale_bytes_near_typical_weights(rng):
    b = FORMATS["MXFP4"].random_blocks(5000, rng, 0.02).reshape(-1, 17)
    assert set(np.unique(b[:, 0])) <= set(range(118, 123))


# -- the real model ------------------------------------------------------------------------

@pytest.mark.slow
def test_real_qwen_tensors_dequantize_bit_exactly(real_qwen):
    """The smallest tensor of every type in the real file dequantizes exactly as gguf-py does."""
    from gguf import GGUFReader

    reader = GGUFReader(real_qwen, "r")
    smallest = {}
    for t in reader.tensors:
        if t.tensor_type.name not in smallest or t.n_bytes < smallest[t.tensor_type.name].n_bytes:
            smallest[t.tensor_type.name] = t
    assert {"Q5_0", "Q8_0", "Q4_K", "Q6_K", "F32"} <= set(smallest)
    for name, t in smallest.items():
        raw = np.asarray(t.data).view(np.uint8).reshape(-1)
        ours = FORMATS[name].dequantize(raw)
        assert_bits_equal(ours, gguf_dequantize(name, raw), f"{t.name} ({name})")
        assert np.isfinite(ours).all()


# -- the VRAM layout (DeviceFormat.planes) ----------------------------------------------

@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "MXFP4", "F16"])
def test_vram_layout_round_trips_and_aligns_planes(host, name):
    fmt = host.formats.by_name[name]
    rng = np.random.default_rng(3)
    n_in = 2880 if fmt.block_elems == 32 else 3072 if fmt.block_elems == 256 else 896
    rows = 5
    raw = fmt.random_blocks(rows * n_in // fmt.block_elems, rng, 0.05)
    vram = fmt.to_vram(raw, n_in)
    assert vram.size == rows * fmt.vram_row_bytes(n_in)
    assert fmt.vram_row_bytes(n_in) % 16 == 0 or not fmt.planar
    np.testing.assert_array_equal(fmt.from_vram(vram, n_in), raw)
    if fmt.planar:   # plane k of row r holds byte range k of each of its (rewritten) blocks, in order
        nb, (lo, hi) = n_in // fmt.block_elems, fmt.device.planes[0]
        blocks = raw.reshape(-1, fmt.block_bytes)
        if fmt.device.block_to_vram is not None:
            blocks = fmt.device.block_to_vram(blocks)
        first = vram.reshape(rows, -1)[2, :nb * (hi - lo)].reshape(nb, hi - lo)
        np.testing.assert_array_equal(first, blocks.reshape(rows, nb, -1)[2, :, lo:hi])
    out = np.full(vram.size + 7, 0xEE, np.uint8)   # into a staging buffer, as the uploader does
    fmt.to_vram(raw, n_in, out=out)
    np.testing.assert_array_equal(out[:vram.size], vram)


def test_planes_must_cover_the_block():
    from orcd.quant.format import DeviceFormat, QuantFormat

    dev = DeviceFormat("FmtX", "x", (("orcd.quant", "base.cuh"),), qk=32, pieces=1, planes=((2, 18), (0, 1)))
    with pytest.raises(ValueError, match="cover"):
        QuantFormat(99, "X", 32, 18, dequantize=lambda raw: raw, device=dev)


def test_q4_k_scale_rewrite_is_exact(host):
    # every bit of the 12 packed scale bytes is some sc or m bit: unpacking loses nothing
    from orcd.quant.kquants import scales_packed, scales_unpacked

    blocks = np.random.default_rng(4).integers(0, 256, (500, 144), dtype=np.uint8)
    wide = scales_unpacked(blocks)
    assert wide.shape == (500, 148) and wide[:, 4:20].max() < 64
    np.testing.assert_array_equal(scales_packed(wide), blocks)
