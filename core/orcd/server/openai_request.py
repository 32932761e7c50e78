"""An OpenAI request's generation options, checked against the model: the
served name, how many choices (n), OpenAI's sampling extras (penalties,
logit_bias, logprobs), parameters orcd refuses rather than ignore (best_of,
suffix), and what constrains the output (response_format, tool_choice) as a
grammar.

Pure functions of the validated request and the loaded model, run on the prep
threads with the rest of a request's CPU work.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from orcd.errors import InvalidRequest
from orcd.sampling import MAX_TOP_LOGPROBS, SamplingParams


class ModelNotFound(InvalidRequest):
    """The request names a model this worker does not serve (vLLM's 404)."""
    code = "model_not_found"
    http_status = 404


def check_model(requested: str | None, served: list[str]) -> None:
    if requested is not None and requested not in served:
        raise ModelNotFound(f"The model `{requested}` does not exist; this worker serves "
                            f"{', '.join(f'`{n}`' for n in served)}.", field="model")


def check_n(n: int | None, max_n: int) -> int:
    """How many choices: 1..``max_n`` (the worker's --max-batch, so that every
    choice can be decoded in the same batch, as llama-server ties n to its slots)."""
    n = 1 if n is None else n
    if not 1 <= n <= max_n:
        raise InvalidRequest(f"n must be between 1 and {max_n} (this worker's --max-batch)",
                             field="n")
    return n


def check_refused(req, kind: str) -> None:
    """Parameters orcd cannot honour: a 400 instead of an answer the client did
    not ask for."""
    if kind == "completion":
        # best_of == n returns every choice, which is just n; orcd ranks nothing
        if req.best_of not in (None, 1, req.n):
            raise InvalidRequest("best_of is not supported (only 1, or equal to n)",
                                 field="best_of")
        if req.suffix:
            raise InvalidRequest("suffix is not supported", field="suffix")


def top_logprobs(req, kind: str) -> int | None:
    """How many alternatives to report per token, or None for no logprobs."""
    if kind == "completion":
        return req.logprobs   # an int (OpenAI's legacy API), None = off
    if not req.logprobs:
        if req.top_logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", field="top_logprobs")
        return None
    return req.top_logprobs or 0


def logit_bias(raw: dict[str, float] | None, n_vocab: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} -> ((id, bias), ...), ids checked against the model."""
    out = []
    for key, bias in (raw or {}).items():
        try:
            tid = int(key)
        except ValueError:
            raise InvalidRequest(f"logit_bias keys must be token ids, got {key!r}",
                                 field="logit_bias") from None
        if not 0 <= tid < n_vocab:
            raise InvalidRequest(f"logit_bias: token id {tid} is outside the vocabulary "
                                 f"(0..{n_vocab - 1})", field="logit_bias")
        out.append((tid, float(bias)))
    return tuple(sorted(out))


def sampling_params(base: SamplingParams, req, kind: str, n_vocab: int) -> SamplingParams:
    """``base`` (temperature … seed, as state.sampling made it) plus OpenAI's extras."""
    n_top = top_logprobs(req, kind)
    if n_top is not None and n_top > MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"at most {MAX_TOP_LOGPROBS} top logprobs", field="logprobs")
    return replace(base, presence_penalty=req.presence_penalty,
                   frequency_penalty=req.frequency_penalty,
                   logit_bias=logit_bias(req.logit_bias, n_vocab), logprobs=n_top)


# -- tools -------------------------------------------------------------------------------

@dataclass
class ToolPlan:
    """What the request's tools mean for this generation."""
    parse_calls: bool = False        # report calls as tool_calls (else as the text written)
    forced: str | None = None        # tool_choice "required"/named: the function, or "*" for any


def tool_plan(tools: list[dict] | None, choice: Any) -> ToolPlan:
    """Check ``tools`` and ``tool_choice`` as OpenAI does; "none" keeps the
    tools in the prompt (vLLM's default) but reports any call as text."""
    names = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                                 f"{{\"name\": ...}}}}", field=f"tools.{i}")
        names.append(fn["name"])
    if choice is None:
        choice = "auto" if names else "none"
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise InvalidRequest("tool_choice must be \"none\", \"auto\", \"required\" or "
                                 "{\"type\": \"function\", \"function\": {\"name\": ...}}",
                                 field="tool_choice")
        if name not in names:
            raise InvalidRequest(f"tool_choice names {name!r}, which is not among the tools",
                                 field="tool_choice")
        return ToolPlan(parse_calls=True, forced=name)
    if choice not in ("none", "auto", "required"):
        raise InvalidRequest(f"tool_choice must be \"none\", \"auto\", \"required\" or a "
                             f"function, got {choice!r}", field="tool_choice")
    if choice != "none" and not names:
        raise InvalidRequest(f"tool_choice {choice!r} needs tools", field="tool_choice")
    return ToolPlan(parse_calls=choice != "none", forced="*" if choice == "required" else None)


def constraint(grammars, parser_factory, tokenizer, tools: list[dict] | None, plan: ToolPlan,
               response_format: dict | None):
    """The grammar for this request (orcd.grammar.Matcher) or None."""
    from orcd.grammar import schema_of

    schema = schema_of(response_format) if response_format is not None else None
    if plan.forced is not None:
        if schema is not None:
            raise InvalidRequest("response_format and a forced tool_choice cannot both "
                                 "constrain the output", field="response_format")
        call_grammar = getattr(parser_factory, "call_grammar", None)
        if call_grammar is None:
            raise InvalidRequest("tool_choice 'required' or a named function needs a model "
                                 "whose tool-call format orcd knows", field="tool_choice")
        name = None if plan.forced == "*" else plan.forced
        return grammars.lark(call_grammar(tools, name, tokenizer), field="tool_choice")
    if schema is not None:
        return grammars.json_schema(schema)
    return None
