"""A backend ``sample_step`` that plays back fixed ids: served tests make a
model "write" a given text (a tool call, harmony output) through the real
engine, parser and routes."""

from __future__ import annotations

from orcd.sampling import Sampled


def scripted_steps(ids: list[int]):
    """``sample_step`` returning ``ids`` in turn, starting over with each request
    (a call whose ``seen`` is not one longer than at the call before)."""
    at = {"k": 0, "len": -1}

    def step(logits, params, seen, rng, n_prompt=None, allowed=None):
        at["k"] = at["k"] + 1 if len(seen) == at["len"] + 1 else 0
        at["len"] = len(seen)
        return Sampled(ids[at["k"]])
    return step
