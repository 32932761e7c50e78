"""Make the parity goldens: what llama.cpp (through llama-cpp-python, on the CPU)
computes for the same GGUF files orcd loads.

    python scripts/make_parity_goldens.py            # all
    python scripts/make_parity_goldens.py --only tiny

Writes tests/golden/parity/qwen_greedy.json (real Qwen2.5-Coder-0.5B Q4_K_M:
greedy continuations and last-position top logits) and tiny_logits.npz (tiny
synthetic qwen2/phi3/gpt-oss models from orcd synth: logits at every position
of a 16-token prompt). llama.cpp runs without flash attention, whose CPU path
accumulates in fp16; the tests compare with orcd's reference in its ggml-cpu
rounding mode, which mirrors llama.cpp's CPU numerics (docs/parity.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden" / "parity"
N_GREEDY = 32
TOP_LOGITS = 64
TINY_PRESETS = ("qwen2-tiny", "phi3-tiny", "phi3-tiny-q4_0", "gpt-oss-tiny")
TINY_PROMPT_LEN = 16

QWEN_PROMPTS = [  # (kind, text): "chat" goes through the GGUF chat template
    ("chat", "Write a haiku about GPU computing"),
    ("chat", "What is 2+2?"),
    ("chat", "Explain what a CUDA graph is in one sentence."),
    ("chat", "用一句话介绍你自己"),
    ("plain", "def fibonacci(n):"),
    ("plain", "import numpy as np\n\n# compute the mean of"),
    ("plain", "The capital of France is"),
    ("plain", "// A C function that reverses a string\n"),
]


def llama(path: Path, n_ctx: int):
    import llama_cpp
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, flash_attn=False,
                           n_threads=2, n_batch=n_ctx, verbose=False)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), n_vocab] after evaluating ``ids`` from an empty cache."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def qwen_prompt_ids(tokenizer, kind: str, text: str) -> list[int]:
    if kind == "plain":
        return tokenizer.encode(text, add_special=True, parse_special=True)
    from orcd.chat import ChatTemplate
    return ChatTemplate.for_tokenizer(tokenizer).prompt_ids(tokenizer, [{"role": "user", "content": text}])


def greedy(llm, ids: list[int], eog: set[int]) -> list[int]:
    out: list[int] = []
    llm.reset()
    llm.eval(ids)
    while len(out) < N_GREEDY:
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if tok in eog:
            break
        out.append(tok)
        llm.eval([tok])
    return out


def make_qwen(host) -> None:
    from orcd.gguf_file import ModelFile
    from orcd.pull import pull

    path = pull("qwen2.5-coder-0.5b")
    tok = host.tokenizer(ModelFile.open(path))
    llm = llama(path, 512)
    cases = []
    for kind, text in QWEN_PROMPTS:
        ids = qwen_prompt_ids(tok, kind, text)
        last = llama_logits(llm, ids)[-1]
        top = np.argsort(-last)[:TOP_LOGITS]
        cases.append({"kind": kind, "text": text, "prompt_ids": ids,
                      "greedy_ids": greedy(llm, ids, set(tok.eog_ids)),
                      "top_ids": top.tolist(), "top_logits": last[top].round(5).tolist()})
        print(kind, repr(text[:40]), len(cases[-1]["greedy_ids"]), "tokens")
    (OUT / "qwen_greedy.json").write_text(json.dumps(
        {"model_sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
         "oracle": "llama-cpp-python 0.3.36, CPU, flash_attn=False", "cases": cases}, indent=1))


def make_tiny(host) -> None:
    from orcd.devkit.synth import synthesize

    arrays = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in TINY_PRESETS:
            path = synthesize(host, preset, Path(tmp) / f"{preset}.gguf", seed=0)
            llm = llama(path, 64)
            ids = np.random.default_rng(1).integers(3, llm.n_vocab(), TINY_PROMPT_LEN).tolist()
            arrays[f"{preset}/ids"] = np.array(ids, np.int32)
            arrays[f"{preset}/logits"] = llama_logits(llm, ids)
            arrays[f"{preset}/sha256"] = np.frombuffer(
                hashlib.sha256(path.read_bytes()).digest(), np.uint8)
            print(preset, arrays[f"{preset}/logits"].shape)
    np.savez_compressed(OUT / "tiny_logits.npz", **arrays)


TEACHER_TEXT_TOKENS = 256


def make_reference(host) -> None:
    """orcd's own float32 reference on the real Qwen (what the GPU path is held
    to): top-1 and the top-2 margin at each of 256 teacher-forced positions, and
    greedy continuations of the parity prompts with the margin of every step."""
    from orcd.engine import Engine, GenerateRequest
    from orcd.load import load_model
    from orcd.sampling import SamplingParams
    from orcd.pull import pull

    lm = load_model(pull("qwen2.5-coder-0.5b"), host=host, device="cpu", n_ctx=512)
    text = (Path(__file__).resolve().parent.parent / "docs" / "architecture.md").read_text()
    ids = lm.tokenizer.encode(text)[:TEACHER_TEXT_TOKENS]
    b = lm.backend
    cache = b.new_kv_cache(lm.hp.n_layer, lm.n_ctx, lm.hp.n_head_kv, lm.hp.head_dim)
    logits = b.to_host(lm.model.forward(b.ops, b.ids(ids), b.positions(0, len(ids)), cache,
                                        last_only=False))
    top2 = np.sort(logits, axis=-1)[:, -2:]
    teacher = {"ids": ids, "top1": logits.argmax(-1).tolist(),
               "margin": (top2[:, 1] - top2[:, 0]).round(5).tolist()}
    engine = Engine(lm)
    prompts = json.loads((OUT / "qwen_greedy.json").read_text())["cases"]
    greedy = []
    for case in prompts:
        res = engine.generate(GenerateRequest(case["prompt_ids"], N_GREEDY,
                                              SamplingParams(temperature=0.0)))
        seq = case["prompt_ids"] + res.token_ids
        step = b.to_host(lm.model.forward(b.ops, b.ids(seq), b.positions(0, len(seq)),
                                          b.new_kv_cache(lm.hp.n_layer, lm.n_ctx, lm.hp.n_head_kv,
                                                         lm.hp.head_dim), last_only=False))
        s = np.sort(step[len(case["prompt_ids"]) - 1:], axis=-1)[:, -2:]
        greedy.append({"prompt_ids": case["prompt_ids"], "ids": res.token_ids,
                       "margin": (s[:, 1] - s[:, 0]).round(5).tolist()})
    (OUT / "qwen_reference.json").write_text(json.dumps(
        {"source": "orcd CPU reference, float32 activations", "teacher": teacher,
         "greedy": greedy}))
    lm.close()


def main() -> None:
    from orcd.plugins import PluginHost

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["qwen", "tiny", "reference"])
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    host = PluginHost()
    if args.only in (None, "tiny"):
        make_tiny(host)
    if args.only in (None, "qwen"):
        make_qwen(host)
    if args.only in (None, "reference"):
        make_reference(host)


if __name__ == "__main__":
    main()
