"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Wire format as OpenAI's (the official client must work unchanged): streamed
chunks carry ``finish_reason: null`` until a last chunk whose delta (or text)
is empty; ``stream_options.include_usage`` adds a usage chunk with no
choices; the stream ends with ``data: [DONE]``. An error after the stream
began is sent as ``data: {"error": {...}}``, which the client raises. A quiet
stream (queued, or in a long prefill) gets an SSE comment every
``sse_keepalive_s``. A model plugin's output parser splits chat output into
``reasoning_content``, ``content`` and ``tool_calls`` (openai_format); what a
request may ask for is checked in openai_request. ``n`` choices (times a
completion's prompts) are jobs merged back by openai_choices (a stream
interleaves them, each chunk's choice carrying its index); ``echo`` puts each
prompt first. docs/openai-api.md lists it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Request

from orcd import __version__
from orcd.chat import normalize_messages
from orcd.errors import InvalidRequest, OrcdError
from orcd.server import openai_request as opts
from orcd.server.http import openai_error, read_body
from orcd.server.openai_choices import Choices, jobs_for, usage
from orcd.server.openai_format import (ChatAnswer, Logprobs, OutputSplitter, finish_reason,
                                       merge_completion_logprobs)
from orcd.server.schemas import ChatCompletionRequest, CompletionRequest, parse
from orcd.server.sse import JSON, SSEResponse, sse_event
from orcd.server.state import Planned, ServerState
from orcd.server.streaming import frame_batches

__all__ = ["router", "OutputSplitter"]

FINGERPRINT = f"orcd-{__version__}"


def router(state: ServerState) -> APIRouter:
    r = APIRouter(prefix="/v1")
    cfg = state.config

    @r.get("/models")
    async def models():
        state.require_ready()
        return {"object": "list",
                "data": [{"id": name, "object": "model", "created": int(state.started_wall),
                          "owned_by": "orcd",
                          "meta": {"n_ctx": state.loaded.n_ctx,
                                   "n_vocab": state.loaded.hp.n_vocab,
                                   "quant_kind": state.loaded.quant_kind}}
                         for name in cfg.served_names]}

    @r.post("/completions")
    async def completions(request: Request):
        arrived = time.monotonic()
        body = await read_body(request, cfg.max_body_bytes, cfg.body_timeout_s)
        rid = f"cmpl-{uuid.uuid4().hex}"
        req, planned, echoes, n = await state.off_loop(_prepare_completion, state, body, rid, arrived)
        jobs = Choices.submit(state, planned)
        meta = _meta(rid, "text_completion", cfg.served_names[0])
        # one per choice: a Logprobs counts its choice's text_offset
        lps = [Logprobs(state.loaded.tokenizer) if req.logprobs is not None else None
               for _ in planned]
        if req.stream:
            include = _include_usage(req, meta)
            return SSEResponse(_completion_chunks(jobs, meta, lps, echoes, n, include, cfg.sse_keepalive_s),
                               on_disconnect=jobs.cancel)
        texts: list[list[str]] = [[e] for e in echoes]
        parts: list[list[dict]] = [[] for _ in planned]

        def token(i: int, ev) -> None:
            texts[i].append(ev.text)
            if lps[i] is not None:
                parts[i].append(lps[i].completion(ev.logprobs))
        results = await jobs.collect(request, token)
        return {**meta, "system_fingerprint": FINGERPRINT,
                "choices": [{"index": i, "text": "".join(texts[i]),
                             "logprobs": merge_completion_logprobs(parts[i]) if lps[i] else None,
                             "finish_reason": finish_reason(result.stop_reason, 0)}
                            for i, result in enumerate(results)],
                "usage": usage(results, per_prompt=n)}

    @r.post("/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.monotonic()
        body = await read_body(request, cfg.max_body_bytes, cfg.body_timeout_s)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        req, planned, tools = await state.off_loop(_prepare_chat, state, body, rid, arrived)
        jobs = Choices.submit(state, planned)
        meta = _meta(rid, "chat.completion.chunk" if req.stream else "chat.completion",
                     cfg.served_names[0])
        # one per choice: the output parser and the logprobs hold one answer's state
        answers = [ChatAnswer(OutputSplitter(state.loaded.output_parser, tools.parse_calls),
                              Logprobs(state.loaded.tokenizer) if req.logprobs else None)
                   for _ in planned]
        if req.stream:
            include = _include_usage(req, meta)
            return SSEResponse(_chat_chunks(jobs, meta, answers, include, cfg.sse_keepalive_s),
                               on_disconnect=jobs.cancel)
        results = await jobs.collect(request, lambda i, ev: answers[i].token(ev))
        for answer in answers:
            answer.finish()
        return {**meta, "system_fingerprint": FINGERPRINT,
                "choices": [{"index": i, "message": answer.message(),
                             "logprobs": answer.all_logprobs(),
                             "finish_reason": answer.finish_reason(result.stop_reason)}
                            for i, (answer, result) in enumerate(zip(answers, results))],
                "usage": usage(results)}

    return r


# -- request → planned job (CPU work: on the prep threads, never the event loop) --

def _prepare_completion(state: ServerState, body: bytes, rid: str, arrived: float
                        ) -> tuple[CompletionRequest, list[Planned], list[str], int]:
    """The jobs of every (prompt, choice) -- choice i is prompt i // n's choice i % n, as
    vLLM orders them --, each choice's echo ("" unless ``echo``) and n."""
    req: CompletionRequest = parse(CompletionRequest, body)
    state.require_ready()
    opts.check_model(req.model, state.config.served_names)
    opts.check_refused(req, "completion")
    n = opts.check_n(req.n, state.config.max_batch)
    if req.echo and req.logprobs is not None:
        raise InvalidRequest("echo with logprobs is not supported: orcd does not score the prompt",
                             field="echo")
    prompts = _completion_prompts(state, req.prompt)
    if len(prompts) * n > state.config.max_batch:
        raise InvalidRequest(f"{len(prompts)} prompts x n = {n} are {len(prompts) * n} choices; "
                             f"at most {state.config.max_batch} (--max-batch) a request",
                             field="prompt")

    def grammar():
        return opts.constraint(state.grammars, None, None, None, opts.ToolPlan(),
                               req.response_format)
    planned: list[Planned] = []
    for ids, _text in prompts:
        planned += _plan(state, rid, ids, req, req.max_tokens, n, arrived, grammar)
    if len(prompts) > 1:   # a job id per choice: the response's id, then -i
        planned = [replace(p, job_id=f"{rid}-{i}") for i, p in enumerate(planned)]
    # echoed as given; token ids as their text (checked by the plan: in the vocabulary)
    echoes = [("" if not req.echo else text if text is not None else state.loaded.tokenizer.decode(ids))
              for ids, text in prompts]
    return req, planned, [e for e in echoes for _ in range(n)], n


def _completion_prompts(state: ServerState, prompt) -> list[tuple[list[int], str | None]]:
    """(token ids, the text they came from or None) of each prompt: one string, a list
    of strings, a list of token ids, or a list of lists of token ids."""
    if isinstance(prompt, str):
        texts = [prompt]
    elif all(type(p) is int for p in prompt):
        return [(list(prompt), None)]   # token ids, as OpenAI allows (the engine checks each)
    elif all(isinstance(p, list) for p in prompt):
        return [(list(p), None) for p in prompt]
    else:
        texts = list(prompt)
    if not all(texts):
        raise InvalidRequest("prompt must not be empty", field="prompt")
    state.check_prompt_chars(sum(len(t) for t in texts), "prompt")
    return [(state.encode(t), t) for t in texts]


def _prepare_chat(state: ServerState, body: bytes, rid: str, arrived: float
                  ) -> tuple[ChatCompletionRequest, list[Planned], opts.ToolPlan]:
    req: ChatCompletionRequest = parse(ChatCompletionRequest, body)
    state.require_ready()
    opts.check_model(req.model, state.config.served_names)
    opts.check_refused(req, "chat")
    n = opts.check_n(req.n, state.config.max_batch)
    tools = opts.tool_plan(req.tools, req.tool_choice)
    ids = chat_prompt_ids(state, req)
    lm = state.loaded

    def grammar():
        return opts.constraint(state.grammars, lm.output_parser, lm.tokenizer, req.tools, tools,
                               req.response_format)
    return req, _plan(state, rid, ids, req, req.max_completion_tokens or req.max_tokens, n,
                      arrived, grammar), tools


def chat_prompt_ids(state: ServerState, req: ChatCompletionRequest) -> list[int]:
    """Render the model's template and tokenize; message text stays text (chat.py)."""
    messages = normalize_messages(req.messages)
    state.check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
    variables = dict(req.chat_template_kwargs or {})
    # llama-server lets chat_template_kwargs set add_generation_prompt (continue a turn)
    generation_prompt = variables.pop("add_generation_prompt", True)
    if not isinstance(generation_prompt, bool):
        raise InvalidRequest("chat_template_kwargs.add_generation_prompt must be a boolean",
                             field="chat_template_kwargs.add_generation_prompt")
    extra: dict[str, Any] = {}
    if req.tools is not None:
        extra["tools"] = req.tools
    if req.reasoning_effort is not None:
        extra["reasoning_effort"] = req.reasoning_effort
    if isinstance(state.chat_template, OrcdError):
        raise state.chat_template
    return state.chat_template.prompt_ids(state.loaded.tokenizer, messages,
                                          add_generation_prompt=generation_prompt,
                                          variables=variables,
                                          max_chars=state.prompt_char_limit, **extra)


def _plan(state: ServerState, rid: str, ids: list[int], req, max_tokens: int | None, n: int,
          arrived: float, grammar: Callable[[], Any]) -> list[Planned]:
    """The jobs of the ``n`` choices (openai_choices); ``grammar()`` makes a
    fresh grammar (or None) for each, since a matcher holds one generation's state."""
    base = state.sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                          min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                          seed=req.seed)
    kind = "completion" if isinstance(req, CompletionRequest) else "chat"
    sampling = opts.sampling_params(base, req, kind, state.loaded.hp.n_vocab)
    one = state.plan(rid, ids, max_tokens=max_tokens, sampling=sampling, stop=req.stops(),
                     prompt_text=None, arrived=arrived)
    return jobs_for(one, n, grammar)


def _include_usage(req, meta: dict) -> bool:
    include = bool(req.stream_options and req.stream_options.include_usage)
    if include:
        meta["usage"] = None
    return include


def _meta(rid: str, obj: str, model: str) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model}


def _chunk(meta: dict, choice: dict | None, usage_: dict | None = None) -> bytes:
    """One stream chunk. As OpenAI's: ``usage`` appears (null until the usage
    chunk) only when the client asked for it; ``meta`` then carries it."""
    body = {**meta, "system_fingerprint": FINGERPRINT,
            "choices": [choice] if choice is not None else []}
    if usage_ is not None:
        body["usage"] = usage_
    return sse_event(None, body)


class _Chunks:
    """``_chunk(meta, choice)`` for one stream, the same bytes, with what every
    chunk shares (meta, the fingerprint) encoded once: per token, only the
    choice is encoded."""

    def __init__(self, meta: dict) -> None:
        shared = JSON.encode({**meta, "system_fingerprint": FINGERPRINT})   # '{...}'
        self.head = f'data: {shared[:-1]},"choices":['.encode()

    def __call__(self, choice: dict) -> bytes:
        return self.head + JSON.encode(choice).encode() + b"]}\n\n"


async def _stream(jobs: Choices, keepalive_s: float, render: Callable[[Any, list[bytes]], None],
                  head: bytes = b"", tail: Callable[[], bytes | None] = lambda: None
                  ) -> AsyncIterator[bytes]:
    """Both streams: ``head``, every batch of events as ``render`` makes its
    frames, ``tail()``, then [DONE]. An error mid-stream (any choice's) becomes
    an error frame, and every job still running is cancelled."""
    try:
        if head:
            yield head
        async for frames in frame_batches(lambda: jobs.take(keepalive_s), render):
            yield frames
        last = tail()
        if last:
            yield last
    except OrcdError as err:
        yield sse_event(None, openai_error(err))
    finally:
        jobs.cancel()
    yield sse_event(None, "[DONE]")


def _completion_chunks(jobs: Choices, meta: dict, lps: list[Logprobs | None], echoes: list[str],
                       per_prompt: int, include_usage: bool, keepalive_s: float) -> AsyncIterator[bytes]:
    chunk = _Chunks(meta)
    results: list = [None] * len(jobs)

    def render(event, out: list[bytes]) -> None:
        i, kind, payload = event
        if kind == "token":
            lp = lps[i]
            out.append(chunk({"index": i, "text": payload.text,
                              "logprobs": lp.completion(payload.logprobs) if lp is not None
                              else None, "finish_reason": None}))
        elif kind == "end":
            results[i] = payload
            out.append(chunk({"index": i, "text": "", "logprobs": None,
                              "finish_reason": finish_reason(payload.stop_reason, 0)}))
        elif kind == "error":
            raise payload

    def tail() -> bytes | None:   # once, after every choice's finish chunk
        return _chunk(meta, None, usage(results, per_prompt)) if include_usage else None
    # echo: each choice's first chunk is its prompt
    head = b"".join(chunk({"index": i, "text": e, "logprobs": None, "finish_reason": None})
                    for i, e in enumerate(echoes) if e)
    return _stream(jobs, keepalive_s, render, head, tail)


def _chat_chunks(jobs: Choices, meta: dict, answers: list[ChatAnswer],
                 include_usage: bool, keepalive_s: float) -> AsyncIterator[bytes]:
    encode = _Chunks(meta)
    results: list = [None] * len(jobs)

    def chunk(i: int, d: dict, logprobs=None, finish: str | None = None) -> bytes:
        return encode({"index": i, "delta": d,
                       "logprobs": {"content": logprobs} if logprobs is not None else None,
                       "finish_reason": finish})

    def render(event, out: list[bytes]) -> None:
        i, kind, payload = event
        answer = answers[i]
        if kind == "token":
            for d, logprobs in answer.token(payload):
                out.append(chunk(i, d, logprobs))
        elif kind == "end":
            results[i] = payload
            for d, logprobs in answer.finish():
                out.append(chunk(i, d, logprobs))
            out.append(chunk(i, {}, answer.leftover_logprobs(),
                             answer.finish_reason(payload.stop_reason)))
        elif kind == "error":
            raise payload

    def tail() -> bytes | None:   # once, after every choice's finish chunk
        return _chunk(meta, None, usage(results)) if include_usage else None
    head = b"".join(chunk(i, {"role": "assistant", "content": ""}) for i in range(len(jobs)))
    return _stream(jobs, keepalive_s, render, head, tail)
