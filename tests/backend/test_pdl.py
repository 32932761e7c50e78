"""Programmatic dependent launch: the kernels' half of the promise (each waits
for its predecessor before touching memory) read from the sources, and the
launcher's half (only such kernels, only on sm_90+, only when asked) against a
fake driver. Whether it pays is bench/decode_profile.py's question (RESULTS.md)."""

from __future__ import annotations

import re
import types
from dataclasses import replace

import pytest

from orcd.backends.cuda.backend import kernel_sources
from orcd.backends.cuda import driver
from orcd.backends.cuda.launch import KernelAttrs, Launcher
from orcd.backends.cuda.nvrtc import KernelSource
from orcd.quant.builtin import builtin_table

from tests.backend.test_cuda_logic import INFO

WAITS = ("orcd_prior_done()", "orcd_grid_wait()")


def kernel_bodies(text: str) -> dict[str, str]:
    """name -> body of every ``__global__`` function in ``text`` (macro kernels keep
    their ``##`` names), found by brace matching from the first ``{`` after it."""
    out = {}
    for m in re.finditer(r"__global__", text):
        open_ = text.index("{", m.end())
        name = re.findall(r"([\w#]+)\s*\(", text[m.end():open_])[-1]
        depth, i = 0, open_
        while True:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        out[name] = text[open_ + 1:i]
    return out


def test_kernel_bodies_finds_macro_and_plain_kernels():
    text = ('extern "C" __global__ void __launch_bounds__(256) k_##NAME(int a) { f(a); } \\\n'
            'extern "C" __global__ void plain(const int* x) {\n    if (x) { g(); }\n    h();\n}\n')
    assert kernel_bodies(text) == {"k_##NAME": " f(a); ", "plain": "\n    if (x) { g(); }\n    h();\n"}


SOURCES = {f"{s.name}-{i}": s for i, s in enumerate(kernel_sources(builtin_table()))}
# what a kernel may do before it waits: fetch its weights into L2 and find its
# segment (fused.cu's BLOCK_SEGMENT, matmul.cu's GEMV_SEGMENT: index math on the
# kernel's arguments)
BEFORE_WAIT = ("orcd_prefetch_rows(", "prefetch_segment(")
SEGMENT_MACROS = ("BLOCK_SEGMENT", "GEMV_SEGMENT")


def object_macros(text: str) -> dict[str, str]:
    """name -> body of every ``#define NAME body`` without parameters."""
    joined = text.replace("\\\n", " ")
    return {m[0]: m[1] for m in re.findall(r"^\s*#define\s+(\w+)(?![\w(])\s*(.*)$", joined, re.M)}


def statements_before_wait(body: str, macros: dict[str, str]) -> list[str] | None:
    """The statements of ``body`` before its first wait (object macros expanded, the
    SEGMENT_MACROS kept and dropped); None when it never waits."""
    body = body.replace("\\\n", " ")
    for _ in range(3):
        body = re.sub(r"\b(\w+)\b", lambda m: m[1] if m[1] in SEGMENT_MACROS else macros.get(m[1], m[1]), body)
    at = min((body.find(w) for w in WAITS if w in body), default=-1)
    if at < 0:
        return None
    before = body[:at]
    for name in SEGMENT_MACROS:
        before = re.sub(rf"\b{name}\b", "", before)
    return [s.strip() for s in before.split(";") if s.strip()]


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_kernel_of_a_waiting_source_waits_before_it_touches_memory(name):
    src = SOURCES[name]
    assert src.pdl, f"{name} does not include pdl.cuh: its kernels would never start early"
    texts = [src.source, *(t for h, t in src.headers.items() if h.endswith(".cuh"))]
    macros = {k: v for t in texts for k, v in object_macros(t).items()}
    bodies = {k: b for t in texts for k, b in kernel_bodies(t).items()}
    assert bodies, name
    for kernel, body in bodies.items():
        before = statements_before_wait(body, macros)
        assert before is not None, f"{name}: kernel {kernel} never calls orcd_prior_done()"
        for s in before:
            assert s.startswith(BEFORE_WAIT), f"{name}: kernel {kernel} does {s!r} before it waits"


def test_the_rule_sees_through_macros_and_catches_early_work():
    macros = object_macros("#define PRO \\\n    orcd_prefetch_rows(w, 1, 0, 4, n); \\\n    orcd_prior_done();\n")
    assert statements_before_wait(" PRO f(); ", macros) == ["orcd_prefetch_rows(w, 1, 0, 4, n)"]
    assert statements_before_wait(" out[0] = 1; orcd_prior_done(); ", macros) == ["out[0] = 1"]
    assert statements_before_wait(" f(); ", macros) is None


def test_a_source_without_the_header_is_not_marked():
    assert not KernelSource.from_package("orcd.backends.cuda.kernels", "gemm_simt.cu").pdl
    assert KernelSource.from_package("orcd.ops", "norm.cu").headers["pdl.cuh"].count("griddepcontrol") == 2


# -- the launcher, against a fake driver --------------------------------------------

class FakeDriver:
    """The attribute and config types cuLaunchKernelEx takes, as plain objects."""

    CUlaunchAttributeID = types.SimpleNamespace(CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION=6)

    class CUlaunchAttribute:
        def __init__(self):
            self.id, self.value = None, types.SimpleNamespace(programmaticStreamSerializationAllowed=0)

    class CUlaunchConfig:
        pass


class FakeKernel:
    def __init__(self, name: str, pdl: bool) -> None:
        self.name, self.pdl, self.handle = name, pdl, f"h-{name}"
        self.attrs = KernelAttrs(max_threads_per_block=1024, static_shared=0, num_regs=32)
        self.checked: dict = {}

    def allow_shared(self, nbytes: int) -> None:
        pass


@pytest.fixture
def calls(monkeypatch):
    made: list = []
    monkeypatch.setattr(driver, "cu", lambda name, *args: made.append((name, args)))
    monkeypatch.setattr(driver, "driver_module", lambda: FakeDriver)
    return made


def fake_device(cc=(9, 0)):
    return types.SimpleNamespace(info=replace(INFO, compute_capability=cc), stream="s0",
                                 make_current=lambda: None)


def test_waiting_kernels_launch_early_when_asked(calls):
    launch = Launcher(fake_device(), debug=False, pdl=True)
    launch(FakeKernel("waits", True), (4, 2), 128, [1], shared=64)
    launch(FakeKernel("plain", False), 4, 128, [1])
    (ex, (config, handle, _params, _extra)), (plain, pargs) = calls
    assert (ex, handle, plain) == ("cuLaunchKernelEx", "h-waits", "cuLaunchKernel")
    assert (config.gridDimX, config.gridDimY, config.blockDimX, config.sharedMemBytes) == (4, 2, 128, 64)
    assert config.hStream == "s0" and config.numAttrs == 1
    assert config.attrs[0].id == 6 and config.attrs[0].value.programmaticStreamSerializationAllowed == 1
    assert pargs[:7] == ("h-plain", 4, 1, 1, 128, 1, 1)


@pytest.mark.parametrize("pdl,cc", [(False, (9, 0)), (True, (8, 9))])
def test_no_early_launch_when_off_or_before_sm90(calls, pdl, cc):
    launch = Launcher(fake_device(cc), debug=False, pdl=pdl)
    launch(FakeKernel("waits", True), 4, 128, [1])
    assert [c[0] for c in calls] == ["cuLaunchKernel"] and not launch.pdl
