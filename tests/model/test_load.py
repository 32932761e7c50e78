"""The loading path: refusals before any upload, and what a load reports."""

from __future__ import annotations

import pytest

from orcd.backends.cpu import CpuBackend
from orcd.errors import InsufficientVram, ModelLoadFailed
from orcd.load import load_model


class TinyDevice:
    index = 3

    def __init__(self, free: int) -> None:
        self.free = free

    def mem_info(self):
        return self.free, 80 << 30


class FakeGpu(CpuBackend):
    """The CPU backend dressed as a device with little free memory."""

    def __init__(self, free: int) -> None:
        super().__init__()
        self.device = TinyDevice(free)
        self.uploaded = self.closed = False

    def load_weights(self, *a, **k):
        self.uploaded = True
        return super().load_weights(*a, **k)

    def close(self):
        self.closed = True


def test_insufficient_vram_is_refused_before_upload(tiny_model, host):
    path = tiny_model("qwen2-tiny")
    backend = FakeGpu(free=1 << 20)
    with pytest.raises(InsufficientVram) as e:
        load_model(path, host=host, backend=backend, n_ctx=64)
    err = e.value
    assert err.code == "INSUFFICIENT_VRAM"
    assert err.details["available"] == 1 << 20 and err.details["required"] > 1 << 20
    assert err.details["device"] == 3 and str(path) in err.message
    assert not backend.uploaded and backend.closed


def test_enough_vram_loads(tiny_model, host):
    backend = FakeGpu(free=8 << 30)
    lm = load_model(tiny_model("qwen2-tiny"), host=host, backend=backend, n_ctx=64)
    assert backend.uploaded and lm.quant_kind


def test_unconsumed_tensor_is_refused(tiny_model, host, monkeypatch):
    import orcd_qwen.model as qm
    real = qm.build

    def lazy(hp, w, backend):
        model = real(hp, w, backend)
        w._taken.discard("blk.0.ffn_up.weight")  # as if the forward ignored a tensor
        return model

    monkeypatch.setattr(qm, "build", lazy)
    with pytest.raises(ModelLoadFailed, match="did not use tensors blk.0.ffn_up.weight"):
        load_model(tiny_model("qwen2-tiny"), host=host, device="cpu", n_ctx=64)
