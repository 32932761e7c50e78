"""The llama forward: pre-norm decoder, GQA attention with normal (GPT-J
style, pairs (2i, 2i+1)) RoPE, SwiGLU feed-forward; tied or separate output
embedding. Written once against the shared ops, so it runs on ``--device cpu``
(numpy reference) and on CUDA alike."""

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
    wq: Any
    wk: Any
    wv: Any
    wo: Any
    ffn_norm: Any
    w_gate: Any
    w_up: Any
    w_down: Any
    # optional biases (None in Llama/SmolLM2 files; some fine-tunes carry them)
    bq: Any = None
    bk: Any = None
    bv: Any = None
    bo: Any = None
    b_gate: Any = None
    b_up: Any = None
    b_down: Any = None


def _layer(L: Weights) -> Layer:
    return Layer(L.take("attn_norm.weight"), L.take("attn_q.weight"), L.take("attn_k.weight"),
                 L.take("attn_v.weight"), L.take("attn_output.weight"), L.take("ffn_norm.weight"),
                 L.take("ffn_gate.weight"), L.take("ffn_up.weight"), L.take("ffn_down.weight"),
                 L.take_optional("attn_q.bias"), L.take_optional("attn_k.bias"),
                 L.take_optional("attn_v.bias"), L.take_optional("attn_output.bias"),
                 L.take_optional("ffn_gate.bias"), L.take_optional("ffn_up.bias"),
                 L.take_optional("ffn_down.bias"))


class Llama:
    def __init__(self, hp: HParams, w: Weights, backend) -> None:
        self.hp = hp
        self.tok_embd = w.take("token_embd.weight")
        self.out_norm = w.take("output_norm.weight")
        self.output = w.take_optional("output.weight")
        if self.output is None:
            self.output = self.tok_embd  # tied embeddings (SmolLM2), as llama.cpp does
        self.layers = [_layer(w.layer(i)) for i in range(hp.n_layer)]
        self.rope = RopeConfig(n_rot=hp.n_rot, head_dim=hp.head_dim, base=hp.rope_base,
                               neox=False, freq_scale=hp.rope_freq_scale,
                               freq_factors=_rope_freqs(w, backend))
        self.scale = 1.0 / math.sqrt(hp.head_dim)

    def forward(self, ops, ids, pos, cache, last_only: bool = True):
        hp = self.hp
        x = ops.embed(self.tok_embd, ids)                              # x: [T, n_embd]
        for i, L in enumerate(self.layers):
            h = ops.rms_norm(x, L.attn_norm, hp.norm_eps)
            q = ops.rope(ops.linear(h, L.wq, L.bq), pos, self.rope)    # [T, n_head*hd]
            k = ops.rope(ops.linear(h, L.wk, L.bk), pos, self.rope)    # [T, n_kv*hd]
            v = ops.linear(h, L.wv, L.bv)                              # [T, n_kv*hd]
            a = ops.attention(q, k, v, cache, i, pos, self.scale)      # [T, n_head*hd]
            x = ops.add(x, ops.linear(a, L.wo, L.bo))
            h = ops.rms_norm(x, L.ffn_norm, hp.norm_eps)
            f = ops.swiglu(ops.linear(h, L.w_gate, L.b_gate), ops.linear(h, L.w_up, L.b_up))
            x = ops.add(x, ops.linear(f, L.w_down, L.b_down))          # f: [T, n_ff]
        if last_only:
            x = ops.last_row(x)
        return ops.linear(ops.rms_norm(x, self.out_norm, hp.norm_eps), self.output)  # [T, n_vocab]


def _rope_freqs(w: Weights, backend) -> tuple[float, ...] | None:
    """Llama 3's frequency divisors: constants of the model, read once at load."""
    freqs = w.take_optional("rope_freqs.weight")
    if freqs is None:
        return None
    return tuple(float(f) for f in np.asarray(backend.to_host(freqs)).reshape(-1))


def build(hp: HParams, weights: Weights, backend) -> Llama:
    return Llama(hp, weights, backend)
