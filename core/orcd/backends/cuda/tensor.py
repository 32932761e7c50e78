"""Device tensors the CUDA backend's ops exchange.

``DeviceTensor`` is a contiguous row-major array in device memory (activations,
KV cache, ids, positions). ``QWeight`` is a weight kept in its GGUF block format
(numpy-order shape, rows of whole blocks). ``Arena`` hands out scratch tensors
from one allocation with a bump pointer: a forward that asks for the same
shapes in the same order gets the same addresses, which is what lets a decode
step be captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from orcd.errors import VramOom

if TYPE_CHECKING:  # pragma: no cover
    from orcd.quant import QuantFormat

ALIGN = 256


@dataclass(frozen=True)
class DeviceTensor:
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    # the same values as int8 activations (orcd.ops.matmul_base.Q8Act), where the kernel that
    # wrote them also quantized them (attention's output); a view or row range drops it
    q8: Any = field(default=None, compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.shape)) * np.dtype(self.dtype).itemsize

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))   # not np.prod: ~20x slower, and called per launch

    def view(self, *shape: int) -> "DeviceTensor":
        """Same bytes, another shape (one dimension may be -1)."""
        shape = tuple(shape)
        if -1 in shape:
            known = int(math.prod(d for d in shape if d != -1))
            shape = tuple(self.numel // known if d == -1 else d for d in shape)
        if int(math.prod(shape)) != self.numel:
            raise ValueError(f"cannot view {self.shape} as {shape}")
        return DeviceTensor(self.ptr, shape, self.dtype)

    def rows(self, start: int, stop: int) -> "DeviceTensor":
        """Rows [start, stop) of the first axis: a view, no copy."""
        row = self.nbytes // self.shape[0]
        return DeviceTensor(self.ptr + start * row, (stop - start, *self.shape[1:]), self.dtype)


@dataclass(frozen=True)
class QWeight:
    """A weight in its format's VRAM layout (QuantFormat.to_vram: the GGUF blocks
    as stored, or planar rows); ``row_bytes`` and ``nbytes`` are VRAM sizes."""

    ptr: int
    shape: tuple[int, ...]      # numpy order: a linear weight is (n_out, n_in)
    type_id: int
    fmt: "QuantFormat"

    @property
    def row_bytes(self) -> int:
        return self.fmt.vram_row_bytes(self.shape[-1])

    @property
    def nbytes(self) -> int:
        return self.fmt.vram_tensor_bytes(self.shape)


class Arena:
    """Scratch tensors from one device allocation; ``reset()`` between steps."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.base, self.capacity, self.offset = ptr, nbytes, 0
        self.high_water = 0

    def empty(self, shape: tuple[int, ...], dtype: Any = np.float32) -> DeviceTensor:
        t = DeviceTensor(self.base + self.offset, tuple(int(d) for d in shape), np.dtype(dtype))
        size = -(-t.nbytes // ALIGN) * ALIGN
        if self.offset + size > self.capacity:
            raise VramOom(f"scratch arena exhausted: need {self.offset + size} bytes, "
                          f"have {self.capacity}", requested=size, available=self.capacity - self.offset)
        self.offset += size
        self.high_water = max(self.high_water, self.offset)
        return t

    def reset(self) -> None:
        self.offset = 0
