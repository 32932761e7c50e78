"""What a request samples with and what a draw gives back: the request-side
types of sampling (``SamplingParams``, ``Sampled``, a batch row's ``RowDraw``),
their limits, and the defaults a request that leaves a field unset gets.

How the logits become an id -- the numpy reference and the device kernels --
lives in ``orcd.ops.sampling``, which takes these types.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from orcd.errors import ModelLoadFailed

#: temperatures below this sample greedily (vLLM's epsilon; llama.cpp: <= 0): dividing
#: float32 logits by a smaller one overflows them or divides by zero
GREEDY_BELOW_TEMPERATURE = 1e-5
#: > 0 (vLLM refuses <= 0 too): the penalty divides the float32 logits of tokens already
#: seen, so it must stay far from float32's smallest numbers as well
MIN_REPETITION_PENALTY = 1e-5
#: logprobs further down than this are reported as it (JSON has no -inf; vLLM's value)
LOGPROB_FLOOR = -9999.0
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """The filters one request samples with, every value explicit. The field
    defaults are the neutral ones (each filter off); what a request that leaves
    a field unset gets is ``request_defaults(metadata)``, applied by ``resolve``."""

    temperature: float = 1.0
    top_k: int = 0              # 0 = off
    top_p: float = 1.0          # 1 = off
    min_p: float = 0.0          # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None
    presence_penalty: float = 0.0    # 0 = off
    frequency_penalty: float = 0.0   # 0 = off
    logit_bias: tuple[tuple[int, float], ...] = ()   # (id, added to its logit)
    logprobs: int | None = None      # None: none; N >= 0: the chosen id's and the N best

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def counts_output(self) -> bool:
        """Whether the output's token counts matter (frequency or presence penalty)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @classmethod
    def resolve(cls, defaults: Mapping[str, Any], seed: int | None = None,
                **requested: Any) -> "SamplingParams":
        """The request's values where given (not None), else ``defaults``'."""
        values = {f.name: defaults[f.name] for f in fields(cls) if f.name in defaults}
        values.update({k: v for k, v in requested.items() if v is not None})
        return replace(cls(), **values, seed=seed)


@dataclass(frozen=True)
class Sampled:
    """One step's choice and, when asked for, its logprob and the best ``N``
    (id, logprob) of the processed logits, best first."""
    id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RowDraw:
    """One row's draw in a batch (``Backend.sample_rows``): row ``row`` of the
    logits, for the sequence ``key`` -- a backend may keep device state for it
    (the seen mask, the output counts) from one draw to the next, until
    ``release_rows([key])``. The rest are ``sample_step``'s arguments.
    ``chained``: the draw right after this sequence's last one, whose id has not
    reached the host (a pipelined step, ``Backend.launch_rows``): ``seen`` lacks
    that id, and the backend goes on from its own state."""
    key: object
    row: int
    params: SamplingParams
    seen: np.ndarray
    rng: np.random.Generator
    n_prompt: int | None = None
    allowed: np.ndarray | None = None
    chained: bool = False


#: llama-server's defaults for a field a request leaves unset, when the model
#: file recommends nothing (llama.cpp common_params_sampling).
LLAMA_SERVER_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.0})
#: The GGUF keys with which a model file recommends its sampling (llama.cpp's
#: ``general.sampling.*``), and the range a value must lie in to be used.
GGUF_SAMPLING_KEYS: Mapping[str, tuple[str, type, float, float]] = MappingProxyType({
    "temperature": ("general.sampling.temp", float, 0.0, 2.0),
    "top_k": ("general.sampling.top_k", int, 0, 2**31 - 1),
    "top_p": ("general.sampling.top_p", float, 0.0, 1.0),
    "min_p": ("general.sampling.min_p", float, 0.0, 1.0),
    "repetition_penalty": ("general.sampling.penalty_repeat", float, MIN_REPETITION_PENALTY, 2.0),
})


def request_defaults(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """What an unset field of a request means for this model: the value the
    GGUF recommends (``general.sampling.*``, where present and in range),
    else llama-server's default."""
    out = dict(LLAMA_SERVER_DEFAULTS)
    for name, (key, cast, lo, hi) in GGUF_SAMPLING_KEYS.items():
        try:
            value = cast(metadata[key])
        except (KeyError, TypeError, ValueError, ModelLoadFailed):
            continue  # absent or not a number: llama-server's default stands
        if lo <= value <= hi:
            out[name] = value
    return out
