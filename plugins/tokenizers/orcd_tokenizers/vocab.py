"""The tokenizer metadata of a GGUF file, read once into plain Python.

Token types follow gguf-py / llama.cpp: 1 normal, 2 unknown, 3 control,
4 user-defined, 5 unused, 6 byte. The end-of-generation set and the few
per-token attribute overrides mirror llama.cpp's ``llama_vocab::load`` so that
orcd stops exactly where llama.cpp would on the same file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from orcd.errors import ModelLoadFailed

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp marks any token with one of these texts as end-of-generation.
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>",
})
# Fill-in-the-middle pad / repo / file-separator tokens also end a generation in llama.cpp.
FIM_EOG_TEXTS = frozenset({"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",
                           "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>",
                           "<|file_sep|>"})
# GPT-OSS (harmony) structure tokens are always rendered: llama.cpp makes them user-defined.
HARMONY_RENDERED = frozenset({"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"})


@dataclass
class GGUFVocab:
    model: str                  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str                    # tokenizer.ggml.pre ("" if absent)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None
    model_name: str             # general.name, lower-cased (llama.cpp keys quirks off it)
    eog_ids: frozenset[int] = field(default_factory=frozenset)
    rstrip_ids: frozenset[int] = field(default_factory=frozenset)


def _opt_id(meta: Mapping[str, Any], key: str, n_tokens: int) -> int | None:
    if key not in meta:
        return None
    v = int(meta[key])
    return v if 0 <= v < n_tokens else None


def read_vocab(meta: Mapping[str, Any], where: str = "model") -> GGUFVocab:
    """Read and sanity-check the ``tokenizer.*`` keys; ``where`` names the file in errors."""
    model = str(meta.get("tokenizer.ggml.model", ""))
    if "tokenizer.ggml.tokens" not in meta:
        raise ModelLoadFailed(f"{where}: GGUF has no tokenizer.ggml.tokens")
    tokens = list(meta["tokenizer.ggml.tokens"])
    n = len(tokens)
    types = list(meta["tokenizer.ggml.token_type"]) if "tokenizer.ggml.token_type" in meta else [NORMAL] * n
    scores = list(meta["tokenizer.ggml.scores"]) if "tokenizer.ggml.scores" in meta else None
    if len(types) != n or (scores is not None and len(scores) != n):
        raise ModelLoadFailed(f"{where}: tokenizer.ggml.token_type/scores length differs from "
                              f"the {n} tokens")
    merges = list(meta["tokenizer.ggml.merges"]) if "tokenizer.ggml.merges" in meta else None
    spm = model == "llama"
    pre = str(meta.get("tokenizer.ggml.pre", ""))
    # llama.cpp forces BOS on for llama3-style pre-tokenizers.
    add_bos_default = spm or pre in ("llama3", "llama-v3", "llama-bpe", "tekken", "chameleon")
    v = GGUFVocab(
        model=model, pre=pre, tokens=tokens, types=[int(t) for t in types], scores=scores,
        merges=merges,
        bos_id=_opt_id(meta, "tokenizer.ggml.bos_token_id", n),
        eos_id=_opt_id(meta, "tokenizer.ggml.eos_token_id", n),
        pad_id=_opt_id(meta, "tokenizer.ggml.padding_token_id", n),
        unk_id=_opt_id(meta, "tokenizer.ggml.unknown_token_id", n),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", spm)),
        chat_template=(str(meta["tokenizer.chat_template"])
                       if "tokenizer.chat_template" in meta else None),
        model_name=str(meta.get("general.name", "")).lower(),
    )
    if spm and v.bos_id is None and v.add_bos:
        v.bos_id = _find(tokens, "<s>")
    if spm and v.eos_id is None:
        v.eos_id = _find(tokens, "</s>")
    if spm and v.unk_id is None:
        v.unk_id = _find(tokens, "<unk>")
    _apply_llama_cpp_overrides(v, meta, n)
    return v


def _find(tokens: list[str], text: str) -> int | None:
    try:
        return tokens.index(text)
    except ValueError:
        return None


def _apply_llama_cpp_overrides(v: GGUFVocab, meta: Mapping[str, Any], n: int) -> None:
    """End-of-generation ids and token-type fix-ups, as llama.cpp derives them."""
    eog: set[int] = set()
    for i, text in enumerate(v.tokens):
        if text in EOG_TEXTS or text in FIM_EOG_TEXTS:
            eog.add(i)
            if v.types[i] not in (CONTROL, USER_DEFINED) and text in EOG_TEXTS:
                v.types[i] = CONTROL  # "control-looking token" fix-up
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id"):
        tid = _opt_id(meta, key, n)
        if tid is not None:
            eog.add(tid)
    for i, text in enumerate(v.tokens):
        if text in HARMONY_RENDERED:
            v.types[i] = USER_DEFINED
    # Harmony: <|end|> closes a message, not the generation, when <|return|>/<|call|> exist.
    texts = {v.tokens[i]: i for i in eog}
    if "<|end|>" in texts and "<|call|>" in texts and ("<|return|>" in texts or "<|flush|>" in texts):
        end = texts["<|end|>"]
        eog.discard(end)
        v.types[end] = USER_DEFINED
    v.eog_ids = frozenset(eog)
    if "phi-3" in v.model_name or "phi3" in v.model_name:
        # llama.cpp: Phi-3's special tokens swallow the whitespace that follows them.
        keep = {"<unk>", "<s>", "<|endoftext|>"}
        v.rstrip_ids = frozenset(
            i for i, t in enumerate(v.types)
            if (t in (CONTROL, USER_DEFINED, UNKNOWN) or v.tokens[i] == "</s>")
            and v.tokens[i] not in keep)
