"""Synthetic phi3 presets for ``orcd synth``.

``phi3-mini`` is Phi-3-mini-4k-instruct as llama.cpp's Q4_K_M quantizes it;
``phi3-mini-q4_0`` as its Q4_0 does (output.weight still Q6_K). The tiny
variants keep each mix at n_embd 256 (K-quant rows need multiples of 256).
"""

from orcd.devkit.synth import F32, Q4_0, Q4_K, Q5_K, Q6_K, SynthPreset, SynthVocab

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Phi-3's added tokens, ids 32000.. in the real vocabulary
SPECIALS = (
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
)


def _vocab(size: int, n_normal: int) -> SynthVocab:
    return SynthVocab(kind="spm", size=size, pre="default", specials=SPECIALS, n_normal=n_normal,
                      bos="<s>", eos="<|endoftext|>", eot="<|end|>", pad="<|endoftext|>", unk="<unk>",
                      add_bos=True, eog=("<|endoftext|>", "<|end|>"), chat_template=CHAT_TEMPLATE)


def _metadata(ctx, n_embd, n_layer, n_ff, n_head, n_head_kv, file_type) -> dict:
    return {
        "phi3.context_length": ctx,
        "phi3.rope.scaling.original_context_length": ctx,
        "phi3.embedding_length": n_embd,
        "phi3.feed_forward_length": n_ff,
        "phi3.block_count": n_layer,
        "phi3.attention.head_count": n_head,
        "phi3.attention.head_count_kv": n_head_kv,
        "phi3.attention.layer_norm_rms_epsilon": 1e-5,
        "phi3.rope.dimension_count": n_embd // n_head,
        "phi3.rope.freq_base": 10000.0,
        "general.file_type": file_type,
        "general.quantization_version": 2,
    }


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's llama-quant.cpp rule for which layers get more bits."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _q4_k_m(n_layer: int):
    def tensor_type(name: str, shape: tuple[int, ...]) -> int:
        if len(shape) == 1:
            return F32
        if name == "output.weight":
            return Q6_K
        if name.endswith("attn_qkv.weight"):
            return Q5_K
        if name.endswith("ffn_down.weight"):
            return Q6_K if use_more_bits(int(name.split(".")[1]), n_layer) else Q4_K
        return Q4_K  # token_embd, attn_output, ffn_up
    return tensor_type


def _q4_0(name: str, shape: tuple[int, ...]) -> int:
    if len(shape) == 1:
        return F32
    return Q6_K if name == "output.weight" else Q4_0


OUTPUT = ("output.weight",)  # the 4k model has its own output matrix (optional in the table)


def _presets():
    big = dict(ctx=4096, n_embd=3072, n_layer=32, n_ff=8192, n_head=32, n_head_kv=32)
    tiny = dict(ctx=4096, n_embd=256, n_layer=2, n_ff=512, n_head=4, n_head_kv=4)
    return (
        SynthPreset("phi3-mini", "phi3", "Phi-3-mini-4k Q4_K_M shape (llama.cpp's mix), 2.39 GB",
                    _metadata(**big, file_type=15), _q4_k_m(32), _vocab(32064, 32000), OUTPUT),
        SynthPreset("phi3-mini-q4_0", "phi3", "Phi-3-mini-4k Q4_0 shape (output Q6_K), 2.2 GB",
                    _metadata(**big, file_type=2), _q4_0, _vocab(32064, 32000), OUTPUT),
        SynthPreset("phi3-tiny", "phi3", "tiny phi3 for tests: the Q4_K_M mix at n_embd 256, 2 layers",
                    _metadata(**tiny, file_type=15), _q4_k_m(2), _vocab(512, 480), OUTPUT),
        SynthPreset("phi3-tiny-q4_0", "phi3", "tiny phi3 for tests: the Q4_0 mix",
                    _metadata(**tiny, file_type=2), _q4_0, _vocab(512, 480), OUTPUT),
    )


PRESETS = _presets()
