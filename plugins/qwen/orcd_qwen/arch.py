"""The qwen2 weight table and hyper-parameters (as llama.cpp's LLM_ARCH_QWEN2)."""

from orcd.arch import HParam, HParams, TensorSpec

HPARAMS = (
    HParam("n_ctx_train", "{arch}.context_length"),
    HParam("n_embd", "{arch}.embedding_length"),
    HParam("n_layer", "{arch}.block_count"),
    HParam("n_ff", "{arch}.feed_forward_length"),
    HParam("n_head", "{arch}.attention.head_count"),
    HParam("n_head_kv", "{arch}.attention.head_count_kv", None),
    HParam("rope_base", "{arch}.rope.freq_base", 10000.0, float),
    HParam("norm_eps", "{arch}.attention.layer_norm_rms_epsilon", 1e-6, float),
)


def derive(hp: HParams) -> dict:
    n_head_kv = hp.n_head_kv if hp.n_head_kv is not None else hp.n_head
    head_dim = hp.n_embd // hp.n_head
    return {"n_head_kv": n_head_kv, "head_dim": head_dim, "n_rot": head_dim}


def _q(hp):
    return hp.n_head * hp.head_dim


def _kv(hp):
    return hp.n_head_kv * hp.head_dim


TENSORS = (
    TensorSpec("token_embd.weight", lambda hp: (hp.n_vocab, hp.n_embd)),
    TensorSpec("output_norm.weight", lambda hp: (hp.n_embd,)),
    TensorSpec("output.weight", lambda hp: (hp.n_vocab, hp.n_embd), optional=True),
    TensorSpec("blk.{i}.attn_norm.weight", lambda hp: (hp.n_embd,)),
    TensorSpec("blk.{i}.attn_q.weight", lambda hp: (_q(hp), hp.n_embd)),
    TensorSpec("blk.{i}.attn_q.bias", lambda hp: (_q(hp),)),
    TensorSpec("blk.{i}.attn_k.weight", lambda hp: (_kv(hp), hp.n_embd)),
    TensorSpec("blk.{i}.attn_k.bias", lambda hp: (_kv(hp),)),
    TensorSpec("blk.{i}.attn_v.weight", lambda hp: (_kv(hp), hp.n_embd)),
    TensorSpec("blk.{i}.attn_v.bias", lambda hp: (_kv(hp),)),
    TensorSpec("blk.{i}.attn_output.weight", lambda hp: (hp.n_embd, _q(hp))),
    TensorSpec("blk.{i}.ffn_norm.weight", lambda hp: (hp.n_embd,)),
    TensorSpec("blk.{i}.ffn_gate.weight", lambda hp: (hp.n_ff, hp.n_embd)),
    TensorSpec("blk.{i}.ffn_up.weight", lambda hp: (hp.n_ff, hp.n_embd)),
    TensorSpec("blk.{i}.ffn_down.weight", lambda hp: (hp.n_embd, hp.n_ff)),
)
