"""Matrix ops: quantized linear layers and embedding lookup.

The reference works on weights the CPU backend dequantized to float32 at load;
the CUDA kernels read the GGUF blocks and dequantize in registers.
"""

from __future__ import annotations

import numpy as np


def linear_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    # x: [T, n_in], w: [n_out, n_in], b: [n_out] -> [T, n_out]
    # w @ x.T runs several times faster than x @ w.T on the BLAS we test with
    y = np.ascontiguousarray((w @ x.T).T)
    return y if b is None else y + b


def embed_ref(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    # table: [n_vocab, D], ids: [T] -> [T, D]
    return table[ids].astype(np.float32)
