#!/usr/bin/env python3
"""Tokenizer speed: build time and encode time of a 32k-character prompt, per backend.

    python bench/bench_tokenizer.py [--qwen /tmp/models/qwen.gguf] [--chars 32768]

Prints one line per backend; not a test. "cold" is the first encode of the
prompt (empty word cache), "warm" the median of the repeats.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench(name: str, build, prompt: str, repeats: int) -> None:
    t0 = time.perf_counter()
    tok = build()
    t_build = time.perf_counter() - t0
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        ids = tok.encode(prompt, add_special=False)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    tok.decode(ids)
    t_dec = time.perf_counter() - t0
    print(f"{name:<10} {tok.kind:<9} build {t_build * 1e3:7.0f} ms   encode {len(prompt)} chars -> "
          f"{len(ids)} tokens: cold {times[0] * 1e3:6.1f} ms, warm {statistics.median(times[1:]) * 1e3:6.1f} ms"
          f"   decode {t_dec * 1e3:5.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qwen", default="/tmp/models/qwen.gguf")
    ap.add_argument("--chars", type=int, default=32_768)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    from orcd.gguf_file import ModelFile
    from orcd.plugins import PluginHost

    host = PluginHost()
    goldens = load_script("make_tokenizer_goldens")
    prompt = goldens.long_text(args.chars, seed=42)
    models = {}
    if Path(args.qwen).is_file():
        models["qwen"] = ModelFile.open(args.qwen)  # GGUF reading is not the tokenizer's cost
        bench("qwen", lambda: host.tokenizer(models["qwen"]), prompt, args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = json.loads((ROOT / "tests/golden/tokenizer/spm_vocab.json").read_text())
        models["phi3"] = ModelFile.open(goldens.write_spm_gguf(vocab, Path(tmp) / "phi3.gguf"))
        bench("phi3-spm", lambda: host.tokenizer(models["phi3"]), prompt, args.repeats)
    try:
        path = load_script("make_o200k_harmony").cached()
    except SystemExit as e:
        print(f"o200k      skipped: {e}", file=sys.stderr)
    else:
        bench("o200k", lambda: host.tokenizer(None, path), prompt, args.repeats)


if __name__ == "__main__":
    main()
