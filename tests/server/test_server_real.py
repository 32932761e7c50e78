"""The real Qwen2.5-Coder-0.5B over HTTP on the CPU backend: the haiku test,
seeded sampling, and UTF-8 with CJK and emoji. Slow (real model on numpy)."""

from __future__ import annotations

import re
import uuid

import httpx
import openai
import pytest

from orcd.devkit.server_testing import SSEStream, running_server
from orcd.server.state import ServerConfig

pytestmark = pytest.mark.slow
HAIKU = [{"role": "user", "content": "Write a haiku about GPU computing"}]


@pytest.fixture(scope="module")
def srv(real_qwen):
    cfg = ServerConfig(model_path=str(real_qwen), model_ref="qwen2.5-coder-0.5b",
                       worker_id=str(uuid.uuid4()), device="cpu", ctx_size=512)
    with running_server(cfg) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_haiku_over_http(srv, client):
    r = client.chat.completions.create(model="qwen2.5-coder-0.5b", messages=HAIKU,
                                       temperature=0, max_tokens=48)
    text = r.choices[0].message.content
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert r.choices[0].finish_reason == "stop", text
    assert len(lines) == 3, text
    assert re.search(r"GPU|parallel|core|comput|thread|kernel|silicon", text, re.I), text
    # the same prompt, rendered and sent raw to /execute, gives the same greedy text
    prompt = srv.state.chat_template.render(HAIKU)
    events = SSEStream(f"{srv.url}/execute", {"job_id": "haiku", "prompt": prompt,
                                              "temperature": 0, "max_tokens": 48}).join()
    assert events[-1][0] == "end" and events[-1][1]["stop_reason"] == "eog"
    assert events[-1][1]["prompt_tokens"] == r.usage.prompt_tokens
    assert "".join(d["t"] for k, d in events if k == "token") == text


def test_seeded_sampling_is_reproducible(client):
    runs = [client.chat.completions.create(model="qwen2.5-coder-0.5b", messages=HAIKU, temperature=0.7, seed=2024,
                                           max_tokens=8).choices[0].message.content
            for _ in range(2)]
    assert runs[0] == runs[1] and runs[0]


def test_cjk_and_emoji_stream_as_whole_characters(srv):
    prompt = "<|im_start|>user\n用中文写一句关于猫的话 🐱<|im_end|>\n<|im_start|>assistant\n"
    with httpx.stream("POST", f"{srv.url}/execute", timeout=300,
                      json={"job_id": "cjk", "prompt": prompt, "temperature": 0,
                            "max_tokens": 8}) as r:
        raw = r.read()
    text = raw.decode("utf-8")   # strict
    pieces = [m for m in re.findall(r'"t":"((?:[^"\\]|\\.)*)"', text)]
    assert pieces and "\ufffd" not in "".join(pieces)
    assert re.search(r"[\u4e00-\u9fff]", "".join(pieces)), pieces   # the model answers in Chinese
    assert "event: end" in text
