"""Make the SmolLM2 parity goldens: llama.cpp's (llama-cpp-python, CPU, no
flash attention) greedy continuations and last-position top logits for the
real SmolLM2-135M-Instruct Q4_1 file, which orcd serves through the
llama plugin, plugins/llama.

    python scripts/make_smollm2_goldens.py

Writes tests/golden/smollm2/greedy.json; tests/plugins/test_llama_plugin.py compares
orcd's CPU reference (ggml-cpu roundings, docs/parity.md) with it. The oracle
plumbing is make_parity_goldens.py's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_parity_goldens import TOP_LOGITS, greedy, llama, llama_logits, qwen_prompt_ids  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden" / "smollm2"
MODEL = "smollm2-135m"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
N_CTX = 512

PROMPTS = [  # (kind, text): "chat" goes through the GGUF chat template
    ("chat", "What is the capital of France?"),
    ("chat", "Write a haiku about GPU computing"),
    ("chat", "Give me three tips for staying focused."),
    ("chat", "What is 12 times 7?"),
    ("plain", "Once upon a time, in a small village,"),
    ("plain", "def fibonacci(n):"),
    ("plain", "The three primary colors are"),
    ("chat", "Name a famous scientist and say why they matter."),
    ("chat", "Translate 'good morning' into Spanish."),
    ("plain", "import numpy as np\n\n# compute the mean of"),
    ("plain", "The capital of France is"),
    ("plain", "Water boils at"),
]


def main() -> None:
    from orcd.gguf_file import ModelFile
    from orcd.plugins import PluginHost
    from orcd.pull import pull

    host = PluginHost()
    path = pull(MODEL)
    tok = host.tokenizer(ModelFile.open(path))
    llm = llama(path, N_CTX)
    cases = []
    for kind, text in PROMPTS:
        ids = qwen_prompt_ids(tok, kind, text)  # plain: encode; chat: the GGUF template
        last = llama_logits(llm, ids)[-1]
        top = np.argsort(-last)[:TOP_LOGITS]
        out = greedy(llm, ids, set(tok.eog_ids))
        cases.append({"kind": kind, "text": text, "prompt_ids": ids, "greedy_ids": out,
                      "greedy_text": tok.decode(out),
                      "top_ids": top.tolist(), "top_logits": last[top].round(5).tolist()})
        print(kind, repr(text[:40]), "->", repr(cases[-1]["greedy_text"][:60]))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "greedy.json").write_text(json.dumps(
        {"model": MODEL, "model_sha256": SHA256, "n_ctx": N_CTX,
         "oracle": "llama-cpp-python 0.3.36, CPU, flash_attn=False", "cases": cases}, indent=1,
        ensure_ascii=False))


if __name__ == "__main__":
    main()
