"""GPT-OSS's harmony output parser: channels, chunking, tool calls, malformed
output, and its wiring into the OpenAI chat endpoint."""

from __future__ import annotations

import json
import random
import uuid

import httpx
import openai
import pytest

from orcd.chat import ChatTemplate
from orcd.devkit.server_testing import running_server
from orcd.server.state import ServerConfig
from orcd.toolcalls import ToolCall
from orcd_gpt_oss.harmony import MAX_HEADER, SPECIALS, HarmonyParser, parser_factory
from scripted import scripted_steps

THINK_THEN_ANSWER = ("<|channel|>analysis<|message|>User asks 2+2. Easy: 4.<|end|>"
                     "<|start|>assistant<|channel|>final<|message|>2 + 2 = **4**.")
PREAMBLE = ("<|channel|>commentary<|message|>Checking the docs…<|end|>"
            "<|start|>assistant<|channel|>final<|message|>Use `pip install x` 🚀<|return|>")
TOOL_CALL = ("<|channel|>analysis<|message|>Need weather.<|end|>"
             "<|start|>assistant<|channel|>commentary to=functions.get_weather "
             "<|constrain|>json<|message|>{\"city\": \"Paris\"}")
TOOL_IN_ROLE = (" to=functions.lookup<|channel|>commentary json<|message|>{\"q\": 1}<|call|>")
TRANSCRIPTS = [THINK_THEN_ANSWER, PREAMBLE, TOOL_CALL, TOOL_IN_ROLE,
               "plain text with a < and <| and <|end of nothing",
               "<|channel|>final<|message|>a<|end|>stray<|message|>tail<|start|>assistant<|chan"]


def merged(pieces):
    """Text pieces of one channel joined; a call as ("tool_call", (name, arguments, raw))."""
    out = []
    for ch, t in pieces:
        if ch == "tool_call":
            assert isinstance(t, ToolCall)
            out.append((ch, (t.name, t.arguments, t.raw)))
            continue
        assert ch in ("content", "reasoning") and isinstance(t, str)
        if t:
            out = out[:-1] + [(ch, out[-1][1] + t)] if out and out[-1][0] == ch else out + [(ch, t)]
    return out


def parse(*chunks):
    p = HarmonyParser()
    pieces = [x for c in chunks for x in p.feed(c)]
    return merged(pieces + p.finish())


def test_reasoning_then_answer():
    assert parse(THINK_THEN_ANSWER) == [("reasoning", "User asks 2+2. Easy: 4."),
                                        ("content", "2 + 2 = **4**.")]


def test_commentary_preamble_is_reasoning_and_return_ends_the_message():
    assert parse(PREAMBLE) == [("reasoning", "Checking the docs…"),
                               ("content", "Use `pip install x` 🚀")]
    # text after the end of the last message is outside any message: plain content
    assert parse(PREAMBLE + " trailing")[-1] == ("content", "Use `pip install x` 🚀 trailing")


@pytest.mark.parametrize("text", TRANSCRIPTS)
def test_every_split_point_gives_the_one_shot_result(text):
    whole = parse(text)
    for i in range(len(text) + 1):
        assert parse(text[:i], text[i:]) == whole, i
    assert parse(*text) == whole                      # one character at a time
    rng = random.Random(0)
    for _ in range(50):                               # three uneven chunks
        i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
        assert parse(text[:i], text[i:j], "", text[j:]) == whole


def test_a_special_token_split_across_feeds_is_held_back_not_shown():
    p = HarmonyParser()
    assert p.feed("<|channel|>final<|message|>Hi<|e") == [("content", "Hi")]
    assert p.feed("nd") == []
    assert p.feed("|>") == []
    assert p.feed("<|start|>assistant<|channel|>analysis<|mess") == []
    assert p.feed("age|>x") == [("reasoning", "x")]
    assert p.finish() == []


def test_function_calls_become_tool_calls_with_their_text_kept():
    assert parse(TOOL_CALL) == [
        ("reasoning", "Need weather."),
        ("tool_call", ("get_weather", '{"city": "Paris"}',
                       "<|start|>assistant<|channel|>commentary to=functions.get_weather "
                       "<|constrain|>json<|message|>{\"city\": \"Paris\"}"))]
    assert parse(TOOL_IN_ROLE) == [("tool_call", ("lookup", '{"q": 1}', TOOL_IN_ROLE))]


@pytest.mark.parametrize("text", [
    "<|channel|>commentary to=browser.search<|message|>{\"q\": 1}<|call|>",   # a built-in tool
    "<|channel|>commentary to=functions.f<|message|>not json<|call|>",
    "<|channel|>commentary to=functions.f<|message|>[1, 2]<|call|>",           # no object
    "<|start|>user to=functions.f<|channel|>commentary<|message|>{}<|call|>",  # not the assistant
])
def test_other_recipients_and_bad_arguments_pass_through_verbatim(text):
    assert parse(text) == [("content", text)]


def test_a_call_ends_at_the_next_message_too():
    text = ("<|channel|>commentary to=functions.a<|message|>{}"
            "<|start|>assistant<|channel|>final<|message|>done")
    assert parse(text) == [("tool_call", ("a", "{}", "<|channel|>commentary to=functions.a"
                                                     "<|message|>{}")), ("content", "done")]


def test_constrain_without_recipient_is_still_the_channel():
    assert parse("<|channel|>final <|constrain|>json<|message|>{}") == [("content", "{}")]


@pytest.mark.parametrize("text", [
    "no header at all",                                               # plain text
    "Hello<|channel|>final<|message|>x",                              # text before the header
    "<|channel|>summary<|message|>unknown channel<|end|>",            # unknown channel
    "<|start|>user<|channel|>final<|message|>not the assistant",      # another role
    "<|channel|>final<|channel|>analysis<|message|>two channels",
    "<|channel|>analysis",                                            # header unterminated
    "<|channel|>final<|end|>",                                        # ended inside the header
    "<|message|>body without header",
    "<|end|><|return|><|call|><|constrain|>",
    "x" * (MAX_HEADER + 50),                                          # too long to be a header
])
def test_malformed_output_comes_back_exactly_as_plain_content(text):
    assert parse(text) == [("content", text)]
    assert parse(*text) == [("content", text)]


def test_long_plain_text_streams_once_it_cannot_be_a_header():
    p = HarmonyParser()
    assert p.feed("y" * MAX_HEADER) == []
    assert p.feed("yz") == [("content", "y" * (MAX_HEADER + 1) + "z")]
    assert p.feed("more") == [("content", "more")]


def test_after_a_malformed_stretch_a_new_message_is_parsed():
    text = "oops<|end|><|start|>assistant<|channel|>analysis<|message|>ok"
    assert parse(text) == [("content", "oops<|end|>"), ("reasoning", "ok")]


def test_random_soup_never_raises_and_is_split_independent():
    """Random mixes of specials, near-specials and text: no exception, the same
    pieces however chunked, and every output character comes from the input in order."""
    atoms = list(SPECIALS) + ["<|", "|>", "<", "assistant", "analysis", "final", "commentary",
                              " to=functions.f", "json", "hi ", "é", "\n"]
    rng = random.Random(1)
    for _ in range(300):
        text = "".join(rng.choice(atoms) for _ in range(rng.randrange(1, 14)))
        whole = parse(text)
        cuts = sorted(rng.randrange(len(text) + 1) for _ in range(3))
        parts = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert parse(*parts) == whole, (text, parts)
        out = iter(text)
        assert all(c in out for c in "".join(t for _, t in whole)), text


def test_factory_only_for_a_harmony_vocabulary():
    class Vocab:
        special_tokens = {"<|channel|>": 200005, "<|message|>": 200008}
    assert parser_factory(Vocab()) is HarmonyParser
    Vocab.special_tokens = {"<|im_start|>": 1}
    assert parser_factory(Vocab()) is None
    assert parser_factory(object()) is None


# ---- wired into the server: the tiny synthetic GPT-OSS through /v1/chat/completions ----

KEY = "test-key"
HI = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def gpt_oss_srv(tiny_model):
    cfg = ServerConfig(model_path=str(tiny_model("gpt-oss-tiny")), model_ref="gpt-oss-tiny",
                       worker_id=str(uuid.uuid4()), device="cpu", ctx_size=512, api_key=KEY)
    with running_server(cfg) as s:
        yield s


def test_the_plugin_provides_the_parser(host, gpt_oss_srv):
    tok = gpt_oss_srv.state.loaded.tokenizer
    assert host.output_parser("gpt-oss", tok) is HarmonyParser
    assert gpt_oss_srv.state.loaded.output_parser is HarmonyParser
    assert host.output_parser("qwen2", tok) is None


def raw_completion(srv, seed: int, n: int) -> str:
    """The same generation as the chat request, unparsed: the chat prompt's ids
    sent to /v1/completions with the same sampling."""
    tok = srv.state.loaded.tokenizer
    ids = ChatTemplate.for_tokenizer(tok).prompt_ids(tok, HI)
    r = httpx.post(f"{srv.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "gpt-oss-tiny", "prompt": ids, "max_tokens": n, "temperature": 1.0,
                         "seed": seed}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize("seed", [3, 11])
def test_chat_is_the_parsed_raw_output_streamed_or_not(gpt_oss_srv, seed):
    """The random tiny model's output is malformed harmony at best: never a 500,
    and the message is exactly what the parser makes of the raw generation."""
    c = openai.OpenAI(base_url=f"{gpt_oss_srv.url}/v1", api_key=KEY, max_retries=0)
    kw = dict(model="gpt-oss-tiny", messages=HI, temperature=1.0, seed=seed, max_tokens=24)
    raw = raw_completion(gpt_oss_srv, seed, 24)
    want = {"content": "", "reasoning": ""}
    for channel, text in parse(raw):
        want[channel] += text

    r = c.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason in ("stop", "length")
    assert msg.content == want["content"]
    assert (getattr(msg, "reasoning_content", None) or "") == want["reasoning"]

    chunks = list(c.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last = chunks[1:]
    assert last.choices[0].finish_reason == r.choices[0].finish_reason
    got = {"content": "", "reasoning": ""}
    for ch in body:
        delta = ch.choices[0].delta.model_dump(exclude_none=True)
        assert ch.choices[0].finish_reason is None
        assert len(delta) == 1 and set(delta) <= {"content", "reasoning_content"}, delta
        [(field, text)] = delta.items()
        assert isinstance(text, str) and text
        got["content" if field == "content" else "reasoning"] += text
    assert got == want


def test_raw_stream_frames_are_json_and_end_with_done(gpt_oss_srv):
    body = {"model": "gpt-oss-tiny", "messages": HI, "max_tokens": 16, "stream": True, "temperature": 1.0,
            "seed": 5}
    with httpx.stream("POST", f"{gpt_oss_srv.url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    frames = [json.loads(line[6:]) for line in lines[:-1]]
    assert all("error" not in f for f in frames)
    assert frames[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.fixture
def scripted(gpt_oss_srv, monkeypatch):
    """``scripted(text)``: the served model now generates ``text`` (as tokens), then
    ``<|return|>``, whatever the sampling, so the server sees real harmony output."""
    lm = gpt_oss_srv.state.loaded

    def script(text: str) -> None:
        tok = lm.tokenizer
        ids = tok.encode(text, add_special=False) + [tok.special_tokens["<|return|>"]]
        assert tok.decode(ids[:-1]) == text
        monkeypatch.setattr(lm.backend, "sample_step", scripted_steps(ids))
    return script


def stream_fields(client, **kw) -> list[tuple[str, str]]:
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"
    out = []
    for ch in chunks[1:-1]:
        [(field, text)] = ch.choices[0].delta.model_dump(exclude_none=True).items()
        out.append((field, text))
    return out


def test_served_harmony_splits_reasoning_from_content(gpt_oss_srv, scripted):
    scripted(THINK_THEN_ANSWER)
    c = openai.OpenAI(base_url=f"{gpt_oss_srv.url}/v1", api_key=KEY, max_retries=0)
    kw = dict(model="gpt-oss-tiny", messages=HI, max_tokens=200)
    msg = c.chat.completions.create(**kw).choices[0].message
    assert msg.content == "2 + 2 = **4**."
    assert msg.reasoning_content == "User asks 2+2. Easy: 4."
    fields = stream_fields(c, **kw)
    names = [f for f, _ in fields]
    assert names == sorted(names, key=lambda f: f != "reasoning_content")   # thinking first
    assert "".join(t for f, t in fields if f == "reasoning_content") == msg.reasoning_content
    assert "".join(t for f, t in fields if f == "content") == msg.content


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]}}}]


def test_served_tool_call_is_a_tool_call_when_tools_were_given(gpt_oss_srv, scripted):
    scripted(TOOL_CALL)
    c = openai.OpenAI(base_url=f"{gpt_oss_srv.url}/v1", api_key=KEY, max_retries=0)
    kw = dict(model="gpt-oss-tiny", messages=HI, max_tokens=200, tools=WEATHER)
    r = c.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert msg.reasoning_content == "Need weather."
    [call] = msg.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather",
                                                                         {"city": "Paris"})
    chunks = list(c.chat.completions.create(**kw, stream=True))
    deltas = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments


def test_forced_harmony_call_grammar_gives_a_parseable_call(gpt_oss_srv):
    pytest.importorskip("llguidance")
    from orcd.ops.sampling import allowed_ids
    state = gpt_oss_srv.state
    tok, n_vocab = state.loaded.tokenizer, state.loaded.hp.n_vocab
    m = state.grammars.lark(HarmonyParser.call_grammar(WEATHER, "get_weather", tok),
                            field="tool_choice")
    rng, ids = random.Random(0), []
    while len(ids) < 60:
        ok = [int(i) for i in allowed_ids(m.allowed(), n_vocab).nonzero()[0]]
        if set(ok) <= tok.eog_ids:
            break
        pick = ok[0] if len(ok) == 1 else rng.choice([i for i in ok if i not in tok.eog_ids])
        m.accept(pick)
        ids.append(pick)
    assert ok == [tok.special_tokens["<|call|>"]]   # the end the engine stops on: complete
    p = HarmonyParser()
    pieces = merged(p.feed(tok.decode(ids)) + p.finish())
    [(kind, (name, args, _))] = pieces
    assert kind == "tool_call" and name == "get_weather"
    assert json.loads(args)["city"] in ("Paris", "Oslo")


def test_served_tool_call_comes_back_as_content(gpt_oss_srv, scripted):
    scripted(TOOL_CALL)
    c = openai.OpenAI(base_url=f"{gpt_oss_srv.url}/v1", api_key=KEY, max_retries=0)
    msg = c.chat.completions.create(model="gpt-oss-tiny", messages=HI, max_tokens=200).choices[0].message
    assert msg.reasoning_content == "Need weather."
    assert msg.content.endswith("to=functions.get_weather <|constrain|>json<|message|>"
                                "{\"city\": \"Paris\"}")
