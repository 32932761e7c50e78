"""The gpt-oss forward (as llama.cpp's llm_build_openai_moe_iswa):

    x = embed(ids)
    per layer:  h = rms_norm(x);  q, k, v = linear + bias;  NeoX YaRN rope on q, k
                x += linear(attention(q, k, v, sinks, window if the layer is even), wo) + bo
                x += moe(rms_norm(x, post_attention_norm))   # top-4 of 32, clamped SwiGLU (ops.moe_add)
    logits = linear(rms_norm(x), output)

Even layers use the 128-token sliding window, odd layers full attention.
"""

from __future__ import annotations

from orcd.arch import HParams
from orcd.blocks import Attention, Decoder, Layer, Moe
from orcd.ops.rope import RopeConfig
from orcd.weights import Weights

SWIGLU_ALPHA = 1.702   # GPT-OSS's clamped SwiGLU constants
SWIGLU_LIMIT = 7.0


def rope_config(hp: HParams) -> RopeConfig:
    yarn = hp.rope_scaling == "yarn"
    return RopeConfig(n_rot=hp.n_rot, head_dim=hp.head_dim, base=hp.rope_base, neox=True,
                      freq_scale=1.0 / hp.rope_factor if yarn else 1.0,
                      ext_factor=1.0 if yarn else 0.0, n_ctx_orig=hp.n_ctx_orig)


def build(hp: HParams, weights: Weights, backend) -> Decoder:
    layers = [Layer(Attention.take(L, biases="qkvo", sinks=True, window=hp.n_swa if i % 2 == 0 else 0),
                    Moe.take(L, "post_attention_norm", hp.n_expert_used, SWIGLU_ALPHA, SWIGLU_LIMIT))
              for i, L in ((i, weights.layer(i)) for i in range(hp.n_layer))]
    return Decoder(hp, weights, layers, rope_config(hp), tied_output=False)
