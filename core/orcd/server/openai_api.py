"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Wire format as OpenAI's (the official client must work unchanged): streamed
chunks carry ``finish_reason: null`` until a last chunk whose delta (or text)
is empty; ``stream_options.include_usage`` adds a usage chunk with no
choices; the stream ends with ``data: [DONE]``. An error after the stream
began is sent as ``data: {"error": {...}}``, which the client raises.
A model plugin's output parser (GPT-OSS harmony) splits chat output into
``reasoning_content`` and ``content``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request

from orcd import __version__
from orcd.chat import normalize_messages
from orcd.errors import InvalidRequest, OrcdError
from orcd.server.http import openai_error, read_body
from orcd.server.schemas import ChatCompletionRequest, CompletionRequest, parse
from orcd.server.sse import SSEResponse, sse_event
from orcd.server.state import JobStream, Planned, ServerState

FINISH = {"eog": "stop", "stop_sequence": "stop", "max_tokens": "length"}
FINGERPRINT = f"orcd-{__version__}"
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class OutputSplitter:
    """Text pieces → (field, text) for the chat message: ``content`` or
    ``reasoning_content``. Without a plugin parser everything is content."""

    FIELDS = {"content": "content", "reasoning": "reasoning_content"}

    def __init__(self, factory: Any) -> None:
        self.parser = factory() if factory is not None else None

    def feed(self, text: str) -> list[tuple[str, str]]:
        if self.parser is None:
            return [("content", text)] if text else []
        return self._fields(self.parser.feed(text))

    def finish(self) -> list[tuple[str, str]]:
        return [] if self.parser is None else self._fields(self.parser.finish())

    def _fields(self, pieces) -> list[tuple[str, str]]:
        return [(self.FIELDS.get(ch, "content"), t) for ch, t in pieces if t]


def router(state: ServerState) -> APIRouter:
    r = APIRouter(prefix="/v1")
    cfg = state.config

    @r.get("/models")
    async def models():
        state.require_ready()
        return {"object": "list",
                "data": [{"id": cfg.model_ref, "object": "model", "created": int(state.started_wall),
                          "owned_by": "orcd",
                          "meta": {"n_ctx": state.loaded.n_ctx,
                                   "n_vocab": state.loaded.hp.n_vocab,
                                   "quant_kind": state.loaded.quant_kind}}]}

    @r.post("/completions")
    async def completions(request: Request):
        body = await read_body(request, cfg.max_body_bytes, cfg.body_timeout_s)
        req, planned = await state.off_loop(_prepare_completion, state, body)
        stream = state.submit(planned)
        meta = _meta(stream, "text_completion", cfg.model_ref)
        if req.stream:
            include = _include_usage(req, meta)
            return SSEResponse(_completion_chunks(stream, meta, include), on_disconnect=stream.cancel)
        text, result = [], None
        async for kind, payload in _watched(request, stream):
            if kind == "token":
                text.append(payload.text)
            elif kind == "end":
                result = payload
            elif kind == "error":
                raise payload
        return {**meta, "system_fingerprint": FINGERPRINT,
                "choices": [{"index": 0, "text": "".join(text), "logprobs": None,
                             "finish_reason": FINISH[result.stop_reason]}],
                "usage": usage(result.prompt_tokens, result.tokens_out)}

    @r.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, cfg.max_body_bytes, cfg.body_timeout_s)
        req, planned = await state.off_loop(_prepare_chat, state, body)
        stream = state.submit(planned)
        meta = _meta(stream, "chat.completion.chunk" if req.stream else "chat.completion",
                     cfg.model_ref)
        splitter = OutputSplitter(state.loaded.output_parser)
        if req.stream:
            include = _include_usage(req, meta)
            return SSEResponse(_chat_chunks(stream, meta, splitter, include),
                               on_disconnect=stream.cancel)
        fields: dict[str, list[str]] = {"content": [], "reasoning_content": []}
        result = None
        async for kind, payload in _watched(request, stream):
            if kind == "token":
                for name, t in splitter.feed(payload.text):
                    fields[name].append(t)
            elif kind == "end":
                result = payload
            elif kind == "error":
                raise payload
        for name, t in splitter.finish():
            fields[name].append(t)
        message: dict[str, Any] = {"role": "assistant", "content": "".join(fields["content"])}
        if fields["reasoning_content"]:
            message["reasoning_content"] = "".join(fields["reasoning_content"])
        return {**meta, "system_fingerprint": FINGERPRINT,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": FINISH[result.stop_reason]}],
                "usage": usage(result.prompt_tokens, result.tokens_out)}

    return r


# -- request → planned job (CPU work: on the prep threads, never the event loop) --

def _prepare_completion(state: ServerState, body: bytes) -> tuple[CompletionRequest, Planned]:
    req: CompletionRequest = parse(CompletionRequest, body)
    state.require_ready()
    if req.echo:
        raise InvalidRequest("echo is not supported", field="echo")
    ids = _completion_prompt(state, req.prompt)
    return req, _plan(state, "cmpl", ids, req, req.max_tokens)


def _completion_prompt(state: ServerState, prompt) -> list[int]:
    if isinstance(prompt, str):
        text = prompt
    elif all(type(p) is int for p in prompt):
        return list(prompt)   # token ids, as OpenAI allows (the engine checks each)
    elif len(prompt) == 1:
        text = prompt[0]
    else:
        raise InvalidRequest("prompt must be one string or one list of token ids", field="prompt")
    if not text:
        raise InvalidRequest("prompt must not be empty", field="prompt")
    state.check_prompt_chars(len(text), "prompt")
    return state.encode(text)


def _prepare_chat(state: ServerState, body: bytes) -> tuple[ChatCompletionRequest, Planned]:
    req: ChatCompletionRequest = parse(ChatCompletionRequest, body)
    state.require_ready()
    ids = _chat_prompt_ids(state, req)
    return req, _plan(state, "chatcmpl", ids, req, req.max_completion_tokens or req.max_tokens)


def _chat_prompt_ids(state: ServerState, req: ChatCompletionRequest) -> list[int]:
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


async def _watched(request: Request, stream: JobStream):
    """A non-streamed job's events; the client hanging up cancels the job."""
    async def hung_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        stream.cancel()

    watcher = asyncio.ensure_future(hung_up())
    try:
        async for event in stream.events():
            yield event
    finally:
        watcher.cancel()


def _plan(state: ServerState, prefix: str, ids: list[int], req,
          max_tokens: int | None) -> Planned:
    sampling = state.sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                              min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                              seed=req.seed)
    return state.plan(f"{prefix}-{uuid.uuid4().hex}", ids, max_tokens=max_tokens,
                      sampling=sampling, stop=req.stops(), prompt_text=None)


def _include_usage(req, meta: dict) -> bool:
    include = bool(req.stream_options and req.stream_options.include_usage)
    if include:
        meta["usage"] = None
    return include


def _meta(stream: JobStream, obj: str, model: str) -> dict[str, Any]:
    return {"id": stream.job_id, "object": obj, "created": int(time.time()), "model": model}


def _chunk(meta: dict, choice: dict | None, usage_: dict | None = None) -> bytes:
    """One stream chunk. As OpenAI's: ``usage`` appears (null until the usage
    chunk) only when the client asked for it; ``meta`` then carries it."""
    body = {**meta, "system_fingerprint": FINGERPRINT,
            "choices": [choice] if choice is not None else []}
    if usage_ is not None:
        body["usage"] = usage_
    return sse_event(None, body)


async def _finish_stream(stream: JobStream, events: AsyncIterator) -> AsyncIterator[bytes]:
    """Shared tail of both streams: an error mid-stream becomes an error frame."""
    try:
        async for frame in events:
            yield frame
    except OrcdError as err:
        yield sse_event(None, openai_error(err))
    finally:
        stream.cancel()
    yield sse_event(None, "[DONE]")


async def _completion_chunks(stream: JobStream, meta: dict, include_usage: bool):
    async def frames():
        async for kind, payload in stream.events():
            if kind == "token":
                yield _chunk(meta, {"index": 0, "text": payload.text, "logprobs": None,
                                    "finish_reason": None})
            elif kind == "end":
                yield _chunk(meta, {"index": 0, "text": "", "logprobs": None,
                                    "finish_reason": FINISH[payload.stop_reason]})
                if include_usage:
                    yield _chunk(meta, None, usage(payload.prompt_tokens, payload.tokens_out))
            elif kind == "error":
                raise payload
    async for frame in _finish_stream(stream, frames()):
        yield frame


async def _chat_chunks(stream: JobStream, meta: dict, splitter: OutputSplitter,
                       include_usage: bool):
    def delta(d: dict, finish: str | None = None) -> bytes:
        return _chunk(meta, {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish})

    async def frames():
        yield delta({"role": "assistant", "content": ""})
        async for kind, payload in stream.events():
            if kind == "token":
                for name, t in splitter.feed(payload.text):
                    yield delta({name: t})
            elif kind == "end":
                for name, t in splitter.finish():
                    yield delta({name: t})
                yield delta({}, FINISH[payload.stop_reason])
                if include_usage:
                    yield _chunk(meta, None, usage(payload.prompt_tokens, payload.tokens_out))
            elif kind == "error":
                raise payload
    async for frame in _finish_stream(stream, frames()):
        yield frame
