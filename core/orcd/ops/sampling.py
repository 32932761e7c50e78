"""Sampling: temperature → repetition penalty → top-k → top-p → min-p → draw.

The reference draws from a per-request ``numpy.random.Generator`` (PCG64) seeded
with the request's seed, so the same seed and request give the same tokens.
Temperature 0 is argmax (after the repetition penalty).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0              # 0 = off
    top_p: float = 1.0          # 1 = off
    min_p: float = 0.0          # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """As llama.cpp: divide positive logits of seen ids by the penalty,
    multiply negative ones."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    out = logits.copy()
    ids = np.unique(seen)
    v = out[ids]
    out[ids] = np.where(v > 0, v / np.float32(penalty), v * np.float32(penalty))
    return out


def sample_ref(logits: np.ndarray, p: SamplingParams, seen: np.ndarray,
               rng: np.random.Generator) -> int:
    """logits [n_vocab] float32 -> token id."""
    logits = logits.astype(np.float32)
    if p.greedy:
        return int(np.argmax(apply_repetition_penalty(logits, seen, p.repetition_penalty)))
    logits = apply_repetition_penalty(logits / np.float32(p.temperature), seen,
                                      p.repetition_penalty)
    order = np.argsort(-logits, kind="stable")                    # candidates, best first
    if p.top_k > 0:
        order = order[:p.top_k]
    cand = logits[order].astype(np.float64)
    probs = np.exp(cand - cand[0])
    probs /= probs.sum()
    if p.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (at least one token)
        keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    if p.min_p > 0.0:
        keep = probs >= p.min_p * probs[0]
        order, probs = order[keep], probs[keep] / probs[keep].sum()
    u = rng.random()
    i = int(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"))
    return int(order[min(i, len(order) - 1)])
