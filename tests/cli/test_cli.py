"""The CLI's shared rules: one exit-code rule, defaults in every help, one
``--device`` flag, and a GPU probe that never raises whatever cuda-bindings
does on a machine without a GPU."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from orcd import cli
from orcd.commands import _options
from orcd.devkit import testing
from support import fake_cuda_package

ROOT = Path(__file__).resolve().parents[2]

def raising(exc):
    def f(*args):
        raise exc
    return f


class Result:  # cuda-python's CUresult enum member
    def __init__(self, name):
        self.name = name


def _driver(**calls) -> types.ModuleType:
    m = types.ModuleType("cuda.bindings.driver")
    m.CUresult = types.SimpleNamespace(CUDA_SUCCESS=0)
    m.__dict__.update(calls)
    return m


@pytest.fixture
def no_cache():
    testing.gpu_available.cache_clear()
    yield
    testing.gpu_available.cache_clear()


@pytest.mark.parametrize("driver", [
    None,                                                            # cuda-bindings not installed
    _driver(cuInit=raising(RuntimeError("DynamicLibNotFoundError"))),  # new bindings, no driver
    _driver(cuInit=raising(OSError("libcuda.so.1: cannot open"))),
    _driver(cuInit=lambda flags: (Result("CUDA_ERROR_NO_DEVICE"),)),   # old bindings, no device
    _driver(cuInit=lambda flags: (0,), cuDeviceGetCount=lambda: (0, 0)),  # a driver, no GPU
])
def test_gpu_probe_never_raises(monkeypatch, no_cache, driver):
    bindings = types.ModuleType("cuda.bindings")
    if driver is not None:
        bindings.driver = driver
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings if driver else None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", driver)
    assert testing.gpu_available() is False
    with pytest.raises(_options.UsageError, match="use --device cpu") as e:
        _options.check_device("cuda:0")
    assert "\n" not in str(e.value)


def test_conftest_survives_bindings_that_raise(tmp_path):
    """The README's test command with [cuda] installed on a CPU-only machine:
    collection (tests/conftest.py asks gpu_available) must not stop."""
    env = {**os.environ, "PYTHONPATH": str(fake_cuda_package(tmp_path))}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "--collect-only", "tests/cli/test_cli.py"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "INTERNALERROR" not in r.stdout + r.stderr, r.stdout[-2000:]


def test_parse_device():
    assert [_options.parse_device(t) for t in ("cpu", "CPU", "cuda", "cuda:3")] == \
        ["cpu", "cpu", "cuda:0", "cuda:3"]
    for bad in ("gpu", "cuda:", "cuda:-1", "1"):
        with pytest.raises(argparse.ArgumentTypeError):
            _options.parse_device(bad)


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", ["serve", "generate", "bench"])
def test_one_device_flag_on_every_model_subcommand(name):
    p = subparsers()[name]
    device = next(a for a in p._actions if "--device" in a.option_strings)
    assert device.type is _options.parse_device and device.default is None  # None: cuda:0
    assert "cuda:0" in p.format_help()


def test_every_option_shows_its_default():
    missing = []
    for name, p in subparsers().items():
        for a in p._actions:
            takes_value = a.nargs != 0 and a.option_strings and not a.required
            if takes_value and "default" not in (p._get_formatter()._expand_help(a) or ""):
                missing.append(f"{name} {a.option_strings[0]}")
    assert missing == []


@pytest.mark.parametrize("argv", [
    ["serve", "--no-such-flag"], ["generate", "--prompt", "x"], ["bench", "--model"],
    ["pull", "a", "b"], ["inspect"], ["synth", "--seed", "x"], ["nonsense"], [],
])
def test_usage_errors_exit_1(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 1
    assert "error:" in capsys.readouterr().err


def test_runtime_errors_exit_1_and_help_exits_0(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "none.gguf")]) == 1
    assert cli.main(["generate", "--model", str(tmp_path / "none.gguf"), "--prompt", "x",
                     "--device", "cpu"]) == 1
    assert cli.main(["synth", "nope", "-o", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("orcd: error [") for line in err)
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0
