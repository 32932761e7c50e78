"""``orcd serve`` as a command: argument validation (one clear line, exit 1),
and a real process that drains and exits 0 on SIGTERM / SIGINT."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from orcd import cli
from orcd.commands import serve
from orcd.devkit.server_testing import SSEStream
from support import free_port, wait_healthy

ORCD = [sys.executable, "-m", "orcd.cli"]


def run_serve(argv: list[str], capsys) -> tuple[int, str]:
    """``orcd serve ARGV`` through the CLI's entry point (its exit-code rule)."""
    try:
        rc = cli.main(["serve", *argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def parsed(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(["serve", *argv])


def _cuda_present() -> bool:
    try:
        from orcd.backends.cuda.device import device_count
        return device_count() > 0
    except Exception:
        return False


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return str(tiny_model("qwen2-tiny"))


@pytest.mark.parametrize("extra,message", [
    (["--worker-id", "worker-7"], "is not a UUID"),
    (["--port", "80"], "outside 1024-65535"),
    (["--port", "70000"], "outside 1024-65535"),
    (["--port", "http"], "invalid int value"),
    (["--ctx-size", "0"], "--ctx-size must be a positive integer"),
    (["--max-tokens-out", "0"], "--max-tokens-out must be a positive integer"),
    (["--ctx-size", "64", "--max-tokens-out", "64"], "leaves no room for a prompt in --ctx-size 64"),
    (["--max-tokens-out", "4096"], "in the model's context length 4096; use at most 4095"),
    (["--device", "tpu"], "'tpu' is not cpu, cuda or cuda:N"),
    (["--inference-timeout-sec", "0"], "--inference-timeout-sec must be positive"),
    (["--queue-size", "-1"], "--queue-size must be 0 or more"),
    (["--max-batch", "0"], "--max-batch must be between 1 and 256, got 0"),
    (["--max-batch", "257"], "--max-batch must be between 1 and 256, got 257"),
    (["--max-batch", "many"], "invalid int value"),
    (["--residency-check-sec", "0"], "--residency-check-sec must be positive"),
    (["--tokenizer", "/no/such/tokenizer.json"], "--tokenizer /no/such/tokenizer.json: no such file"),
    (["--kv-cache-size-mb", "-5"], "--kv-cache-size-mb must be a positive integer"),
    (["--api-key", " "], "--api-key must not be empty"),
    (["--callback-url", "ftp://x"], "must be an http(s) URL"),
    (["--gpu-device", "1", "--device", "cpu"], "not allowed with"),
    (["--cuda-option", "moe_tc=off"], "--cuda-option needs a cuda device, not --device cpu"),
    (["--cuda-option", "warp_speed=on"], "--cuda-option 'warp_speed=on': expected one of"),
    (["--cuda-option", "gemm=cutlass"], "expected one of prefill_graphs=on|off"),
])
def test_bad_arguments_exit_1_with_a_clear_message(tiny, capsys, extra, message):
    rc, err = run_serve(["--model", tiny, "--device", "cpu", *extra], capsys)
    assert rc == 1 and message in err and "Traceback" not in err


def test_missing_model_file_and_directory(tmp_path, capsys):
    rc, err = run_serve(["--model", str(tmp_path / "nope.gguf"), "--device", "cpu"], capsys)
    assert rc == 1 and "no such model file" in err
    rc, err = run_serve(["--model", str(tmp_path), "--device", "cpu"], capsys)
    assert rc == 1 and "directory" in err


def test_port_in_use(tiny, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, err = run_serve(["--model", tiny, "--device", "cpu", "--port", str(port)], capsys)
    assert rc == 1 and f"cannot listen on 127.0.0.1:{port}" in err


def test_max_tokens_out_is_bounded_by_the_context_not_2048(tiny):
    args = parsed(["--model", tiny, "--device", "cpu", "--port", str(free_port()),
                   "--max-tokens-out", "4000"])
    assert serve.validate(args)["device"] == "cpu"
    assert parsed(["--model", tiny]).max_tokens_out is None   # default: the context


@pytest.mark.skipif(_cuda_present(), reason="a GPU is present")
def test_missing_gpu_is_a_clear_error(tiny, capsys):
    rc, err = run_serve(["--model", tiny], capsys)   # --device cuda:0 by default
    assert rc == 1 and "--device cuda:0: no usable NVIDIA GPU" in err and "--device cpu" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(_cuda_present(), reason="a GPU is present")
def test_gpu_device_is_a_deprecated_alias(tiny, capsys):
    rc, err = run_serve(["--model", tiny, "--gpu-device", "0"], capsys)
    assert rc == 1 and "--gpu-device is deprecated; use --device cuda:0" in err
    assert "--device cuda:0: no usable NVIDIA GPU" in err


def test_cuda_options_become_the_backend_options(tiny, monkeypatch):
    from orcd.commands import _options
    monkeypatch.setattr(_options, "check_device", lambda device: device)
    args = parsed(["--model", tiny, "--device", "cuda:0", "--port", str(free_port()),
                   "--cuda-option", "prefill_graphs=off", "--cuda-option", "gemm=simt", "--cuda-option", "moe_tc=off",
                   "--cuda-option", "pipelined_steps=off", "--cuda-option", "fold_prompts=on",
                   "--cuda-option", "prompt_step=1024"])
    assert serve.validate(args)["backend_options"] == {"prefill_graphs": False, "gemm": "simt", "moe_tc": False,
                                                       "pipelined_steps": False, "fold_prompts": True,
                                                       "prompt_step": "1024"}
    assert serve.validate(parsed(["--model", tiny, "--device", "cpu", "--port", str(free_port())]))[
        "backend_options"] == {}


def test_every_cuda_option_is_a_backend_parameter_whose_default_is_listed_first():
    # --cuda-option NAME=VALUE becomes CudaBackend(NAME=VALUE); the first value listed is
    # the measured default (so --help and the backend agree)
    import inspect

    from orcd.backends.cuda.backend import CudaBackend
    from orcd.commands._options import CUDA_OPTIONS, cuda_options

    params = inspect.signature(CudaBackend).parameters
    for name, values in CUDA_OPTIONS.items():
        assert name in params, name
        default = cuda_options([f"{name}={values[0]}"], "cuda:0")[name]
        assert str(params[name].default) == str(default), (name, default)
    assert cuda_options(["int8=off", "mma=off"], "cuda:0") == {"int8": "off", "mma": False}   # a mode, a switch


def test_gpu_device_maps_to_cuda_n(monkeypatch, capsys):
    from orcd.commands import _options
    monkeypatch.setattr(_options, "check_device", lambda device: device)
    assert _options.device_from_args(parsed(["--gpu-device", "3"])) == "cuda:3"
    assert "deprecated" in capsys.readouterr().err
    assert _options.device_from_args(parsed(["--device", "cuda:2"])) == "cuda:2"
    assert _options.device_from_args(parsed([])) == "cuda:0"


def start(argv: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([*ORCD, "serve", *argv, "--device", "cpu",
                             "--port", str(port)], stderr=subprocess.PIPE, text=True)
    return proc, f"http://127.0.0.1:{port}"


def signal_mid_stream(proc: subprocess.Popen, url: str, signals: list, max_tokens: int):
    """Once a stream runs, send ``signals`` 0.3 s apart: (exit code, events, stderr)."""
    try:
        wait_healthy(proc, url)
        st = SSEStream(f"{url}/execute", {"job_id": "sig", "prompt": "Hello", "temperature": 0,
                                          "max_tokens": max_tokens})
        st.wait_for("token")
        for i, sig in enumerate(signals):
            time.sleep(0.3 if i else 0)
            proc.send_signal(sig)
        rc = proc.wait(30)
        events = st.join()
    finally:
        if proc.poll() is None:
            proc.kill()
    return rc, events, proc.stderr.read()


def narration(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_the_running_job_and_exits_0(tiny, sig):
    proc, url = start(["--model", tiny, "--ctx-size", "4096"])
    rc, events, err = signal_mid_stream(proc, url, [sig], max_tokens=400)
    assert rc == 0, err
    # finished within the 5 s deadline or was cancelled then: either way, one terminal event
    assert [k for k, _ in events if k in ("end", "error")] == [events[-1][0]]
    if events[-1][0] == "error":
        assert events[-1][1]["code"] == "CANCELLED"
    shutdown = [e for e in narration(err) if e["event"] == "shutdown"]
    assert shutdown[0]["reason"] == sig.name and shutdown[-1]["phase"] == "done"


def test_load_failure_exits_1(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    proc, _ = start(["--model", str(bad)])
    rc = proc.wait(60)
    err = proc.stderr.read()
    assert rc == 1 and "MODEL_LOAD_FAILED" in err and "Traceback" not in err


def parsed(argv: list[str]):
    p = argparse.ArgumentParser(prog="orcd serve")
    serve.add_arguments(p)
    return p.parse_args(argv)


def test_api_key_from_the_environment_or_a_file(tiny, tmp_path, monkeypatch, capsys):
    base = ["--model", tiny, "--device", "cpu", "--port", str(free_port())]
    monkeypatch.delenv("ORCD_API_KEY", raising=False)
    assert serve.validate(parsed(base))["api_key"] is None
    monkeypatch.setenv("ORCD_API_KEY", "from-env")
    assert serve.validate(parsed(base))["api_key"] == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert serve.validate(parsed([*base, "--api-key-file", str(key_file)]))["api_key"] == "from-file"
    assert serve.validate(parsed([*base, "--api-key", "flag"]))["api_key"] == "flag"
    for extra, message in ((["--api-key-file", str(tmp_path / "none")], "No such file"),
                           (["--api-key", "a", "--api-key-file", str(key_file)], "not both"),
                           (["--max-connections", "0"], "--max-connections must be 1"),
                           (["--body-timeout-sec", "0"], "--body-timeout-sec must be positive"),
                           (["--header-timeout-sec", "-1"],
                            "--header-timeout-sec must be positive")):
        rc, err = run_serve([*base, *extra], capsys)
        assert rc == 1 and message in err, err


def test_second_sigterm_still_ends_every_stream(tiny):
    """The second signal cancels the running job at once: its stream ends with a
    retriable error event, and the worker still exits in order (0). Bound beyond
    loopback without a key, the worker warns at start."""
    port = free_port()
    proc = subprocess.Popen([*ORCD, "serve", "--model", tiny, "--ctx-size", "4096", "--device",
                             "cpu", "--host", "0.0.0.0", "--port", str(port)],
                            stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "ORCD_API_KEY"})
    rc, events, err = signal_mid_stream(proc, f"http://127.0.0.1:{port}",
                                        [signal.SIGTERM, signal.SIGTERM], max_tokens=2000)
    assert rc == 0, err
    assert events[-1][0] == "error", events[-3:]
    assert events[-1][1]["code"] == "CANCELLED" and events[-1][1]["retriable"] is True
    assert "warning: listening on 0.0.0.0 without an API key" in err
    phases = [e.get("phase") for e in narration(err) if e["event"] == "shutdown"]
    assert phases[0] == "begin" and "cancel" in phases and phases[-1] == "done"
    # the start-up time before the load, named: the process until `orcd serve` runs and
    # the arguments' checks; the model loads while the server's imports run, so these are
    # named in `ready`, with how long the process had lived by then
    events = narration(err)
    order = [e["event"] for e in events]
    assert order.index("startup") < order.index("model_load_start") < order.index("ready"), order
    startup = next(e for e in events if e["event"] == "startup")
    before = startup["phases"]
    assert set(before) == {"process", "validate"} and all(v >= 0 for v in before.values()), before
    # (the process clock ticks in 10 ms steps)
    assert startup["since_process_start_s"] >= before["process"] + before["validate"] - 0.01, startup
    ready = next(e for e in events if e["event"] == "ready")
    assert set(ready["phases"]) == {"process", "validate", "server_imports"}, ready
    assert ready["phases"]["server_imports"] > 0, ready
    assert ready["since_process_start_s"] > startup["since_process_start_s"] + ready["phases"]["server_imports"], ready


def test_the_load_begins_before_the_http_stack_is_imported(tiny, tmp_path):
    """orcd serve starts loading the model (Loading.start) before it imports fastapi,
    starlette or uvicorn, so the load overlaps those imports (issue 15's start-up)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys\n"
        "from orcd.server import loading\n"
        "def start(self):\n"
        "    heavy = sorted(m for m in ('fastapi', 'starlette', 'uvicorn', 'pydantic') if m in sys.modules)\n"
        "    print('IMPORTED BEFORE THE LOAD:', heavy, flush=True)\n"
        "    raise SystemExit(3)\n"
        "loading.Loading.start = start\n"
        "from orcd.cli import main\n"
        f"sys.exit(main(['serve', '--model', {str(tiny)!r}, '--device', 'cpu', '--port', '{free_port()}']))\n")
    done = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "IMPORTED BEFORE THE LOAD: []" in done.stdout, done.stdout
