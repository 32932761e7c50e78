"""The generation loop: prefill, decode, sample, detokenize, stop.

``Engine.generate`` runs one request alone (``orcd generate``; ``orcd serve
--max-batch 1``); orcd.scheduler runs many together. Both feed sampled ids to
a ``Generation``, which stops, detokenizes and emits each complete text piece
through ``on_token`` the same way.

Cancellation and the deadline are checked between tokens and between prefill
chunks; a backend states its chunk (``prefill_chunk``) so that one chunk is a
short time on it.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from orcd.detok import StreamDecoder
from orcd.errors import Cancelled, InferenceTimeout, InvalidRequest
from orcd.sampling import RowDraw, Sampled, SamplingParams

PREFILL_CHUNK = 512  # prompt tokens per forward (unless the backend states its own)
MIN_CACHE = 256      # smallest KV cache; sizes are powers of two so a pooled cache is reused


def cache_size(n_tokens: int, n_ctx: int) -> int:
    """KV positions to allocate for a request of ``n_tokens`` (prompt + max_tokens):
    the next power of two, at least MIN_CACHE, at most the context length."""
    size = MIN_CACHE
    while size < n_tokens:
        size *= 2
    return min(size, n_ctx)


class TokenConstraint(Protocol):
    """Which ids may come next (a grammar; orcd.grammar's matcher is one).
    The engine asks ``allowed()`` before each draw, on the CPU while the
    device still runs the forward it just queued, and reports each id it keeps
    (end-of-generation ids are never reported)."""

    def allowed(self) -> np.ndarray | None:
        """int32 bitmask words over the model's vocabulary (bit i % 32 of word
        i // 32 set = id i allowed), or None for no restriction this step."""

    def accept(self, token_id: int) -> None:
        """The id was drawn and kept."""


@dataclass
class GenerateRequest:
    prompt_ids: Sequence[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    cancelled: Callable[[], bool] = lambda: False
    deadline: float | None = None      # time.monotonic() after which to give up
    constraint: TokenConstraint | None = None   # e.g. a JSON schema's grammar
    # True: the caller already passed this request through Engine.check against
    # this engine, so it is not checked again. The server checks when it plans a
    # job (a bad request is then a 400 before it queues, not an error event after
    # "started") and marks the job; running it does not scan the prompt a second
    # time on the inference thread, where every stream waits.
    checked: bool = False


@dataclass
class TokenEvent:
    index: int       # 0-based position in the output
    token_id: int
    text: str        # complete UTF-8 text released by this token (may be "")
    # with SamplingParams.logprobs: one per token this piece's text came from
    # (the tokens since the previous event), in order
    logprobs: list[Sampled] = field(default_factory=list)


@dataclass
class GenerateResult:
    stop_reason: str  # "eog" | "stop_sequence" | "max_tokens"
    token_ids: list[int]
    text: str
    prompt_tokens: int
    ttft_ms: float
    decode_time_ms: float
    seed: int | None = None   # the seed actually used (drawn when the request had none)

    @property
    def tokens_out(self) -> int:
        return len(self.token_ids)


class Runner:
    """Runs the model forward eagerly; a backend may supply a faster one
    (the CUDA backend replays one captured graph per decode step)."""

    def __init__(self, model, backend, cache) -> None:
        self.model, self.backend, self.cache = model, backend, cache

    def forward(self, ids: Sequence[int], start: int):
        b = self.backend
        return self.model.forward(b.ops, b.ids(ids), b.positions(start, len(ids)), self.cache)


def decode_tokens(backend, runner, logits, params: SamplingParams, seen: Callable[[int], np.ndarray],
                  rng: np.random.Generator, n_prompt: int, max_tokens: int,
                  interrupt: Callable[[], None] = lambda: None) -> Iterator[int]:
    """The sampled ids of a request, at most ``max_tokens``, one at a time, after its
    prefill ``logits``.

    ``seen(k)``: prompt + the first k output ids (for the repetition penalty; the
    caller fills it as ids arrive). ``interrupt()`` raises to stop (cancel,
    deadline) and is called before each decode step is queued. The caller stops
    pulling when it is done (end of generation, stop string, max_tokens).

    Where the backend can sample on the device into the next step's input
    (CudaBackend.sample_to_device), step k+1 and its sampling are queued before
    id k is read on the host: the GPU runs while the host detokenizes, matches
    stop strings and streams (a step may run past the end, its id unused).
    Elsewhere each step waits for the id before it."""
    pending = None
    if hasattr(runner, "forward_pending") and hasattr(backend, "sample_to_device"):
        pending = backend.sample_to_device(logits, params, seen(0))
    if pending is None:
        for k in range(1, max_tokens + 1):
            tok = backend.sample(logits, params, seen(k - 1), rng)
            yield tok
            if k < max_tokens:
                interrupt()
                logits = runner.forward([tok], n_prompt + k - 1)
        return
    k = 0
    while k < max_tokens:
        nxt = None
        if k + 1 < max_tokens:       # queue step k+1 on id k, still on the device
            interrupt()
            nxt = backend.sample_to_device(runner.forward_pending(n_prompt + k), params, chained=True)
        yield pending.result()
        pending, k = nxt, k + 1


def decode_steps(backend, runner, logits, params: SamplingParams,
                 seen: Callable[[int], np.ndarray], rng: np.random.Generator, n_prompt: int,
                 max_tokens: int, interrupt: Callable[[], None] = lambda: None,
                 constraint: TokenConstraint | None = None) -> Iterator[Sampled]:
    """``decode_tokens`` for requests that need the host between draws (a
    grammar, logprobs, output-count penalties): one step at a time, each a
    ``Sampled`` from ``backend.sample_step``. The caller reports each kept id to
    ``constraint`` before pulling the next; its mask for step k+1 is computed
    after that step's forward is queued, so on the GPU the two overlap."""
    for k in range(1, max_tokens + 1):
        allowed = constraint.allowed() if constraint is not None else None
        step = backend.sample_step(logits, params, seen(k - 1), rng, n_prompt=n_prompt,
                                   allowed=allowed)
        yield step
        if k < max_tokens:
            interrupt()
            logits = runner.forward([step.id], n_prompt + k - 1)


def _as_sampled(tokens: Iterator[int]) -> Iterator[Sampled]:
    try:
        for tok in tokens:
            yield Sampled(tok)
    finally:
        tokens.close()


class StopMatcher:
    """Holds back only text that could still grow into a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string matched)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = self._partial_suffix()
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def _partial_suffix(self) -> int:
        """Length of the longest suffix of pending that begins some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class _Output:
    """Token ids -> the text a client sees: whole UTF-8 only, stop strings held
    back and cut, each released piece passed to ``on_token``."""

    def __init__(self, tokenizer, stops: Sequence[str], on_token: Callable[[TokenEvent], None]):
        self.detok, self.stops, self.on_token = StreamDecoder(tokenizer), StopMatcher(stops), on_token
        self.pieces: list[str] = []
        self.logprobs: list[Sampled] = []   # the tokens not yet released with an event

    def push(self, token_id: int, index: int, sampled: Sampled | None = None) -> bool:
        """Feed one generated token; True when a stop string matched."""
        if sampled is not None and sampled.logprob is not None:
            self.logprobs.append(sampled)
        text, hit = self.stops.push(self.detok.feed(token_id))
        self._emit(text, index, token_id)
        return hit

    def finish(self, ids: list[int]) -> bool:
        """Release what the decoder and the matcher still hold; True on a late stop match."""
        tail, hit = self.stops.push(self.detok.flush())
        tail += "" if hit else self.stops.flush()
        self._emit(tail, max(len(ids) - 1, 0), ids[-1] if ids else -1)
        return hit

    def _emit(self, text: str, index: int, token_id: int) -> None:
        if text:
            self.pieces.append(text)
            self.on_token(TokenEvent(index, token_id, text, self.logprobs))
            self.logprobs = []

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def fresh_seed() -> int:
    """A random uint64 seed for a request that gave none (the only place one is drawn)."""
    return secrets.randbits(64)


def with_seed(params: SamplingParams) -> SamplingParams:
    """``params`` with a seed: its own, else a fresh one, reported back
    (GenerateResult.seed) so the run can be reproduced. Whoever first needs the
    seed calls this and the request carries it from then on, so it is drawn once:
    the server when it plans a job (the seed is reported before the job runs, and
    n choices take seed + i), ``Generation`` for a direct caller."""
    return params if params.seed is not None else replace(params, seed=fresh_seed())


def seeded(params: SamplingParams) -> tuple[SamplingParams, np.random.Generator]:
    """The request's sampling with its seed (``with_seed``) and the generator that seed starts."""
    params = with_seed(params)
    return params, np.random.Generator(np.random.PCG64(params.seed))


def interrupt(req: GenerateRequest) -> None:
    """Raise when the request was cancelled or its deadline has passed."""
    if req.cancelled():
        raise Cancelled("the request was cancelled")
    if req.deadline is not None and time.monotonic() > req.deadline:
        raise InferenceTimeout("the inference timeout was exceeded")


class Generation:
    """One request's side of the decode loop, whoever runs its forwards
    (``Engine.generate`` alone, or the scheduler among others): its seeded
    sampling, the ids it has seen, each sampled id taken in order -- end of
    generation, the grammar's bookkeeping, stop strings, max_tokens -- and the
    text released to ``on_token``. Both paths feed it the same ids, so they
    end the same way."""

    def __init__(self, req: GenerateRequest, tokenizer,
                 on_token: Callable[[TokenEvent], None]) -> None:
        self.req, self.eog_ids = req, tokenizer.eog_ids
        self.params, self.rng = seeded(req.sampling)
        self.n_prompt = len(req.prompt_ids)
        # prompt + output ids for the repetition penalty, filled in place: each step
        # passes a view instead of building a new array from two lists
        self.seen = np.empty(self.n_prompt + req.max_tokens, dtype=np.int64)
        self.seen[:self.n_prompt] = req.prompt_ids
        self.ids: list[int] = []
        self.out = _Output(tokenizer, req.stop, on_token)
        self.reason: str | None = None    # set when done
        self.t0, self.t_first = time.perf_counter(), None

    def seen_at(self, k: int) -> np.ndarray:
        """The prompt and the first k output ids."""
        return self.seen[:self.n_prompt + k]

    def sample(self, backend, logits) -> Sampled:
        """Draw the next id from ``logits`` (this request's row) on the host:
        the grammar's mask, penalties over what it has seen, its own generator."""
        c = self.req.constraint
        return backend.sample_step(logits, self.params, self.seen_at(len(self.ids)), self.rng,
                                   n_prompt=self.n_prompt,
                                   allowed=c.allowed() if c is not None else None)

    def draw(self, key, row: int) -> RowDraw:
        """This request's next draw from row ``row`` of a batch's logits, as
        ``sample`` makes it (Backend.sample_rows; ``key`` names the sequence)."""
        c = self.req.constraint
        return RowDraw(key, row, self.params, self.seen_at(len(self.ids)), self.rng, self.n_prompt,
                       c.allowed() if c is not None else None)

    def take(self, step: Sampled) -> bool:
        """Take the next sampled id; True when the request is done (``reason`` says why)."""
        tok = step.id
        self.t_first = self.t_first or time.perf_counter()
        if tok in self.eog_ids:
            self.reason = "eog"
            return True
        if self.req.constraint is not None:
            self.req.constraint.accept(tok)
        self.seen[self.n_prompt + len(self.ids)] = tok
        self.ids.append(tok)
        if self.out.push(tok, len(self.ids) - 1, step):
            self.reason = "stop_sequence"
        elif len(self.ids) == self.req.max_tokens:
            self.reason = "max_tokens"
        return self.reason is not None

    def result(self) -> GenerateResult:
        """Release the text still held back and sum the request up."""
        reason = self.reason or "max_tokens"
        if reason != "stop_sequence" and self.out.finish(self.ids):
            reason = "stop_sequence"
        t_first = self.t_first or time.perf_counter()
        return GenerateResult(reason, self.ids, self.out.text, self.n_prompt,
                              (t_first - self.t0) * 1000, (time.perf_counter() - t_first) * 1000,
                              seed=self.params.seed)


class Engine:
    def __init__(self, loaded) -> None:
        self.lm = loaded
        self.tokenizer = loaded.tokenizer

    def check(self, req: GenerateRequest) -> None:
        """Raise InvalidRequest unless ``req`` fits this model. Every way into the
        engine (``generate``, Scheduler.add) calls it, so a direct caller (orcd
        generate, the tests) is protected as well; a request marked ``checked``
        passed it already and is let through (GenerateRequest.checked says why)."""
        if not req.checked:
            self._validate(req)

    def _validate(self, req: GenerateRequest) -> None:
        """A prompt, within the context with its max_tokens, every id in the vocabulary."""
        n_prompt, n_ctx = len(req.prompt_ids), self.lm.n_ctx
        if n_prompt == 0:
            raise InvalidRequest("the prompt encodes to no tokens", field="prompt")
        if n_prompt + req.max_tokens > n_ctx:
            raise InvalidRequest(f"prompt ({n_prompt} tokens) + max_tokens ({req.max_tokens}) "
                                 f"exceeds the context length {n_ctx}", field="max_tokens")
        bad = [i for i in req.prompt_ids if not 0 <= i < self.lm.hp.n_vocab]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} outside the vocabulary", field="prompt")

    def new_runner(self, n_tokens: int | None = None):
        """A runner with a KV cache for ``n_tokens`` positions (default: the whole
        context). Sizing per request keeps a short request from needing the whole
        context's cache: if that does not fit, only the large request gets VRAM_OOM."""
        b, hp = self.lm.backend, self.lm.hp
        n = self.lm.n_ctx if n_tokens is None else cache_size(n_tokens, self.lm.n_ctx)
        cache = b.new_kv_cache(hp.n_layer, n, hp.n_head_kv, hp.head_dim, hp.get("head_dim_v"))
        make = getattr(b, "make_runner", None)
        return make(self.lm.model, cache) if make else Runner(self.lm.model, b, cache)

    def generate(self, req: GenerateRequest,
                 on_token: Callable[[TokenEvent], None] = lambda ev: None) -> GenerateResult:
        self.check(req)
        gen = Generation(req, self.tokenizer, on_token)
        runner = self.new_runner(gen.n_prompt + req.max_tokens)
        logits = self._prefill(runner, list(req.prompt_ids), req)
        args = (self.lm.backend, runner, logits, gen.params, gen.seen_at, gen.rng, gen.n_prompt,
                req.max_tokens, lambda: interrupt(req))
        steps = (decode_steps(*args, req.constraint) if self.host_steps(req, gen.params)
                 else _as_sampled(decode_tokens(*args)))
        for step in steps:
            if gen.take(step):
                break
        steps.close()
        return gen.result()

    @staticmethod
    def host_steps(req: GenerateRequest, params: SamplingParams) -> bool:
        """Whether each step needs the host between draws: a grammar's mask
        depends on the id before, logprobs are read per step, and frequency /
        presence penalties count the output with the prompt split known."""
        return req.constraint is not None or params.logprobs is not None or params.counts_output

    def _prefill(self, runner, prompt: list[int], req: GenerateRequest):
        """Logits after the prompt, fed in chunks; cancellation and the deadline are
        checked between them, so a job overruns its deadline by at most one chunk."""
        chunk = getattr(self.lm.backend, "prefill_chunk", PREFILL_CHUNK)
        logits = None
        for start in range(0, len(prompt), chunk):
            interrupt(req)
            logits = runner.forward(prompt[start:start + chunk], start)
        return logits

