"""Request bodies. /execute is strict (wrong types and unknown fields are
errors); the OpenAI endpoints are lenient like OpenAI's own (unknown fields
are ignored, so newer clients keep working)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional, Union

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictInt, ValidationError,
                      field_validator)

from orcd.errors import InvalidRequest
from orcd.sampling import GREEDY_BELOW_TEMPERATURE, MIN_REPETITION_PENALTY

MAX_PROMPT_CHARS = 32_768
MAX_STOPS = 4
MAX_STOP_TOKENS = 32
MAX_STOP_CHARS = 512     # checked before a stop string is tokenized (for MAX_STOP_TOKENS)
MAX_JSON_DEPTH = 64      # deeper bodies are refused before anything walks them
MAX_LOGIT_BIAS = 1024    # logit_bias entries per request
UINT64_MAX = 2**64 - 1

StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0),
                        AfterValidator(lambda t: 0.0 if t < GREEDY_BELOW_TEMPERATURE else t)]
RepetitionPenalty = Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=2.0)]


def _check_stops(v: list[str]) -> list[str]:
    if len(v) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings")
    if any(s == "" for s in v):
        raise ValueError("stop strings must not be empty")
    if any(len(s) > MAX_STOP_CHARS for s in v):
        raise ValueError(f"each stop string must be at most {MAX_STOP_CHARS} characters")
    return v


class ExecuteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    job_id: str = Field(min_length=1, max_length=256)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_tokens: Optional[int] = Field(default=None, ge=1)  # at most --max-tokens-out (the app)
    # sampling: None (unset) = the model file's recommendation, else llama-server's default
    temperature: Optional[Temperature] = None
    top_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0)   # upper bound (vocab size) checked by the app
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: Optional[RepetitionPenalty] = None
    stop: list[StopString] = Field(default_factory=list)
    seed: Optional[int] = Field(default=None, ge=0, le=UINT64_MAX)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: list[str]) -> list[str]:
        return _check_stops(v)

    @field_validator("job_id")
    @classmethod
    def _job_id_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("job_id must not be blank")
        return v


class CancelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    job_id: str = Field(min_length=1, max_length=256)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    # sampling: None (unset) = the model file's recommendation, else llama-server's default
    temperature: Optional[Temperature] = None
    top_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    n: Optional[StrictInt] = 1   # 1..--max-batch (openai_request.check_n); strict: true is not 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(default=None, ge=0, le=UINT64_MAX)
    # llama-server extensions
    top_k: Optional[int] = Field(default=None, ge=0)
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: Optional[RepetitionPenalty] = None
    # OpenAI's (orcd.ops.sampling says where each applies)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]]] = Field(
        default=None, max_length=MAX_LOGIT_BIAS)
    response_format: Optional[dict[str, Any]] = None

    def stops(self) -> list[str]:
        v = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return _check_stops(v)
        except ValueError as e:
            raise InvalidRequest(str(e), field="stop") from None


class CompletionRequest(_OpenAIBase):
    prompt: Any   # a string, a list of strings, a list of token ids or a list of those (below)
    max_tokens: Optional[int] = Field(default=16, ge=1)   # OpenAI's default for completions
    echo: bool = False
    logprobs: Optional[int] = Field(default=None, ge=0)   # top-N per token (legacy API)
    best_of: Optional[int] = None                         # only 1 or n (openai_request)
    suffix: Optional[str] = None                          # not supported: set is a 400

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        # checked by hand: pydantic's lax ints would take [true, false] as token ids
        def ids(p: Any) -> bool:
            return isinstance(p, list) and bool(p) and all(type(t) is int for t in p)
        if isinstance(v, str) or (isinstance(v, list) and v and (
                all(isinstance(p, str) for p in v) or ids(v) or all(ids(p) for p in v))):
            return v
        raise ValueError("prompt must be a string, a list of strings, a list of token ids "
                         "or a list of lists of token ids")


class ChatCompletionRequest(_OpenAIBase):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    chat_template_kwargs: Optional[dict[str, Any]] = None
    reasoning_effort: Optional[str] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0)


def parse(model: type[BaseModel], body: bytes) -> Any:
    """Bytes -> a validated model, or InvalidRequest naming the first bad field.
    CPU work for a large body: call it off the event loop."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"the body is not valid JSON: {e}") from None
    except RecursionError:   # nested beyond the parser's own stack
        raise InvalidRequest(f"the body is nested more than {MAX_JSON_DEPTH} levels deep") from None
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise InvalidRequest(f"the body is nested more than {MAX_JSON_DEPTH} levels deep")
    if not isinstance(obj, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        where = f"{field}: " if field else ""
        kind = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise InvalidRequest(f"{where}{kind}", field=field) from None


def json_depth(obj: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), walked without recursion;
    stops counting once past MAX_JSON_DEPTH."""
    deepest, stack = 0, [(obj, 0)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, (dict, list)):
            d += 1
            if d > deepest:
                deepest = d
                if d > MAX_JSON_DEPTH:
                    return d
            stack.extend((v, d) for v in (x.values() if isinstance(x, dict) else x)
                         if isinstance(v, (dict, list)))
    return deepest


__all__ = ["ExecuteRequest", "CancelRequest", "CompletionRequest", "ChatCompletionRequest",
           "parse"]
