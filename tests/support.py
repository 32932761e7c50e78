"""Helpers shared by tests in different folders (tests/ is on sys.path through
tests/conftest.py, so ``from support import ...`` works from any subfolder).

A helper used by one folder only stays in that folder's test module."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

# cuda-bindings 13.5 + cuda-pathfinder 1.9 on a machine without the driver:
# cuInit raises instead of returning an error code
FAKE_DRIVER = '''
class DynamicLibNotFoundError(RuntimeError):
    pass

class CUresult:
    CUDA_SUCCESS = 0

def cuInit(flags):
    raise DynamicLibNotFoundError('"cuda" is an NVIDIA driver library and can only be found '
                                  'via system search. Ensure the NVIDIA display driver is installed.')
'''


def fake_cuda_package(root: Path) -> Path:
    """A ``cuda.bindings.driver`` whose cuInit raises, importable from ``root``."""
    (root / "cuda" / "bindings").mkdir(parents=True)
    (root / "cuda" / "__init__.py").write_text("")
    (root / "cuda" / "bindings" / "__init__.py").write_text("")
    (root / "cuda" / "bindings" / "driver.py").write_text(FAKE_DRIVER)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "the worker exited"
        try:
            if httpx.get(f"{url}/health", timeout=2).json()["status"] == "healthy":
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the worker did not become healthy")


def load_script(name: str):
    """scripts/NAME.py as a module (the golden generators, whose helpers tests reuse)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
