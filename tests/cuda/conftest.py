"""Fixtures every CUDA test module shares: one device, allocator, kernel compiler
and launcher for the whole session, and the ``gpu`` rig over them (gpu_rig.Gpu).

Without a GPU the same fixtures come from the CUDA simulator (orcd.cudasim): the
tests also marked ``sim`` run there (tests/conftest.py skips the others), so CI runs
the real kernel sources through the real launchers on the CPU.

Nothing CUDA is imported at import time: CI has no GPU, collects these modules
and skips them (tests/conftest.py), and importing orcd must not touch CUDA.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from gpu_rig import Gpu

from orcd.devkit.testing import gpu_available

SIMULATED = not gpu_available()   # decided once: the whole session is on the GPU or on the simulator


@pytest.fixture(scope="session")
def simulated() -> bool:
    return SIMULATED


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # A kernel that faulted leaves the session's CUDA context unusable: every later test
    # would fail for that alone (a card once turned one fault into 439 failures), so the
    # run stops after the test that caused it, which is named.
    yield
    from orcd.errors import device_lost

    if call.excinfo is not None and device_lost(call.excinfo.value):
        item.session.shouldstop = (f"{item.nodeid} left the CUDA context unusable "
                                   f"({call.excinfo.value}); the tests after it would fail for that alone")


@pytest.fixture(scope="session")
def dev():
    if SIMULATED:
        from orcd.cudasim import SimDevice

        yield SimDevice()
        return
    from orcd.backends.cuda.device import CudaDevice

    d = CudaDevice(int(os.environ.get("ORCD_TEST_GPU", "0")))
    yield d
    d.close()


@pytest.fixture(scope="session")
def alloc(dev):
    if SIMULATED:
        from orcd.cudasim import SimAllocator as Allocator
    else:
        from orcd.backends.cuda.memory import DeviceAllocator

        def Allocator():
            return DeviceAllocator(dev)
    a = Allocator()
    yield a
    a.free_all()


@pytest.fixture(scope="session")
def compiler(dev, tmp_path_factory):
    if SIMULATED:
        from orcd.cudasim import SimCompiler

        return SimCompiler()   # the on-disk cache: its key covers every input
    from orcd.backends.cuda.nvrtc import KernelCompiler

    return KernelCompiler(dev.info.arch, cache=tmp_path_factory.mktemp("kcache"), cuda_headers=True)


@pytest.fixture(scope="session")
def launcher(dev, alloc):
    if SIMULATED:
        from orcd.cudasim import SimLauncher

        return SimLauncher(after=alloc.check)
    from orcd.backends.cuda.launch import Launcher

    return Launcher(dev)


@pytest.fixture(scope="session")
def gpu(dev, alloc, compiler, launcher):
    return Gpu(dev, alloc, compiler, launcher)


@pytest.fixture
def scope(gpu):
    """The rig, with what the test uploads through it freed when the test ends.
    Module-scoped fixtures are set up before it, so their buffers stay."""
    with gpu.scope():
        yield gpu


@pytest.fixture
def rng():
    return np.random.default_rng()
