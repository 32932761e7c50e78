"""What the endpoints share: the configuration, the loaded model, the inference thread,
and the path from a validated request to a queued job whose events arrive on
the event loop."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from orcd.engine import GenerateRequest, with_seed
from orcd.errors import InvalidRequest, Unavailable
from orcd.sampling import SamplingParams, request_defaults
from orcd.server.config import ServerConfig  # noqa: F401 - where the app's modules import it from
from orcd.server.inference import InferenceThread, Job
from orcd.server.jobstream import JobStream, Mailbox
from orcd.server.metrics import Metrics
from orcd.server.narration import Narrator
from orcd.server.schemas import MAX_PROMPT_CHARS, MAX_STOP_TOKENS

#: /v1 prompts may have this many characters per token of context (at least
#: MAX_PROMPT_CHARS): checked before tokenizing, which costs time and memory
#: in proportion to the text
CHARS_PER_CONTEXT_TOKEN = 8
#: threads that parse, render and tokenize requests (off the event loop; bounded,
#: so a flood of large bodies queues here instead of holding memory in parallel)
PREP_THREADS = 2
#: the prep threads' nice value (Linux: per thread): tokenizing runs without the GIL
#: and can fill every core, so the OS must prefer the event loop and the inference
#: thread whenever they have work
PREP_NICE = 10


class ServerState:
    """Mutable per-app state. ``status`` moves loading → healthy (or unhealthy);
    ``accepting`` turns False when shutdown begins."""

    def __init__(self, config: ServerConfig, narrator: Narrator) -> None:
        self.config, self.narrator = config, narrator
        self.metrics = Metrics()
        self.status = "loading"
        self.accepting = True
        self.load_error: BaseException | None = None
        self.loaded: Any = None
        self.engine: Any = None
        self.inference: InferenceThread | None = None
        self.chat_template: Any = None
        self.health_cache: dict[str, Any] = {}
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.request_exit: Callable[[], None] = lambda: None   # set by whoever runs uvicorn
        self.shutdown_task: asyncio.Task | None = None
        self.last_residency_check = float("-inf")
        self.prep = ThreadPoolExecutor(PREP_THREADS, thread_name_prefix="orcd-prep",
                                       initializer=_lower_priority)
        self._grammars: Any = None
        self._grammars_lock = threading.Lock()
        self._mailbox: Mailbox | None = None   # the event loop's, made on first submit

    # -- cached state for /health (no device calls on the request path) --------
    def can_take_work(self) -> bool:
        """/health answers 200 only then (503 while loading, unhealthy or draining)."""
        return self.status == "healthy" and self.accepting and self.inference is not None

    def health(self) -> dict[str, Any]:
        cfg = self.config
        out = {"status": self.status, "model": cfg.model_ref, "resident": False,
               "quant_kind": None, "vram_bytes_used": 0, "tokenizer_kind": None,
               "vocab_size": None, "context_length": None, "sm": None,
               "cuda_runtime_version": None, "device": cfg.health_device,
               "worker_id": cfg.worker_id}
        out.update(self.health_cache)
        inference = self.inference
        out["running"] = inference.running if inference is not None else 0
        out["waiting"] = inference.queue_depth if inference is not None else 0
        out["max_batch"] = cfg.max_batch
        out["uptime_seconds"] = round(time.monotonic() - self.started, 3)
        if not self.accepting:
            out["status"] = "unhealthy"
            out["shutting_down"] = True
        return out

    def require_ready(self) -> None:
        if self.status == "loading":
            raise Unavailable("the model is loading")
        if not self.accepting:
            raise Unavailable("the worker is shutting down")
        if self.status != "healthy" or self.inference is None:
            raise Unavailable(f"the worker is {self.status}")

    # -- requests → jobs ----------------------------------------------------------
    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run CPU work (JSON parsing, templating, tokenizing) on the prep threads:
        the event loop never waits on it, so /health and running streams stay live."""
        return await asyncio.get_running_loop().run_in_executor(self.prep, fn, *args)

    @property
    def prompt_char_limit(self) -> int:
        return max(MAX_PROMPT_CHARS, CHARS_PER_CONTEXT_TOKEN * self.loaded.n_ctx)

    def check_prompt_chars(self, n_chars: int, field: str) -> None:
        """Refuse a prompt too long for any context before tokenizing it."""
        limit = self.prompt_char_limit
        if n_chars > limit:
            raise InvalidRequest(f"the prompt has {n_chars} characters; at most {limit} are "
                                 f"accepted ({CHARS_PER_CONTEXT_TOKEN} per token of the "
                                 f"{self.loaded.n_ctx}-token context)", field=field)

    def encode(self, text: str) -> list[int]:
        """Raw prompt text → ids, special-token text parsed as the special token
        (as llama-server's /completion). CPU work: call it through ``off_loop``."""
        tok = self.loaded.tokenizer
        return tok.encode(text, add_special=True, parse_special=True)

    def sampling(self, *, temperature: float | None, top_p: float | None, top_k: int | None,
                 min_p: float | None, repetition_penalty: float | None,
                 seed: int | None) -> SamplingParams:
        """The request's sampling; a field it left unset (None) takes the
        model file's recommendation, else llama-server's default. A request
        without a seed gets one here, not in the engine: it is reported before
        the job runs, and each of n choices takes seed + i."""
        vocab = self.loaded.hp.n_vocab
        if top_k is not None and top_k > vocab:
            raise InvalidRequest(f"top_k must be at most the vocabulary size {vocab}",
                                 field="top_k")
        return with_seed(SamplingParams.resolve(
            request_defaults(self.loaded.file.metadata), seed=seed, temperature=temperature,
            top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty))

    def check_stops(self, stops: Sequence[str]) -> None:
        tok = self.loaded.tokenizer
        for s in stops:
            if len(tok.encode(s, add_special=False, parse_special=False)) > MAX_STOP_TOKENS:
                raise InvalidRequest(f"each stop string must be at most {MAX_STOP_TOKENS} tokens",
                                     field="stop")

    def max_tokens(self, requested: int | None, n_prompt: int) -> int:
        cap = self.config.max_tokens_out or self.loaded.n_ctx
        if requested is None:   # as much as fits, up to the operator's cap
            return max(1, min(cap, self.loaded.n_ctx - n_prompt))
        if requested > cap:
            raise InvalidRequest(f"max_tokens must be at most {cap} (--max-tokens-out)",
                                 field="max_tokens")
        return requested

    @property
    def grammars(self):
        """The model's grammar compiler (orcd.grammar.Grammars), made on first use."""
        with self._grammars_lock:   # the prep threads may ask at once
            if self._grammars is None:
                from orcd.grammar import Grammars
                self._grammars = Grammars(self.loaded.tokenizer, self.loaded.hp.n_vocab)
        return self._grammars

    def plan(self, job_id: str, prompt_ids: list[int], *, max_tokens: int | None,
             sampling: SamplingParams, stop: Sequence[str], prompt_text: str | None,
             constraint: Any = None, arrived: float | None = None) -> Planned:
        """Validate a job against the model (CPU work: through ``off_loop``).
        Raises InvalidRequest (400) or Unavailable (503). ``constraint``: a
        grammar (engine.TokenConstraint); ``arrived``: when the request came in.
        The engine's own check runs here, once: the job is marked checked
        (``submit``), so running it does not repeat it."""
        self.require_ready()
        self.check_stops(stop)
        n = self.max_tokens(max_tokens, len(prompt_ids))
        self.engine.check(GenerateRequest(prompt_ids, n, sampling, stop))
        return Planned(job_id, prompt_ids, n, sampling, list(stop), prompt_text, constraint,
                       arrived if arrived is not None else time.monotonic())

    def submit(self, p: Planned) -> JobStream:
        """Queue a planned job (on the event loop). Raises DuplicateJob (409) or
        Unavailable (503) before any event is sent."""
        self.require_ready()
        loop = asyncio.get_running_loop()
        # one mailbox for every stream of the loop: a scheduler step's events for all
        # of them cost one loop wakeup (a new loop, as in tests, gets its own)
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop)
        stream = JobStream(p.job_id, loop, self.inference, self._mailbox)
        job = Job(p.job_id, p.prompt_ids, p.max_tokens, p.sampling, stream.sink, p.stop,
                  timeout_s=self.config.inference_timeout_s, prompt_text=p.prompt_text,
                  constraint=p.constraint, arrived=p.arrived, checked=True)   # by plan
        self.inference.submit(job)
        return stream


def _lower_priority() -> None:
    """Give the calling thread (a prep thread) a lower CPU priority than the rest."""
    if sys.platform == "linux":   # elsewhere PRIO_PROCESS would name the whole process
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid)
                                                     + PREP_NICE))
        except OSError:
            pass


@dataclass
class Planned:
    """A job that passed ``plan``'s checks, ready to queue. Copies may change its
    id, seed or grammar (openai_choices), none of which those checks read."""
    job_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    prompt_text: str | None
    constraint: Any = None           # a grammar the output must follow
    arrived: float = 0.0             # time.monotonic() of the request's arrival
