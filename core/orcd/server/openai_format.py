"""Engine output in OpenAI's shapes: the chat message's fields (content,
reasoning_content, tool_calls) from a plugin's output parser, and logprobs
for chat and for legacy completions, streamed or whole."""

from __future__ import annotations

from typing import Any, Sequence

from orcd.sampling import Sampled
from orcd.toolcalls import ToolCall


class OutputSplitter:
    """Text pieces → (field, payload) for the chat message: ``content`` and
    ``reasoning_content`` text, or ``tool_call`` ToolCalls. Without a plugin
    parser everything is content; without ``parse_calls`` a call shows as the
    text the model wrote."""

    FIELDS = {"content": "content", "reasoning": "reasoning_content", "tool_call": "tool_call"}

    def __init__(self, factory: Any, parse_calls: bool = False) -> None:
        self.parser = factory() if factory is not None else None
        self.parse_calls = parse_calls
        self.calls = 0

    def feed(self, text: str) -> list[tuple[str, Any]]:
        if self.parser is None:
            return [("content", text)] if text else []
        return self._fields(self.parser.feed(text))

    def finish(self) -> list[tuple[str, Any]]:
        return [] if self.parser is None else self._fields(self.parser.finish())

    def _fields(self, pieces) -> list[tuple[str, Any]]:
        out = []
        for ch, t in pieces:
            if not t:
                continue
            if isinstance(t, ToolCall):
                if not self.parse_calls:
                    out.append(("content", t.raw))
                    continue
                self.calls += 1
            out.append((self.FIELDS.get(ch, "content"), t))
        return out


def tool_call_json(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    """A call as OpenAI's message ``tool_calls`` entry (with ``index``: a stream delta's)."""
    out: dict[str, Any] = {"id": call.id, "type": "function",
                           "function": {"name": call.name, "arguments": call.arguments}}
    return out if index is None else {"index": index, **out}


def finish_reason(stop_reason: str, calls: int) -> str:
    """OpenAI's finish_reason: ``tool_calls`` when the answer is calls (and was
    not cut off by max_tokens)."""
    if stop_reason == "max_tokens":
        return "length"
    return "tool_calls" if calls else "stop"


class ChatAnswer:
    """One chat answer built from token events, for the stream (each piece a
    chunk's delta with the logprobs of the tokens it came from) and for the
    whole message (the same pieces merged), so the two always agree."""

    def __init__(self, splitter: OutputSplitter, logprobs: Logprobs | None) -> None:
        self.splitter, self.lp = splitter, logprobs
        self.pending: list[dict] = []      # logprob entries not yet sent with a delta
        self.calls: list[dict] = []        # the message's tool_calls
        self.text = {"content": [], "reasoning_content": []}
        self.logprobs: list[dict] = []     # every entry, for the whole message

    def token(self, ev) -> list[tuple[dict, list | None]]:
        if self.lp is not None:
            entries = self.lp.chat(ev.logprobs)
            self.pending += entries
            self.logprobs += entries
        return self._deltas(self.splitter.feed(ev.text))

    def finish(self) -> list[tuple[dict, list | None]]:
        return self._deltas(self.splitter.finish())

    def leftover_logprobs(self) -> list | None:
        """Entries of tokens whose text no delta carried (sent with the last chunk)."""
        out, self.pending = self.pending, []
        return out or None

    def _deltas(self, pieces) -> list[tuple[dict, list | None]]:
        out: list[dict] = []
        for name, t in pieces:
            if isinstance(t, ToolCall):
                i = len(self.calls)
                self.calls.append(tool_call_json(t))
                out.append({"tool_calls": [{"index": i, "id": t.id, "type": "function",
                                            "function": {"name": t.name, "arguments": ""}}]})
                out.append({"tool_calls": [{"index": i, "function": {"arguments": t.arguments}}]})
            else:
                self.text[name].append(t)
                out.append({name: t})
        pairs: list[tuple[dict, list | None]] = [(d, None) for d in out]
        if pairs and self.pending:
            pairs[0] = (out[0], self.leftover_logprobs())
        return pairs

    def message(self) -> dict[str, Any]:
        content = "".join(self.text["content"])
        msg: dict[str, Any] = {"role": "assistant",
                               "content": content or (None if self.calls else "")}
        if self.text["reasoning_content"]:
            msg["reasoning_content"] = "".join(self.text["reasoning_content"])
        if self.calls:
            msg["tool_calls"] = self.calls
        return msg

    def all_logprobs(self) -> dict | None:
        return {"content": self.logprobs, "refusal": None} if self.lp is not None else None

    def finish_reason(self, stop_reason: str) -> str:
        return finish_reason(stop_reason, len(self.calls))


class Logprobs:
    """Sampled steps → OpenAI logprobs, in the token strings of one tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.offset = 0   # completions' text_offset of the next token

    def _token(self, tid: int) -> tuple[str, bytes]:
        raw = self.tok.token_bytes(tid)
        return raw.decode("utf-8", errors="replace"), raw

    def _entry(self, tid: int, lp: float) -> dict[str, Any]:
        text, raw = self._token(tid)
        return {"token": text, "logprob": lp, "bytes": list(raw)}

    def chat(self, steps: Sequence[Sampled]) -> list[dict[str, Any]]:
        """``choices[].logprobs.content`` entries for these steps."""
        return [{**self._entry(s.id, s.logprob),
                 "top_logprobs": [self._entry(i, lp) for i, lp in s.top]} for s in steps]

    def completion(self, steps: Sequence[Sampled]) -> dict[str, list]:
        """``choices[].logprobs`` of a legacy completion for these steps; the
        sampled token is always among ``top_logprobs`` (as vLLM reports it)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                "text_offset": []}
        for s in steps:
            text, _ = self._token(s.id)
            top = {self._token(i)[0]: lp for i, lp in s.top}
            top.setdefault(text, s.logprob)
            out["tokens"].append(text)
            out["token_logprobs"].append(s.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def merge_completion_logprobs(parts: Sequence[dict[str, list]]) -> dict[str, list]:
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                            "text_offset": []}
    for p in parts:
        for k in out:
            out[k] += p[k]
    return out
