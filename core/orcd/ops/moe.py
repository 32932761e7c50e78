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


def moe_ref(x: np.ndarray, ex: Experts, n_used: int, alpha: float = 1.702,
            limit: float = 7.0, linear: Callable = linear_ref) -> np.ndarray:
    # x: [T, D] -> [T, D]; ``linear(x, w, b)`` is the backend's matmul
    logits = linear(x, ex.router_w, ex.router_b)                 # [T, n_expert]
    ids, weights = route_ref(logits, n_used)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        xt = x[t:t + 1]                                          # [1, D]
        for e, wgt in zip(ids[t], weights[t]):
            gate = linear(xt, ex.gate_w[e], ex.gate_b[e])        # [1, n_ff]
            up = linear(xt, ex.up_w[e], ex.up_b[e])
            h = swiglu_oai_ref(gate, up, alpha, limit)
            out[t] += wgt * linear(h, ex.down_w[e], ex.down_b[e])[0]
    return out


# -- CUDA ------------------------------------------------------------------------
# Launchers for moe.cu. The expert matmuls are MatmulKernels.moe_linear; this
# part routes (top-k + softmax on the device) and sums the chosen experts.

class MoeKernels:
    def __init__(self, device, compiler, launcher) -> None:
        from orcd.cuda.nvrtc import KernelSource

        module = compiler.load(device, KernelSource.from_package("orcd.ops", "moe.cu"))
        self._route = module.function("moe_route")
        self._sum = module.function("moe_weighted_sum")
        self._launch = launcher

    def route(self, logits, n_used: int, ids, weights) -> None:
        # logits: [T, n_expert] f32 -> ids: [T, n_used] int32, weights: [T, n_used] f32
        T, n_expert = logits.shape
        if not 0 < n_used <= n_expert:
            raise ValueError(f"moe: {n_used} experts used of {n_expert}")
        self._launch(self._route, -(-T // 128), 128,
                     [np.uint64(logits.ptr), np.uint64(ids.ptr), np.uint64(weights.ptr),
                      T, n_expert, n_used])

    def weighted_sum(self, y, weights, out) -> None:
        # y: [T, k, D], weights: [T, k] -> out: [T, D]
        T, k, D = y.shape
        blocks = max(1, min(4096, -(-(T * D) // 256)))
        self._launch(self._sum, blocks, 256,
                     [np.uint64(y.ptr), np.uint64(weights.ptr), np.uint64(out.ptr), T, k, D])
