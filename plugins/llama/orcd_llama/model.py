"""The llama forward: pre-norm decoder, GQA attention with normal (GPT-J
style, pairs (2i, 2i+1)) RoPE, SwiGLU feed-forward; tied or separate output
embedding. The shared decoder blocks (orcd.blocks) with Llama's weight table,
so it runs on ``--device cpu`` (numpy reference) and on CUDA alike, with the
fused decode kernels the built-in models use."""

from __future__ import annotations

import numpy as np

from orcd.arch import HParams
from orcd.blocks import Attention, Decoder, Ffn, Layer
from orcd.ops.rope import RopeConfig
from orcd.weights import Weights


def build(hp: HParams, weights: Weights, backend) -> Decoder:
    # biases are absent in Llama/SmolLM2 files; some fine-tunes carry them
    layers = [Layer(Attention.take(L, optional_biases=True), Ffn.take(L, optional_biases=True))
              for L in (weights.layer(i) for i in range(hp.n_layer))]
    rope = RopeConfig(n_rot=hp.n_rot, head_dim=hp.head_dim, base=hp.rope_base, neox=False,
                      freq_scale=hp.rope_freq_scale, freq_factors=_rope_freqs(weights, backend))
    return Decoder(hp, weights, layers, rope)


def _rope_freqs(w: Weights, backend) -> tuple[float, ...] | None:
    """Llama 3's frequency divisors: constants of the model, read once at load."""
    freqs = w.take_optional("rope_freqs.weight")
    if freqs is None:
        return None
    return tuple(float(f) for f in np.asarray(backend.to_host(freqs)).reshape(-1))

