"""The expert matmuls of a mixture of experts on matmul.cu's per-format kernels:
per (token, slot) pair for a decode (``moe_linear``), grouped per expert for a
prefill (``moe_gemm``, on the tensor cores ``moe_gemm_tc``), and one token's
gate/up/SwiGLU and down/weighted-sum kernels (``moe_gate_up_q8``,
``moe_down_sum_q8``). A mixin of ``MatmulKernels``, whose ``activations`` they use.
"""

from __future__ import annotations

import numpy as np

from orcd.ops.matmul_base import (GEMV_ROWS, MAX_GRID_Y, MOE_MAX_K, MOE_TC_ROWS, MOE_TC_TILE, MatmulBase, Q8Act,
                                  gemv_split, int8_capable, kptr, row_pieces, tc_step, tc_takes)


class ExpertMatmuls(MatmulBase):
    """Launches of the expert kernels (see the module docstring)."""

    def moe_linear(self, x, w, b, expert_ids, out, scratch=None) -> None:
        """out[T, k, n_out] = x_t(,slot) @ w[e].T (+ b[e]) with e = expert_ids[t, slot]
        (int32 on the device; an id outside 0..n_expert-1 gives NaN). w: QWeight
        [n_expert, n_out, n_in]; b: [n_expert, n_out] or None; x: [T, n_in] (one
        row per token) or [T * k, n_in] (one per slot). Reads only chosen experts."""
        if len(w.shape) != 3:
            raise ValueError(f"moe_linear weight must be [n_expert, n_out, n_in], got {w.shape}")
        n_expert, n_out, n_in = w.shape
        if len(expert_ids.shape) != 2 or np.dtype(expert_ids.dtype) != np.int32:
            raise ValueError(f"expert_ids must be int32 [T, k], got {expert_ids.dtype} {expert_ids.shape}")
        T, k = expert_ids.shape
        if tuple(x.shape) not in ((T, n_in), (T * k, n_in)) or not self._is_act(x):
            raise ValueError(f"moe_linear x must be float32 [{T}, {n_in}] or [{T * k}, {n_in}], "
                             f"got {getattr(x, 'dtype', 'int8')} {x.shape}")
        per_pair = x.shape[0] == T * k and k > 1
        self._check_tensor(out, (T, k, n_out), "moe_linear out")
        if b is not None:
            self._check_tensor(b, (n_expert, n_out), "moe_linear bias")
        self._check_row(w, n_in)
        x = self.activations(x, w, scratch if scratch is not None else self.scratch)
        q8 = isinstance(x, Q8Act)
        kernel = self._fn(f"moe_gemv_{'q8_' if q8 else ''}", w)
        split = gemv_split(n_out, row_pieces(w))
        grid_x = -(-n_out // (GEMV_ROWS // split))
        step = MAX_GRID_Y // k * k   # whole tokens per launch
        expert_bytes = w.fmt.vram_tensor_bytes((n_out, n_in))
        for s in range(0, T * k, step):
            e = min(T * k, s + step)
            x_row = s if per_pair else s // k
            self.launch(kernel, (grid_x, e - s), 32 * GEMV_ROWS,
                        [kptr(w.ptr), np.int64(w.row_bytes), np.int64(expert_bytes),
                         *self._act_args(x, x_row), int(per_pair), kptr(expert_ids.ptr + 4 * s), k,
                         n_expert, kptr(b.ptr if b is not None else 0), kptr(out.ptr + 4 * s * n_out),
                         n_out, n_in, split])

    def moe_gemm_tc(self, xg, w, b, tiles, out) -> None:
        """moe_gemm on the tensor cores: the same product for tiles of up to
        MOE_TC_TILE pairs, fp16 operands (x and the dequantized weights rounded),
        fp32 sums; xg float32. n_in must be a multiple of max(32, the format's block)."""
        n_expert, n_out, n_in = self._check_grouped("moe_gemm_tc", xg, w, b, tiles, out)
        if isinstance(xg, Q8Act) or np.dtype(xg.dtype) != np.float32 or not tc_takes(w, n_in):
            raise ValueError(f"moe_gemm_tc x must be float32 with n_in a multiple of {tc_step(w)}, "
                             f"got {xg.dtype} {xg.shape}")
        # TC_ROWS weight rows per block; shared memory for a tile of x and one of w, (step + 8) halves a row
        self.launch(self._fn("moe_gemm_tc_", w), (-(-n_out // MOE_TC_ROWS), tiles.shape[0]), 128,
                    [kptr(w.ptr), np.int64(w.row_bytes), np.int64(w.fmt.vram_tensor_bytes((n_out, n_in))),
                     kptr(xg.ptr), kptr(tiles.ptr), kptr(b.ptr if b is not None else 0), kptr(out.ptr),
                     n_out, n_in],
                    shared=(MOE_TC_TILE + MOE_TC_ROWS) * (tc_step(w) + 8) * 2)

    def moe_gemm(self, xg, w, b, tiles, out, scratch=None) -> None:
        """Prefill's grouped expert matmul: out[i] = xg[i] @ w[e].T (+ b[e]) for
        every row i of each used tile (e, start, rows) of ``tiles`` ([n_tiles, 3]
        int32 on the device, from MoeKernels.group). xg: [N, n_in], out: [N, n_out],
        one row per (token, slot) pair in grouped order. Each tile reads its
        expert's weight rows once for up to MOE_TILE pairs."""
        n_expert, n_out, n_in = self._check_grouped("moe_gemm", xg, w, b, tiles, out)
        split = gemv_split(n_out, row_pieces(w))
        xg = self.activations(xg, w, scratch if scratch is not None else self.scratch)
        q8 = isinstance(xg, Q8Act)
        self.launch(self._fn(f"moe_gemm_{'q8_' if q8 else ''}", w),
                    (-(-n_out // (GEMV_ROWS // split)), tiles.shape[0]), 32 * GEMV_ROWS,
                    [kptr(w.ptr), np.int64(w.row_bytes),
                     np.int64(w.fmt.vram_tensor_bytes((n_out, n_in))), *self._act_args(xg, 0), kptr(tiles.ptr),
                     kptr(b.ptr if b is not None else 0), kptr(out.ptr), n_out, n_in, split])

    def _check_grouped(self, name: str, xg, w, b, tiles, out) -> tuple[int, int, int]:
        """A grouped expert matmul's operands checked; (n_expert, n_out, n_in)."""
        if len(w.shape) != 3:
            raise ValueError(f"{name} weight must be [n_expert, n_out, n_in], got {w.shape}")
        n_expert, n_out, n_in = w.shape
        N = xg.shape[0]
        if tuple(xg.shape) != (N, n_in) or not self._is_act(xg):
            raise ValueError(f"{name} x must be float32 [{N}, {n_in}], got {xg.shape}")
        self._check_tensor(out, (N, n_out), f"{name} out")
        if len(tiles.shape) != 2 or tiles.shape[1] != 3 or np.dtype(tiles.dtype) != np.int32:
            raise ValueError(f"{name} tiles must be int32 [n_tiles, 3], got {tiles.dtype} {tiles.shape}")
        if not 0 < tiles.shape[0] <= MAX_GRID_Y:
            raise ValueError(f"{name}: {tiles.shape[0]} tiles (at most {MAX_GRID_Y} per launch)")
        if b is not None:
            self._check_tensor(b, (n_expert, n_out), f"{name} bias")
        self._check_row(w, n_in)
        return n_expert, n_out, n_in

    def moe_gate_up_q8(self, xa: "Q8Act", ex, ids, alpha: float, limit: float, h: "Q8Act") -> None:
        """h[t * k + s] = swiglu_oai(x_t . gate[e] + bg[e], x_t . up[e] + bu[e]) for e =
        ids[t, s], quantized per 32 values into h (Q8Act [T * k, n_ff]); x as int8
        activations xa [T, D]. One launch for every chosen expert's gate, up and SwiGLU."""
        n_expert, n_ff, D = ex.gate_w.shape
        T, k = ids.shape
        if ex.up_w.shape != ex.gate_w.shape or ex.up_w.type_id != ex.gate_w.type_id or n_ff % 32:
            raise ValueError(f"moe gate/up: gate {ex.gate_w.shape}, up {ex.up_w.shape} (n_ff a multiple of 32)")
        if tuple(xa.shape) != (T, D) or tuple(h.shape) != (T * k, n_ff) or not int8_capable(ex.gate_w):
            raise ValueError(f"moe gate/up: x {xa.shape}, h {h.shape} for ids {ids.shape}")
        w = ex.gate_w
        self._check_row(w, D)
        self.launch(self._fn("moe_gate_up_q8_", w), (n_ff // 32, T * k), 256,
                    [kptr(w.ptr), kptr(ex.up_w.ptr), np.int64(w.row_bytes),
                     np.int64(w.fmt.vram_tensor_bytes((n_ff, D))), kptr(xa.xq.ptr), kptr(xa.xd.ptr),
                     kptr(ids.ptr), k, n_expert, kptr(ex.gate_b.ptr), kptr(ex.up_b.ptr), float(alpha),
                     float(limit), kptr(h.xq.ptr), kptr(h.xd.ptr), n_ff, D])

    def moe_down_sum_q8(self, h: "Q8Act", w, b, ids, weights, residual, out) -> None:
        """out[t] = residual[t] + sum_s weights[t, s] * (h[t * k + s] . w[e].T + b[e]), e =
        ids[t, s], in choice order: the experts' down projections, their weighted sum
        and the residual add in one launch. w: QWeight [n_expert, D, n_ff]."""
        n_expert, D, n_ff = w.shape
        T, k = ids.shape
        if not 0 < k <= MOE_MAX_K or tuple(h.shape) != (T * k, n_ff) or not int8_capable(w):
            raise ValueError(f"moe down: h {h.shape} for ids {ids.shape} (k <= {MOE_MAX_K}), {w.fmt.name}")
        self._check_tensor(residual, (T, D), "moe down residual")
        self._check_tensor(out, (T, D), "moe down out")
        self._check_row(w, n_ff)
        self.launch(self._fn("moe_down_sum_q8_", w), (-(-D // 8), T), 256,
                    [kptr(w.ptr), np.int64(w.row_bytes), np.int64(w.fmt.vram_tensor_bytes((D, n_ff))),
                     kptr(h.xq.ptr), kptr(h.xd.ptr), kptr(ids.ptr), kptr(weights.ptr), k, n_expert,
                     kptr(b.ptr), kptr(residual.ptr), kptr(out.ptr), D, n_ff])
