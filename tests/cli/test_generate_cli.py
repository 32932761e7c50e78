"""``orcd generate``: streams exactly what the engine generates, raw or through
the chat template."""

from __future__ import annotations

import argparse
import io
import re

import pytest

from orcd.chat import ChatTemplate
from orcd.commands import generate
from orcd.engine import Engine, GenerateRequest
from orcd.errors import InvalidRequest, OrcdError
from orcd.load import load_model
from orcd.sampling import SamplingParams


def run(argv, capsys) -> tuple[str, str]:
    p = argparse.ArgumentParser(prog="orcd generate")
    generate.add_arguments(p)
    assert generate.run(p.parse_args(argv)) == 0
    out = capsys.readouterr()
    return out.out, out.err


@pytest.fixture(scope="module")
def tiny(tiny_model, host):
    path = tiny_model("qwen2-tiny")
    lm = load_model(path, host=host, device="cpu", n_ctx=256)
    yield str(path), lm
    lm.close()


def engine_text(lm, ids, n, **sampling) -> str:
    return Engine(lm).generate(GenerateRequest(ids, n, SamplingParams(**sampling))).text


def test_raw_prompt_streams_the_engine_output(tiny, capsys):
    path, lm = tiny
    out, err = run(["--model", path, "--device", "cpu", "--prompt", "Hello", "--temperature", "0",
                    "--max-tokens", "12"], capsys)
    want = engine_text(lm, lm.tokenizer.encode("Hello"), 12, temperature=0)
    assert out == want + "\n"
    assert "12 generated" in err and "stop: max_tokens" in err


def test_chat_applies_the_template(tiny, capsys):
    path, lm = tiny
    out, _ = run(["--model", path, "--device", "cpu", "--prompt", "Hi", "--chat", "--system", "Be terse.",
                  "--temperature", "0", "--max-tokens", "8", "--quiet"], capsys)
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    ids = ChatTemplate.for_tokenizer(lm.tokenizer).prompt_ids(lm.tokenizer, msgs)
    assert out == engine_text(lm, ids, 8, temperature=0) + "\n"


def test_seed_is_printed_and_reproduces(tiny, capsys, monkeypatch):
    path, _ = tiny
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello"))
    out1, err = run(["--model", path, "--device", "cpu", "--prompt", "-", "--max-tokens", "10"], capsys)
    seed = re.search(r"seed (\d+)", err).group(1)
    out2, _ = run(["--model", path, "--device", "cpu", "--prompt", "Hello", "--max-tokens", "10",
                   "--seed", seed], capsys)
    assert out1 == out2


@pytest.mark.parametrize("flag,value", [("--temperature", "2.5"), ("--top-p", "1.5"),
                                        ("--max-tokens", "0"), ("--seed", "-1"),
                                        ("--repetition-penalty", "0")])
def test_bad_flags_are_clear_errors(tiny, flag, value):
    p = argparse.ArgumentParser()
    generate.add_arguments(p)
    args = p.parse_args(["--model", tiny[0], "--prompt", "x", "--device", "cpu", flag, value])
    with pytest.raises(InvalidRequest, match=flag):
        generate.run(args)


def test_unavailable_gpu_is_a_clear_error(tiny, capsys):
    """No device 99 anywhere: one line that says to use --device cpu, exit 1, no traceback."""
    from orcd.cli import main
    assert main(["generate", "--model", tiny[0], "--prompt", "x", "--device", "cuda:99"]) == 1
    err = capsys.readouterr().err
    assert "--device cuda:99: no usable NVIDIA GPU" in err and "use --device cpu" in err
    assert len(err.strip().splitlines()) == 1


def test_through_the_orcd_cli(tiny, capsys):
    from orcd.cli import main
    assert main(["generate", "--model", tiny[0], "--prompt", "Hello", "--device", "cpu",
                 "--temperature", "0", "--max-tokens", "4", "--quiet"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["generate", "--model", tiny[0], "--prompt", "x", "--device", "cpu",
                 "--top-k", "-3"]) == 1
    assert "--top-k must be 0 or more" in capsys.readouterr().err
