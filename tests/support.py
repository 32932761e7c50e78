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


#: how far apart two logits may be and still count as a tie that rounding can flip:
#: the CPU reference's ggml-cpu rounding leaves its logits 0.1-0.35 from llama.cpp's
#: (tests/model/test_parity.py), and BLAS's summation order differs between CPUs
NEAR_TIE = 0.5


def greedy_divergence(logits_at, got: list[int], want: list[int]) -> tuple[int, float] | None:
    """Where a greedy continuation ``got`` first leaves the oracle's ``want``, and
    how much the model preferred its own token there: (index, logit gap), or None
    when one is a prefix of the other. ``logits_at(k)``: the model's logits for the
    next token after the first k tokens of the continuation (where the two agree)."""
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if i is None:
        return None
    logits = logits_at(i)
    return i, float(logits[got[i]] - logits[want[i]])


def assert_greedy_agrees(logits_at, got: list[int], want: list[int], what: str) -> bool:
    """``got`` equals ``want``, or first leaves it at a near-tie of the model's own
    logits (NEAR_TIE); after that the two continuations are different texts and
    are not compared. Whether they were equal all along."""
    d = greedy_divergence(logits_at, got, want)
    if d is None:
        assert got == want, f"{what}: one continuation stopped before the other"
        return True
    assert d[1] <= NEAR_TIE, \
        f"{what}: left the oracle's greedy ids at token {d[0]}, preferring its own by {d[1]:.3f}"
    return False


def all_logits(lm, ids: list[int]):
    """Logits at every position of ``ids`` from an empty cache: [T, n_vocab] (host)."""
    b = lm.backend
    cache = b.new_kv_cache(lm.hp.n_layer, lm.n_ctx, lm.hp.n_head_kv, lm.hp.head_dim,
                           lm.hp.get("head_dim_v"))
    return b.to_host(lm.model.forward(b.ops, b.ids(ids), b.positions(0, len(ids)), cache,
                                      last_only=False))
