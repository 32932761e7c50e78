"""Decoder building blocks a model plugin composes: the pre-norm attention
block, the gated feed-forward block, the mixture-of-experts block, and the
decoder around them (embed, layers, final norm, output).

Each block takes its weights from the file by GGUF name (``take``) and runs
through the fused ops (orcd.ops.fused), so a plugin written with them gets the
single-launch decode kernels of the built-in models; where a fused op does not
fit (biases on gate/up), the block composes the plain ops instead. A model
plugin is then a weight table and a few constants:

    layers = [Layer(Attention.take(L, biases="qkv"), Ffn.take(L)) for L in ...]
    model = Decoder(hp, weights, layers, rope=RopeConfig(...))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from orcd.arch import HParams
from orcd.ops.moe import Experts
from orcd.weights import Weights


@dataclass
class Attention:
    """x + wo @ attention(rope(q), rope(k), v) with q, k, v from rms_norm(x):
    separate wq/wk/wv, or a fused wqkv split after the matmul (``qkv_sizes``)."""

    norm: Any
    wo: Any
    wq: Any = None
    wk: Any = None
    wv: Any = None
    wqkv: Any = None
    qkv_sizes: tuple[int, int, int] | None = None
    bq: Any = None
    bk: Any = None
    bv: Any = None
    bo: Any = None
    sinks: Any = None      # [n_head] attention sinks (GPT-OSS)
    window: int = 0        # sliding window in tokens (0: the whole context)

    @classmethod
    def take(cls, L: Weights, *, biases: str = "", optional_biases: bool = False, sinks: bool = False,
             window: int = 0) -> "Attention":
        """attn_norm, attn_q/k/v, attn_output (+ the biases named in ``biases``, any of
        "qkvo"; ``optional_biases``: every bias the file has)."""
        def bias(part: str, name: str):
            if optional_biases:
                return L.take_optional(f"{name}.bias")
            return L.take(f"{name}.bias") if part in biases else None
        return cls(L.take("attn_norm.weight"), L.take("attn_output.weight"),
                   L.take("attn_q.weight"), L.take("attn_k.weight"), L.take("attn_v.weight"),
                   bq=bias("q", "attn_q"), bk=bias("k", "attn_k"), bv=bias("v", "attn_v"),
                   bo=bias("o", "attn_output"),
                   sinks=L.take("attn_sinks.weight") if sinks else None, window=window)

    @classmethod
    def take_fused(cls, L: Weights, qkv_sizes: tuple[int, int, int]) -> "Attention":
        """attn_norm, attn_qkv (q, k, v rows stacked), attn_output."""
        return cls(L.take("attn_norm.weight"), L.take("attn_output.weight"),
                   wqkv=L.take("attn_qkv.weight"), qkv_sizes=qkv_sizes)

    def __call__(self, ops, x, cache, layer: int, pos, *, eps: float, scale: float, rope):
        norm = (self.norm, eps)
        if self.wqkv is not None:
            qkv, = ops.linear_multi(x, (self.wqkv,), norm=norm)        # [T, (n_head + 2 n_kv) * hd]
            q, k, v = ops.split(qkv, self.qkv_sizes)
        else:
            q, k, v = ops.linear_multi(x, (self.wq, self.wk, self.wv), (self.bq, self.bk, self.bv),
                                       norm=norm)                      # [T, n_head*hd], [T, n_kv*hd] x2
        a = ops.attention(q, k, v, cache, layer, pos, scale, window=self.window, sinks=self.sinks,
                          rope=rope)                                   # [T, n_head*hd_v]
        return ops.linear_add(a, self.wo, x, self.bo)                  # x + a @ wo.T (+ bo)


@dataclass
class Ffn:
    """x + w_down @ swiglu(w_gate @ h, w_up @ h) with h = rms_norm(x); w_up None:
    w_gate is the fused [2 n_ff, n_embd] gate/up weight (gate rows first)."""

    norm: Any
    w_gate: Any
    w_up: Any
    w_down: Any
    b_gate: Any = None
    b_up: Any = None
    b_down: Any = None

    @classmethod
    def take(cls, L: Weights, *, optional_biases: bool = False) -> "Ffn":
        """ffn_norm, ffn_gate, ffn_up, ffn_down (+ their biases where the file has them)."""
        b = (lambda n: L.take_optional(f"{n}.bias")) if optional_biases else (lambda n: None)
        return cls(L.take("ffn_norm.weight"), L.take("ffn_gate.weight"), L.take("ffn_up.weight"),
                   L.take("ffn_down.weight"), b("ffn_gate"), b("ffn_up"), b("ffn_down"))

    @classmethod
    def take_fused(cls, L: Weights) -> "Ffn":
        """ffn_norm, ffn_up holding gate and up, ffn_down (Phi-3)."""
        return cls(L.take("ffn_norm.weight"), L.take("ffn_up.weight"), None, L.take("ffn_down.weight"))

    def __call__(self, ops, x, *, eps: float):
        norm = (self.norm, eps)
        if self.b_gate is None and self.b_up is None:
            f = ops.gated_linear(x, self.w_gate, self.w_up, norm=norm)  # [T, n_ff]
        else:   # biased gate/up: no fused kernel takes them
            h = ops.rms_norm(x, *norm)
            f = ops.swiglu(ops.linear(h, self.w_gate, self.b_gate), ops.linear(h, self.w_up, self.b_up))
        return ops.linear_add(f, self.w_down, x, self.b_down)


@dataclass
class Moe:
    """x + moe(rms_norm(x)): top-``n_used`` experts with a clamped SwiGLU (alpha, limit)."""

    norm: Any
    experts: Experts
    n_used: int
    alpha: float
    limit: float

    @classmethod
    def take(cls, L: Weights, norm: str, n_used: int, alpha: float, limit: float) -> "Moe":
        """The router ffn_gate_inp and the stacked ffn_{gate,up,down}_exps, with biases."""
        ex = Experts(L.take("ffn_gate_inp.weight"), L.take("ffn_gate_inp.bias"),
                     L.take("ffn_gate_exps.weight"), L.take("ffn_gate_exps.bias"),
                     L.take("ffn_up_exps.weight"), L.take("ffn_up_exps.bias"),
                     L.take("ffn_down_exps.weight"), L.take("ffn_down_exps.bias"))
        return cls(L.take(f"{norm}.weight"), ex, n_used, alpha, limit)

    def __call__(self, ops, x, *, eps: float):
        return ops.moe_add(x, self.experts, self.n_used, self.alpha, self.limit, norm=(self.norm, eps))


@dataclass
class Layer:
    attention: Attention
    ffn: Ffn | Moe


class Decoder:
    """embed -> layers (attention block, then feed-forward or MoE block) -> rms_norm -> output.
    The output weight is the token embedding where the file has no ``output.weight``
    (tied embeddings, as llama.cpp allows)."""

    def __init__(self, hp: HParams, w: Weights, layers: Sequence[Layer], rope, *,
                 scale: float | None = None, tied_output: bool = True) -> None:
        self.hp, self.layers, self.rope = hp, list(layers), rope
        self.tok_embd = w.take("token_embd.weight")
        self.out_norm = w.take("output_norm.weight")
        self.output = w.take_optional("output.weight") if tied_output else w.take("output.weight")
        if self.output is None:
            self.output = self.tok_embd
        self.scale = 1.0 / math.sqrt(hp.head_dim) if scale is None else scale

    def forward(self, ops, ids, pos, cache, last_only: bool = True):
        eps = self.hp.norm_eps
        x = ops.embed(self.tok_embd, ids)                              # x: [T, n_embd]
        for i, L in enumerate(self.layers):
            x = L.attention(ops, x, cache, i, pos, eps=eps, scale=self.scale, rope=self.rope)
            x = L.ffn(ops, x, eps=eps)
        if last_only:
            x = ops.last_row(x)
        return ops.linear(ops.rms_norm(x, self.out_norm, eps), self.output)   # [T, n_vocab]
