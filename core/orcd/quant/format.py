"""The ``QuantFormat`` row and the table the plugin host builds from all rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from orcd.errors import ModelLoadFailed

Dequantizer = Callable[[np.ndarray], np.ndarray]
Quantizer = Callable[[np.ndarray], np.ndarray]
RandomBlocks = Callable[[int, np.random.Generator, float], np.ndarray]


@dataclass(frozen=True)
class QuantFormat:
    """One GGML tensor type.

    ``dequantize(raw)`` takes the raw bytes of whole blocks (uint8, length a
    multiple of ``block_bytes``) and returns float32 values (``block_elems`` per
    block). ``quantize(x)`` takes float32 values (length a multiple of
    ``block_elems``) and returns the raw bytes. ``cuda`` names the CUDA source
    family that implements the format's device functions, or None.
    ``random_blocks(n_blocks, rng, std)`` returns ``n_blocks`` random but valid
    blocks (uint8, ``n_blocks * block_bytes``) whose dequantized values are
    finite, zero-mean and of standard deviation about ``std``; ``orcd synth``
    fills synthetic models with it without quantizing any floats.
    """

    type_id: int
    name: str
    block_elems: int
    block_bytes: int
    dequantize: Dequantizer
    quantize: Quantizer | None = None
    cuda: str | None = None
    random_blocks: RandomBlocks | None = None

    def row_bytes(self, n_elems: int) -> int:
        """Bytes of one row of ``n_elems`` values (must be whole blocks)."""
        if n_elems % self.block_elems:
            raise ValueError(f"{self.name}: row of {n_elems} values is not a whole number "
                             f"of {self.block_elems}-value blocks")
        return n_elems // self.block_elems * self.block_bytes

    def tensor_bytes(self, shape: Iterable[int]) -> int:
        """Bytes of a tensor of numpy ``shape`` (last axis contiguous)."""
        shape = tuple(shape)
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        return rows * self.row_bytes(shape[-1])

    def dequantize_tensor(self, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Dequantize raw tensor bytes into a float32 array of numpy ``shape``."""
        flat = self.dequantize(np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1))
        return flat.reshape(shape)


class FormatTable:
    """All known formats, keyed by GGML type id and by name."""

    def __init__(self, formats: Iterable[QuantFormat]) -> None:
        self.by_id: dict[int, QuantFormat] = {}
        self.by_name: dict[str, QuantFormat] = {}
        for f in formats:
            self.by_id[f.type_id] = f
            self.by_name[f.name] = f

    def __getitem__(self, type_id: int) -> QuantFormat:
        try:
            return self.by_id[type_id]
        except KeyError:
            known = ", ".join(f"{f.name}({i})" for i, f in sorted(self.by_id.items()))
            raise ModelLoadFailed(f"unsupported tensor type id {type_id}; known: {known}") from None

    def __contains__(self, type_id: int) -> bool:
        return type_id in self.by_id

    def __iter__(self):
        return iter(sorted(self.by_id.values(), key=lambda f: f.type_id))

    def __len__(self) -> int:
        return len(self.by_id)
