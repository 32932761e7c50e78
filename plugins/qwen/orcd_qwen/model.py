"""The qwen2 forward: pre-norm decoder, GQA attention with q/k/v biases, NeoX
RoPE, SwiGLU feed-forward; tied or separate output embedding."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from orcd.arch import HParams
from orcd.ops.rope import RopeConfig
from orcd.weights import Weights


@dataclass
class Layer:
    attn_norm: Any
    wq: Any
    bq: Any
    wk: Any
    bk: Any
    wv: Any
    bv: Any
    wo: Any
    ffn_norm: Any
    w_gate: Any
    w_up: Any
    w_down: Any


class Qwen2:
    def __init__(self, hp: HParams, w: Weights) -> None:
        self.hp = hp
        self.tok_embd = w.take("token_embd.weight")
        self.out_norm = w.take("output_norm.weight")
        self.output = w.take_optional("output.weight")
        if self.output is None:
            self.output = self.tok_embd  # tied embeddings
        self.layers = []
        for i in range(hp.n_layer):
            L = w.layer(i)
            self.layers.append(Layer(
                L.take("attn_norm.weight"),
                L.take("attn_q.weight"), L.take("attn_q.bias"),
                L.take("attn_k.weight"), L.take("attn_k.bias"),
                L.take("attn_v.weight"), L.take("attn_v.bias"),
                L.take("attn_output.weight"), L.take("ffn_norm.weight"),
                L.take("ffn_gate.weight"), L.take("ffn_up.weight"), L.take("ffn_down.weight")))
        self.rope = RopeConfig(n_rot=hp.n_rot, head_dim=hp.head_dim, base=hp.rope_base, neox=True)
        self.scale = 1.0 / math.sqrt(hp.head_dim)

    def forward(self, ops, ids, pos, cache, last_only: bool = True):
        hp = self.hp
        x = ops.embed(self.tok_embd, ids)                          # x: [T, n_embd]
        for i, L in enumerate(self.layers):
            q, k, v = ops.linear_multi(x, (L.wq, L.wk, L.wv), (L.bq, L.bk, L.bv),
                                       norm=(L.attn_norm, hp.norm_eps))   # [T, n_head*hd], [T, n_kv*hd] x2
            a = ops.attention(q, k, v, cache, i, pos, self.scale, rope=self.rope)
            x = ops.linear_add(a, L.wo, x)                                # x + a @ wo.T
            f = ops.gated_linear(x, L.w_gate, L.w_up, norm=(L.ffn_norm, hp.norm_eps))  # [T, n_ff]
            x = ops.linear_add(f, L.w_down, x)
        if last_only:
            x = ops.last_row(x)
        return ops.linear(ops.rms_norm(x, self.out_norm, hp.norm_eps), self.output)  # [T, n_vocab]


def build(hp: HParams, weights: Weights, backend) -> Qwen2:
    return Qwen2(hp, weights)
