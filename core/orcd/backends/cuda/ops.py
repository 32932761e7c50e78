"""The CUDA backend's op set (orcd.ops' contract on DeviceTensors) and its scratch.

Scratch is two bump arenas used in turn: every ``attention`` call (once per
layer) switches to the other arena and resets it. What crosses a layer
boundary is only the residual stream, made in the previous period, so the
arena being reset holds only dead tensors; memory is two layers' worth
whatever the depth.

A single decode token goes through the fused kernels (orcd.ops.fused: one
launch for q/k/v, one for gate/up/SwiGLU, the residual add inside the output
projections, RoPE and the KV store in one kernel); more tokens compose the
single ops.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from orcd.backends.cuda.tensor import ALIGN, Arena, DeviceTensor, QWeight
from orcd.kvcache import KVCache
from orcd.ops.contract import Phase
from orcd.ops.fused import ToQ8
from orcd.ops.matmul_base import MOE_TC_TILE, MOE_TILE, Q8Act
from orcd.ops.moe import ROUTER_MAX_EXPERTS, max_tiles

SCRATCH_START = 16 << 20   # bytes per arena at first; doubled whenever a forward needs more


class ScratchFull(Exception):
    """An arena ran out; the runner grows the scratch and reruns the forward."""


class Scratch:
    """Two arenas over one "scratch" allocation, switched at each attention."""

    def __init__(self, alloc, per_arena: int) -> None:
        self.alloc, self.per_arena = alloc, per_arena
        self.buf = alloc.alloc(2 * per_arena, "scratch")
        self.arenas = [Arena(self.buf.ptr, per_arena), Arena(self.buf.ptr + per_arena, per_arena)]
        self.cur = 0

    def empty(self, shape, dtype=np.float32) -> DeviceTensor:
        a = self.arenas[self.cur]
        size = -(-int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize // ALIGN) * ALIGN
        if a.offset + size > a.capacity:
            raise ScratchFull(a.offset + size)
        return a.empty(shape, dtype)

    def flip(self) -> None:
        self.cur ^= 1
        self.arenas[self.cur].reset()

    def reset(self) -> None:
        self.cur = 0
        for a in self.arenas:
            a.reset()

    @property
    def offset(self) -> int:  # with ``empty``, the Arena interface MatmulKernels' prefill uses
        return self.arenas[self.cur].offset

    @offset.setter
    def offset(self, value: int) -> None:
        self.arenas[self.cur].offset = value

    def free(self) -> None:
        if self.buf is not None:
            self.alloc.free(self.buf)
            self.buf = None


class CudaOps:
    """The op set on DeviceTensors (see orcd.ops); outputs come from the scratch.

    ``phase`` Phase.ROWS (a batch of decodes, CudaBackend.forward_batch): no
    single-token fused kernels, so a row is computed by the same kernels whether its
    batch holds one sequence or sixteen (the GEMVs and attention sum each row on its
    own): a request's tokens do not depend on which others share its steps. Otherwise
    (None) one sequence's rows: T = 1 is a decode, more a prefill chunk."""

    phase: Phase | None = None

    @property
    def per_row(self) -> bool:
        return self.phase is Phase.ROWS

    def __init__(self, backend: "CudaBackend") -> None:
        self.b = backend

    def _fused_ok(self, x, ws) -> bool:
        return not self.per_row and self.b.fused.supports(x, ws)

    def _empty(self, shape, dtype=np.float32) -> DeviceTensor:
        return self.b.scratch.empty(shape, dtype)

    def _act(self, x: DeviceTensor, *ws: QWeight):
        # x as the GEMVs of all of ws read it: quantized to int8 once when they all can
        # (or already, by the kernel that wrote x: x.q8)
        mm = self.b.mm
        if isinstance(x, Q8Act) or not mm.use_int8(*ws, batch=self.per_row):
            return x
        return x.q8 if x.q8 is not None else mm.quantize(x, self.b.scratch)

    def embed(self, table: QWeight, ids: DeviceTensor) -> DeviceTensor:
        out = self._empty((ids.shape[0], table.shape[-1]))        # [T, D]
        self.b.mm.embed(table, ids, out)
        return out

    def linear(self, x: DeviceTensor, w: QWeight, b: DeviceTensor | None = None) -> DeviceTensor:
        T = x.shape[0]
        out = self._empty((T, w.shape[0]))                        # [T, n_out]
        if self.per_row:
            self._gemvs(x, w, b, out)
            return out
        self.b.mm.linear(x, w, b, out, scratch=self.b.scratch)  # prefill takes GEMM tiles from it
        return out

    def _gemvs(self, x, w, b, out, residual=None) -> None:
        # GEMVs of <= 32 rows, never the GEMM: each row summed alike in any batch
        xa = self._act(x, w)
        for s, e in self._gemv_launches(xa):
            self.b.mm.gemv(xa.rows(s, e), w, b, out.rows(s, e), scratch=self.b.scratch,
                           residual=residual.rows(s, e) if residual is not None else None)

    def _gemv_launches(self, x) -> list[tuple[int, int]]:
        # the rows [s, e) of each GEMV launch over x's rows (MatmulKernels.gemv_rows a launch)
        T, step = x.shape[0], self.b.mm.gemv_rows(x)
        return [(s, min(T, s + step)) for s in range(0, T, step)]

    # -- fused (orcd.ops.fused): one launch for one token, else the single ops ----------

    def _fused_act(self, x, ws, norm):
        # one token into a fused GEMV: (x, norm) as they are, or, when every weight is
        # of an integer format, int8 activations the kernel makes itself (normed first
        # when asked: ToQ8, no rms_norm_q8 or quantize_q8 launch)
        if not self.b.mm.use_int8(*ws):
            return x, norm
        if norm is None and (x.q8 is not None or not self.b.fused.self_quantize):
            return self._act(x, *ws), None          # the int8 x attention wrote, or quantize_q8
        if self.b.fused.self_quantize:
            return ToQ8(x, norm), None
        return self._norm_q8(x, norm), None

    def _norm_q8(self, x, norm) -> Q8Act:
        # rms_norm(x) quantized to int8 per 32 values, in one launch
        xa = Q8Act.empty(self.b.scratch, *x.shape)
        self.b.fused.rms_norm_q8(x, norm[0], norm[1], xa)
        return xa

    def _shared_act(self, x, ws, norm=None):
        # a decode batch quantizes x (normed first when asked) once for all of ws, the
        # norm and the quantizing in one launch where it can (a single row: the fused
        # kernels do both)
        if self.per_row and norm is not None and self.b.mm.use_int8(*ws, batch=True):
            return self._norm_q8(x, norm)
        h = x if norm is None else self.rms_norm(x, *norm)
        return self._act(h, *ws) if self.per_row else h

    def linear_multi(self, x, ws, bs=None, norm=None) -> tuple:
        bs = tuple(bs) if bs is not None else (None,) * len(ws)
        if self._fused_ok(x, ws):
            outs = tuple(self._empty((1, w.shape[0])) for w in ws)   # [1, n_out_i] each
            xa, norm = self._fused_act(x, ws, norm)
            self.b.fused.linear_multi(xa, ws, bs, outs, norm)
            return outs
        h = self._shared_act(x, ws, norm)
        if not self.per_row:
            return tuple(self.linear(h, w, b) for w, b in zip(ws, bs))
        outs = tuple(self._empty((h.shape[0], w.shape[0])) for w in ws)   # [T, n_out_i] each
        for s, e in self._gemv_launches(h):          # weights of one format share a launch
            self.b.mm.gemv_multi(h.rows(s, e), ws, bs, [o.rows(s, e) for o in outs], scratch=self.b.scratch)
        return outs

    def gated_linear(self, x, w_gate, w_up=None, norm=None) -> DeviceTensor:
        n_ff = w_gate.shape[0] // 2 if w_up is None else w_gate.shape[0]
        ws = (w_gate,) if w_up is None else (w_gate, w_up)
        if self._fused_ok(x, ws):
            out = self._empty((1, n_ff))                               # [1, n_ff]
            xa, norm = self._fused_act(x, ws, norm)
            self.b.fused.gated_linear(xa, w_gate, w_up, out, norm)
            return out
        h = self._shared_act(x, ws, norm)
        if self.per_row and self.b.mm.gates(h, w_gate, w_up):
            out = self._empty((h.shape[0], n_ff))                      # [T, n_ff]
            self.b.mm.gated(h, w_gate, w_up, out)                      # both GEMVs and swiglu, one launch
            return out
        if w_up is None:
            gate, up = self.split(self.linear(h, w_gate), (n_ff, n_ff))
        else:
            gate, up = self.linear(h, w_gate), self.linear(h, w_up)
        return self.swiglu(gate, up)

    def linear_add(self, a, w, residual, b=None) -> DeviceTensor:
        if self._fused_ok(a, (w,)):
            out = self._empty(residual.shape)                          # [1, n_out]
            self.b.fused.linear_add(self._fused_act(a, (w,), None)[0], w, residual, b, out)
            return out
        if not self.per_row:
            return self.add(residual, self.linear(a, w, b))
        out = self._empty(residual.shape)                              # [T, n_out]
        self._gemvs(a, w, b, out, residual)                            # the add in the GEMV's launch
        return out

    def rms_norm(self, x, w, eps: float) -> DeviceTensor:
        out = self._empty(x.shape)
        self.b.norm.rms_norm(x, w, eps, out)
        return out

    def layer_norm(self, x, w, b, eps: float) -> DeviceTensor:
        out = self._empty(x.shape)
        self.b.norm.layer_norm(x, w, b, eps, out)
        return out

    def rope(self, x, pos, cfg) -> DeviceTensor:
        out = self._empty(x.shape)
        self.b.rope_k.rope(x, pos, self.b.rope_table(cfg), out)
        return out

    def _unary(self, fn, x) -> DeviceTensor:
        out = self._empty(x.shape)
        fn(x, out)
        return out

    def silu(self, x) -> DeviceTensor:
        return self._unary(self.b.act.silu, x)

    def gelu(self, x) -> DeviceTensor:
        return self._unary(self.b.act.gelu, x)

    def add(self, a, b) -> DeviceTensor:
        out = self._empty(a.shape)
        self.b.act.add(a, b, out)
        return out

    def swiglu(self, gate, up) -> DeviceTensor:
        out = self._empty(gate.shape)
        self.b.act.swiglu(gate, up, out)
        return out

    def swiglu_oai(self, gate, up, alpha: float, limit: float) -> DeviceTensor:
        out = self._empty(gate.shape)
        self.b.act.swiglu_oai(gate, up, out, alpha, limit)
        return out

    def split(self, x: DeviceTensor, sizes: Iterable[int]) -> list[DeviceTensor]:
        # along the last axis: [T, sum(sizes)] -> [T, s] each; one row splits into views
        T = x.shape[0]
        out, off = [], 0
        for s in sizes:
            if T == 1 and (off * 4) % 16 == 0:
                out.append(DeviceTensor(x.ptr + off * 4, (1, s), x.dtype))
            else:
                piece = self._empty((T, s))
                self.b.act.split_copy(x, off, piece)
                out.append(piece)
            off += s
        return out

    def last_row(self, x: DeviceTensor) -> DeviceTensor:
        return x.rows(x.shape[0] - 1, x.shape[0])

    def attention(self, q, k, v, cache: KVCache, layer: int, pos, scale: float,
                  window: int = 0, sinks=None, rope=None) -> DeviceTensor:
        # q: [T, n_head*hd], k/v: [T, n_kv*hd]; stores k, v at pos, attends over 0..pos[t];
        # rope: RoPE on q and k first, fused with the store
        self.b.scratch.flip()  # a layer boundary: the other arena's tensors are dead
        kc, vc, attn = cache.k[layer], cache.v[layer], self.b.attn
        # one sequence's one token: RoPE and the store inside the decode kernel
        in_decode = rope is not None and attn.ropes_in_decode(q, kc, vc, cache)
        q_in = q
        if rope is not None and not in_decode:
            q = self._empty(q_in.shape)
            attn.rope_kv_store(q_in, k, v, kc, vc, pos, self.b.rope_table(rope), q, cache)
        elif rope is None:
            attn.kv_store(kc, vc, k, v, pos, cache)
        T, hd, hd_v = q.shape[0], kc.shape[2], vc.shape[2]
        out = self._empty((T, q.shape[1] // hd * hd_v))
        # a decode's output also as int8 activations, for the output projection's GEMV
        q8 = Q8Act.empty(self.b.scratch, *out.shape) if attn.quantizes(q, kc, vc, cache) else None
        if in_decode:
            attn.rope_attention(q, k, v, kc, vc, pos, self.b.rope_table(rope), scale, window, sinks, out,
                                self._empty, cache, q8)
        else:
            attn.attention(q, kc, vc, pos, scale, window, sinks, out, self._empty, cache, q8)
        return out if q8 is None else DeviceTensor(out.ptr, out.shape, out.dtype, q8)

    def moe_add(self, x, experts, n_used: int, alpha: float, limit: float, norm=None) -> DeviceTensor:
        # x: [T, D] -> x + moe(rms_norm(x)); one decode token: three kernels (norm + router +
        # top-k + int8 x; gate/up/SwiGLU + int8 h; down + weighted sum + residual)
        T, D, ex = *x.shape, experts
        if T != 1 or norm is None or self.per_row or not self._moe_fused(ex, n_used):
            h = x if norm is None else self.rms_norm(x, *norm)
            return self.add(x, self.moe(h, ex, n_used, alpha, limit))
        n_ff = ex.gate_w.shape[1]
        ids, weights = self._empty((T, n_used), np.int32), self._empty((T, n_used))
        h = Q8Act.empty(self.b.scratch, T * n_used, n_ff)
        xa = Q8Act.empty(self.b.scratch, T, D)
        self.b.moe_k.norm_route_q8(x, norm[0], norm[1], ex.router_w, ex.router_b, ids, weights, xa)
        self.b.mm.moe_gate_up_q8(xa, ex, ids, alpha, limit, h)
        out = self._empty((T, D))
        self.b.mm.moe_down_sum_q8(h, ex.down_w, ex.down_b, ids, weights, x, out)
        return out

    def _moe_tc(self, ex, D: int, n_ff: int) -> bool:
        """Whether the grouped experts run on the tensor cores (the backend's
        ``moe_tc``; every K a whole number of the kernel's steps)."""
        from orcd.ops.matmul_base import tc_takes

        return self.b.moe_tc and tc_takes(ex.gate_w, D) and tc_takes(ex.up_w, D) and tc_takes(ex.down_w, n_ff)

    def _moe_fused(self, ex, n_used: int) -> bool:
        from orcd.ops.matmul_base import MOE_MAX_K, int8_capable

        ws = (ex.gate_w, ex.up_w, ex.down_w)
        return (not self.b.mm.int8_off and all(int8_capable(w) for w in ws) and ex.router_w.type_id == 0
                and n_used <= MOE_MAX_K and ex.router_w.shape[0] <= ROUTER_MAX_EXPERTS
                and ex.gate_w.shape[1] % 32 == 0 and ex.gate_w.shape[2] % 32 == 0
                and ex.gate_b is not None and ex.up_b is not None and ex.down_b is not None)

    def moe(self, x, experts, n_used: int, alpha: float, limit: float) -> DeviceTensor:
        # x: [T, D] -> [T, D]: route on the device, then only the chosen experts' weights are read
        T, D, ex = *x.shape, experts
        logits = self.linear(x, ex.router_w, ex.router_b)        # [T, n_expert]
        ids = self._empty((T, n_used), np.int32)
        weights = self._empty((T, n_used))
        self.b.moe_k.route(logits, n_used, ids, weights)
        if T == 1 or self.per_row:   # per pair: a row's experts summed alike in any batch
            y, slot_of = self._experts_per_pair(x, ex, ids, alpha, limit), None
        else:
            y, slot_of = self._experts_grouped(x, ex, ids, alpha, limit)
        out = self._empty((T, D))
        self.b.moe_k.weighted_sum(y.view(T, n_used, D), weights, out, slot_of)
        return out

    def _experts_per_pair(self, x, ex, ids, alpha, limit) -> DeviceTensor:
        # decode: one GEMV per (token, slot) pair -> y: [T, k, D] in pair order
        mm = self.b.mm
        (T, k), n_ff = ids.shape, ex.gate_w.shape[1]
        gate, up = self._empty((T, k, n_ff)), self._empty((T, k, n_ff))
        xa = self._act(x, ex.gate_w, ex.up_w)                       # gate and up read the same x
        mm.moe_linear(xa, ex.gate_w, ex.gate_b, ids, gate)
        mm.moe_linear(xa, ex.up_w, ex.up_b, ids, up)
        h = self.swiglu_oai(gate, up, alpha, limit)                # [T, k, n_ff]
        y = self._empty((T, k, x.shape[1]))
        mm.moe_linear(h.view(T * k, n_ff), ex.down_w, ex.down_b, ids, y, self.b.scratch)  # row per slot
        return y

    def _experts_grouped(self, x, ex, ids, alpha, limit) -> tuple[DeviceTensor, DeviceTensor]:
        # prefill: pairs grouped by expert, each expert's weights read once per tile
        # -> (y: [T*k, D] in grouped order, slot_of: [T*k] each pair's row)
        b, mm = self.b, self.b.mm
        (T, k), (n_expert, n_ff, D) = ids.shape, ex.gate_w.shape
        N = T * k
        tc = self._moe_tc(ex, D, n_ff)   # tiles of MOE_TC_TILE on the tensor cores, else MOE_TILE
        tile = MOE_TC_TILE if tc else MOE_TILE
        order, slot_of = self._empty((N,), np.int32), self._empty((N,), np.int32)
        tiles = self._empty((max_tiles(N, n_expert, tile), 3), np.int32)
        b.moe_k.group(ids, n_expert, tile, order, slot_of, tiles)
        xg = self._empty((N, D))
        b.moe_k.gather(x, order, k, xg)                          # [N, D] grouped rows
        gate, up, y = self._empty((N, n_ff)), self._empty((N, n_ff)), self._empty((N, D))
        if tc:
            mm.moe_gemm_tc(xg, ex.gate_w, ex.gate_b, tiles, gate)
            mm.moe_gemm_tc(xg, ex.up_w, ex.up_b, tiles, up)
            mm.moe_gemm_tc(self.swiglu_oai(gate, up, alpha, limit), ex.down_w, ex.down_b, tiles, y)
            return y, slot_of
        xa = self._act(xg, ex.gate_w, ex.up_w)
        mm.moe_gemm(xa, ex.gate_w, ex.gate_b, tiles, gate)
        mm.moe_gemm(xa, ex.up_w, ex.up_b, tiles, up)
        h = self.swiglu_oai(gate, up, alpha, limit)                # [N, n_ff]
        mm.moe_gemm(h, ex.down_w, ex.down_b, tiles, y, b.scratch)
        return y, slot_of


