"""MXFP4 (OCP microscaling FP4, GGML type 39): 32 E2M1 values sharing an E8M0 scale.

Layout (ggml-common.h): [e uint8][qs 16], 17 bytes. x = kvalues[q] * d with
kvalues the E2M1 values doubled (0, 0.5, 1, ... 6 -> 0, 1, 2, ... 12) and
d = 2^(e - 128), i.e. ggml's GGML_E8M0_TO_FP32_HALF (half the E8M0 value; e < 2
gives the float32 subnormals 2^-128, 2^-127). Value j < 16 is the low nibble of
qs[j], value j + 16 its high nibble; nibble bit 3 is the sign.
"""

from __future__ import annotations

import math

import numpy as np

from orcd.quant.format import DeviceFormat, QuantFormat
from orcd.quant.simple import (blockwise_dequantizer, blockwise_quantizer, nibbles, pack_nibbles,
                               random_bytes)

KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)
KVALUES_F32 = KVALUES.astype(np.float32)


def _e8m0_half_table() -> np.ndarray:
    """[256] float32: GGML_E8M0_TO_FP32_HALF(e) for every byte e."""
    e = np.arange(256, dtype=np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23))
    return bits.astype(np.uint32).view(np.float32)


E8M0_HALF = _e8m0_half_table()


def _dq_mxfp4(b: np.ndarray) -> np.ndarray:
    d = E8M0_HALF[b[:, 0]][:, None]                         # [n, 1]
    return d * KVALUES_F32[nibbles(b[:, 1:17])]


def _q_mxfp4(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_mxfp4_ref: e = floor(log2(amax)) - 2 + 127, then the
    nearest of the 16 levels (first index on ties)."""
    amax = np.abs(x).max(axis=-1)
    e = np.where(amax > 0, np.floor(np.log2(amax)) - 2 + 127, 0).clip(0, 255).astype(np.uint8)
    d = E8M0_HALF[e][:, None, None]                         # [n, 1, 1]
    err = np.abs(d * KVALUES_F32 - x[..., None])            # [n, 32, 16]
    q = err.argmin(axis=-1).astype(np.uint8)
    return np.concatenate([e[:, None], pack_nibbles(q)], axis=-1)


# E[kvalue^2] over the 16 nibbles: uniform random nibbles are already zero-mean
# (the table is symmetric), so only the scale byte needs choosing.
_K_MEAN_SQUARE = float(np.mean(KVALUES_F32.astype(np.float64) ** 2))


def _random_mxfp4(n_blocks: int, rng: np.random.Generator, std: float) -> np.ndarray:
    """Scale bytes mix two adjacent exponents e0, e0 + 1 (d^2 = 4^(e - 128)) with
    the probability that makes E[d^2] * E[k^2] = std^2 exactly."""
    blocks = random_bytes(rng, n_blocks, 17)
    target = std * std / _K_MEAN_SQUARE                      # E[d^2]
    e0 = min(max(math.floor(128 + 0.5 * math.log2(target)), 2), 253)
    p = min(max((target / 4.0 ** (e0 - 128) - 1) / 3, 0.0), 1.0)
    blocks[:, 0] = e0 + (rng.random(n_blocks) < p)
    return blocks.reshape(-1)


FORMATS: tuple[QuantFormat, ...] = (
    QuantFormat(39, "MXFP4", 32, 17,
                dequantize=blockwise_dequantizer(_dq_mxfp4, "MXFP4", 32, 17),
                quantize=blockwise_quantizer(_q_mxfp4, "MXFP4", 32, 17),
                device=DeviceFormat("FmtMXFP4", "mxfp4", (("orcd.quant", "base.cuh"), ("orcd.quant", "mxfp4.cuh")),
                                    qk=32, pieces=1, int8=True, planes=((1, 17), (0, 1))),
                random_blocks=_random_mxfp4),
)
