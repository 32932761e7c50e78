"""Pre-tokenizer regexes by ``tokenizer.ggml.pre``, as llama.cpp splits text.

Each entry is a list of regexes applied one after the other (llama.cpp's
``regex_exprs``); every regex splits each piece into matches and the gaps
between them, which is the ``tokenizers`` library's ``Split(..., "isolated")``.
The contraction alternatives are spelled ``'[sS]`` rather than ``(?i:'s)``
because case-insensitive matching would also take e.g. U+017F (long s).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tiktoken's o200k_base pattern, verbatim (GPT-4o, GPT-OSS's o200k_harmony).
O200K = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]


@dataclass(frozen=True)
class PreTok:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a whole pre-token found in the vocab is taken as is


_TABLE: dict[str, PreTok] = {}


def _add(names: str, regexes: list[str], ignore_merges: bool = False) -> None:
    for name in names.split():
        _TABLE[name] = PreTok(tuple(regexes), ignore_merges)


_add("default", DEFAULT)
_add("llama3 llama-v3 llama-bpe falcon3 pixtral", [LLAMA3], ignore_merges=True)
_add("dbrx smaug-bpe chatglm-bpe", [LLAMA3])
_add("qwen2 deepseek-r1-qwen megrez stablelm2 hunyuan", [QWEN2])
_add("gpt-4o llama4", [O200K])
_add("smollm starcoder refact command-r codeshell exaone minerva-7b", [r"\p{N}", GPT2])
_add("gpt-2 phi-2 jina-es jina-de mpt olmo jais gigachat", [GPT2])


def pretokenizer_for(pre: str) -> PreTok:
    """The split rule for ``tokenizer.ggml.pre``; llama.cpp's default when unknown."""
    if pre in _TABLE:
        return _TABLE[pre]
    log.warning("tokenizer.ggml.pre %r is not known to orcd; using the default BPE "
                "pre-tokenizer (tokenization may differ from the original model)", pre)
    return _TABLE["default"]
