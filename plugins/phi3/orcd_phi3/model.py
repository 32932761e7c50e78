"""The phi3 forward: like llama, but with the fused ``attn_qkv`` and fused
gate/up ``ffn_up`` weights used as stored (split after the matmul), NeoX RoPE
over ``n_rot`` dimensions, and LongRoPE factors when the file has them.

llama.cpp disables Phi-3's sliding window (it warns "Phi SWA is currently
disabled"); we attend over the full context too, to stay identical to it."""

from __future__ import annotations

import numpy as np

from orcd.arch import HParams
from orcd.blocks import Attention, Decoder, Ffn, Layer
from orcd.ops.rope import RopeConfig
from orcd.weights import Weights


def build(hp: HParams, weights: Weights, backend) -> Decoder:
    qkv_sizes = (hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim, hp.n_head_kv * hp.head_dim)
    layers = [Layer(Attention.take_fused(L, qkv_sizes), Ffn.take_fused(L))
              for L in (weights.layer(i) for i in range(hp.n_layer))]
    rope = RopeConfig(n_rot=hp.n_rot, head_dim=hp.head_dim, base=hp.rope_base, neox=True,
                      freq_factors=_rope_factors(hp, weights, backend),
                      attn_factor=float(hp.rope_attn_factor))
    return Decoder(hp, weights, layers, rope)


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
