"""The gpt-oss forward (as llama.cpp's llm_build_openai_moe_iswa):

    x = embed(ids)
    per layer:  h = rms_norm(x);  q, k, v = linear + bias;  NeoX YaRN rope on q, k
                x += linear(attention(q, k, v, sinks, window if the layer is even), wo) + bo
                x += moe(rms_norm(x, post_attention_norm))   # top-4 of 32, clamped SwiGLU (ops.moe_add)
    logits = linear(rms_norm(x), output)

Even layers use the 128-token sliding window, odd layers full attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from orcd.arch import HParams
from orcd.ops.moe import Experts
from orcd.ops.rope import RopeConfig
from orcd.weights import Weights

SWIGLU_ALPHA = 1.702   # GPT-OSS's clamped SwiGLU constants
SWIGLU_LIMIT = 7.0


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
    bo: Any
    sinks: Any
    post_norm: Any
    experts: Experts
    window: int


def _experts(L: Weights) -> Experts:
    return Experts(L.take("ffn_gate_inp.weight"), L.take("ffn_gate_inp.bias"),
                   L.take("ffn_gate_exps.weight"), L.take("ffn_gate_exps.bias"),
                   L.take("ffn_up_exps.weight"), L.take("ffn_up_exps.bias"),
                   L.take("ffn_down_exps.weight"), L.take("ffn_down_exps.bias"))


def rope_config(hp: HParams) -> RopeConfig:
    yarn = hp.rope_scaling == "yarn"
    return RopeConfig(n_rot=hp.n_rot, head_dim=hp.head_dim, base=hp.rope_base, neox=True,
                      freq_scale=1.0 / hp.rope_factor if yarn else 1.0,
                      ext_factor=1.0 if yarn else 0.0, n_ctx_orig=hp.n_ctx_orig)


class GptOss:
    def __init__(self, hp: HParams, w: Weights) -> None:
        self.hp = hp
        self.tok_embd = w.take("token_embd.weight")
        self.out_norm = w.take("output_norm.weight")
        self.output = w.take("output.weight")
        self.layers = []
        for i in range(hp.n_layer):
            L = w.layer(i)
            self.layers.append(Layer(
                L.take("attn_norm.weight"),
                L.take("attn_q.weight"), L.take("attn_q.bias"),
                L.take("attn_k.weight"), L.take("attn_k.bias"),
                L.take("attn_v.weight"), L.take("attn_v.bias"),
                L.take("attn_output.weight"), L.take("attn_output.bias"),
                L.take("attn_sinks.weight"), L.take("post_attention_norm.weight"),
                _experts(L), window=hp.n_swa if i % 2 == 0 else 0))
        self.rope = rope_config(hp)
        self.scale = 1.0 / math.sqrt(hp.head_dim)

    def forward(self, ops, ids, pos, cache, last_only: bool = True):
        hp = self.hp
        x = ops.embed(self.tok_embd, ids)                            # x: [T, n_embd]
        for i, L in enumerate(self.layers):
            q, k, v = ops.linear_multi(x, (L.wq, L.wk, L.wv), (L.bq, L.bk, L.bv),
                                       norm=(L.attn_norm, hp.norm_eps))   # [T, n_head*hd], ...
            a = ops.attention(q, k, v, cache, i, pos, self.scale, window=L.window, sinks=L.sinks,
                              rope=self.rope)
            x = ops.linear_add(a, L.wo, x, L.bo)
            x = ops.moe_add(x, L.experts, hp.n_expert_used, SWIGLU_ALPHA, SWIGLU_LIMIT,
                            norm=(L.post_norm, hp.norm_eps))          # x + moe(rms_norm(x))
        if last_only:
            x = ops.last_row(x)
        return ops.linear(ops.rms_norm(x, self.out_norm, hp.norm_eps), self.output)


def build(hp: HParams, weights: Weights, backend) -> GptOss:
    return GptOss(hp, weights)
