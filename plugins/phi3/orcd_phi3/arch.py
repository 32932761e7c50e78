"""The phi3 weight table and hyper-parameters (as llama.cpp's LLM_ARCH_PHI3):
fused ``attn_qkv`` and fused gate/up ``ffn_up`` (gate first, then up)."""

from orcd.arch import HParam, HParams, TensorSpec

HPARAMS = (
    HParam("n_ctx_train", "{arch}.context_length"),
    HParam("n_embd", "{arch}.embedding_length"),
    HParam("n_layer", "{arch}.block_count"),
    HParam("n_ff", "{arch}.feed_forward_length"),
    HParam("n_head", "{arch}.attention.head_count"),
    HParam("n_head_kv", "{arch}.attention.head_count_kv", None),
    HParam("n_rot", "{arch}.rope.dimension_count", None),
    HParam("rope_base", "{arch}.rope.freq_base", 10000.0, float),
    HParam("norm_eps", "{arch}.attention.layer_norm_rms_epsilon", 1e-5, float),
    HParam("n_ctx_orig", "{arch}.rope.scaling.original_context_length", 0),
    HParam("rope_attn_factor", "{arch}.rope.scaling.attn_factor", 1.0, float),
)


def derive(hp: HParams) -> dict:
    n_head_kv = hp.n_head_kv if hp.n_head_kv is not None else hp.n_head
    head_dim = hp.n_embd // hp.n_head
    return {"n_head_kv": n_head_kv, "head_dim": head_dim,
            "n_rot": hp.n_rot if hp.n_rot is not None else head_dim}


def _qkv(hp):
    return hp.n_head * hp.head_dim + 2 * hp.n_head_kv * hp.head_dim


TENSORS = (
    TensorSpec("token_embd.weight", lambda hp: (hp.n_vocab, hp.n_embd)),
    TensorSpec("output_norm.weight", lambda hp: (hp.n_embd,)),
    TensorSpec("output.weight", lambda hp: (hp.n_vocab, hp.n_embd), optional=True),  # else tied
    # LongRoPE factors of the 128k variants; absent in the 4k model
    TensorSpec("rope_factors_long.weight", lambda hp: (hp.n_rot // 2,), optional=True),
    TensorSpec("rope_factors_short.weight", lambda hp: (hp.n_rot // 2,), optional=True),
    TensorSpec("blk.{i}.attn_norm.weight", lambda hp: (hp.n_embd,)),
    TensorSpec("blk.{i}.attn_qkv.weight", lambda hp: (_qkv(hp), hp.n_embd)),
    TensorSpec("blk.{i}.attn_output.weight", lambda hp: (hp.n_embd, hp.n_head * hp.head_dim)),
    TensorSpec("blk.{i}.ffn_norm.weight", lambda hp: (hp.n_embd,)),
    TensorSpec("blk.{i}.ffn_up.weight", lambda hp: (2 * hp.n_ff, hp.n_embd)),
    TensorSpec("blk.{i}.ffn_down.weight", lambda hp: (hp.n_embd, hp.n_ff)),
)
