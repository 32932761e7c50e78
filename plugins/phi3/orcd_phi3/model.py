"""The phi3 forward: like llama, but with the fused ``attn_qkv`` and fused
gate/up ``ffn_up`` weights used as stored (split after the matmul), NeoX RoPE
over ``n_rot`` dimensions, and LongRoPE factors when the file has them.

llama.cpp disables Phi-3's sliding window (it warns "Phi SWA is currently
disabled"); we attend over the full context too, to stay identical to it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from orcd.arch import HParams
from orcd.ops.rope import RopeConfig
from orcd.weights import Weights


@dataclass
class Layer:
    attn_norm: Any
    wqkv: Any
    wo: Any
    ffn_norm: Any
    w_gate_up: Any
    w_down: Any


class Phi3:
    def __init__(self, hp: HParams, w: Weights, backend) -> None:
        self.hp = hp
        self.tok_embd = w.take("token_embd.weight")
        self.out_norm = w.take("output_norm.weight")
        self.output = w.take_optional("output.weight")
        if self.output is None:
            self.output = self.tok_embd  # tied embeddings, as llama.cpp allows
        self.layers = [Layer(L.take("attn_norm.weight"), L.take("attn_qkv.weight"),
                             L.take("attn_output.weight"), L.take("ffn_norm.weight"),
                             L.take("ffn_up.weight"), L.take("ffn_down.weight"))
                       for L in (w.layer(i) for i in range(hp.n_layer))]
        self.rope = RopeConfig(n_rot=hp.n_rot, head_dim=hp.head_dim, base=hp.rope_base, neox=True,
                               freq_factors=_rope_factors(hp, w, backend),
                               attn_factor=_rope_attn_factor(hp))
        self.scale = 1.0 / math.sqrt(hp.head_dim)
        self.qkv_sizes = (hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim,
                          hp.n_head_kv * hp.head_dim)

    def forward(self, ops, ids, pos, cache, last_only: bool = True):
        hp = self.hp
        x = ops.embed(self.tok_embd, ids)                            # x: [T, n_embd]
        for i, L in enumerate(self.layers):
            qkv, = ops.linear_multi(x, (L.wqkv,), norm=(L.attn_norm, hp.norm_eps))
            q, k, v = ops.split(qkv, self.qkv_sizes)                      # fused qkv, split after
            a = ops.attention(q, k, v, cache, i, pos, self.scale, rope=self.rope)
            x = ops.linear_add(a, L.wo, x)
            f = ops.gated_linear(x, L.w_gate_up, norm=(L.ffn_norm, hp.norm_eps))  # gate/up halves
            x = ops.linear_add(f, L.w_down, x)
        if last_only:
            x = ops.last_row(x)
        return ops.linear(ops.rms_norm(x, self.out_norm, hp.norm_eps), self.output)


def _rope_factors(hp: HParams, w: Weights, backend):
    """LongRoPE: llama.cpp uses the long factors once the context exceeds the
    original context (rope.scaling.original_context_length, else the training
    context), else the short ones. Our context is fixed at load, so the factors
    are constants of the model."""
    long_f = w.take_optional("rope_factors_long.weight")
    short_f = w.take_optional("rope_factors_short.weight")
    original = hp.n_ctx_orig or hp.n_ctx_train
    chosen = long_f if hp.n_ctx > original else short_f
    if chosen is None:
        return None
    return tuple(float(f) for f in np.asarray(backend.to_host(chosen)).reshape(-1))


def _rope_attn_factor(hp: HParams) -> float:
    return float(hp.rope_attn_factor)


def build(hp: HParams, weights: Weights, backend) -> Phi3:
    return Phi3(hp, weights, backend)
