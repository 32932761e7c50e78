"""``orcd inspect MODEL``: what a GGUF file holds and what serving it would cost.

``describe(mf, ctx, host)`` gathers the facts (tests call it); ``run`` prints them.
"""

from __future__ import annotations

import json
from typing import Any

from orcd.errors import InvalidRequest, ModelLoadFailed, OrcdError
from orcd.gguf_file import ModelFile

NAME = "inspect"
HELP = "show a GGUF model's architecture, quantization mix, tokenizer and VRAM estimate"

TOKENIZER_KINDS = {"gpt2": "gguf-bpe", "llama": "gguf-spm"}
KV_BYTES = 2  # the KV cache is fp16


def add_arguments(p) -> None:
    p.add_argument("model", help="a GGUF file, or a name pulled with `orcd pull`")
    p.add_argument("--ctx", type=int, default=None,
                   help="context length for the KV-cache estimate (default: the model's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    from orcd.pull import resolve_model

    if args.ctx is not None and args.ctx < 1:
        raise InvalidRequest(f"--ctx must be a positive number of tokens, got {args.ctx}",
                             field="ctx")
    with ModelFile.open(resolve_model(args.model)) as mf:
        facts = describe(mf, args.ctx, _plugin_host())
    print(json.dumps(facts, indent=2) if args.json else format_text(facts))
    return 0


def _plugin_host():
    """The plugin host, or None if plugins cannot load: inspect still works from metadata."""
    from orcd.plugins import PluginHost
    try:
        return PluginHost()
    except (OrcdError, ImportError):
        return None


def describe(mf: ModelFile, ctx: int | None = None, host: Any = None) -> dict[str, Any]:
    """Facts about ``mf``; the KV cache is estimated at ``ctx`` tokens (default:
    the model's context length) using the architecture plugin of ``host`` when
    one is installed for ``mf.arch``, else the GGUF metadata."""
    md, arch = mf.metadata, mf.arch
    quant: dict[str, dict[str, int]] = {}
    for t in mf.tensors.values():
        row = quant.setdefault(t.type_name, {"tensors": 0, "bytes": 0, "parameters": 0})
        row["tensors"] += 1
        row["bytes"] += t.n_bytes
        row["parameters"] += t.n_elements
    quant = dict(sorted(quant.items(), key=lambda kv: -kv[1]["bytes"]))
    ctx_train = _int_or_none(md.get(f"{arch}.context_length"))
    ctx = ctx if ctx is not None else ctx_train
    tok_model = md.get("tokenizer.ggml.model")
    kv = _kv_layout(mf, host)
    weights = sum(t.n_bytes for t in mf.tensors.values())
    kv_bytes = None if kv is None or ctx is None else ctx * kv["bytes_per_token"]
    return {
        "path": str(mf.path),
        "file_bytes": mf.size,
        "architecture": arch or None,
        "name": mf.name,
        "parameters": sum(t.n_elements for t in mf.tensors.values()),
        "tensors": len(mf.tensors),
        "quantization": quant,
        "context_length": ctx_train,
        "tokenizer": None if tok_model is None else TOKENIZER_KINDS.get(tok_model, tok_model),
        "tokenizer_model": tok_model,
        "vocab_size": _vocab_size(mf),
        "chat_template": "tokenizer.chat_template" in md,
        "vram": {
            "ctx": ctx,
            "weights_bytes": weights,
            "kv_cache_bytes": kv_bytes,
            "total_bytes": None if kv_bytes is None else weights + kv_bytes,
            "kv_layout": kv,
        },
    }


def _kv_layout(mf: ModelFile, host: Any) -> dict[str, Any] | None:
    """Layers, KV heads and key/value head sizes, and the fp16 bytes one token
    of context costs; None if the file does not say."""
    hp, source = None, "metadata"
    if host is not None and mf.arch:
        try:
            spec = host.architecture(mf.arch, source=str(mf.path))
            hp = spec.read_hparams(mf.metadata, _vocab_size(mf) or 0, source=str(mf.path))
            source = f"plugin {spec.plugin or spec.name}"
        except ModelLoadFailed:
            hp = None  # arch not installed, or its keys are missing: fall back to metadata
    try:
        layout = _from_hparams(hp) if hp is not None else _from_metadata(mf)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if layout is None:
        return None
    n_layer, kv_heads_total, k_dim, v_dim = layout
    return {"source": source, "n_layer": n_layer, "n_head_kv": kv_heads_total // max(n_layer, 1),
            "head_dim_k": k_dim, "head_dim_v": v_dim,
            "bytes_per_token": kv_heads_total * (k_dim + v_dim) * KV_BYTES}


def _from_hparams(hp) -> tuple[int, int, int, int]:
    n_head_kv = hp.get("n_head_kv") or hp["n_head"]
    k_dim = hp.get("head_dim") or hp["n_embd"] // hp["n_head"]
    v_dim = hp.get("head_dim_v") or k_dim
    return int(hp["n_layer"]), int(hp["n_layer"]) * int(n_head_kv), int(k_dim), int(v_dim)


def _from_metadata(mf: ModelFile) -> tuple[int, int, int, int] | None:
    md, a = mf.metadata, mf.arch
    if f"{a}.block_count" not in md or f"{a}.attention.head_count" not in md:
        return None
    n_layer = int(md[f"{a}.block_count"])
    n_head = md[f"{a}.attention.head_count"]
    n_head = max(n_head) if isinstance(n_head, list) else int(n_head)  # per-layer in some models
    n_head_kv = md.get(f"{a}.attention.head_count_kv", n_head)
    kv_heads_total = sum(n_head_kv) if isinstance(n_head_kv, list) else n_layer * int(n_head_kv)
    k_dim = md.get(f"{a}.attention.key_length")
    if k_dim is None:
        k_dim = int(md[f"{a}.embedding_length"]) // n_head
    v_dim = md.get(f"{a}.attention.value_length", k_dim)
    return n_layer, int(kv_heads_total), int(k_dim), int(v_dim)


def _vocab_size(mf: ModelFile) -> int | None:
    try:
        return mf.vocab_size()
    except ModelLoadFailed:
        return None


def _int_or_none(v: Any) -> int | None:
    try:
        return None if v is None else int(v)
    except (TypeError, ValueError):
        return None


# -- text output ------------------------------------------------------------------

def _mib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**20:,.1f} MiB"


def format_text(f: dict[str, Any]) -> str:
    vram, kv = f["vram"], f["vram"]["kv_layout"]
    tok = f["tokenizer"] or "none"
    if f["tokenizer_model"] and f["tokenizer_model"] != tok:
        tok += f" (tokenizer.ggml.model = {f['tokenizer_model']})"
    lines = [
        f"model          {f['path']} ({_mib(f['file_bytes'])})",
        f"architecture   {f['architecture'] or 'unknown'}",
        f"name           {f['name'] or '-'}",
        f"parameters     {f['parameters'] / 1e6:,.1f} M ({f['parameters']:,}) "
        f"in {f['tensors']} tensors",
        f"context length {f['context_length'] or 'unknown'}",
        f"tokenizer      {tok}, {f['vocab_size'] or 'unknown'} tokens",
        f"chat template  {'yes' if f['chat_template'] else 'no'}",
        "quantization",
    ]
    for name, row in f["quantization"].items():
        lines.append(f"  {name:<8} {row['tensors']:>4} tensors  {_mib(row['bytes']):>14}")
    lines.append(f"VRAM estimate at ctx {vram['ctx'] or 'unknown'}")
    lines.append(f"  weights      {_mib(vram['weights_bytes'])}")
    if kv is None:
        lines.append("  KV cache     unknown (the file lacks layer/head counts)")
    else:
        lines.append(f"  KV cache     {_mib(vram['kv_cache_bytes'])} (fp16; {kv['n_layer']} layers x "
                     f"{kv['n_head_kv']} KV heads x {kv['head_dim_k']}+{kv['head_dim_v']} dims; "
                     f"from {kv['source']})")
    lines.append(f"  total        {_mib(vram['total_bytes'])}")
    return "\n".join(lines)
