"""The ``QuantFormat`` row and the table the plugin host builds from all rows.

A row is everything orcd knows about one GGML tensor type: block sizes, the
numpy reference (dequantize, quantize, random valid blocks) and, in
``device``, what the GPU kernels need -- the C++ struct that reads the format,
the header it lives in, its kernel-name suffix and its layout in VRAM. The CUDA
kernels are generated from the rows (orcd.quant.device), so a format is one row
plus its device header, also when a plugin provides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from orcd.errors import ModelLoadFailed

Dequantizer = Callable[[np.ndarray], np.ndarray]
Quantizer = Callable[[np.ndarray], np.ndarray]
RandomBlocks = Callable[[int, np.random.Generator, float], np.ndarray]

PLANE_ALIGN = 16   # every VRAM plane starts 16-byte aligned: the kernels' widest loads


def _pad(n: int) -> int:
    return -(-n // PLANE_ALIGN) * PLANE_ALIGN


@dataclass(frozen=True)
class DeviceFormat:
    """How the CUDA kernels read a format.

    ``struct`` is the C++ struct the kernels are templated on, defined in the
    first of ``headers`` ((package, file) pairs of package data, in include
    order: a header may include those before it). Its constants ``QK`` (values
    per device block) and ``PIECES`` (pieces per block, one per thread and
    step) are repeated here as ``qk`` and ``pieces``: the launchers size grids
    with them. ``suffix`` names the kernels (``gemv_<suffix>_t1``, ...).
    ``int8``: the struct has ``dot8`` (int8 activations, dp4a); ``mma``: it also has
    ``mma_chunk`` (the decode batch's GEMV on the int8 tensor cores, ops/gemv_mma.cuh).

    ``planes`` is the VRAM layout. Empty: rows as the GGUF stores them. Else
    byte ranges (start, stop) of a GGUF block, one per plane: each row is kept
    as its planes one after the other -- plane k holds range k of every block
    of the row, in block order -- each plane padded to 16 bytes. So a format
    whose blocks are 17 or 18 bytes (MXFP4, Q4_0) gets its quants 16-byte
    aligned for 128-bit loads and its scales apart. The GGUF stays the file
    format; the layout is made while uploading (``to_vram``).

    ``block_to_vram`` (with its inverse ``block_from_vram``) may first rewrite
    each block, uint8 [n, block_bytes] -> [n, vram_block_bytes], exactly and
    reversibly (Q4_K's packed 6-bit scales unpacked to a byte each, so the
    kernels need no bit surgery); the planes then cut the rewritten block.
    ``device_rewrite`` names the same rewrite in orcd/ops/layout.cu (``"kscales"``:
    scales_unpacked), so the card makes this layout while uploading; empty: a
    format with a block rewrite is laid out by the host.
    """

    struct: str
    suffix: str
    headers: tuple[tuple[str, str], ...]
    qk: int
    pieces: int
    int8: bool = False
    mma: bool = False
    planes: tuple[tuple[int, int], ...] = ()
    block_to_vram: Callable[[np.ndarray], np.ndarray] | None = None
    block_from_vram: Callable[[np.ndarray], np.ndarray] | None = None
    vram_block_bytes: int | None = None
    device_rewrite: str = ""


@dataclass(frozen=True)
class QuantFormat:
    """One GGML tensor type.

    ``dequantize(raw)`` takes the raw bytes of whole blocks (uint8, length a
    multiple of ``block_bytes``) and returns float32 values (``block_elems`` per
    block). ``quantize(x)`` takes float32 values (length a multiple of
    ``block_elems``) and returns the raw bytes. ``device`` says how the CUDA
    kernels read the format (None: no GPU support; the load check refuses it on
    a GPU). ``random_blocks(n_blocks, rng, std)`` returns ``n_blocks`` random
    but valid blocks (uint8, ``n_blocks * block_bytes``) whose dequantized
    values are finite, zero-mean and of standard deviation about ``std``; ``orcd
    synth`` fills synthetic models with it without quantizing any floats.
    """

    type_id: int
    name: str
    block_elems: int
    block_bytes: int
    dequantize: Dequantizer
    quantize: Quantizer | None = None
    device: DeviceFormat | None = None
    random_blocks: RandomBlocks | None = None

    def __post_init__(self) -> None:
        size = self.vram_block_bytes
        for lo, hi in self.device.planes if self.device else ():
            if not 0 <= lo < hi <= size:
                raise ValueError(f"{self.name}: plane ({lo}, {hi}) outside its {size}-byte block")
        if self.device and self.device.planes:
            covered = sorted(b for lo, hi in self.device.planes for b in range(lo, hi))
            if covered != list(range(size)):
                raise ValueError(f"{self.name}: the planes must cover each block's bytes once")
        if self.device and (self.device.block_to_vram is None) != (self.device.block_from_vram is None):
            raise ValueError(f"{self.name}: a block rewrite needs its inverse")

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

    # -- the VRAM layout (DeviceFormat.planes) ----------------------------------------

    @property
    def planar(self) -> bool:
        return bool(self.device and self.device.planes)

    @property
    def vram_block_bytes(self) -> int:
        """Bytes of one block as the planes cut it (after any block rewrite)."""
        d = self.device
        return d.vram_block_bytes if d is not None and d.vram_block_bytes else self.block_bytes

    def vram_row_bytes(self, n_elems: int) -> int:
        """Bytes of one row in VRAM: its planes, each padded to 16; as stored if not planar."""
        raw = self.row_bytes(n_elems)
        if not self.planar:
            return raw
        nb = n_elems // self.block_elems
        return sum(_pad(nb * (hi - lo)) for lo, hi in self.device.planes)

    def vram_tensor_bytes(self, shape: Iterable[int]) -> int:
        shape = tuple(shape)
        rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        return rows * self.vram_row_bytes(shape[-1])

    def to_vram(self, raw: np.ndarray, n_elems: int, out: np.ndarray | None = None) -> np.ndarray:
        """Whole rows of ``n_elems`` values, GGUF bytes -> the VRAM layout (into ``out``
        when given: uint8, at least rows * vram_row_bytes long)."""
        raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
        rb, vb = self.row_bytes(n_elems), self.vram_row_bytes(n_elems)
        rows = raw.size // rb
        if rows * rb != raw.size:
            raise ValueError(f"{self.name}: {raw.size} bytes is not a whole number of {rb}-byte rows")
        dst = (np.empty(rows * vb, np.uint8) if out is None else out[:rows * vb]).reshape(rows, vb)
        if not self.planar:
            dst[:] = raw.reshape(rows, rb)
            return dst.reshape(-1)
        nb = n_elems // self.block_elems
        blocks = raw.reshape(rows * nb, self.block_bytes)
        if self.device.block_to_vram is not None:
            blocks = self.device.block_to_vram(blocks)
        blocks = blocks.reshape(rows, nb, self.vram_block_bytes)
        at = 0
        for lo, hi in self.device.planes:
            width = nb * (hi - lo)
            dst[:, at:at + width].reshape(rows, nb, hi - lo)[:] = blocks[:, :, lo:hi]
            dst[:, at + width:at + _pad(width)] = 0
            at += _pad(width)
        return dst.reshape(-1)

    def from_vram(self, planar: np.ndarray, n_elems: int) -> np.ndarray:
        """The inverse of ``to_vram``: whole VRAM rows -> GGUF bytes."""
        planar = np.asarray(planar, dtype=np.uint8).reshape(-1)
        vb = self.vram_row_bytes(n_elems)
        rows = planar.size // vb
        if not self.planar:
            return planar.copy()
        nb = n_elems // self.block_elems
        src = planar.reshape(rows, vb)
        out = np.empty((rows, nb, self.vram_block_bytes), np.uint8)
        at = 0
        for lo, hi in self.device.planes:
            width = nb * (hi - lo)
            out[:, :, lo:hi] = src[:, at:at + width].reshape(rows, nb, hi - lo)
            at += _pad(width)
        if self.device.block_from_vram is not None:
            return self.device.block_from_vram(out.reshape(rows * nb, -1)).reshape(-1)
        return out.reshape(-1)


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
