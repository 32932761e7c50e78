"""Sampling: temperature → repetition penalty → top-k → top-p → min-p → draw.

The reference draws from a per-request ``numpy.random.Generator`` (PCG64) seeded
with the request's seed, so the same seed and request give the same tokens.
Temperature 0 is argmax (after the repetition penalty).
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

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @classmethod
    def resolve(cls, defaults: Mapping[str, Any], seed: int | None = None,
                **requested: Any) -> "SamplingParams":
        """The request's values where given (not None), else ``defaults``'."""
        values = {f.name: defaults[f.name] for f in fields(cls) if f.name in defaults}
        values.update({k: v for k, v in requested.items() if v is not None})
        return replace(cls(), **values, seed=seed)


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


# ---------------------------------------------------------------------------------
# CUDA: the same filters on the device (sampling.cu); only the chosen id leaves it.
# ---------------------------------------------------------------------------------

_PAD = 16384        # sampling.cu PAD: x is padded to a multiple of this
_PREP_TILE = 2048   # sampling.cu PREP_TILE: elements per sample_prepare block
_SELECT_THREADS = 1024
_PREP_THREADS = 256

#: sampling.cu SampleArgs, written before each launch.
SAMPLE_ARGS = np.dtype([("temperature", "<f4"), ("penalty", "<f4"), ("top_p", "<f4"),
                        ("min_p", "<f4"), ("top_k", "<i4"), ("step", "<i4"), ("seed", "<u8")])
#: sampling.cu SampleInfo, written by the kernel (tests and diagnostics).
SAMPLE_INFO = np.dtype([("klast", "<u8"), ("xmax", "<f4"), ("z", "<f4"), ("n_kept", "<i4"),
                        ("slow", "<i4")])


def sort_keys(x: np.ndarray) -> np.ndarray:
    """The device's unique sort keys of x [n] float32: larger value first, then
    lower id (numpy's stable argsort of -x); -0 equals +0."""
    x = np.where(x == 0, np.float32(0), x).astype(np.float32)
    u = x.view(np.uint32)
    ordered = np.where(u & 0x80000000, ~u, u | 0x80000000).astype(np.uint64)
    ids = np.arange(x.size, dtype=np.uint64)
    return (ordered << np.uint64(32)) | (np.uint64(0xFFFFFFFF) - ids)


class CudaSampler:
    """Device sampler for one vocabulary size: temperature → repetition penalty →
    top-k → top-p → min-p → a seeded draw, as ``sample_ref`` (same filters, same
    llama.cpp penalty, argmax with the lowest id on ties).

    ``CudaSampler(device, compiler, launcher, n_vocab, allocator=None)``: device
    buffers (scratch, the seen mask, the parameter struct) come from ``allocator``
    (purpose "workspace") or, without one, from a private ``DeviceAllocator``.

    Per request: ``reset(prompt_ids)`` once, then per token
    ``sample(logits, params, step, out_id)`` with ``logits`` a float32
    DeviceTensor [1, n_vocab] or [n_vocab] and ``out_id`` an int32 DeviceTensor
    [1]; the chosen id lands in ``out_id`` and is marked seen on the device, so
    the repetition penalty needs no host traffic. ``sample`` is
    ``set_params(params, step)`` (a 32-byte host→device copy) then
    ``launch(logits, out_id)`` (two kernels, no sync, no allocation): a decode
    graph captures ``launch`` and calls ``set_params`` before each replay.

    The draw is counter-based (splitmix64 of (seed, step); seed None = 0), so
    the same seed and request give the same ids on the same device; it is not
    numpy's PCG64 stream, so the ids differ from ``sample_ref``'s. Logits must
    be finite or -inf.
    """

    SOURCE = "sampling.cu"   # package data of orcd.ops (orcd.backend.cuda.kernel_sources lists it)

    def __init__(self, device, compiler, launcher, n_vocab: int, allocator=None) -> None:
        from orcd.cuda.memory import DeviceAllocator
        from orcd.cuda.nvrtc import KernelSource

        if n_vocab < 1:
            raise ValueError(f"n_vocab must be positive, got {n_vocab}")
        self.device, self.launcher, self.n_vocab = device, launcher, int(n_vocab)
        self.n_pad = -(-self.n_vocab // _PAD) * _PAD
        self.n_part = self.n_pad // _PREP_TILE
        module = compiler.load(device, KernelSource.from_package("orcd.ops", self.SOURCE))
        self._prepare = module.function("sample_prepare")
        self._select = module.function("sample_select")
        self._alloc = allocator if allocator is not None else DeviceAllocator(device)
        sizes = {"x": 4 * self.n_pad, "w": 4 * self.n_pad, "part_max": 4 * self.n_part,
                 "part_arg": 4 * self.n_part, "seen": 4 * self.n_vocab,
                 "args": SAMPLE_ARGS.itemsize, "info": SAMPLE_INFO.itemsize}
        bufs = self._alloc.alloc_all([(n, "workspace") for n in sizes.values()])
        self._buf = dict(zip(sizes, bufs))
        self._args_host = np.zeros(1, SAMPLE_ARGS)  # kept alive: source of the async copy
        self.reset(())

    # -- per request -------------------------------------------------------------
    def reset(self, prompt_ids) -> None:
        """Start a request: the seen mask = the prompt's ids (for the penalty)."""
        from orcd.cuda.memory import from_host

        ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            raise ValueError(f"prompt ids must lie in [0, {self.n_vocab})")
        mask = np.zeros(self.n_vocab, dtype=np.int32)
        mask[ids] = 1
        from_host(self.device, mask, self._buf["seen"].ptr)

    # -- per token ---------------------------------------------------------------
    def sample(self, logits, params: SamplingParams, step: int, out_id) -> None:
        """Choose the next id from ``logits`` into ``out_id`` (stream-ordered, no sync)."""
        self.set_params(params, step)
        self.launch(logits, out_id)

    def set_params(self, params: SamplingParams, step: int) -> None:
        """Write the parameter struct the kernels read (ordered on the stream)."""
        from orcd.cuda.memory import from_host_async

        a = self._args_host
        # the kernel's greedy test is temperature <= 0: one rule, SamplingParams.greedy
        a["temperature"] = 0.0 if params.greedy else params.temperature
        a["penalty"] = params.repetition_penalty
        a["top_p"], a["min_p"] = params.top_p, params.min_p
        a["top_k"] = params.top_k if 0 < params.top_k < self.n_vocab else 0
        a["step"] = int(step)
        a["seed"] = (params.seed or 0) & 0xFFFFFFFFFFFFFFFF
        from_host_async(self.device, a, self._buf["args"].ptr)

    def launch(self, logits, out_id) -> None:
        """Enqueue the two kernels; graph-capturable (reads params from the device)."""
        if logits.numel != self.n_vocab or np.dtype(logits.dtype) != np.float32:
            raise ValueError(f"logits must be float32 [{self.n_vocab}], got "
                             f"{np.dtype(logits.dtype)} {logits.shape}")
        if out_id.numel < 1 or np.dtype(out_id.dtype) != np.int32:
            raise ValueError(f"out_id must be int32 [1], got {np.dtype(out_id.dtype)} {out_id.shape}")
        b = self._buf
        self.launcher(self._prepare, self.n_part, _PREP_THREADS,
                      [np.uint64(logits.ptr), b["seen"], b["args"], b["x"], b["part_max"],
                       b["part_arg"], self.n_vocab])
        self.launcher(self._select, 1, _SELECT_THREADS,
                      [b["x"], b["w"], b["part_max"], b["part_arg"], self.n_part, b["args"],
                       b["seen"], np.uint64(out_id.ptr), b["info"], self.n_vocab, self.n_pad])

    # -- inspection (tests, diagnostics; these sync) ---------------------------------
    def info(self) -> dict:
        """What the last draw saw: klast (smallest kept key), xmax, z, n_kept, slow."""
        from orcd.cuda.memory import to_host

        raw = to_host(self.device, self._buf["info"].ptr, SAMPLE_INFO.itemsize).view(SAMPLE_INFO)[0]
        return {name: raw[name].item() for name in SAMPLE_INFO.names}

    def filtered(self) -> np.ndarray:
        """The transformed logits x [n_vocab] of the last call (after temperature and penalty)."""
        from orcd.cuda.memory import to_host

        return to_host(self.device, self._buf["x"].ptr, 4 * self.n_vocab).view(np.float32)

    def kept_ids(self) -> np.ndarray:
        """Ids the last draw chose among (sorted ascending)."""
        return np.flatnonzero(sort_keys(self.filtered()) >= np.uint64(self.info()["klast"]))

    def seen_mask(self) -> np.ndarray:
        from orcd.cuda.memory import to_host

        return to_host(self.device, self._buf["seen"].ptr, 4 * self.n_vocab).view(np.int32)

    def close(self) -> None:
        for buf in self._buf.values():
            self._alloc.free(buf)
        self._buf = {}
