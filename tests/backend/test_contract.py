"""The op and backend contracts (orcd.ops.contract): the numpy reference and the
CUDA backend define every member with the same parameter names, so a model
forward written against one runs on the other. Importing the CUDA classes
touches no GPU."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from orcd.backends.cpu import CpuBackend, CpuOps
from orcd.backends.cuda.backend import CudaBackend
from orcd.backends.cuda.ops import CudaOps
from orcd.ops.contract import Backend, Ops


def members(protocol) -> list[str]:
    return sorted(n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_"))


def params(cls, name: str) -> list[str]:
    fn = inspect.getattr_static(cls, name)
    fn = fn.__func__ if isinstance(fn, (staticmethod, classmethod)) else fn
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize("protocol,impls", [(Ops, (CpuOps, CudaOps)), (Backend, (CpuBackend, CudaBackend))])
def test_every_member_has_the_contracts_parameters(protocol, impls):
    names = members(protocol)
    assert len(names) >= 12
    for cls in impls:
        for name in names:
            assert hasattr(cls, name), f"{cls.__name__} lacks {name}"
            assert params(cls, name) == params(protocol, name), f"{cls.__name__}.{name}"


def test_the_two_op_sets_are_equal():
    public = lambda cls: {n for n in vars(cls) if not n.startswith("_") and callable(getattr(cls, n))}  # noqa: E731
    assert public(CpuOps) == public(CudaOps) == set(members(Ops))


def test_the_reference_backend_is_a_backend():
    assert isinstance(CpuBackend(), Backend) and isinstance(CpuBackend().ops, Ops)


def test_a_forward_is_in_one_of_three_named_phases():
    from types import SimpleNamespace

    from orcd.ops.contract import Phase, in_phase, phase_of

    assert (phase_of(1), phase_of(7), phase_of(1, batched=True), phase_of(7, batched=True)) == (
        Phase.DECODE, Phase.PREFILL, Phase.ROWS, Phase.ROWS)
    ops = SimpleNamespace(phase=None)
    with pytest.raises(RuntimeError):
        with in_phase(ops, Phase.ROWS):
            assert ops.phase is Phase.ROWS
            raise RuntimeError("a failed forward")
    assert ops.phase is None          # back to "one sequence" whatever happened


def test_the_reference_batch_forward_runs_in_phase_rows(host, tiny_model):
    from orcd.load import load_model
    from orcd.ops.contract import Phase

    lm = load_model(tiny_model("qwen2-tiny"), host=host, device="cpu", n_ctx=128)
    try:
        b, hp, seen = lm.backend, lm.hp, []
        pool = b.new_kv_pool(hp.n_layer, 4, hp.n_head_kv, hp.head_dim, hp.get("head_dim_v"))
        linear = b.ops.linear

        def spy(x, w, bias=None):
            seen.append(b.ops.phase)
            return linear(x, w, bias)

        b.ops.linear = spy
        tables = np.arange(4, dtype=np.int32).reshape(2, 2)
        b.forward_batch(lm.model, pool, tables, [0, 1], [3, 4], [0, 0], 128, batched=True, last_only=False)
        assert seen and set(seen) == {Phase.ROWS} and b.ops.phase is None
    finally:
        lm.close()
