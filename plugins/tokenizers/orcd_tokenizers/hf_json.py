"""``hf-json``: a Hugging Face ``tokenizer.json`` (given explicitly or beside the model).

The ``tokenizers`` library runs it as is, post-processor included. Metadata
comes from the GGUF when it has it (same ids: it is the same model), else from
a ``tokenizer_config.json`` in the same folder, else from well-known token names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

from tokenizers import Tokenizer as HFTok

from orcd.errors import ModelLoadFailed, OrcdError
from orcd_tokenizers.hf_backed import HFBackedTokenizer, TokenizerInfo, byte_level_bytes
from orcd_tokenizers.vocab import EOG_TEXTS, FIM_EOG_TEXTS

SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_BOS_NAMES = ("<|startoftext|>", "<|begin_of_text|>", "<s>", "<bos>")


def _read_json(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadFailed(f"{path}: cannot read tokenizer JSON: {e}") from None
    if not isinstance(spec, dict):
        raise ModelLoadFailed(f"{path}: expected a JSON object")
    return text, spec


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _decoder_kinds(node: Any) -> set[str]:
    if not isinstance(node, dict):
        return set()
    kinds = {str(node.get("type"))}
    for child in (node.get("decoders") or node.get("normalizers") or []):
        kinds |= _decoder_kinds(child)
    return kinds


def _pieces(tok: HFTok, spec: dict[str, Any], added: dict[int, str]) -> list[bytes]:
    """Each id's exact output bytes, read off the decoder the tokenizer.json declares."""
    kinds = _decoder_kinds(spec.get("decoder"))
    model = spec.get("model") or {}
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):  # not a BPE/WordLevel vocab: ask the library per id
        n = tok.get_vocab_size(with_added_tokens=True)
        return [added[i].encode("utf-8") if i in added
                else tok.decode([i], skip_special_tokens=False).encode("utf-8") for i in range(n)]
    if "ByteLevel" in kinds:
        convert = byte_level_bytes
    else:
        byte_fallback = bool(model.get("byte_fallback")) or "ByteFallback" in kinds
        metaspace = "Metaspace" in kinds or "Replace" in kinds

        def convert(text: str) -> bytes:
            if byte_fallback and (m := _BYTE_TOKEN.fullmatch(text)):
                return bytes([int(m.group(1), 16)])
            return (text.replace(SPACE, " ") if metaspace else text).encode("utf-8")
    out = [b""] * _spec_vocab_size(spec)
    for text, i in vocab.items():
        out[i] = convert(text)
    for i, text in added.items():
        out[i] = text.encode("utf-8")
    return out


def _strips_space(spec: dict[str, Any]) -> bool:
    """SentencePiece-style tokenizers prepend a space the user never typed."""
    dec = spec.get("decoder")
    if "Strip" in _decoder_kinds(dec) or "Prepend" in _decoder_kinds(spec.get("normalizer")):
        return True
    return any(isinstance(d, dict) and d.get("type") == "Metaspace"
               and d.get("prepend_scheme", "always") != "never"
               for d in [dec, *((dec or {}).get("decoders") or [])])


def load_hf_json(path: Path, model: Any = None) -> HFBackedTokenizer:
    if not path.is_file():
        raise ModelLoadFailed(f"{path}: no such tokenizer.json")
    text, spec = _read_json(path)
    model_vocab = _model_vocab_size(model)
    n_spec = _spec_vocab_size(spec)
    if model_vocab is not None and n_spec > model_vocab:  # checked before the costly build
        raise ModelLoadFailed(f"{path}: tokenizer has {n_spec} tokens but the model only "
                              f"{model_vocab}; it belongs to another model")
    try:
        tok = HFTok.from_str(text)
    except Exception as e:  # the library's parse errors have no common base class
        raise ModelLoadFailed(f"{path}: not a valid tokenizer.json: {e}") from None
    config_path = path.parent / "tokenizer_config.json"
    config = _read_json(config_path)[1] if config_path.is_file() else {}
    meta: Mapping[str, Any] = getattr(model, "metadata", None) or {}

    added = {int(t["id"]): t for t in spec.get("added_tokens") or []}
    special_ids = frozenset(i for i, t in added.items() if t.get("special"))
    n = tok.get_vocab_size(with_added_tokens=True)

    def token_id(gguf_key: str, config_key: str, fallback_names: tuple[str, ...] = ()) -> int | None:
        if gguf_key in meta and 0 <= int(meta[gguf_key]) < n:
            return int(meta[gguf_key])
        for name in (_token_text(config.get(config_key)), *fallback_names):
            if name is not None and (tid := tok.token_to_id(name)) is not None:
                return tid
        return None

    bos = token_id("tokenizer.ggml.bos_token_id", "bos_token", _BOS_NAMES)
    eos = token_id("tokenizer.ggml.eos_token_id", "eos_token")
    pad = token_id("tokenizer.ggml.padding_token_id", "pad_token")
    with_special = tok.encode("", add_special_tokens=True).ids
    eog = {i for i, t in added.items() if t.get("content") in EOG_TEXTS | FIM_EOG_TEXTS}
    eog |= {tid for tid in (eos,) if tid is not None}
    if {"<|return|>", "<|call|>"} <= {added[i]["content"] for i in eog}:
        eog -= {i for i in eog if added.get(i, {}).get("content") == "<|end|>"}  # harmony
    info = TokenizerInfo(
        kind="hf-json", vocab_size=max(n, model_vocab or 0), bos_id=bos, eos_id=eos, pad_id=pad,
        add_bos=bos is not None and with_special[:1] == [bos],
        add_eos=eos is not None and with_special[-1:] == [eos],
        eog_ids=frozenset(eog),
        special_tokens={t["content"]: i for i, t in added.items()},
        skip_ids=special_ids,
        chat_template=_chat_template(meta, config, path.parent),
        strip_leading_space=_strips_space(spec), hf_post_process=True)
    added_text = {i: t["content"] for i, t in added.items()}
    return HFBackedTokenizer(tok, info, lambda: _pieces(tok, spec, added_text))


def _spec_vocab_size(spec: dict[str, Any]) -> int:
    """1 + the largest id a tokenizer.json names (model vocab or added tokens)."""
    vocab = (spec.get("model") or {}).get("vocab") or {}
    ids = vocab.values() if isinstance(vocab, dict) else range(len(vocab))  # Unigram: a list
    added = (t.get("id", -1) for t in spec.get("added_tokens") or [] if isinstance(t, dict))
    return 1 + max(max(ids, default=-1), max(added, default=-1))


def _model_vocab_size(model: Any) -> int | None:
    try:
        return int(model.vocab_size()) if model is not None else None
    except (OrcdError, AttributeError):  # no vocabulary hint: nothing to check against
        return None


def _chat_template(meta: Mapping[str, Any], config: dict[str, Any], folder: Path) -> str | None:
    if "tokenizer.chat_template" in meta:
        return str(meta["tokenizer.chat_template"])
    template = config.get("chat_template")
    if isinstance(template, str):
        return template
    jinja = folder / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None
