"""The llama weight table and hyper-parameters, as llama.cpp's LLM_ARCH_LLAMA
(src/models/llama.cpp) for the dense models: RMSNorm, GQA attention, normal
(not NeoX) RoPE, SwiGLU feed-forward, tied or separate output embedding.

llama.cpp's GGUF converter permutes the q/k rows of Hugging Face checkpoints so
that ggml's normal rope pairing (2i, 2i+1) is right for the stored weights; we
read the same file, so we rope the same way.

Supported options: optional q/k/v/o and FFN biases, ``rope_freqs.weight``
(Llama 3 frequency factors), linear rope scaling. Refused with a clear error:
mixture-of-experts (Mixtral), YaRN/LongRoPE scaling, a rotary dimension other
than the head size, key/value heads of different sizes.
"""

from orcd.arch import HParam, HParams, TensorSpec
from orcd.errors import ModelLoadFailed

SUPPORTED_ROPE_SCALING = ("none", "linear")

HPARAMS = (
    HParam("n_ctx_train", "{arch}.context_length"),
    HParam("n_embd", "{arch}.embedding_length"),
    HParam("n_layer", "{arch}.block_count"),
    HParam("n_ff", "{arch}.feed_forward_length"),
    HParam("n_head", "{arch}.attention.head_count"),
    HParam("n_head_kv", "{arch}.attention.head_count_kv", None),
    HParam("n_rot", "{arch}.rope.dimension_count", None),
    HParam("key_length", "{arch}.attention.key_length", None),
    HParam("value_length", "{arch}.attention.value_length", None),
    HParam("rope_base", "{arch}.rope.freq_base", 10000.0, float),
    HParam("rope_scaling", "{arch}.rope.scaling.type", "none", str),
    HParam("rope_scale", "{arch}.rope.scaling.factor", 0.0, float),
    HParam("norm_eps", "{arch}.attention.layer_norm_rms_epsilon", 1e-5, float),
    HParam("n_expert", "{arch}.expert_count", 0),
    HParam("vocab_size", "{arch}.vocab_size", None),
)


def derive(hp: HParams) -> dict:
    """Defaults as llama.cpp's, and a clear error for what this plugin lacks."""
    if hp.n_expert:
        raise ModelLoadFailed(f"llama with {hp.n_expert} experts (Mixtral-style MoE) is not "
                              f"supported by orcd-plugin-llama")
    if hp.rope_scaling not in SUPPORTED_ROPE_SCALING:
        raise ModelLoadFailed(f"llama rope scaling {hp.rope_scaling!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ROPE_SCALING)})")
    if hp.n_head <= 0 or hp.n_embd % hp.n_head:
        raise ModelLoadFailed(f"llama: embedding length {hp.n_embd} is not a multiple of "
                              f"{hp.n_head} heads")
    if hp.vocab_size is not None and hp.vocab_size != hp.n_vocab:
        raise ModelLoadFailed(f"llama: llama.vocab_size {hp.vocab_size} differs from the "
                              f"{hp.n_vocab} tokens of the vocabulary")
    head_dim = hp.key_length if hp.key_length is not None else hp.n_embd // hp.n_head
    if hp.value_length is not None and hp.value_length != head_dim:
        raise ModelLoadFailed(f"llama: key length {head_dim} != value length {hp.value_length} "
                              f"is not supported")
    n_rot = hp.n_rot if hp.n_rot is not None else head_dim
    if n_rot != head_dim:  # llama.cpp asserts the same (GGML_ASSERT(n_embd_head == n_rot))
        raise ModelLoadFailed(f"llama: rope dimension count {n_rot} must equal the head size "
                              f"{head_dim}")
    n_head_kv = hp.n_head_kv if hp.n_head_kv is not None else hp.n_head
    if n_head_kv <= 0 or hp.n_head % n_head_kv:
        raise ModelLoadFailed(f"llama: {hp.n_head} heads are not a multiple of {n_head_kv} "
                              f"key/value heads")
    # ggml: freq_scale = 1 / factor, a factor of 0 meaning none
    freq_scale = 1.0 / hp.rope_scale if hp.rope_scaling == "linear" and hp.rope_scale else 1.0
    return {"n_head_kv": n_head_kv, "head_dim": head_dim, "n_rot": n_rot,
            "rope_freq_scale": freq_scale}


def _q(hp):
    return hp.n_head * hp.head_dim


def _kv(hp):
    return hp.n_head_kv * hp.head_dim


TENSORS = (
    TensorSpec("token_embd.weight", lambda hp: (hp.n_vocab, hp.n_embd)),
    TensorSpec("output_norm.weight", lambda hp: (hp.n_embd,)),
    TensorSpec("output.weight", lambda hp: (hp.n_vocab, hp.n_embd), optional=True),  # else tied
    # Llama 3.x: per-pair rope frequency divisors (llama.cpp writes one, shared by all layers)
    TensorSpec("rope_freqs.weight", lambda hp: (hp.n_rot // 2,), optional=True),
    TensorSpec("blk.{i}.attn_norm.weight", lambda hp: (hp.n_embd,)),
    TensorSpec("blk.{i}.attn_q.weight", lambda hp: (_q(hp), hp.n_embd)),
    TensorSpec("blk.{i}.attn_k.weight", lambda hp: (_kv(hp), hp.n_embd)),
    TensorSpec("blk.{i}.attn_v.weight", lambda hp: (_kv(hp), hp.n_embd)),
    TensorSpec("blk.{i}.attn_output.weight", lambda hp: (hp.n_embd, _q(hp))),
    TensorSpec("blk.{i}.attn_q.bias", lambda hp: (_q(hp),), optional=True),
    TensorSpec("blk.{i}.attn_k.bias", lambda hp: (_kv(hp),), optional=True),
    TensorSpec("blk.{i}.attn_v.bias", lambda hp: (_kv(hp),), optional=True),
    TensorSpec("blk.{i}.attn_output.bias", lambda hp: (hp.n_embd,), optional=True),
    TensorSpec("blk.{i}.ffn_norm.weight", lambda hp: (hp.n_embd,)),
    TensorSpec("blk.{i}.ffn_gate.weight", lambda hp: (hp.n_ff, hp.n_embd)),
    TensorSpec("blk.{i}.ffn_up.weight", lambda hp: (hp.n_ff, hp.n_embd)),
    TensorSpec("blk.{i}.ffn_down.weight", lambda hp: (hp.n_embd, hp.n_ff)),
    TensorSpec("blk.{i}.ffn_gate.bias", lambda hp: (hp.n_ff,), optional=True),
    TensorSpec("blk.{i}.ffn_up.bias", lambda hp: (hp.n_ff,), optional=True),
    TensorSpec("blk.{i}.ffn_down.bias", lambda hp: (hp.n_embd,), optional=True),
)
