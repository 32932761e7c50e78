"""orcd plugin: tokenizers of three kinds (gguf-bpe, gguf-spm, hf-json).

All three are built on the ``tokenizers`` library; see ``gguf_kinds`` and
``hf_json``. An explicit or neighbouring ``tokenizer.json`` wins over the GGUF
vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from orcd import hookimpl

ORCD_PLUGIN_API = 1


def find_tokenizer_json(model_path: Path | None) -> Path | None:
    """``tokenizer.json`` in the model file's folder, if there is one."""
    if model_path is None:
        return None
    candidate = Path(model_path).parent / "tokenizer.json"
    return candidate if candidate.is_file() else None


@hookimpl
def orcd_tokenizer(model, tokenizer_path):
    path = tokenizer_path or find_tokenizer_json(getattr(model, "path", None))
    where = str(getattr(model, "path", "model"))
    if path is not None:
        from orcd_tokenizers.hf_json import load_hf_json
        return load_hf_json(Path(path), model)
    from orcd_tokenizers.gguf_kinds import build
    from orcd_tokenizers.vocab import read_vocab
    if "tokenizer.ggml.model" not in model.metadata:
        return None
    return build(read_vocab(model.metadata, where), where)
