"""Fused ops: what a decode step does in many small kernels, done in one.

The references are compositions of the single ops (``linear`` is passed in, so
the CPU backend's llama.cpp rounding mode applies to every product):

    linear_multi(x, ws, bs, norm)   -> tuple(linear(rms_norm(x), w_i, b_i))
    gated_linear(x, w_gate, w_up, norm) -> swiglu(linear(h, w_gate), linear(h, w_up))
    linear_add(a, w, residual, b)   -> residual + linear(a, w, b)

``norm`` is ``(weight, eps)`` of an RMSNorm applied to x first, or None. In
``gated_linear``, ``w_up=None`` means w_gate holds both halves (Phi-3's fused
gate_up): rows [0, n_ff) gate, [n_ff, 2 n_ff) up.

On the GPU (fused.cu) each is one launch for a single token; more tokens use the
separate kernels (prefill is GEMM-bound, not launch-bound). With int8 activations
(integer formats) the input arrives quantized (matmul's Q8Act): normed and
quantized by ``rms_norm_q8`` when there is a norm, or by the GEMV itself (``ToQ8``)
when there is none, and the GEMV dots with dp4a.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from orcd.ops.activation import swiglu_ref
from orcd.ops.matmul import linear_ref
from orcd.ops.norm import rms_norm_ref


def _normed(x, norm):
    return x if norm is None else rms_norm_ref(x, norm[0], norm[1])


def linear_multi_ref(x: np.ndarray, ws: Sequence, bs: Sequence | None = None, norm=None,
                     linear: Callable = linear_ref) -> tuple:
    # x: [T, n_in] -> ([T, n_out_i] for each weight)
    h = _normed(x, norm)
    bs = tuple(bs) if bs is not None else (None,) * len(ws)
    return tuple(linear(h, w, b) for w, b in zip(ws, bs))


def gated_linear_ref(x: np.ndarray, w_gate, w_up=None, norm=None,
                     linear: Callable = linear_ref) -> np.ndarray:
    # x: [T, n_in] -> [T, n_ff]
    h = _normed(x, norm)
    if w_up is None:
        n_ff = w_gate.shape[0] // 2
        gate_up = linear(h, w_gate)
        return swiglu_ref(gate_up[:, :n_ff], gate_up[:, n_ff:])
    return swiglu_ref(linear(h, w_gate), linear(h, w_up))


def linear_add_ref(a: np.ndarray, w, residual: np.ndarray, b=None,
                   linear: Callable = linear_ref) -> np.ndarray:
    # a: [T, n_in], residual: [T, n_out]
    return residual + linear(a, w, b)


# -- CUDA ------------------------------------------------------------------------
# Launcher for fused.cu. CUDA modules are imported lazily.

FG_THREADS = 128
FG_WARPS = 4
MAX_SEGMENTS = 3
GATED_ROWS = 2    # gemv_gated_q8: output rows (gate and up each) per warp


def _kernel_source(formats):
    """fused.cu with its format switch over ``formats`` (the generated formats.cuh)."""
    from orcd.quant.device import kernel_source

    return kernel_source("orcd.ops", "fused.cu", formats)


class ToQ8:
    """fp32 activations [1, n] that a fused int8 GEMV quantizes per 32 values in its
    own prologue, normed first when ``norm`` (weight, eps) is given: bitwise what
    ``quantize_q8`` or ``rms_norm_q8`` would give it, one launch fewer."""

    def __init__(self, x, norm=None) -> None:
        self.x, self.norm = x, norm

    @property
    def shape(self) -> tuple:
        return self.x.shape


def _q8_args(x) -> tuple[list, int]:
    """The (x, g, eps, xq, xqd) arguments of an int8 GEMV and its dynamic shared memory:
    given quantized (Q8Act), or fp32 it quantizes itself (ToQ8: n bytes of xq, then a
    float per 32 values)."""
    if not isinstance(x, ToQ8):
        return [_u64(None), _u64(None), 0.0, _u64(x.xq.ptr), _u64(x.xd.ptr)], 0
    g, eps = (x.norm[0].ptr, float(x.norm[1])) if x.norm is not None else (None, 0.0)
    n = x.shape[1]
    return [_u64(x.x.ptr), _u64(g), eps, _u64(None), _u64(None)], n + n // 8


def _u64(p) -> np.uint64:
    return np.uint64(0 if p is None else int(p))


class FusedKernels:
    """One-token fused GEMVs. Only enqueue kernels: graph-capturable."""

    def __init__(self, device, compiler, launcher, formats=None, self_quantize: bool = False) -> None:
        from orcd.quant.builtin import builtin_table
        from orcd.quant.device import with_device

        self.formats = {f.type_id: f for f in with_device(builtin_table() if formats is None else formats)}
        module = compiler.load(device, _kernel_source(self.formats.values()))
        self._fn, self._fn_q8 = module.function("gemv_fused"), module.function("gemv_fused_q8")
        self._norm_q8 = module.function("rms_norm_q8")
        self._gated_q8 = {t: module.function(f"gemv_gated_q8_{f.device.suffix}")
                          for t, f in self.formats.items() if f.device.int8}
        #: gated int8 GEMVs of rows of at most 32 pieces (Qwen's 896: 28) with two rows
        #: a warp (gemv_gated_q8; H100: 12.2 -> 10.7 us a layer; Phi-3's 96-piece rows
        #: lost 3%, so they keep gemv_fused_q8)
        self.gated_rows = True
        #: a single token's int8 activations made in each block (ToQ8), not launched
        #: (CudaBackend's self_quantize; off until measured on a card)
        self.self_quantize = bool(self_quantize)
        self._launch = launcher

    def rms_norm_q8(self, x, g, eps: float, out) -> None:
        # x: [T, n] -> out (Q8Act [T, n]): rms_norm(x) * g quantized per 32 values
        T, n = x.shape
        if tuple(out.shape) != (T, n) or n % 32:
            raise ValueError(f"rms_norm_q8: x {x.shape} into {out.shape} (n a multiple of 32)")
        self._launch(self._norm_q8, T, FG_THREADS, [_u64(x.ptr), _u64(g.ptr), float(eps), int(n),
                                                    _u64(out.xq.ptr), _u64(out.xd.ptr)])

    def supports(self, x, ws) -> bool:
        """One token, at most three 2-D weights of formats this module knows with whole
        pieces (integer formats only, for int8 activations)."""
        from orcd.ops.matmul_base import Q8Act, device_block, int8_capable

        if x.shape[0] != 1 or not 1 <= len(ws) <= MAX_SEGMENTS or x.shape[1] % 4:
            return False
        for w in ws:
            if len(w.shape) != 2 or w.shape[1] != x.shape[1] or self.formats.get(w.type_id) != w.fmt:
                return False
            if (isinstance(x, (Q8Act, ToQ8)) and not int8_capable(w)) or x.shape[1] % device_block(w)[0]:
                return False
        return True

    def linear_multi(self, x, ws, bs, outs, norm=None) -> None:
        # outs[i]: [1, n_out_i] = rms_norm(x) @ ws[i].T + bs[i]
        segs = [(w, b, o, w.shape[0]) for w, b, o in zip(ws, bs, outs)]
        self._run(x, segs, norm, residual=None, gated=False)

    def gated_linear(self, x, w_gate, w_up, out, norm=None) -> None:
        # out: [1, n_ff] = silu(h @ w_gate.T) * (h @ w_up.T); w_up None: halves of w_gate
        from orcd.ops.matmul_base import Q8Act, row_pieces

        n_ff = out.shape[1]
        up = (w_up.ptr, w_up) if w_up is not None else (w_gate.ptr + n_ff * w_gate.row_bytes, w_gate)
        if (self.gated_rows and isinstance(x, (Q8Act, ToQ8)) and norm is None and row_pieces(w_gate) <= 32
                and up[1].type_id == w_gate.type_id and up[1].row_bytes == w_gate.row_bytes):
            acts, shared = _q8_args(x)
            self._launch(self._gated_q8[w_gate.type_id], -(-n_ff // (FG_WARPS * GATED_ROWS)), FG_THREADS,
                         [*acts, int(x.shape[1]), _u64(w_gate.ptr), _u64(up[0]),
                          np.int64(w_gate.row_bytes), _u64(out.ptr), int(n_ff)], shared=shared)
            return
        self._run(x, [(w_gate, None, out, n_ff)], norm, residual=None, gated=True, up=up)

    def linear_add(self, a, w, residual, b, out) -> None:
        # out: [1, n_out] = residual + a @ w.T + b
        self._run(a, [(w, b, out, w.shape[0])], None, residual=residual, gated=False)

    def _run(self, x, segs, norm, residual, gated: bool, up=None) -> None:
        from orcd.ops.matmul_base import Q8Act, gemv_split, row_pieces

        n_in = x.shape[1]
        args, total = [], 0
        for i in range(MAX_SEGMENTS):
            if i < len(segs):
                w, b, out, n_out = segs[i]
                split = gemv_split(n_out, row_pieces(w))
                rows = n_out
                if gated:   # gate and up rows interleaved: 2 n_out warp rows, both in one block
                    split, rows = min(split, 2), 2 * n_out
                blocks = -(-rows // (FG_WARPS // split))
                args += [_u64(w.ptr), np.int64(w.row_bytes), int(w.type_id), _u64(None if b is None else b.ptr),
                         _u64(out.ptr), int(n_out), split, blocks]
                total += blocks
            elif i == 1 and up is not None:   # gated: segment 1 is the up weight, no blocks of its own
                ptr, w = up
                args += [_u64(ptr), np.int64(w.row_bytes), int(w.type_id), _u64(None), _u64(None),
                         int(segs[0][3]), 1, 0]
            else:
                args += [_u64(None), np.int64(0), 0, _u64(None), _u64(None), 0, 1, 0]
        res = _u64(None if residual is None else residual.ptr)
        if isinstance(x, (Q8Act, ToQ8)):
            if norm is not None:
                raise ValueError("fused GEMV: int8 activations come normed (rms_norm_q8)")
            acts, shared = _q8_args(x)    # ToQ8: quantized in the kernel, into shared memory
            self._launch(self._fn_q8, total, FG_THREADS, [*acts, int(n_in), res, int(gated), *args],
                         shared=shared)
            return
        g, eps = (norm[0].ptr, float(norm[1])) if norm is not None else (None, 0.0)
        self._launch(self._fn, total, FG_THREADS,
                     [_u64(x.ptr), int(n_in), _u64(g), eps, _u64(None if residual is None else residual.ptr),
                      int(gated), *args], shared=4 * n_in if norm is not None else 0)  # staged x * g
