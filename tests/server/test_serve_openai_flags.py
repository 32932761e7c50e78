"""``orcd serve --chat-template FILE --served-model-name NAME`` (vLLM's flags)."""

from __future__ import annotations

import socket
import uuid

import openai
import pytest

from orcd import cli
from orcd.commands import serve
from orcd.devkit.server_testing import running_server
from orcd.server.state import ServerConfig

TEMPLATE = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"


def parsed(argv):
    return cli.build_parser().parse_args(["serve", *argv])


def run(argv) -> int:
    """``orcd serve ARGV`` through the CLI's entry point (its exit-code rule)."""
    try:
        return cli.main(["serve", *argv])
    except SystemExit as e:
        return e.code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base(tiny_model):
    return ["--model", str(tiny_model("qwen2-tiny")), "--device", "cpu"]


def test_the_flags_reach_the_config(base, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    checked = serve.validate(parsed([*base, "--port", str(free_port()),
                                     "--chat-template", str(path)]))
    assert checked["chat_template"] == TEMPLATE
    assert parsed([*base, "--served-model-name", "x"]).served_model_name == "x"


@pytest.mark.parametrize("content,message", [
    (None, "No such file"), ("", "the file is empty"), ("{% for %}", "does not compile")])
def test_a_bad_chat_template_file_is_one_line_and_exit_1(base, tmp_path, capsys, content, message):
    path = tmp_path / "t.jinja"
    if content is not None:
        path.write_text(content)
    rc = run([*base, "--port", str(free_port()), "--chat-template", str(path)])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and "Traceback" not in err


def test_an_empty_served_name_is_refused(base, capsys):
    assert run([*base, "--served-model-name", " "]) == 1
    assert "--served-model-name must not be empty" in capsys.readouterr().err


def test_the_served_template_replaces_the_models(tiny_model):
    cfg = ServerConfig(model_path=str(tiny_model("qwen2-tiny")), model_ref="qwen2-tiny",
                       worker_id=str(uuid.uuid4()), device="cpu", ctx_size=512,
                       chat_template=TEMPLATE, served_model_name="mine")
    with running_server(cfg) as s:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="mine", max_tokens=1,
                                      messages=[{"role": "user", "content": "hey"}])
        tok = s.state.loaded.tokenizer
        assert r.usage.prompt_tokens == len(tok.encode("<<hey>>", add_special=True))
        assert r.model == "mine"
