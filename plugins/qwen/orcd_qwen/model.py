"""The qwen2 forward: pre-norm decoder, GQA attention with q/k/v biases, NeoX
RoPE, SwiGLU feed-forward; tied or separate output embedding. The shared
decoder blocks (orcd.blocks) with Qwen2's weight table."""

from __future__ import annotations

from orcd.arch import HParams
from orcd.blocks import Attention, Decoder, Ffn, Layer
from orcd.ops.rope import RopeConfig
from orcd.weights import Weights


def build(hp: HParams, weights: Weights, backend) -> Decoder:
    layers = [Layer(Attention.take(L, biases="qkv"), Ffn.take(L))
              for L in (weights.layer(i) for i in range(hp.n_layer))]
    rope = RopeConfig(n_rot=hp.n_rot, head_dim=hp.head_dim, base=hp.rope_base, neox=True)
    return Decoder(hp, weights, layers, rope)
