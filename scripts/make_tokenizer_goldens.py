#!/usr/bin/env python3
"""Regenerate the tokenizer conformance vectors in tests/golden/tokenizer/ from independent oracles.

    pip install -e '.[oracle]' quicktok-v1
    python scripts/make_tokenizer_goldens.py [--qwen /tmp/models/qwen.gguf]

Oracles (never orcd's own code):
- ``qwen_gguf.json``: llama.cpp (llama-cpp-python, vocab-only load) on the real
  Qwen2.5-Coder GGUF (byte-level BPE, pre "qwen2").
- ``phi3_spm.json``: llama.cpp on a vocab-only phi3 GGUF written from
  ``spm_vocab.json`` (a small SentencePiece BPE vocabulary trained here once,
  with byte fallback and Phi-3's special tokens).
- ``o200k_harmony.json``: tiktoken on o200k_base ranks (from quicktok-v1) plus
  the harmony special tokens.

The tests import this file for ``CASES``, ``write_spm_gguf`` and the oracle
functions, so the live-oracle tests rerun exactly what made the stored vectors.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "tokenizer"

# fmt: off
COMMON = [
    "", "Hello, world!", "The quick brown fox jumps over the lazy dog.", " leading space",
    "trailing space ", "   multiple   spaces   ", "\n\n\n", "\t\ttabs\tand\ttext",
    "line1\nline2\r\nline3\r", "a  \n  b \n\n c",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    '<div class="a">x &amp; y</div>', "12345678901234567890", "3.14159 2.71828 -42 1e-10 0x1F",
    "1,000,000.00 $5 €10 ¥20", "你好，世界！这是一个测试。", "日本語のテキストとカタカナ、ひらがな。",
    "한국어 텍스트입니다.", "😀😃😄 👍🏽 🇺🇸", "👨\u200d👩\u200d👧\u200d👦 family, 🏳️\u200d🌈 flag",
    "e\u0301 a\u0300 n\u0303 Z\u0351\u0352a\u0353l\u0354g\u0355o", "café naïve résumé",
    "مرحبا بالعالم", "שלום עולם", "mixed العربية and English", "Ελληνικά και русский текст",
    "I'm you're he'll we've they'd IT'S", "can't won't shouldn't", "!!!???...,,,;;;",
    "email@example.com https://example.com/path?q=1&r=2", "\u00a0nbsp\u2003em\u3000ideographic",
    "zero\u200bwidth\u200bspace", "NUL\x00byte", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "ＡＢＣ fullwidth ｱｲｳ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛", "Emoji at the end 🎉",
]
SPECIAL = {
    "qwen": ["<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>",
             "a<|endoftext|>b", "<tool_call>\n{\"name\": \"f\"}\n</tool_call>", "x</s>y <|im_end|>",
             "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>"],
    "phi3": ["<|user|>\nHello<|end|>\n<|assistant|>", "<s>text</s> more", "  <|user|>  spaced",
             "a<|endoftext|>b", "<|placeholder1|>x<|system|>\n\ny"],
    "o200k": ["<|start|>user<|message|>Hi<|end|><|start|>assistant",
              "<|channel|>analysis<|message|>think<|end|>", "a<|endoftext|>b<|return|>",
              "<|startoftext|> <|call|>", "<|reserved_200100|>x<|endofprompt|>"],
}
# fmt: on


def long_text(n: int = 10_000, seed: int = 0) -> str:
    """A deterministic ~n-character mix of prose, code, numbers and non-Latin text."""
    rng = random.Random(seed)
    parts = ["The model reads tokens. ", "def f(x):\n    return x * 2\n", "123 4567 89. ",
             "你好世界。", "Привет, мир! ", "🙂👍 ", "\t\n", "   ", "مرحبا ", "naïve café "]
    out = []
    while sum(map(len, out)) < n:
        out.append(rng.choice(parts))
    return "".join(out)[:n]


def cases(backend: str) -> list[dict]:
    """(text, add_special, parse_special) rows for one backend, in a stable order."""
    rows = [{"text": t, "add_special": False, "parse_special": True} for t in COMMON]
    rows += [{"text": long_text(), "add_special": False, "parse_special": True}]
    for t in SPECIAL[backend]:
        rows += [{"text": t, "add_special": True, "parse_special": True},
                 {"text": t, "add_special": False, "parse_special": False}]
    rows += [{"text": t, "add_special": True, "parse_special": True}
             for t in ("", "Hello", " Hello", "\nx")]
    return rows


# -- the synthetic SentencePiece vocabulary (phi3) -------------------------------------
SPM_SPECIALS = [("<|endoftext|>", 3), ("<|assistant|>", 3), ("<|placeholder1|>", 4),
                ("<|system|>", 3), ("<|end|>", 3), ("<|user|>", 3)]


def train_spm_vocab(vocab_size: int = 3000) -> dict:
    """A small SentencePiece-BPE vocabulary: tokens, scores and types, Phi-3 layout."""
    from tokenizers import SentencePieceBPETokenizer

    corpus = COMMON * 3 + [long_text(20_000, seed=s) for s in range(4)]
    trainer = SentencePieceBPETokenizer(add_prefix_space=True)
    trainer.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                limit_alphabet=400)
    spec = json.loads(trainer.to_str())["model"]
    # No NUL (C strings in llama.cpp) and no second <unk>: both break a GGUF vocab.
    pieces = [p for p in sorted(spec["vocab"], key=spec["vocab"].get)
              if "\x00" not in p and p != "<unk>"]
    merged = ["".join(m.split(" ") if isinstance(m, str) else m) for m in spec["merges"]]
    rank = {p: i for i, p in enumerate(merged)}
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    extra = ["\u2581\u2581", "\u2581\u2581\u2581\u2581"]  # indentation pieces, like Llama's vocab
    for p in pieces + [e for e in extra if e not in pieces]:
        tokens.append(p)
        types.append(1)
        # SentencePiece scores: merged pieces by merge order; characters and extras below.
        scores.append(-float(rank.get(p, len(merged) + len(tokens))))
    for text, kind in SPM_SPECIALS:
        tokens.append(text)
        types.append(kind)
        scores.append(0.0)
    return {"tokens": tokens, "scores": scores, "types": types}


def write_spm_gguf(vocab: dict, path: Path) -> Path:
    """A vocab-only phi3 GGUF (no tensors) that llama.cpp and orcd both load."""
    import gguf

    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_name("Phi3 synthetic SPM")  # "phi3" in the name: llama.cpp's Phi-3 rstrip rules
    for key, val in (("context_length", 4096), ("embedding_length", 64), ("feed_forward_length", 128),
                     ("block_count", 1)):
        w.add_uint32(f"phi3.{key}", val)
    w.add_uint32("phi3.attention.head_count", 4)
    w.add_uint32("phi3.attention.head_count_kv", 4)
    w.add_float32("phi3.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32("phi3.rope.dimension_count", 16)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab["tokens"])
    w.add_token_scores(vocab["scores"])
    w.add_token_types(vocab["types"])
    ids = {t: i for i, t in enumerate(vocab["tokens"])}
    w.add_bos_token_id(ids["<s>"])
    w.add_eos_token_id(ids["<|endoftext|>"])
    w.add_unk_token_id(ids["<unk>"])
    w.add_pad_token_id(ids["<|endoftext|>"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- oracles -----------------------------------------------------------------------------
def llama_cpp_oracle(gguf_path: Path):
    """``encode(text, add_special, parse_special) -> ids`` and the EOG ids, from llama.cpp."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    eog = [i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)]

    def encode(text: str, add_special: bool, parse_special: bool) -> list[int]:
        return llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)

    return encode, {"eog_ids": eog, "n_tokens": n}


def tiktoken_oracle():
    import tiktoken

    mk = load_script("make_o200k_harmony")
    specials = {t: i for i, t in mk.harmony_specials().items()}
    enc = tiktoken.Encoding("o200k_harmony_local", pat_str=mk.O200K,
                            mergeable_ranks=mk.read_o200k_ranks(), special_tokens=specials)

    def encode(text: str, add_special: bool, parse_special: bool) -> list[int]:
        # harmony adds no BOS; parse_special=False: special-token text is ordinary text
        if parse_special:
            return enc.encode(text, allowed_special="all")
        return enc.encode(text, allowed_special=set(), disallowed_special=())

    return encode, {"eog_ids": sorted(specials[t] for t in ("<|endoftext|>", "<|return|>", "<|call|>"))}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_oracle(encode, backend: str) -> list[dict]:
    return [{**c, "ids": encode(c["text"], c["add_special"], c["parse_special"])} for c in cases(backend)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qwen", default="/tmp/models/qwen.gguf")
    ap.add_argument("--retrain-spm", action="store_true", help="train a new spm_vocab.json")
    args = ap.parse_args()
    GOLDEN.mkdir(parents=True, exist_ok=True)
    vocab_path = GOLDEN / "spm_vocab.json"
    if args.retrain_spm or not vocab_path.exists():
        vocab_path.write_text(json.dumps(train_spm_vocab(), ensure_ascii=False))
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        phi3 = write_spm_gguf(json.loads(vocab_path.read_text()), Path(tmp) / "phi3-spm.gguf")
        jobs = [("qwen", "qwen_gguf.json", "llama.cpp (llama-cpp-python) on Qwen2.5-Coder-0.5B GGUF",
                 lambda: llama_cpp_oracle(Path(args.qwen))),
                ("phi3", "phi3_spm.json", "llama.cpp (llama-cpp-python) on phi3 GGUF from spm_vocab.json",
                 lambda: llama_cpp_oracle(phi3)),
                ("o200k", "o200k_harmony.json", "tiktoken on o200k_base ranks + harmony specials",
                 tiktoken_oracle)]
        for backend, fname, source, make in jobs:
            encode, meta = make()
            out = {"source": source, **meta, "cases": run_oracle(encode, backend)}
            (GOLDEN / fname).write_text(json.dumps(out, ensure_ascii=False, indent=0))
            print(f"{fname}: {len(out['cases'])} cases")


if __name__ == "__main__":
    main()
