"""Sampling, in this order (llama.cpp's and vLLM's):

    grammar mask -> logit_bias -> repetition penalty -> frequency / presence
    penalty -> [logprobs] -> temperature -> top-k -> top-p -> min-p -> draw

``process`` is everything before temperature: the logits "the sampler saw",
which is what logprobs are reported from (vLLM's ``processed_logprobs`` minus
temperature). The repetition penalty (llama.cpp's: divide positive logits,
multiply negative ones) covers prompt and output; frequency and presence
penalties (OpenAI's: ``- count * frequency - presence`` for every id generated
so far) cover the output only, as vLLM's. A grammar's mask is a bitmask of
allowed ids (int32 words, bit ``i % 32`` of word ``i // 32``, as llguidance's);
disallowed ids get -inf.

The reference draws from a per-request ``numpy.random.Generator`` (PCG64) seeded
with the request's seed, so the same seed and request give the same tokens.
Temperature 0 is argmax of the processed logits.
"""

from __future__ import annotations

import numpy as np

# the request-side types and limits live in orcd.sampling; re-exported here, where
# the reference and the kernels that take them are
from orcd.sampling import (GGUF_SAMPLING_KEYS, GREEDY_BELOW_TEMPERATURE, LLAMA_SERVER_DEFAULTS,  # noqa: F401
                           LOGPROB_FLOOR, MAX_TOP_LOGPROBS, MIN_REPETITION_PENALTY, RowDraw, Sampled,
                           SamplingParams, request_defaults)

def sample_rows(logits: np.ndarray, draws) -> list[Sampled]:
    """The reference for a batch: each draw's ``sample_step`` on its own row of
    host logits [rows, n_vocab], with its own generator."""
    return [sample_step(logits[d.row].reshape(-1), d.params, d.seen, d.rng, d.n_prompt, d.allowed)
            for d in draws]


def mask_words(n_vocab: int) -> int:
    """int32 words of a bitmask over ``n_vocab`` ids."""
    return (n_vocab + 31) // 32


def allowed_ids(allowed: np.ndarray, n_vocab: int) -> np.ndarray:
    """Bitmask words -> bool [n_vocab]."""
    bits = np.unpackbits(np.ascontiguousarray(allowed, dtype="<i4").view(np.uint8),
                         bitorder="little")
    return bits[:n_vocab].astype(bool)



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


def process(logits: np.ndarray, p: SamplingParams, seen: np.ndarray, n_prompt: int | None = None,
            allowed: np.ndarray | None = None) -> np.ndarray:
    """logits [n_vocab] -> the processed float32 logits (everything before
    temperature). ``seen`` = prompt + output ids; the output starts at
    ``n_prompt`` (None: no output counts). Each step rounds in float32 exactly
    as sampling.cu does (no fused multiply-add)."""
    x = np.array(logits, dtype=np.float32)   # a copy: callers' arrays stay as they were
    if allowed is not None:
        x[~allowed_ids(allowed, x.size)] = -np.inf
    if p.logit_bias:
        ids = np.fromiter((i for i, _ in p.logit_bias), np.int64)
        x[ids] += np.fromiter((b for _, b in p.logit_bias), np.float32)
    x = apply_repetition_penalty(x, np.asarray(seen), p.repetition_penalty)
    if p.counts_output and n_prompt is not None and len(seen) > n_prompt:
        ids, counts = np.unique(np.asarray(seen)[n_prompt:], return_counts=True)
        v = x[ids] - counts.astype(np.float32) * np.float32(p.frequency_penalty)
        x[ids] = v - np.float32(p.presence_penalty)
    return x


def transform(logits: np.ndarray, p: SamplingParams, seen: np.ndarray,
              n_prompt: int | None = None, allowed: np.ndarray | None = None) -> np.ndarray:
    """What the filters run on: ``process`` then temperature (none when greedy)
    -- the device sampler's ``x`` bit for bit."""
    x = process(logits, p, seen, n_prompt, allowed)
    return x if p.greedy else x / np.float32(p.temperature)


def choose(x: np.ndarray, p: SamplingParams, rng: np.random.Generator) -> int:
    """Transformed logits x [n_vocab] -> token id: top-k -> top-p -> min-p -> draw."""
    if p.greedy:
        return int(np.argmax(x))
    order = np.argsort(-x, kind="stable")                         # candidates, best first
    if p.top_k > 0:
        order = order[:p.top_k]
    cand = x[order].astype(np.float64)
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


def logprobs_of(x: np.ndarray, chosen: int, n: int) -> Sampled:
    """log_softmax of the processed logits x: the chosen id's and the n best
    (larger first, lower id on ties), floored at LOGPROB_FLOOR."""
    x64 = x.astype(np.float64)
    m = x64.max()
    lse = m + np.log(np.exp(x64 - m).sum()) if np.isfinite(m) else m
    order = np.argsort(-x, kind="stable")[:n]

    def lp(i) -> float:
        v = float(x64[i] - lse)
        return v if v > LOGPROB_FLOOR else LOGPROB_FLOOR
    return Sampled(int(chosen), lp(chosen), tuple((int(i), lp(i)) for i in order))


def sample_step(logits: np.ndarray, p: SamplingParams, seen: np.ndarray,
                rng: np.random.Generator, n_prompt: int | None = None,
                allowed: np.ndarray | None = None) -> Sampled:
    """The whole reference step: logits [n_vocab] -> Sampled (with logprobs
    when ``p.logprobs`` is set)."""
    x = process(logits, p, seen, n_prompt, allowed)
    tok = choose(x if p.greedy else x / np.float32(p.temperature), p, rng)
    if p.logprobs is None:
        return Sampled(tok)
    return logprobs_of(x, tok, p.logprobs)


def sample_ref(logits: np.ndarray, p: SamplingParams, seen: np.ndarray,
               rng: np.random.Generator, n_prompt: int | None = None,
               allowed: np.ndarray | None = None) -> int:
    """logits [n_vocab] float32 -> token id."""
    return choose(transform(logits, p, seen, n_prompt, allowed), p, rng)


# ---------------------------------------------------------------------------------
# CUDA: the same filters on the device (sampling.cu); only the chosen id leaves it.
# ---------------------------------------------------------------------------------

_PAD = 16384        # sampling.cu PAD: x is padded to a multiple of this
_PREP_TILE = 2048   # sampling.cu PREP_TILE: elements per sample_prepare block
_SELECT_THREADS = 1024
_PREP_THREADS = 256

#: sampling.cu SampleArgs, written before each launch.
SAMPLE_ARGS = np.dtype([("temperature", "<f4"), ("penalty", "<f4"), ("top_p", "<f4"),
                        ("min_p", "<f4"), ("presence", "<f4"), ("frequency", "<f4"),
                        ("top_k", "<i4"), ("step", "<i4"), ("flags", "<i4"), ("n_top", "<i4"),
                        ("seed", "<u8")])
USE_MASK, USE_BIAS, USE_COUNTS = 1, 2, 4   # SampleArgs.flags
#: sampling.cu LogprobOut, written by sample_logprobs / sample_logprob_pick.
LOGPROB_OUT = np.dtype([("lse", "<f4"), ("chosen", "<f4"), ("chosen_id", "<i4"), ("n_top", "<i4"),
                        ("top_id", "<i4", (MAX_TOP_LOGPROBS,)),
                        ("top_val", "<f4", (MAX_TOP_LOGPROBS,))])
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
    """Device sampler for one vocabulary size: mask → logit_bias → penalties →
    temperature → top-k → top-p → min-p → a seeded draw, as ``sample_ref`` (same
    filters, same float32 roundings, argmax with the lowest id on ties).

    ``CudaSampler(device, compiler, launcher, n_vocab, allocator=None)``: device
    buffers (scratch, the seen mask, the parameter struct) come from ``allocator``
    (purpose "workspace") or, without one, from a private ``DeviceAllocator``.

    Per request: ``reset(seen_ids, n_prompt)`` once, then per token
    ``sample(logits, params, step, out_id, allowed=None)`` with ``logits`` a
    float32 DeviceTensor [1, n_vocab] or [n_vocab] and ``out_id`` an int32
    DeviceTensor [1]; the chosen id lands in ``out_id`` and is marked seen and
    counted on the device, so the penalties need no host traffic. ``sample`` is
    ``set_params(params, step, allowed)`` (a 48-byte host→device copy, the
    grammar's bitmask when there is one, the dense logit_bias when it changed)
    then ``launch(logits, out_id, logprobs)`` (two kernels, four with logprobs;
    no sync, no allocation): a decode graph captures ``launch`` and calls
    ``set_params`` before each replay. ``logprobs()`` reads what the last
    launch with logprobs found (a sync and one small copy).

    The draw is counter-based (splitmix64 of (seed, step); seed None = 0), so
    the same seed and request give the same ids on the same device; it is not
    numpy's PCG64 stream, so the ids differ from ``sample_ref``'s. Logits must
    be finite or -inf.
    """

    SOURCE = "sampling.cu"   # package data of orcd.ops (orcd.backends.cuda.backend.kernel_sources lists it)

    def __init__(self, device, compiler, launcher, n_vocab: int, allocator=None) -> None:
        from orcd.backends.cuda.memory import DeviceAllocator
        from orcd.backends.cuda.nvrtc import KernelSource

        if n_vocab < 1:
            raise ValueError(f"n_vocab must be positive, got {n_vocab}")
        self.device, self.launcher, self.n_vocab = device, launcher, int(n_vocab)
        self.n_pad = -(-self.n_vocab // _PAD) * _PAD
        self.n_part = self.n_pad // _PREP_TILE
        module = compiler.load(device, KernelSource.from_package("orcd.ops", self.SOURCE))
        self._prepare = module.function("sample_prepare")
        self._select = module.function("sample_select")
        self._logprobs = module.function("sample_logprobs")
        self._pick = module.function("sample_logprob_pick")
        self._alloc = allocator if allocator is not None else DeviceAllocator(device)
        words = mask_words(self.n_vocab)
        sizes = {"x": 4 * self.n_pad, "w": 4 * self.n_pad, "part_max": 4 * self.n_part,
                 "part_arg": 4 * self.n_part, "seen": 4 * self.n_vocab,
                 "counts": 4 * self.n_vocab, "bias": 4 * self.n_vocab, "allowed": 4 * words,
                 "y": 4 * self.n_vocab, "lp": LOGPROB_OUT.itemsize,
                 "args": SAMPLE_ARGS.itemsize, "info": SAMPLE_INFO.itemsize}
        bufs = self._alloc.alloc_all([(n, "workspace") for n in sizes.values()])
        self._buf = dict(zip(sizes, bufs))
        self._args_host = np.zeros(1, SAMPLE_ARGS)  # kept alive: source of the async copy
        self._mask_host = np.zeros(words, dtype=np.int32)   # likewise
        self._bias: tuple = ()   # the logit_bias now in the device's dense bias array
        self.reset(())
        self._upload_bias(())

    # -- per request -------------------------------------------------------------
    def reset(self, seen_ids, n_prompt: int | None = None) -> None:
        """Start a request: the seen mask = ``seen_ids`` (prompt + output so far,
        for the repetition penalty) and the output counts = those from
        ``n_prompt`` on (None: no output yet)."""
        from orcd.backends.cuda.memory import from_host

        ids = np.asarray(seen_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            raise ValueError(f"prompt ids must lie in [0, {self.n_vocab})")
        mask = np.zeros(self.n_vocab, dtype=np.int32)
        mask[ids] = 1
        from_host(self.device, mask, self._buf["seen"].ptr)
        counts = np.zeros(self.n_vocab, dtype=np.int32)
        if n_prompt is not None:
            np.add.at(counts, ids[n_prompt:], 1)
        from_host(self.device, counts, self._buf["counts"].ptr)

    def _upload_bias(self, logit_bias) -> None:
        from orcd.backends.cuda.memory import from_host

        dense = np.zeros(self.n_vocab, dtype=np.float32)
        for i, b in logit_bias:
            if not 0 <= i < self.n_vocab:
                raise ValueError(f"logit_bias id {i} outside [0, {self.n_vocab})")
            dense[i] += np.float32(b)
        from_host(self.device, dense, self._buf["bias"].ptr)
        self._bias = tuple(logit_bias)

    # -- per token ---------------------------------------------------------------
    def sample(self, logits, params: SamplingParams, step: int, out_id,
               allowed: np.ndarray | None = None) -> None:
        """Choose the next id from ``logits`` into ``out_id`` (stream-ordered, no
        sync); ``allowed``: a grammar's bitmask words, or None."""
        self.set_params(params, step, allowed)
        self.launch(logits, out_id, logprobs=params.logprobs is not None)

    def set_params(self, params: SamplingParams, step: int,
                   allowed: np.ndarray | None = None) -> None:
        """Write the parameter struct the kernels read (ordered on the stream),
        the bitmask when there is one and the dense bias when it changed."""
        from orcd.backends.cuda.memory import from_host_async

        self.write_args(self._args_host, params, step, allowed)
        from_host_async(self.device, self._args_host, self._buf["args"].ptr)

    def write_args(self, a: np.ndarray, params: SamplingParams, step: int,
                   allowed: np.ndarray | None = None) -> None:
        """Fill ``a`` (a SAMPLE_ARGS array of one) for this draw, and queue this
        sampler's bitmask and changed dense bias to the device: ``set_params``
        without the struct's copy (sampling_rows copies a batch's at once)."""
        from orcd.backends.cuda.memory import from_host_async

        if tuple(params.logit_bias) != self._bias:
            self._upload_bias(params.logit_bias)
        # the kernel's greedy test is temperature <= 0: one rule, SamplingParams.greedy.
        # One tuple in SAMPLE_ARGS' field order: a batch writes one per row per step
        flags = ((USE_MASK if allowed is not None else 0) | (USE_BIAS if params.logit_bias else 0)
                 | (USE_COUNTS if params.counts_output else 0))
        a[0] = (0.0 if params.greedy else params.temperature, params.repetition_penalty,
                params.top_p, params.min_p, params.presence_penalty, params.frequency_penalty,
                params.top_k if 0 < params.top_k < self.n_vocab else 0, int(step), flags,
                min(params.logprobs or 0, MAX_TOP_LOGPROBS), (params.seed or 0) & 0xFFFFFFFFFFFFFFFF)
        if allowed is not None:
            if allowed.size != self._mask_host.size:
                raise ValueError(f"allowed must hold {self._mask_host.size} int32 words")
            self._mask_host[:] = allowed
            from_host_async(self.device, self._mask_host, self._buf["allowed"].ptr)

    def row_pointers(self, logits_ptr: int, args_ptr: int, out_ptr: int) -> tuple[int, ...]:
        """sampling.cu SampleRow: this sampler's buffers for one row of a batched
        draw (sampling_rows), its logits, parameter struct and output elsewhere."""
        b = self._buf
        return (logits_ptr, b["seen"].ptr, b["counts"].ptr, b["bias"].ptr, b["allowed"].ptr,
                args_ptr, b["x"].ptr, b["w"].ptr, b["part_max"].ptr, b["part_arg"].ptr,
                out_ptr, b["info"].ptr)

    def launch(self, logits, out_id, logprobs: bool = False) -> None:
        """Enqueue the kernels; graph-capturable (reads params from the device)."""
        if logits.numel != self.n_vocab or np.dtype(logits.dtype) != np.float32:
            raise ValueError(f"logits must be float32 [{self.n_vocab}], got "
                             f"{np.dtype(logits.dtype)} {logits.shape}")
        if out_id.numel < 1 or np.dtype(out_id.dtype) != np.int32:
            raise ValueError(f"out_id must be int32 [1], got {np.dtype(out_id.dtype)} {out_id.shape}")
        b = self._buf
        inputs = [np.uint64(logits.ptr), b["seen"], b["counts"], b["bias"], b["allowed"], b["args"]]
        self.launcher(self._prepare, self.n_part, _PREP_THREADS,
                      [*inputs, b["x"], b["part_max"], b["part_arg"], self.n_vocab])
        if logprobs:   # before select marks the chosen id seen and counted
            self.launcher(self._logprobs, 1, _SELECT_THREADS, [*inputs, b["y"], b["lp"], self.n_vocab])
        self.launcher(self._select, 1, _SELECT_THREADS,
                      [b["x"], b["w"], b["part_max"], b["part_arg"], self.n_part, b["args"],
                       b["seen"], b["counts"], np.uint64(out_id.ptr), b["info"], self.n_vocab,
                       self.n_pad])
        if logprobs:
            self.launcher(self._pick, 1, 32, [b["y"], np.uint64(out_id.ptr), b["lp"]])

    def logprobs(self) -> Sampled:
        """The last launch's chosen id with its logprob and the best ``n_top``
        (syncs). Values are float32 y - lse, floored as ``logprobs_of``."""
        from orcd.backends.cuda.memory import to_host

        raw = to_host(self.device, self._buf["lp"].ptr, LOGPROB_OUT.itemsize).view(LOGPROB_OUT)[0]
        lse = float(raw["lse"])

        def lp(v) -> float:
            d = float(np.float32(v) - np.float32(lse))
            return d if d > LOGPROB_FLOOR else LOGPROB_FLOOR
        n = int(raw["n_top"])
        return Sampled(int(raw["chosen_id"]), lp(raw["chosen"]),
                       tuple((int(i), lp(v)) for i, v in zip(raw["top_id"][:n], raw["top_val"][:n])))

    # -- inspection (tests, diagnostics; these sync) ---------------------------------
    def info(self) -> dict:
        """What the last draw saw: klast (smallest kept key), xmax, z, n_kept, slow."""
        from orcd.backends.cuda.memory import to_host

        raw = to_host(self.device, self._buf["info"].ptr, SAMPLE_INFO.itemsize).view(SAMPLE_INFO)[0]
        return {name: raw[name].item() for name in SAMPLE_INFO.names}

    def filtered(self) -> np.ndarray:
        """The transformed logits x [n_vocab] of the last call (``transform``'s)."""
        from orcd.backends.cuda.memory import to_host

        return to_host(self.device, self._buf["x"].ptr, 4 * self.n_vocab).view(np.float32)

    def kept_ids(self) -> np.ndarray:
        """Ids the last draw chose among (sorted ascending)."""
        return np.flatnonzero(sort_keys(self.filtered()) >= np.uint64(self.info()["klast"]))

    def seen_mask(self) -> np.ndarray:
        from orcd.backends.cuda.memory import to_host

        return to_host(self.device, self._buf["seen"].ptr, 4 * self.n_vocab).view(np.int32)

    def output_counts(self) -> np.ndarray:
        from orcd.backends.cuda.memory import to_host

        return to_host(self.device, self._buf["counts"].ptr, 4 * self.n_vocab).view(np.int32)

    def close(self) -> None:
        for buf in self._buf.values():
            self._alloc.free(buf)
        self._buf = {}
