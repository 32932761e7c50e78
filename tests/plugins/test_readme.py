"""README.md as a new user follows it on a fresh machine without a GPU.

Each set-up command (with the ``[cuda]`` extra and without) runs as written in
a fresh venv whose ``python3`` comes first on PATH; then every example command
of the README runs as written. Each either works or, where it needs a GPU,
fails with exit status 1 and one line on stderr that says to use
``--device cpu`` — and then works with ``--device cpu`` added, as the README
says. Only the port of the server differs (a free one instead of 8080, since
other work may hold 8080), and ``bench`` on the CPU runs a few tokens instead
of its GPU-sized defaults. The test command itself is what runs this file.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from orcd.devkit.testing import gpu_available
from support import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
TEST_COMMAND = "python3 -m pip install -q -e '.[dev]'"
BENCH_ON_CPU = ["--prompt-tokens", "8", "--gen-tokens", "2", "--repeat", "1"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(gpu_available(), reason="checks the README without a GPU")]


def code_lines(text: str) -> list[str]:
    """The README's commands: its indented code lines, comments cut."""
    lines = [ln[4:] for ln in text.splitlines() if ln.startswith("    ") and ln.strip()]
    return [re.sub(r"\s+#\s.*$", "", ln).rstrip() for ln in lines]


def setup_commands() -> list[str]:
    return [c for c in code_lines(README)
            if c.startswith("python3 -m pip install") and not c.startswith(TEST_COMMAND)]


def test_the_readme_has_what_this_test_runs():
    setups = setup_commands()
    assert len(setups) == 2 and "'.[cuda]'" in setups[0] and "'.[cuda]'" not in setups[1]
    assert all(s.endswith(("&& orcd pull && orcd serve", "&& orcd pull && orcd serve --device cpu"))
               for s in setups)
    assert [c.split()[1] for c in code_lines(README) if c.startswith("orcd ")] == \
        ["generate", "inspect", "synth", "bench"]
    assert sum(c.startswith("curl ") for c in code_lines(README)) == 2


class Venv:
    def __init__(self, root: Path) -> None:
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
        self.root = root
        keep = {k: v for k, v in os.environ.items()
                if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "ORCD_BLOCK_PLUGINS")}
        self.env = {**keep, "VIRTUAL_ENV": str(root), "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                    "PATH": f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}

    def sh(self, command: str, cwd: Path = ROOT, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=cwd, env=self.env, capture_output=True,
                              text=True, timeout=timeout)


def set_up(tmp: Path, command: str) -> tuple[Venv, list[str]]:
    """Run the install and `orcd pull` of a set-up command; return the venv and
    the rest of the command (the serve)."""
    install, pull, *serve = command.split(" && ")
    assert pull == "orcd pull" and len(serve) == 1
    venv = Venv(tmp)
    r = venv.sh(install)
    assert r.returncode == 0, r.stderr[-3000:]
    assert venv.sh("command -v orcd").stdout.strip() == str(tmp / "bin" / "orcd")
    r = venv.sh(pull, timeout=1800)
    assert r.returncode == 0 and r.stdout.strip().endswith(".gguf"), r.stderr[-2000:]
    return venv, shlex.split(serve[0])


def needs_a_gpu(r: subprocess.CompletedProcess) -> bool:
    """Exit 1 with one line on stderr that says to use --device cpu."""
    lines = r.stderr.strip().splitlines()
    return (r.returncode == 1 and len(lines) == 1 and "use --device cpu" in lines[0]
            and "Traceback" not in r.stderr)


def run_examples(venv: Venv, cwd: Path, then_on_cpu: bool = True) -> None:
    for command in (c for c in code_lines(README) if c.startswith("orcd ")):
        r = venv.sh(command, cwd=cwd, timeout=600)
        if r.returncode == 0:
            continue
        assert needs_a_gpu(r), f"{command}:\n{r.stderr[-3000:]}"
        if not then_on_cpu:
            continue
        extra = ["--device", "cpu", *(BENCH_ON_CPU if command.startswith("orcd bench") else [])]
        r = venv.sh(f"{command} {shlex.join(extra)}", cwd=cwd, timeout=600)
        assert r.returncode == 0, f"{command} --device cpu:\n{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def model_available():
    from orcd.pull import cached_path
    if cached_path("qwen2.5-coder-0.5b") is None and os.environ.get("ORCD_NO_PULL"):
        pytest.skip("the default model is not cached and ORCD_NO_PULL is set")


def test_gpu_set_up_on_a_machine_without_a_gpu(tmp_path, model_available):
    venv, serve = set_up(tmp_path / "venv", setup_commands()[0])
    assert serve == ["orcd", "serve"]
    assert needs_a_gpu(venv.sh("orcd serve", timeout=300))
    run_examples(venv, tmp_path, then_on_cpu=False)   # the CPU runs: the next test


def test_cpu_set_up_and_every_example(tmp_path, model_available):
    venv, serve = set_up(tmp_path / "venv", setup_commands()[1])
    assert serve == ["orcd", "serve", "--device", "cpu"]
    port = free_port()
    with open(tmp_path / "serve.log", "w") as log:   # the narration, read on failure
        proc = subprocess.Popen([*serve, "--port", str(port)], cwd=tmp_path, env=venv.env,
                                stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", timeout=300)
        curls = [c.replace("localhost:8080", f"localhost:{port}")
                 for c in code_lines(README) if c.startswith("curl ")]
        execute, chat = (venv.sh(c, cwd=tmp_path, timeout=600) for c in curls)
        assert execute.returncode == 0 and "event: end" in execute.stdout, execute.stdout[-2000:]
        answer = json.loads(chat.stdout)["choices"][0]["message"]["content"]
        assert chat.returncode == 0 and answer.strip()
    except AssertionError as e:
        log = (tmp_path / "serve.log").read_text()[-3000:]
        raise AssertionError(f"{e}\n--- orcd serve's stderr ---\n{log}") from None
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    run_examples(venv, tmp_path)
