"""ggml's K-quants Q4_K, Q5_K, Q6_K: 256-value super-blocks of small sub-blocks.

Layouts (ggml-common.h), little-endian:

    Q4_K  [d f16][dmin f16][scales 12][qs 128]            144 bytes, 8 x 32 values
    Q5_K  [d f16][dmin f16][scales 12][qh 32][qs 128]     176 bytes, 8 x 32 values
    Q6_K  [ql 128][qh 64][scales int8 x 16][d f16]        210 bytes, 16 x 16 values

Q4_K / Q5_K: x = d * sc_j * q - dmin * m_j, with 6-bit sc_j, m_j packed in 12
bytes (``unpack_scale_min``). Sub-blocks 2i and 2i+1 are the low and high
nibbles of qs[32i : 32i+32]; Q5_K's fifth bit of value l of sub-block j is bit
j of qh[l]. Q6_K: x = d * sc_j * (q - 32), 16-value sub-blocks; each 128-value
half h uses ql[64h : 64h+64] and qh[32h : 32h+32]: its four 32-value groups are
the low nibbles of ql[0:32], of ql[32:64], then their high nibbles, with the
top two bits at qh >> 0, 2, 4, 6.
"""

from __future__ import annotations

import math

import numpy as np

from orcd.quant.format import DeviceFormat, QuantFormat
from orcd.quant.simple import (blockwise_dequantizer, blockwise_quantizer, f16_at, f16_bytes,
                               f16_ceil, random_bytes, random_sign, uniform_int_power)

QK_K = 256


# -- 6-bit scale / min packing of Q4_K and Q5_K ------------------------------------------

def unpack_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, 12] bytes -> (sc [n, 8], m [n, 8]) uint8 (ggml's get_scale_min_k4)."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & np.uint8(63), (c & np.uint8(15)) | ((a >> np.uint8(6)) << np.uint8(4))], axis=-1)
    m = np.concatenate([b & np.uint8(63), (c >> np.uint8(4)) | ((b >> np.uint8(6)) << np.uint8(4))], axis=-1)
    return sc, m


def pack_scale_min(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(sc [n, 8], m [n, 8]) 6-bit values -> [n, 12] bytes."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    a = (sc[:, :4] & np.uint8(63)) | ((sc[:, 4:] >> np.uint8(4)) << np.uint8(6))
    b = (m[:, :4] & np.uint8(63)) | ((m[:, 4:] >> np.uint8(4)) << np.uint8(6))
    c = (sc[:, 4:] & np.uint8(15)) | ((m[:, 4:] & np.uint8(15)) << np.uint8(4))
    return np.concatenate([a, b, c], axis=-1)


def _low_quants(qs: np.ndarray) -> np.ndarray:
    """[n, 128] qs -> [n, 8, 32] 4-bit values in sub-block order."""
    qs = qs.reshape(len(qs), 4, 1, 32)
    return np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=2).reshape(len(qs), 8, 32)


def _pack_low_quants(q: np.ndarray) -> np.ndarray:
    """[n, 8, 32] -> [n, 128] qs (inverse of ``_low_quants``)."""
    q = q.reshape(len(q), 4, 2, 32)
    return ((q[:, :, 0] & np.uint8(15)) | (q[:, :, 1] << np.uint8(4))).reshape(len(q), 128)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """[n, 32] Q5_K qh -> [n, 8, 32] uint8 0/1: bit j of qh[l] at [j, l]."""
    return np.unpackbits(qh[:, :, None], axis=-1, bitorder="little").transpose(0, 2, 1)


def _pack_high_bits(bits: np.ndarray) -> np.ndarray:
    """[n, 8, 32] 0/1 -> [n, 32] qh (inverse of ``_high_bits``)."""
    return np.packbits(bits.transpose(0, 2, 1), axis=-1, bitorder="little").reshape(len(bits), 32)


# -- dequantize ------------------------------------------------------------------------

def _affine_k(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """x = (d * sc) * q - dmin * m, per sub-block; q: [n, 8, 32]."""
    n = len(b)
    sc, m = unpack_scale_min(b[:, 4:16])
    dl = (f16_at(b, 0) * sc.astype(np.float32)).reshape(n, 8, 1)
    ml = (f16_at(b, 2) * m.astype(np.float32)).reshape(n, 8, 1)
    return (dl * q.astype(np.float32) - ml).reshape(n, QK_K)


def _dq_q4_k(b: np.ndarray) -> np.ndarray:
    return _affine_k(b, _low_quants(b[:, 16:144]))


def _dq_q5_k(b: np.ndarray) -> np.ndarray:
    q = _low_quants(b[:, 48:176]) | (_high_bits(b[:, 16:48]) << np.uint8(4))
    return _affine_k(b, q)


def _q6_values(ql: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """ql [n, 128], qh [n, 64] -> [n, 256] int8 in -32..31."""
    n = len(ql)
    ql = ql.reshape(n, 2, 2, 32)                                        # [n, half, ql 0:32 | 32:64, l]
    low = np.concatenate([ql & np.uint8(15), ql >> np.uint8(4)], axis=2)  # [n, half, group, l]
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    high = (qh.reshape(n, 2, 1, 32) >> shifts) & np.uint8(3)
    return (low | (high << np.uint8(4))).astype(np.int8).reshape(n, QK_K) - np.int8(32)


def _dq_q6_k(b: np.ndarray) -> np.ndarray:
    n = len(b)
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    dl = (f16_at(b, 208) * sc).reshape(n, 16, 1)
    q = _q6_values(b[:, 0:128], b[:, 128:192]).reshape(n, 16, 16).astype(np.float32)
    return (dl * q).reshape(n, QK_K)


# -- quantize (round to nearest, scales rounded up so no value is ever clipped) ----------

def _quantize_affine_k(x: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """x: [n, 256] -> (d, dmin, sc, m, q) for x ~ d*sc_j*q - dmin*m_j.

    m_j is rounded up so -dmin*m_j <= min(x_j, 0); sc_j is then rounded up so the
    top level reaches max(x_j): every value lies inside its sub-block's grid and
    is off by at most half a step d*sc_j."""
    n = len(x)
    x = x.reshape(n, 8, 32)
    lo = np.minimum(x.min(axis=-1), 0)                       # [n, 8]
    hi = x.max(axis=-1)
    dmin = f16_ceil(-lo.min(axis=-1, keepdims=True) / np.float32(63))   # [n, 1]
    m = np.where(dmin > 0, np.ceil(-lo / dmin), 0).clip(0, 63)
    offset = dmin * m.astype(np.float32)                        # as dequantize computes it
    span = hi + offset
    d = f16_ceil(span.max(axis=-1, keepdims=True) / np.float32((levels - 1) * 63))
    sc = np.where(d > 0, np.ceil(span / (d * np.float32(levels - 1))), 0).clip(0, 63)
    step = (d * sc.astype(np.float32))[..., None]              # [n, 8, 1]
    q = np.where(step > 0, np.rint((x + offset[..., None]) / step), 0).clip(0, levels - 1)
    return d, dmin, sc.astype(np.uint8), m.astype(np.uint8), q.astype(np.uint8)


def _q_q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _quantize_affine_k(x, 16)
    return np.concatenate([f16_bytes(d), f16_bytes(dmin), pack_scale_min(sc, m),
                           _pack_low_quants(q)], axis=-1)


def _q_q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _quantize_affine_k(x, 32)
    return np.concatenate([f16_bytes(d), f16_bytes(dmin), pack_scale_min(sc, m),
                           _pack_high_bits(q >> np.uint8(4)), _pack_low_quants(q)], axis=-1)


def _pack_q6(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, 256] values in -32..31 -> (ql [n, 128], qh [n, 64])."""
    n = len(q)
    u = (q.astype(np.int16) + 32).astype(np.uint8).reshape(n, 2, 4, 32)   # [n, half, group, l]
    low, high = u & np.uint8(15), u >> np.uint8(4)
    ql = low[:, :, 0:2] | (low[:, :, 2:4] << np.uint8(4))                 # [n, half, 2, 32]
    qh = high[:, :, 0] | (high[:, :, 1] << np.uint8(2)) | (high[:, :, 2] << np.uint8(4)) \
        | (high[:, :, 3] << np.uint8(6))
    return ql.reshape(n, 128), qh.reshape(n, 64)


def _q_q6_k(x: np.ndarray) -> np.ndarray:
    """Symmetric: sub-block scale amax/31 (so |q| <= 31), 8-bit sc rounded up."""
    n = len(x)
    x = x.reshape(n, 16, 16)
    scale = np.abs(x).max(axis=-1) / np.float32(31)                  # [n, 16]
    d = f16_ceil(scale.max(axis=-1, keepdims=True) / np.float32(127))  # [n, 1]
    sc = np.where(d > 0, np.ceil(scale / d), 0).clip(0, 127)
    step = (d * sc.astype(np.float32))[..., None]
    q = np.where(step > 0, np.rint(x / step), 0).clip(-32, 31).astype(np.int8)
    ql, qh = _pack_q6(q.reshape(n, QK_K))
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), f16_bytes(d)], axis=-1)


# -- random valid blocks -------------------------------------------------------------------
# Uniform random quants average (levels-1)/2, so raw random bytes would give every
# sub-block a large positive mean. Instead each sub-block gets a random 6-bit scale
# and the min that cancels its own quants' mean (m_j = sc_j * mean_j(q) / k with
# dmin = k * d, k a power of two so dmin stays exact in fp16), and every block's
# d gets a random sign.

SC_LO, SC_HI = 16, 63           # 6-bit sub-block scales drawn from this range
Q6_SC_LO, Q6_SC_HI = 16, 127    # Q6_K's 8-bit scale magnitudes


def _random_affine_k(n_blocks: int, rng: np.random.Generator, std: float,
                     block_bytes: int, levels: int) -> np.ndarray:
    blocks = random_bytes(rng, n_blocks, block_bytes)
    qs = blocks[:, block_bytes - 128:]
    q_sum = _low_quants(qs).sum(axis=-1, dtype=np.int32)                 # [n, 8]
    if levels == 32:
        q_sum += 16 * _high_bits(blocks[:, 16:48]).sum(axis=-1, dtype=np.int32)
    sc = rng.integers(SC_LO, SC_HI + 1, (n_blocks, 8), dtype=np.uint8)
    k = levels                                                          # dmin = k * d keeps m_j <= 63
    m = np.rint(sc * q_sum.astype(np.float32) / np.float32(32 * k)).clip(0, 63)
    q_var = (levels * levels - 1) / 12
    scale = std / math.sqrt(uniform_int_power(SC_LO, SC_HI) * q_var)
    d = (random_sign(rng, n_blocks) * np.float32(scale)).astype(np.float16).astype(np.float32)
    blocks[:, 0:2] = f16_bytes(d)
    blocks[:, 2:4] = f16_bytes(d * np.float32(k))
    blocks[:, 4:16] = pack_scale_min(sc, m)
    return blocks.reshape(-1)


def _random_q6_k(n_blocks: int, rng: np.random.Generator, std: float) -> np.ndarray:
    blocks = random_bytes(rng, n_blocks, 210)
    mag = rng.integers(Q6_SC_LO, Q6_SC_HI + 1, (n_blocks, 16), dtype=np.int16)
    sign = rng.integers(0, 2, (n_blocks, 16), dtype=np.int16) * 2 - 1
    blocks[:, 192:208] = (mag * sign).astype(np.int8).view(np.uint8)
    q_mean_square = (64 * 64 - 1) / 12 + 0.25                          # q uniform on -32..31
    scale = std / math.sqrt(uniform_int_power(Q6_SC_LO, Q6_SC_HI) * q_mean_square)
    blocks[:, 208:210] = f16_bytes(random_sign(rng, n_blocks) * np.float32(scale))
    return blocks.reshape(-1)


HEADERS = (("orcd.quant", "base.cuh"), ("orcd.quant", "kquants.cuh"))


def scales_unpacked(blocks: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K blocks [n, B] -> [n, B + 4]: the 12 bytes of packed 6-bit scales and
    mins as 8 + 8 bytes ([d dmin][sc 8][m 8][rest]), so a GPU thread reads its
    sub-block's scale and min with a byte load instead of unpacking bits."""
    sc, m = unpack_scale_min(blocks[:, 4:16])
    return np.concatenate([blocks[:, :4], sc, m, blocks[:, 16:]], axis=1)


def scales_packed(blocks: np.ndarray) -> np.ndarray:
    """The inverse of ``scales_unpacked`` (exact: the 12 bytes hold nothing else)."""
    return np.concatenate([blocks[:, :4], pack_scale_min(blocks[:, 4:12], blocks[:, 12:20]), blocks[:, 20:]],
                          axis=1)


def _row(type_id, name, nbytes, dq, q, rnd, planes=(), affine=False) -> QuantFormat:
    # device: eight pieces of 32 values per 256-value block, int8 activations (dp4a, tensor cores)
    rewrite = dict(block_to_vram=scales_unpacked, block_from_vram=scales_packed,
                   vram_block_bytes=nbytes + 4, device_rewrite="kscales") if affine else {}
    return QuantFormat(type_id, name, QK_K, nbytes,
                       dequantize=blockwise_dequantizer(dq, name, QK_K, nbytes),
                       quantize=blockwise_quantizer(q, name, QK_K, nbytes),
                       device=DeviceFormat(f"Fmt{name}", name.lower(), HEADERS, qk=QK_K, pieces=8, int8=True,
                                           mma=True, planes=planes, **rewrite),
                       random_blocks=rnd)


FORMATS: tuple[QuantFormat, ...] = (
    # Q4_K / Q5_K in VRAM: scales unpacked (scales_unpacked: [d dmin][sc 8][m 8][qh][qs]),
    # then planar: qs, (qh,) sc + m, d + dmin
    _row(12, "Q4_K", 144, _dq_q4_k, _q_q4_k,
         lambda n, rng, std: _random_affine_k(n, rng, std, 144, 16),
         planes=((20, 148), (4, 20), (0, 4)), affine=True),
    _row(13, "Q5_K", 176, _dq_q5_k, _q_q5_k,
         lambda n, rng, std: _random_affine_k(n, rng, std, 176, 32),
         planes=((52, 180), (20, 52), (4, 20), (0, 4)), affine=True),
    # Q6_K's 210-byte blocks are not 16-byte multiples: planar (ql, qh, scales, d)
    _row(14, "Q6_K", 210, _dq_q6_k, _q_q6_k, _random_q6_k, ((0, 128), (128, 192), (192, 208), (208, 210))),
)
