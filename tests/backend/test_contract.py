"""The op and backend contracts (orcd.ops.contract): the numpy reference and the
CUDA backend define every member with the same parameter names, so a model
forward written against one runs on the other. Importing the CUDA classes
touches no GPU."""

from __future__ import annotations

import inspect

import pytest

from orcd.backend.cpu import CpuBackend, CpuOps
from orcd.backend.cuda import CudaBackend
from orcd.backend.cuda_ops import CudaOps
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
