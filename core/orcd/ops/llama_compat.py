"""llama.cpp's CPU numerics, for exact parity checks.

ggml's CPU backend multiplies a quantized weight by an activation that it
first rounds to the weight's "vec_dot type": 8-bit blocks (Q8_0 for the
32-value formats and MXFP4, Q8_K for the K-quants), fp16 for F16 weights,
bf16 for BF16. orcd's reference keeps activations in float32; with
``CpuBackend(activation_rounding="ggml-cpu")`` it rounds them the same way,
which removes the only systematic difference from llama.cpp on the CPU (see
docs/parity.md).
"""

from __future__ import annotations

import numpy as np

Q8_0_TYPES = {2, 3, 6, 7, 8, 39}   # Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 MXFP4 (Q8_1 rounds alike)
Q8_K_TYPES = {12, 13, 14}          # Q4_K Q5_K Q6_K
F16, BF16 = 1, 30


def round_q8_0(x: np.ndarray) -> np.ndarray:
    # quantize_row_q8_0: d = amax/127 per 32 values, q = round(x/d), d stored as fp16
    rows = x.reshape(-1, 32)
    d = np.abs(rows).max(axis=-1, keepdims=True) / np.float32(127)
    q = np.round(np.divide(rows, d, out=np.zeros_like(rows), where=d > 0))
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def round_q8_k(x: np.ndarray) -> np.ndarray:
    # quantize_row_q8_K: per 256 values, iscale = -127/max (max: the value of
    # largest magnitude, with its sign), q = min(127, round(iscale*x)), d = 1/iscale
    rows = x.reshape(-1, 256)
    mx = np.take_along_axis(rows, np.abs(rows).argmax(axis=-1)[:, None], axis=-1)
    iscale = np.divide(np.float32(-127), mx, out=np.zeros_like(mx), where=mx != 0)
    q = np.minimum(np.float32(127), np.round(iscale * rows))
    d = np.divide(np.float32(1), iscale, out=np.zeros_like(iscale), where=iscale != 0)
    return (q * d).reshape(x.shape)


def round_bf16(x: np.ndarray) -> np.ndarray:
    # round to nearest even on the upper 16 bits, as ggml's fp32 -> bf16
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    u = (u + np.uint32(0x7FFF) + ((u >> 16) & 1)) & np.uint32(0xFFFF0000)
    return u.view(np.float32)


def round_int8(x: np.ndarray, fmt) -> np.ndarray:
    """x as orcd's int8 GPU GEMVs see it for a weight of format ``fmt`` (a
    QuantFormat or None): the inputs of formats with int8 kernels quantized per 32
    values (matmul.quantize_q8_ref), others as is."""
    from orcd.ops.matmul import quantize_q8_ref

    if fmt is None or fmt.device is None or not fmt.device.int8:
        return x
    q, d = quantize_q8_ref(x)
    return (q.reshape(*x.shape[:-1], -1, 32) * d[..., None]).reshape(x.shape).astype(np.float32)


def round_activation(x: np.ndarray, fmt) -> np.ndarray:
    """x [..., n_in] as ggml-cpu sees it when multiplying a weight of format ``fmt``."""
    weight_type = None if fmt is None else fmt.type_id
    if weight_type in Q8_0_TYPES:
        return round_q8_0(x)
    if weight_type in Q8_K_TYPES:
        return round_q8_k(x)
    if weight_type == F16:
        return x.astype(np.float16).astype(np.float32)
    if weight_type == BF16:
        return round_bf16(x)
    return x
