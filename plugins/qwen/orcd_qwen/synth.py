"""Synthetic qwen2 presets for ``orcd synth``.

``qwen2-0.5b`` clones the real Qwen2.5-Coder-0.5B-Instruct Q4_K_M file: every
hyper-parameter key and every tensor's type (hidden 896 is not a multiple of
256, so most tensors are Q5_0). ``qwen2-tiny`` keeps that type mix at tiny dims.
"""

from orcd.devkit.synth import F32, Q4_K, Q5_0, Q6_K, Q8_0, SynthPreset, SynthVocab

CHATML = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2.5's 22 added tokens; <tool_call> and </tool_call> are user-defined in the
# real file, the rest control. All are control here (type only matters for parsing).
SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)


def _vocab(size: int, n_normal: int) -> SynthVocab:
    return SynthVocab(kind="bpe", size=size, pre="qwen2", specials=SPECIALS, n_normal=n_normal,
                      bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>", add_bos=False,
                      eog=("<|im_end|>", "<|endoftext|>"), chat_template=CHATML)


def _metadata(ctx, n_embd, n_layer, n_ff, n_head, n_head_kv) -> dict:
    return {
        "qwen2.block_count": n_layer,
        "qwen2.context_length": ctx,
        "qwen2.embedding_length": n_embd,
        "qwen2.feed_forward_length": n_ff,
        "qwen2.attention.head_count": n_head,
        "qwen2.attention.head_count_kv": n_head_kv,
        "qwen2.rope.freq_base": 1000000.0,
        "qwen2.attention.layer_norm_rms_epsilon": 1e-6,
        "general.file_type": 15,  # LLAMA_FTYPE_MOSTLY_Q4_K_M
        "general.quantization_version": 2,
    }


def _type_mix(more_bits_layers: frozenset[int]):
    """The real file's mix: Q5_0 by default, output Q8_0, 1-D tensors F32; in
    ``more_bits_layers`` ffn_down is Q6_K and attn_v Q8_0 (Q6_K cannot hold a
    896-wide row), elsewhere Q4_K and Q5_0."""
    def tensor_type(name: str, shape: tuple[int, ...]) -> int:
        if len(shape) == 1:
            return F32
        if name == "output.weight":
            return Q8_0
        more_bits = name.startswith("blk.") and int(name.split(".")[1]) in more_bits_layers
        if name.endswith("attn_v.weight"):
            return Q8_0 if more_bits else Q5_0
        if name.endswith("ffn_down.weight"):
            return Q6_K if more_bits else Q4_K
        return Q5_0
    return tensor_type


# the real file's more-bits layers (not llama.cpp's current use_more_bits rule)
REAL_MORE_BITS = frozenset({0, 1, 3, 6, 7, 8, 9, 10, 13, 16, 19, 21})

PRESETS = (
    SynthPreset(
        name="qwen2-0.5b", arch="qwen2",
        description="Qwen2.5-0.5B Q4_K_M shape (the real file's metadata and type mix), 491 MB",
        metadata=_metadata(32768, 896, 24, 4864, 14, 2),
        tensor_type=_type_mix(REAL_MORE_BITS),
        vocab=_vocab(151936, 151643),
        optional_tensors=("output.weight",),
    ),
    SynthPreset(
        name="qwen2-tiny", arch="qwen2",
        description="tiny qwen2 for tests: the 0.5B type mix at n_embd 256, 2 layers, vocab 512",
        metadata=_metadata(4096, 256, 2, 512, 4, 2),
        tensor_type=_type_mix(frozenset({0})),
        vocab=_vocab(512, 480),
        optional_tensors=("output.weight",),
    ),
)
