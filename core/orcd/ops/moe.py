"""Mixture of experts (GPT-OSS): top-k routing over router logits, softmax over
the chosen k, per-expert gate/up/down with biases and clamped SwiGLU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from orcd.ops.activation import swiglu_oai_ref
from orcd.ops.matmul import linear_ref


@dataclass
class Experts:
    """One layer's experts; weights in the backend's representation."""

    router_w: Any   # [n_expert, D]
    router_b: Any   # [n_expert]
    gate_w: Any     # [n_expert, n_ff, D]
    gate_b: Any     # [n_expert, n_ff]
    up_w: Any       # [n_expert, n_ff, D]
    up_b: Any       # [n_expert, n_ff]
    down_w: Any     # [n_expert, D, n_ff]
    down_b: Any     # [n_expert, D]


def route_ref(logits: np.ndarray, n_used: int) -> tuple[np.ndarray, np.ndarray]:
    """logits [T, n_expert] -> (chosen expert ids [T, k], weights [T, k]).

    Ties go to the lower expert id (stable sort), so the choice is deterministic.
    """
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :n_used]
    chosen = np.take_along_axis(logits, order, axis=-1)
    e = np.exp(chosen - chosen.max(axis=-1, keepdims=True))
    return order, (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def group_ref(ids: np.ndarray, n_expert: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids [T, k] -> (order [T*k], slot_of [T*k], counts [n_expert]).

    ``order`` lists the (token, slot) pairs p = t * k + slot grouped by expert
    (expert 0's first), each group in pair order; ``slot_of[p]`` is where pair p
    sits in ``order`` (-1 for an id outside 0..n_expert-1, which joins no group).
    Grouping is what lets prefill read each expert's weights once for all its
    tokens instead of once per (token, expert) pair.
    """
    flat = ids.reshape(-1).astype(np.int64)
    valid = (flat >= 0) & (flat < n_expert)
    order = np.flatnonzero(valid)[np.argsort(flat[valid], kind="stable")].astype(np.int32)
    slot_of = np.full(flat.shape, -1, np.int32)
    slot_of[order] = np.arange(order.size, dtype=np.int32)
    return order, slot_of, np.bincount(flat[valid], minlength=n_expert).astype(np.int32)


def tiles_ref(counts: np.ndarray, tile: int, n_tiles: int) -> np.ndarray:
    """Expert group sizes -> [n_tiles, 3] rows (expert, first row in order, rows):
    each group cut into tiles of at most ``tile`` rows, unused rows (0, 0, 0)."""
    out = np.zeros((n_tiles, 3), np.int32)
    i, start = 0, 0
    for e, n in enumerate(counts):
        for s in range(0, int(n), tile):
            out[i] = (e, start + s, min(tile, n - s))
            i += 1
        start += int(n)
    return out


def max_tiles(n_pairs: int, n_expert: int, tile: int) -> int:
    """An upper bound on tiles_ref's used rows: sum_e ceil(n_e / tile)."""
    return n_pairs // tile + min(n_expert, n_pairs)


def moe_add_ref(x: np.ndarray, ex: Experts, n_used: int, alpha: float, limit: float,
                norm=None, linear: Callable = linear_ref) -> np.ndarray:
    """x + moe(rms_norm(x)): a transformer's MoE block with its residual (``norm`` =
    (weight, eps), or None for no norm). One decode token runs it on the GPU as three
    kernels: norm + router + top-k, expert gate/up/SwiGLU, expert down + sum + residual."""
    from orcd.ops.norm import rms_norm_ref

    h = x if norm is None else rms_norm_ref(x, norm[0], norm[1])
    return x + moe_ref(h, ex, n_used, alpha, limit, linear)


def moe_ref(x: np.ndarray, ex: Experts, n_used: int, alpha: float,
            limit: float, linear: Callable = linear_ref) -> np.ndarray:
    # x: [T, D] -> [T, D]; ``linear(x, w, b)`` is the backend's matmul
    T, D = x.shape
    logits = linear(x, ex.router_w, ex.router_b)                 # [T, n_expert]
    ids, weights = route_ref(logits, n_used)                     # [T, k] each
    order, _, counts = group_ref(ids, logits.shape[1])
    y = np.empty((T * n_used, D), np.float32)                    # one row per (token, slot)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]                           # the pairs routed to e
        start += n
        xe = x[pairs // n_used]                                  # [n, D]
        gate = linear(xe, ex.gate_w[e], ex.gate_b[e])            # [n, n_ff]
        up = linear(xe, ex.up_w[e], ex.up_b[e])
        y[pairs] = linear(swiglu_oai_ref(gate, up, alpha, limit), ex.down_w[e], ex.down_b[e])
    y = y.reshape(T, n_used, D)
    out = np.zeros_like(x)
    for slot in range(n_used):  # summed in choice order, as the kernel does
        out += weights[:, slot:slot + 1] * y[:, slot]
    return out


# -- CUDA ------------------------------------------------------------------------

#: the most experts moe_norm_route_q8's warp top-k takes (32 lanes x 32 bits of its taken mask)
ROUTER_MAX_EXPERTS = 1024


# Launchers for moe.cu. The expert matmuls are MatmulKernels.moe_linear (one
# GEMV per pair, decode) and MatmulKernels.moe_gemm (per expert tile, prefill);
# this part routes (top-k + softmax on the device), groups pairs by expert and
# sums the chosen experts.

class MoeKernels:

    SOURCE = "moe.cu"   # package data of orcd.ops (orcd.backends.cuda.backend.kernel_sources lists it)
    def __init__(self, device, compiler, launcher) -> None:
        from orcd.backends.cuda.nvrtc import KernelSource

        module = compiler.load(device, KernelSource.from_package("orcd.ops", self.SOURCE))
        self._route = module.function("moe_route")
        self._group = module.function("moe_group")
        self._gather = module.function("moe_gather")
        self._sum = module.function("moe_weighted_sum")
        self._norm_route = module.function("moe_norm_route_q8")
        self._launch = launcher

    def route(self, logits, n_used: int, ids, weights) -> None:
        # logits: [T, n_expert] f32 -> ids: [T, n_used] int32, weights: [T, n_used] f32
        T, n_expert = logits.shape
        if not 0 < n_used <= n_expert:
            raise ValueError(f"moe: {n_used} experts used of {n_expert}")
        self._launch(self._route, -(-T // 128), 128,
                     [np.uint64(logits.ptr), np.uint64(ids.ptr), np.uint64(weights.ptr),
                      T, n_expert, n_used])

    def norm_route_q8(self, x, g, eps: float, router_w, router_b, ids, weights, xa) -> None:
        """x [T, D] -> rms_norm(x) * g quantized per 32 values into xa (matmul_base.Q8Act [T, D]),
        and its top-k experts ids [T, k] int32 with softmax weights [T, k] from the
        router (router_w an F32 QWeight [E, D], router_b [E]; E <= ROUTER_MAX_EXPERTS)."""
        T, D = x.shape
        E = router_w.shape[0]
        k = ids.shape[1]
        if router_w.type_id != 0 or tuple(router_w.shape) != (E, D) or D % 32 or not 0 < k <= E <= ROUTER_MAX_EXPERTS:
            raise ValueError(f"moe norm_route: router {router_w.fmt.name} {router_w.shape}, D {D}, k {k}")
        self._launch(self._norm_route, T, 1024,
                     [np.uint64(x.ptr), np.uint64(g.ptr), float(eps), np.uint64(router_w.ptr),
                      np.uint64(router_b.ptr), D, E, k, np.uint64(ids.ptr), np.uint64(weights.ptr),
                      np.uint64(xa.xq.ptr), np.uint64(xa.xd.ptr)], shared=4 * (D + E))

    def group(self, ids, n_expert: int, tile: int, order, slot_of, tiles) -> None:
        # ids: [T, k] int32 -> order, slot_of: [T*k] int32, tiles: [n_tiles, 3] int32 (group_ref, tiles_ref)
        n = ids.numel
        n_tiles = tiles.shape[0]
        if order.shape != (n,) or slot_of.shape != (n,):
            raise ValueError(f"moe group: order and slot_of must be [{n}], got {order.shape} {slot_of.shape}")
        if n_tiles < max_tiles(n, n_expert, tile):
            raise ValueError(f"moe group: {n_tiles} tiles cannot hold {n} pairs over {n_expert} experts")
        self._launch(self._group, 1, 1024,
                     [np.uint64(ids.ptr), n, n_expert, tile, n_tiles, np.uint64(order.ptr),
                      np.uint64(slot_of.ptr), np.uint64(tiles.ptr)], shared=4 * (3 * n_expert + 1))

    def gather(self, x, order, k: int, xg) -> None:
        # x: [T, D], order: [N] -> xg: [N, D], row i = x[order[i] // k]
        N, D = xg.shape
        blocks = max(1, min(4096, -(-(N * D) // 256)))
        self._launch(self._gather, blocks, 256,
                     [np.uint64(x.ptr), np.uint64(order.ptr), k, N, D, np.uint64(xg.ptr)])

    def weighted_sum(self, y, weights, out, slot_of=None) -> None:
        # y: [T, k, D] (pair order, or grouped order through slot_of [T*k]), weights: [T, k] -> out: [T, D]
        T, k, D = y.shape
        blocks = max(1, min(4096, -(-(T * D) // 256)))
        self._launch(self._sum, blocks, 256,
                     [np.uint64(y.ptr), np.uint64(weights.ptr),
                      np.uint64(slot_of.ptr if slot_of is not None else 0), np.uint64(out.ptr), T, k, D])
