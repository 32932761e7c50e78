"""Synthetic llama presets for ``orcd synth`` and tests.

``smollm2-135m`` has the real SmolLM2-135M-Instruct Q4_1 file's shapes,
hyper-parameter keys and type mix (Q4_1 matrices, Q8_0 tied embedding, F32
norms); ``llama-tiny`` keeps that mix at tiny dims for fast tests.
"""

from orcd.devkit.synth import F32, Q8_0, SynthPreset, SynthVocab

Q4_1 = 3  # GGML type id (orcd.devkit.synth names only the types its own presets use)

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _vocab(size: int) -> SynthVocab:
    return SynthVocab(kind="bpe", size=size, pre="smollm", specials=SPECIALS,
                      bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>",
                      unk="<|endoftext|>", add_bos=False, eog=("<|im_end|>", "<|endoftext|>"),
                      chat_template=CHATML)


def _metadata(ctx, n_embd, n_layer, n_ff, n_head, n_head_kv, n_vocab) -> dict:
    return {
        "llama.block_count": n_layer,
        "llama.context_length": ctx,
        "llama.embedding_length": n_embd,
        "llama.feed_forward_length": n_ff,
        "llama.attention.head_count": n_head,
        "llama.attention.head_count_kv": n_head_kv,
        "llama.rope.freq_base": 100000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.vocab_size": n_vocab,
        "llama.rope.dimension_count": n_embd // n_head,
        "general.file_type": 3,  # LLAMA_FTYPE_MOSTLY_Q4_1
        "general.quantization_version": 2,
    }


def tensor_type(name: str, shape: tuple[int, ...]) -> int:
    """The real file's mix: F32 vectors, a Q8_0 (tied) embedding, Q4_1 matrices."""
    if len(shape) == 1:
        return F32
    return Q8_0 if name == "token_embd.weight" else Q4_1


PRESETS = (
    SynthPreset(
        name="smollm2-135m", arch="llama",
        description="SmolLM2-135M-Instruct Q4_1 shape (metadata and type mix), 98 MB",
        metadata=_metadata(8192, 576, 30, 1536, 9, 3, 49152),
        tensor_type=tensor_type, vocab=_vocab(49152)),
    SynthPreset(
        name="llama-tiny", arch="llama",
        description="tiny llama for tests: the SmolLM2 type mix at n_embd 128, 2 layers, vocab 512",
        metadata=_metadata(2048, 128, 2, 256, 4, 2, 512),
        tensor_type=tensor_type, vocab=_vocab(512)),
)
