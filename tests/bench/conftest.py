"""What the bench script tests share: a script of bench/ as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench_module(monkeypatch):
    """bench/NAME.py as a module ``bench_NAME``, in sys.modules while the test runs
    (the dataclasses of a script look their module up there)."""
    monkeypatch.syspath_prepend(str(BENCH))   # the scripts import their siblings

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        return module
    return load
