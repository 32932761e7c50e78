"""The orcd side of a benchmark: load time, prefill and decode throughput,
time to first token, peak VRAM — measured through the same runner the engine
uses (batch 1, greedy, end-of-generation ignored so every run decodes the
same number of tokens)."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np


@dataclass
class BenchResult:
    model: str
    device: str
    prompt_tokens: int
    gen_tokens: int
    load_s: float
    prefill_tok_s: float
    decode_tok_s: float
    ttft_ms: float
    vram_bytes: int
    phases: dict = field(default_factory=dict)   # load_model's start-up phases, seconds

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(backend) -> None:
    sync = getattr(backend, "synchronize", None)
    if sync is not None:
        sync()


def prompt_ids(n_vocab: int, n: int, seed: int = 0) -> list[int]:
    """Deterministic pseudo-random prompt ids (content does not change timings)."""
    return np.random.default_rng(seed).integers(0, n_vocab, n).tolist()


def time_generation(lm, prompt: list[int], n_gen: int) -> tuple[float, float, float]:
    """(prefill seconds, time to first token seconds, decode seconds) for one run,
    decoding as the engine does (orcd.engine.decode_tokens: on the GPU the next step
    is queued before the last id reaches the host)."""
    from orcd.engine import Engine, decode_tokens
    from orcd.sampling import SamplingParams

    backend = lm.backend
    runner = Engine(lm).new_runner()
    greedy = SamplingParams(temperature=0.0)
    seen = np.zeros(0, np.int64)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    logits = runner.forward(prompt, 0)
    _sync(backend)
    t_prefill = time.perf_counter() - t0
    tokens = decode_tokens(backend, runner, logits, greedy, lambda k: seen, rng, len(prompt), n_gen)
    next(tokens)
    t_first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(n_gen - 1):
        next(tokens)
    _sync(backend)
    tokens.close()
    return t_prefill, t_first, time.perf_counter() - t1


def run_bench(path, *, host, device: str, prompt_tokens: int = 512, gen_tokens: int = 128,
              repeat: int = 3, progress: Callable[[str], None] = lambda s: None,
              **backend_options) -> BenchResult:
    from orcd.load import load_model

    t0 = time.perf_counter()
    lm = load_model(path, host=host, device=device, n_ctx=prompt_tokens + gen_tokens + 1, **backend_options)
    load_s = time.perf_counter() - t0
    try:
        prompt = prompt_ids(lm.hp.n_vocab, prompt_tokens)
        progress("warm-up")
        time_generation(lm, prompt[:8], 4)  # compiles kernels, captures graphs
        time_generation(lm, prompt, 1)      # plans the prefill GEMMs for this prompt length
        runs = []
        for r in range(repeat):
            progress(f"run {r + 1}/{repeat}")
            runs.append(time_generation(lm, prompt, gen_tokens))
        pre, first, dec = (statistics.median(x) for x in zip(*runs))
        vram = sum(lm.backend.memory_usage().values())
        return BenchResult(str(path), lm.backend.name, prompt_tokens, gen_tokens, load_s,
                           prompt_tokens / pre, (gen_tokens - 1) / dec, first * 1000, vram, lm.phases)
    finally:
        lm.close()
