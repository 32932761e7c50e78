"""Shared fixtures: the plugin host, tiny synthetic models, the real Qwen file.

GPU tests carry the ``cuda`` marker. Without a usable GPU they are skipped, except
those also marked ``sim``: they run on the CUDA simulator (orcd.cudasim) where a C++
compiler is present (tests/cuda/conftest.py hands them simulated fixtures).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orcd import cudasim
from orcd.devkit.testing import gpu_available  # the same probe the plugin kit uses


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    simulate = cudasim.available()
    skip = pytest.mark.skip(reason="no usable NVIDIA GPU")
    for item in items:
        runs_simulated = simulate and "sim" in item.keywords and "gpu_only" not in item.keywords
        if "cuda" in item.keywords and not runs_simulated:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def host():
    from orcd.plugins import PluginHost
    return PluginHost()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, host):
    """``tiny_model(preset) -> Path``: a tiny synthetic GGUF, made once per session."""
    from orcd.devkit.synth import synthesize

    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("synth")

    def make(preset: str, seed: int = 0) -> Path:
        key = f"{preset}-{seed}"
        if key not in made:
            made[key] = synthesize(host, preset, root / f"{key}.gguf", seed=seed)
        return made[key]

    return make


@pytest.fixture(scope="session")
def real_qwen() -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, pulled once into the cache.

    Set ORCD_NO_PULL=1 to skip tests that need it instead of downloading."""
    from orcd.pull import cached_path, pull

    path = cached_path("qwen2.5-coder-0.5b")
    if path is None:
        if os.environ.get("ORCD_NO_PULL"):
            pytest.skip("real Qwen model not cached and ORCD_NO_PULL is set")
        path = pull("qwen2.5-coder-0.5b", progress=False)
    return path
