"""The gpt-oss weight table and hyper-parameters (as llama.cpp's
LLM_ARCH_OPENAI_MOE): attention sinks, alternating sliding window, 32-expert
top-4 MoE with biases, YaRN RoPE."""

from orcd.arch import HParam, HParams, TensorSpec

HPARAMS = (
    HParam("n_ctx_train", "{arch}.context_length"),
    HParam("n_embd", "{arch}.embedding_length"),
    HParam("n_layer", "{arch}.block_count"),
    HParam("n_ff_exp", "{arch}.expert_feed_forward_length"),
    HParam("n_head", "{arch}.attention.head_count"),
    HParam("n_head_kv", "{arch}.attention.head_count_kv"),
    HParam("head_dim", "{arch}.attention.key_length"),
    HParam("head_dim_v", "{arch}.attention.value_length", None),
    HParam("n_expert", "{arch}.expert_count"),
    HParam("n_expert_used", "{arch}.expert_used_count"),
    HParam("n_swa", "{arch}.attention.sliding_window", 128),
    HParam("rope_base", "{arch}.rope.freq_base", 150000.0, float),
    HParam("rope_scaling", "{arch}.rope.scaling.type", "none", str),
    HParam("rope_factor", "{arch}.rope.scaling.factor", 1.0, float),
    HParam("n_ctx_orig", "{arch}.rope.scaling.original_context_length", 4096),
    HParam("norm_eps", "{arch}.attention.layer_norm_rms_epsilon", 1e-5, float),
)


def derive(hp: HParams) -> dict:
    return {"n_rot": hp.head_dim,
            "head_dim_v": hp.head_dim_v if hp.head_dim_v is not None else hp.head_dim}


TENSORS = (
    TensorSpec("token_embd.weight", lambda hp: (hp.n_vocab, hp.n_embd)),
    TensorSpec("output_norm.weight", lambda hp: (hp.n_embd,)),
    TensorSpec("output.weight", lambda hp: (hp.n_vocab, hp.n_embd)),
    TensorSpec("blk.{i}.attn_norm.weight", lambda hp: (hp.n_embd,)),
    TensorSpec("blk.{i}.attn_q.weight", lambda hp: (hp.n_head * hp.head_dim, hp.n_embd)),
    TensorSpec("blk.{i}.attn_q.bias", lambda hp: (hp.n_head * hp.head_dim,)),
    TensorSpec("blk.{i}.attn_k.weight", lambda hp: (hp.n_head_kv * hp.head_dim, hp.n_embd)),
    TensorSpec("blk.{i}.attn_k.bias", lambda hp: (hp.n_head_kv * hp.head_dim,)),
    TensorSpec("blk.{i}.attn_v.weight", lambda hp: (hp.n_head_kv * hp.head_dim_v, hp.n_embd)),
    TensorSpec("blk.{i}.attn_v.bias", lambda hp: (hp.n_head_kv * hp.head_dim_v,)),
    TensorSpec("blk.{i}.attn_output.weight", lambda hp: (hp.n_embd, hp.n_head * hp.head_dim_v)),
    TensorSpec("blk.{i}.attn_output.bias", lambda hp: (hp.n_embd,)),
    TensorSpec("blk.{i}.attn_sinks.weight", lambda hp: (hp.n_head,)),
    TensorSpec("blk.{i}.post_attention_norm.weight", lambda hp: (hp.n_embd,)),
    TensorSpec("blk.{i}.ffn_gate_inp.weight", lambda hp: (hp.n_expert, hp.n_embd)),
    TensorSpec("blk.{i}.ffn_gate_inp.bias", lambda hp: (hp.n_expert,)),
    TensorSpec("blk.{i}.ffn_gate_exps.weight", lambda hp: (hp.n_expert, hp.n_ff_exp, hp.n_embd)),
    TensorSpec("blk.{i}.ffn_gate_exps.bias", lambda hp: (hp.n_expert, hp.n_ff_exp)),
    TensorSpec("blk.{i}.ffn_up_exps.weight", lambda hp: (hp.n_expert, hp.n_ff_exp, hp.n_embd)),
    TensorSpec("blk.{i}.ffn_up_exps.bias", lambda hp: (hp.n_expert, hp.n_ff_exp)),
    TensorSpec("blk.{i}.ffn_down_exps.weight", lambda hp: (hp.n_expert, hp.n_embd, hp.n_ff_exp)),
    TensorSpec("blk.{i}.ffn_down_exps.bias", lambda hp: (hp.n_expert, hp.n_embd)),
)
