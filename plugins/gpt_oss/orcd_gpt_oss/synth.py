"""Synthetic gpt-oss presets for ``orcd synth``.

``gpt-oss-20b`` is GPT-OSS-20B as released in MXFP4 (llama.cpp's MXFP4_MOE
mix): experts MXFP4, other matrices Q8_0, norms, biases, sinks and the router
F32; the o200k_harmony vocabulary's size and special-token ids. ``gpt-oss-tiny``
keeps head_dim 64, sinks, the alternating sliding window (8 tokens, so tests
reach it) and the mix, with 4 experts of which 2 are used.
"""

from orcd.devkit.synth import CONTROL, F32, MXFP4, Q8_0, SynthPreset, SynthVocab

# harmony, simplified: system/user/assistant turns, final channel for the assistant
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + message['content'] + '<|end|>' }}"
    "{%- else %}"
    "{{- '<|start|>' + message['role'] + '<|message|>' + message['content'] + '<|end|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start|>assistant' }}{%- endif %}"
)

# o200k_harmony's special tokens from id 199998 on; the rest up to the vocab
# size are <|reserved_N|> control tokens
SPECIALS = (
    "<|startoftext|>", "<|endoftext|>", "<|reserved_200000|>", "<|reserved_200001|>", "<|return|>",
    "<|constrain|>", "<|reserved_200004|>", "<|channel|>", "<|start|>", "<|end|>", "<|message|>",
    "<|reserved_200009|>", "<|reserved_200010|>", "<|reserved_200011|>", "<|call|>",
    "<|reserved_200013|>", "<|reserved_200014|>", "<|reserved_200015|>", "<|reserved_200016|>",
    "<|reserved_200017|>", "<|endofprompt|>",
)


def _vocab(size: int, n_normal: int) -> SynthVocab:
    # ids of the tiny vocabulary's reserved tokens differ from their names; harmless
    return SynthVocab(kind="bpe", size=size, pre="gpt-4o", specials=SPECIALS, n_normal=n_normal,
                      pad_text="<|reserved_{i}|>", pad_type=CONTROL,
                      bos="<|startoftext|>", eos="<|return|>", pad="<|endoftext|>", add_bos=False,
                      eog=("<|return|>", "<|call|>"), chat_template=CHAT_TEMPLATE)


def _metadata(ctx, n_embd, n_layer, n_ff_exp, n_head, n_head_kv, n_expert, n_expert_used,
              n_swa) -> dict:
    a = "gpt-oss"
    return {
        f"{a}.block_count": n_layer,
        f"{a}.context_length": ctx,
        f"{a}.embedding_length": n_embd,
        f"{a}.feed_forward_length": n_ff_exp,
        f"{a}.expert_feed_forward_length": n_ff_exp,
        f"{a}.attention.head_count": n_head,
        f"{a}.attention.head_count_kv": n_head_kv,
        f"{a}.attention.key_length": 64,
        f"{a}.attention.value_length": 64,
        f"{a}.attention.sliding_window": n_swa,
        f"{a}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{a}.expert_count": n_expert,
        f"{a}.expert_used_count": n_expert_used,
        f"{a}.rope.freq_base": 150000.0,
        f"{a}.rope.scaling.type": "yarn",
        f"{a}.rope.scaling.factor": 32.0,
        f"{a}.rope.scaling.original_context_length": 4096,
        "general.file_type": 38,  # LLAMA_FTYPE_MOSTLY_MXFP4_MOE
        "general.quantization_version": 2,
    }


def tensor_type(name: str, shape: tuple[int, ...]) -> int:
    """llama.cpp's MXFP4_MOE rule: 3-D expert weights MXFP4, other matrices
    Q8_0; 1-D tensors, expert biases and the router stay F32."""
    if name.endswith("_exps.weight"):
        return MXFP4
    if len(shape) == 1 or name.endswith(".bias") or "ffn_gate_inp" in name:
        return F32
    return Q8_0


PRESETS = (
    SynthPreset("gpt-oss-20b", "gpt-oss", "GPT-OSS-20B MXFP4 shape, 12.1 GB",
                _metadata(131072, 2880, 24, 2880, 64, 8, 32, 4, 128),
                tensor_type, _vocab(201088, 199998), ("output.weight",)),
    SynthPreset("gpt-oss-tiny", "gpt-oss",
                "tiny gpt-oss for tests: head_dim 64, sinks, window 8, 4 experts (2 used), 2 layers",
                _metadata(131072, 256, 2, 256, 4, 2, 4, 2, 8),
                tensor_type, _vocab(640, 600), ("output.weight",)),
)
