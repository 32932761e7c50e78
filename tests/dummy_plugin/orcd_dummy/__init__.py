"""orcd test plugin: architecture ``dummy``, a bigram model.

logits = output · rms_norm(token_embd[id]): no layers, no attention, so the
whole plugin is a weight table and a three-op forward. It exists to prove that
a plugin outside this repository's plugins/ is found through its entry point
and that an ArchSpec table plus ``orcd.weights.Weights`` is all a model needs.
"""

from __future__ import annotations

from orcd import hookimpl
from orcd.arch import ArchSpec, HParam, HParams, TensorSpec

ORCD_PLUGIN_API = 1

HPARAMS = (
    HParam("n_ctx_train", "{arch}.context_length"),
    HParam("n_embd", "{arch}.embedding_length"),
    HParam("n_layer", "{arch}.block_count", 0),
    HParam("norm_eps", "{arch}.attention.layer_norm_rms_epsilon", 1e-6, float),
)

TENSORS = (
    TensorSpec("token_embd.weight", lambda hp: (hp.n_vocab, hp.n_embd)),
    TensorSpec("output_norm.weight", lambda hp: (hp.n_embd,)),
    TensorSpec("output.weight", lambda hp: (hp.n_vocab, hp.n_embd), optional=True),
)


def derive(hp: HParams) -> dict:
    # the engine sizes a KV cache from these; a bigram model has no layers to fill it
    return {"n_head_kv": 1, "head_dim": 1}


class Bigram:
    def __init__(self, hp: HParams, w) -> None:
        self.hp = hp
        self.tok_embd = w.take("token_embd.weight")
        self.out_norm = w.take("output_norm.weight")
        self.output = w.take_optional("output.weight")
        if self.output is None:
            self.output = self.tok_embd  # tied embeddings

    def forward(self, ops, ids, pos, cache, last_only: bool = True):
        x = ops.embed(self.tok_embd, ids)  # x: [T, n_embd]
        if last_only:
            x = ops.last_row(x)
        return ops.linear(ops.rms_norm(x, self.out_norm, self.hp.norm_eps), self.output)  # [T, n_vocab]


def build(hp: HParams, weights, backend) -> Bigram:
    return Bigram(hp, weights)


@hookimpl
def orcd_architectures():
    return [ArchSpec(name="dummy", hparams=HPARAMS, tensors=TENSORS, build=build, derive=derive)]
