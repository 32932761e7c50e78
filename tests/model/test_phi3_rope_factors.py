"""Phi-3's LongRoPE factor choice, as llama.cpp's get_rope_factors makes it."""

import numpy as np
import pytest

from orcd.arch import HParams
from orcd.backends.cpu import CpuBackend
from orcd.weights import Weights
from orcd_phi3.model import _rope_factors

LONG = np.array([2.0, 4.0], np.float32)
SHORT = np.array([1.0, 1.5], np.float32)


@pytest.mark.parametrize("n_ctx,n_ctx_orig,n_ctx_train,want", [
    (4096, 4096, 131072, SHORT),     # within the original context: short factors
    (8192, 4096, 131072, LONG),      # beyond it: long factors
    (8192, 0, 4096, LONG),           # no original length in the file: the training context counts
    (4096, 0, 4096, SHORT),
])
def test_long_or_short_factors(n_ctx, n_ctx_orig, n_ctx_train, want):
    hp = HParams(n_ctx=n_ctx, n_ctx_orig=n_ctx_orig, n_ctx_train=n_ctx_train)
    w = Weights({"rope_factors_long.weight": LONG, "rope_factors_short.weight": SHORT})
    assert _rope_factors(hp, w, CpuBackend()) == tuple(want)
    assert w.unconsumed() == []          # both are consumed whichever is used


def test_no_factors_in_the_file():
    hp = HParams(n_ctx=4096, n_ctx_orig=0, n_ctx_train=4096)
    assert _rope_factors(hp, Weights({}), CpuBackend()) is None
