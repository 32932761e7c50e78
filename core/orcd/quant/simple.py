"""Plain floats (F32, F16, BF16) and ggml's 32-value legacy quants (Q4_0 ... Q8_0).

Legacy block layouts (ggml-common.h), little-endian, 32 values a block:

    Q4_0  [d f16][qs 16]               x = d * (q - 8)     q: 4 bits
    Q4_1  [d f16][m f16][qs 16]        x = d * q + m       q: 4 bits
    Q5_0  [d f16][qh 4][qs 16]         x = d * (q - 16)    q: 4 bits | qh bit << 4
    Q5_1  [d f16][m f16][qh 4][qs 16]  x = d * q + m       q: 5 bits
    Q8_0  [d f16][qs int8 x 32]        x = d * q

Value j < 16 is the low nibble of qs[j], value j + 16 its high nibble; bit j of
the little-endian uint32 qh is the fifth bit of value j.

This module also holds the block helpers the other family modules share.
The dequantizers evaluate ggml's float32 expressions in ggml's order, so the
results are bit-identical to ggml's (and gguf-py's) reference.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from orcd.quant.format import DeviceFormat, QuantFormat

# Values per chunk of blocks processed at once: whole-array numpy ops, but
# temporaries small enough to stay in cache and not double the peak memory.
CHUNK_VALUES = 1 << 18


# -- shared block helpers ---------------------------------------------------------

def as_blocks(raw: np.ndarray, block_bytes: int, name: str) -> np.ndarray:
    """raw bytes -> [n_blocks, block_bytes] uint8 view."""
    raw = np.asarray(raw).view(np.uint8).reshape(-1)
    if raw.size % block_bytes:
        raise ValueError(f"{name}: {raw.size} bytes is not a whole number of "
                         f"{block_bytes}-byte blocks")
    return raw.reshape(-1, block_bytes)


def blockwise_dequantizer(fn: Callable[[np.ndarray], np.ndarray], name: str,
                          block_elems: int, block_bytes: int) -> Callable[[np.ndarray], np.ndarray]:
    """Lift ``fn: [n, block_bytes] uint8 -> [n, block_elems] float32`` to flat
    raw bytes -> flat float32, a chunk of blocks at a time."""
    chunk = max(1, CHUNK_VALUES // block_elems)

    def dequantize(raw: np.ndarray) -> np.ndarray:
        blocks = as_blocks(raw, block_bytes, name)
        out = np.empty((len(blocks), block_elems), np.float32)
        for s in range(0, len(blocks), chunk):
            out[s:s + chunk] = fn(blocks[s:s + chunk])
        return out.reshape(-1)

    dequantize.__name__ = f"dequantize_{name.lower()}"
    return dequantize


def blockwise_quantizer(fn: Callable[[np.ndarray], np.ndarray], name: str,
                        block_elems: int, block_bytes: int) -> Callable[[np.ndarray], np.ndarray]:
    """Lift ``fn: [n, block_elems] float32 -> [n, block_bytes] uint8`` to flat
    float32 -> flat raw bytes, a chunk of blocks at a time."""
    chunk = max(1, CHUNK_VALUES // block_elems)

    def quantize(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        if x.size % block_elems:
            raise ValueError(f"{name}: {x.size} values is not a whole number of "
                             f"{block_elems}-value blocks")
        values = x.reshape(-1, block_elems)
        out = np.empty((len(values), block_bytes), np.uint8)
        with np.errstate(divide="ignore", invalid="ignore"):
            for s in range(0, len(values), chunk):
                out[s:s + chunk] = fn(values[s:s + chunk])
        return out.reshape(-1)

    quantize.__name__ = f"quantize_{name.lower()}"
    return quantize


def f16_at(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 field at byte ``offset`` of every block -> [n, 1] float32."""
    return np.ascontiguousarray(blocks[:, offset:offset + 2]).view(np.float16).astype(np.float32)


def f16_bytes(d: np.ndarray) -> np.ndarray:
    """[n] or [n, 1] float values -> [n, 2] fp16 bytes (round to nearest even)."""
    return np.asarray(d, np.float32).reshape(-1).astype(np.float16).view(np.uint8).reshape(-1, 2)


def f16_ceil(x: np.ndarray) -> np.ndarray:
    """Smallest fp16 >= x (x >= 0), saturating at the largest finite fp16, as float32.
    Scales rounded up this way never make a block's range miss its extreme value."""
    x = np.minimum(np.asarray(x, np.float32), np.float32(65504.0))
    h = x.astype(np.float16)
    h = np.where(h.astype(np.float32) < x, np.nextafter(h, np.float16(np.inf)), h)
    return h.astype(np.float32)


def round_away(x: np.ndarray) -> np.ndarray:
    """C ``roundf``: round half away from zero, exactly (no x + 0.5 rounding error)."""
    a = np.abs(x)
    fl = np.floor(a)
    return np.sign(x) * (fl + np.floor(2 * (a - fl)))


def random_sign(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n] float32 of +1 / -1."""
    return np.float32(1) - np.float32(2) * rng.integers(0, 2, n, dtype=np.uint8).astype(np.float32)


def random_bytes(rng: np.random.Generator, n_blocks: int, block_bytes: int) -> np.ndarray:
    """[n_blocks, block_bytes] uniform random uint8."""
    return rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)


def uniform_int_power(lo: int, hi: int) -> float:
    """E[k^2] for k uniform on the integers lo..hi."""
    k = np.arange(lo, hi + 1, dtype=np.float64)
    return float(np.mean(k * k))


def nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, m] packed bytes -> [n, 2m] uint8: all low nibbles, then all high."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 2m] 4-bit values -> [n, m] bytes (inverse of ``nibbles``)."""
    half = q.shape[-1] // 2
    return (q[..., :half] & np.uint8(0x0F)) | (q[..., half:] << np.uint8(4))


# -- plain floats ---------------------------------------------------------------------

def _dequantize_f32(raw: np.ndarray) -> np.ndarray:
    return as_blocks(raw, 4, "F32").reshape(-1).view(np.float32).copy()


def _dequantize_f16(raw: np.ndarray) -> np.ndarray:
    return as_blocks(raw, 2, "F16").reshape(-1).view(np.float16).astype(np.float32)


def _dequantize_bf16(raw: np.ndarray) -> np.ndarray:
    bits = as_blocks(raw, 2, "BF16").reshape(-1).view(np.uint16).astype(np.uint32)
    return (bits << np.uint32(16)).view(np.float32)


def _quantize_f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).reshape(-1).view(np.uint8).copy()


def _quantize_f16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).reshape(-1).astype(np.float16).view(np.uint8)


def _quantize_bf16(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: quiet NaNs, round to nearest even."""
    n = np.asarray(x, np.float32).reshape(-1).view(np.uint32)
    n = np.where((n & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000),
                 (n & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), n)
    n = (n.astype(np.uint64) + (np.uint64(0x7FFF) + ((n >> np.uint32(16)) & np.uint32(1)))) >> np.uint64(16)
    return n.astype(np.uint16).view(np.uint8)


def _random_normal(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    return rng.standard_normal(n, dtype=np.float32) * np.float32(std)


def _random_f32(n_blocks: int, rng: np.random.Generator, std: float) -> np.ndarray:
    return _random_normal(rng, n_blocks, std).view(np.uint8)


def _random_f16(n_blocks: int, rng: np.random.Generator, std: float) -> np.ndarray:
    return _random_normal(rng, n_blocks, std).astype(np.float16).view(np.uint8)


def _random_bf16(n_blocks: int, rng: np.random.Generator, std: float) -> np.ndarray:
    return _quantize_bf16(_random_normal(rng, n_blocks, std))


# -- legacy quants: dequantize --------------------------------------------------------

def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """[n, 4] qh bytes -> [n, 32] uint8 with the fifth bit of each value at 1 << 4."""
    return np.unpackbits(qh, axis=-1, bitorder="little") << np.uint8(4)


def _dq_q4_0(b: np.ndarray) -> np.ndarray:
    q = nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)
    return f16_at(b, 0) * q.astype(np.float32)


def _dq_q4_1(b: np.ndarray) -> np.ndarray:
    q = nibbles(b[:, 4:]).astype(np.float32)
    return f16_at(b, 0) * q + f16_at(b, 2)


def _dq_q5_0(b: np.ndarray) -> np.ndarray:
    q = (nibbles(b[:, 6:]) | _fifth_bits(b[:, 2:6])).astype(np.int8) - np.int8(16)
    return f16_at(b, 0) * q.astype(np.float32)


def _dq_q5_1(b: np.ndarray) -> np.ndarray:
    q = (nibbles(b[:, 8:]) | _fifth_bits(b[:, 4:8])).astype(np.float32)
    return f16_at(b, 0) * q + f16_at(b, 2)


def _dq_q8_0(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.float32) * f16_at(b, 0)


# -- legacy quants: quantize (ggml's quantize_row_*_ref, bit for bit) -----------------

def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """[n, k] -> [n, 1]: the value of largest magnitude, with its sign."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=-1, keepdims=True), axis=-1)


def _inverse(d: np.ndarray) -> np.ndarray:
    return np.where(d == 0, np.float32(0), np.float32(1) / d)


def _q_symmetric(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 / Q5_0 rule: d = max / -(levels/2), q = (int)(x/d + levels/2 + 0.5)."""
    half = levels // 2
    d = _signed_absmax(x) / np.float32(-half)
    q = np.trunc(x * _inverse(d) + np.float32(half + 0.5)).clip(0, levels - 1).astype(np.uint8)
    return d, q


def _q_affine(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 / Q5_1 rule: d = (max - min) / (levels - 1), q = (int)((x - min)/d + 0.5)."""
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    d = (hi - lo) / np.float32(levels - 1)
    q = np.trunc((x - lo) * _inverse(d) + np.float32(0.5)).clip(0, levels - 1).astype(np.uint8)
    return d, lo, q


def _fifth_bit_bytes(q: np.ndarray) -> np.ndarray:
    """[n, 32] 5-bit values -> [n, 4] qh bytes."""
    return np.packbits((q >> np.uint8(4)) & np.uint8(1), axis=-1, bitorder="little")


def _q_q4_0(x: np.ndarray) -> np.ndarray:
    d, q = _q_symmetric(x, 16)
    return np.concatenate([f16_bytes(d), pack_nibbles(q)], axis=-1)


def _q_q4_1(x: np.ndarray) -> np.ndarray:
    d, m, q = _q_affine(x, 16)
    return np.concatenate([f16_bytes(d), f16_bytes(m), pack_nibbles(q)], axis=-1)


def _q_q5_0(x: np.ndarray) -> np.ndarray:
    d, q = _q_symmetric(x, 32)
    return np.concatenate([f16_bytes(d), _fifth_bit_bytes(q), pack_nibbles(q)], axis=-1)


def _q_q5_1(x: np.ndarray) -> np.ndarray:
    d, m, q = _q_affine(x, 32)
    return np.concatenate([f16_bytes(d), f16_bytes(m), _fifth_bit_bytes(q), pack_nibbles(q)], axis=-1)


def _q_q8_0(x: np.ndarray) -> np.ndarray:
    d = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)
    q = round_away(x * _inverse(d)).astype(np.int8).view(np.uint8)
    return np.concatenate([f16_bytes(d), q], axis=-1)


# -- legacy quants: random valid blocks -------------------------------------------------
# q uniform on its range; d = +-D per block (random sign, so the -0.5 * d mean of a
# symmetric range averages out) with D chosen so E[x^2] = std^2.  The affine types
# put m = -d * mean(q) so every block is centred.

def _random_symmetric(n_blocks: int, rng: np.random.Generator, std: float,
                      block_bytes: int, q_mean_square: float) -> np.ndarray:
    blocks = random_bytes(rng, n_blocks, block_bytes)
    d = random_sign(rng, n_blocks) * np.float32(std / math.sqrt(q_mean_square))
    blocks[:, 0:2] = f16_bytes(d)
    return blocks.reshape(-1)


def _random_affine(n_blocks: int, rng: np.random.Generator, std: float,
                   block_bytes: int, levels: int) -> np.ndarray:
    blocks = random_bytes(rng, n_blocks, block_bytes)
    q_var = (levels * levels - 1) / 12
    d = random_sign(rng, n_blocks) * np.float32(std / math.sqrt(q_var))
    d = d.astype(np.float16).astype(np.float32)
    blocks[:, 0:2] = f16_bytes(d)
    blocks[:, 2:4] = f16_bytes(-d * np.float32((levels - 1) / 2))
    return blocks.reshape(-1)


def _mean_square_centred(levels: int) -> float:
    """E[(q - levels/2)^2] for q uniform on 0..levels-1 (variance plus the 1/2 offset)."""
    return (levels * levels - 1) / 12 + 0.25


HEADERS = (("orcd.quant", "base.cuh"), ("orcd.quant", "simple.cuh"))


def _plain(struct: str, suffix: str) -> DeviceFormat:
    # the kernels read plain floats 8 values (one or two 16-byte loads) at a time
    return DeviceFormat(struct, suffix, HEADERS, qk=8, pieces=1)


def _row(type_id, name, elems, nbytes, dq, q, rnd, planes) -> QuantFormat:
    # ggml's 32-value blocks: one piece of 32 values, int8 activations (dp4a, tensor cores); planar
    # in VRAM (quants 16-byte aligned, scales apart: 18-34-byte blocks are not)
    return QuantFormat(type_id, name, elems, nbytes,
                       dequantize=blockwise_dequantizer(dq, name, elems, nbytes),
                       quantize=blockwise_quantizer(q, name, elems, nbytes),
                       device=DeviceFormat(f"Fmt{name}", name.lower(), HEADERS, qk=32, pieces=1, int8=True,
                                           mma=True, planes=planes),
                       random_blocks=rnd)


FORMATS: tuple[QuantFormat, ...] = (
    QuantFormat(0, "F32", 1, 4, _dequantize_f32, _quantize_f32, _plain("FmtF32", "f32"), _random_f32),
    QuantFormat(1, "F16", 1, 2, _dequantize_f16, _quantize_f16, _plain("FmtF16", "f16"), _random_f16),
    QuantFormat(30, "BF16", 1, 2, _dequantize_bf16, _quantize_bf16, _plain("FmtBF16", "bf16"), _random_bf16),
    # planes: qs first, then qh (Q5_*), then d (and m): byte ranges of the GGUF block
    _row(2, "Q4_0", 32, 18, _dq_q4_0, _q_q4_0,
         lambda n, rng, std: _random_symmetric(n, rng, std, 18, _mean_square_centred(16)), ((2, 18), (0, 2))),
    _row(3, "Q4_1", 32, 20, _dq_q4_1, _q_q4_1,
         lambda n, rng, std: _random_affine(n, rng, std, 20, 16), ((4, 20), (0, 4))),
    _row(6, "Q5_0", 32, 22, _dq_q5_0, _q_q5_0,
         lambda n, rng, std: _random_symmetric(n, rng, std, 22, _mean_square_centred(32)),
         ((6, 22), (2, 6), (0, 2))),
    _row(7, "Q5_1", 32, 24, _dq_q5_1, _q_q5_1,
         lambda n, rng, std: _random_affine(n, rng, std, 24, 32), ((8, 24), (4, 8), (0, 4))),
    _row(8, "Q8_0", 32, 34, _dq_q8_0, _q_q8_0,
         lambda n, rng, std: _random_symmetric(n, rng, std, 34, _mean_square_centred(256)), ((2, 34), (0, 2))),
)
