"""POST /tokenize and /detokenize, as vLLM serves them (llama-server's field names also
taken): a prompt's token ids and count without generating -- raw text, or chat messages
rendered by the model's template exactly as /v1/chat/completions renders them -- and ids
back to text. CPU work, on the prep threads; errors in orcd's shape (not under /v1).
"""

from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from orcd.errors import InvalidRequest
from orcd.server import openai_request as opts
from orcd.server.http import read_body
from orcd.server.openai_api import chat_prompt_ids
from orcd.server.schemas import ChatCompletionRequest, parse
from orcd.server.state import ServerState


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    prompt: Optional[str] = None            # raw text (vLLM)
    content: Optional[str] = None           # raw text (llama-server's name)
    messages: Optional[list[dict[str, Any]]] = Field(default=None, min_length=1)
    add_special_tokens: Optional[bool] = None   # raw text: BOS etc. (vLLM's name; default on)
    add_special: Optional[bool] = None          # llama-server's name (its default: off)
    add_generation_prompt: bool = True          # messages: end with the assistant's turn opening
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None
    return_token_strs: bool = False             # vLLM: each token's text beside its id
    with_pieces: bool = False                   # llama-server: tokens as {id, piece}


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    tokens: list[StrictInt]


def router(state: ServerState) -> APIRouter:
    r = APIRouter()
    cfg = state.config

    @r.post("/tokenize")
    async def tokenize(request: Request):
        body = await read_body(request, cfg.max_body_bytes, cfg.body_timeout_s)
        return await state.off_loop(_tokenize, state, body)

    @r.post("/detokenize")
    async def detokenize(request: Request):
        body = await read_body(request, cfg.max_body_bytes, cfg.body_timeout_s)
        return await state.off_loop(_detokenize, state, body)

    return r


def _tokenize(state: ServerState, body: bytes) -> dict[str, Any]:
    req: TokenizeRequest = parse(TokenizeRequest, body)
    state.require_ready()
    opts.check_model(req.model, state.config.served_names)
    ids = _ids(state, req)
    tok = state.loaded.tokenizer
    out: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": state.loaded.n_ctx}
    if req.with_pieces:
        out["tokens"] = [{"id": t, "piece": tok.decode([t])} for t in ids]
    if req.return_token_strs:
        out["token_strs"] = [tok.decode([t]) for t in ids]
    return out


def _ids(state: ServerState, req: TokenizeRequest) -> list[int]:
    given = [k for k in ("prompt", "content", "messages") if getattr(req, k) is not None]
    if len(given) != 1:
        raise InvalidRequest("give exactly one of prompt, content (raw text) or messages",
                             field=given[1] if len(given) > 1 else "prompt")
    if req.messages is not None:   # as a chat request renders them (its checks included)
        kwargs = {**(req.chat_template_kwargs or {}), "add_generation_prompt": req.add_generation_prompt}
        chat = ChatCompletionRequest(messages=req.messages, tools=req.tools, chat_template_kwargs=kwargs)
        return chat_prompt_ids(state, chat)
    text = req.prompt if req.prompt is not None else req.content
    state.check_prompt_chars(len(text), given[0])
    special = (req.add_special_tokens if req.add_special_tokens is not None
               else req.add_special if req.add_special is not None
               else req.prompt is not None)   # each server's own default
    return state.loaded.tokenizer.encode(text, add_special=special, parse_special=True)


def _detokenize(state: ServerState, body: bytes) -> dict[str, str]:
    req: DetokenizeRequest = parse(DetokenizeRequest, body)
    state.require_ready()
    opts.check_model(req.model, state.config.served_names)
    n_vocab = state.loaded.hp.n_vocab
    bad = next((t for t in req.tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is outside the vocabulary (0..{n_vocab - 1})",
                             field="tokens")
    text = state.loaded.tokenizer.decode(req.tokens)
    return {"prompt": text, "content": text}   # vLLM's name, llama-server's name
