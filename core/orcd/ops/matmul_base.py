"""What the matmul family's launchers share (ops/matmul.cu and gemv_mma.cuh): the
kernels' shapes (rows a launch takes, splits, tiles, the int8 rule), the int8
activations (``Q8Act``), a module per quantization format, and the argument checks.
``MatmulKernels`` (orcd.ops.matmul) and ``ExpertMatmuls`` (orcd.ops.matmul_experts)
build on ``MatmulBase``. Nothing here imports CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

# Which formats there are, their kernel-name suffixes, values per device block and
# int8 support all come from the format table (QuantFormat.device; orcd.quant.device
# generates matmul.cu's per-format instantiations from it).
# int8="auto" (the default): where the measured gain pays for the extra quantize launch.
# H200, bench/RESULTS.md ("Planar VRAM layouts"): with 16-byte quant loads and 32-value
# pieces the int8 GEMVs are 1.05-5.5x faster than the fp32 ones at every size (Q5_0
# 4864 x 896: 3.5 vs 6.8 us; 896 x 896: 2.3 vs 2.8 us); below a few million values the
# quantize launch (and the single-block rms_norm_q8) costs about what they gain, so
# the rule stays by size, lowered from 16M to 8M values: Qwen2.5-0.5B's gate/up (8.7M)
# and every GPT-OSS and Phi-3 projection take int8, Qwen's small q/k/v, o and down not.
INT8_AUTO_MIN_VALUES = 1 << 23   # weight values the GEMVs of one input read, at least
INT8_MODES = ("off", "auto", "all")
GEMV_MAX_T = 8              # decode: tokens per GEMV launch (each weight byte read once for all)
GEMV_TM = (1, 2, 4, 8, 16)  # GEMV instantiations: T is rounded up to one of these
GEMV_Q8_TM = GEMV_TM + (32,)  # and of the int8 GEMV (a weight piece unpacked once for all rows)
GATED_Q8_TM = GEMV_TM       # and of the int8 gate/up GEMV with SwiGLU (MatmulKernels.gated)
GEMV_SEGMENTS = 3           # weights one int8 GEMV launch takes (matmul.cu's GEMV_SEG_ARGS)
# rows of a decode batch per GEMV launch (MatmulKernels.gemv): a batch of 16 (32 with int8
# activations) reads each weight once per step, not twice as two launches of 8 did
BATCH_GEMV_T = GEMV_TM[-1]
BATCH_GEMV_Q8_T = GEMV_Q8_TM[-1]
GEMV_ROWS = 4               # warps per GEMV block
MMA_ROWS, MMA_THREADS = 16, 256   # weight rows and threads of a tensor-core GEMV block (gemv_mma.cuh)
MOE_TILE = 8                # pairs per tile of the grouped expert matmul (matmul.cu's MOE_TILE)
MOE_TC_TILE = 64            # pairs per tile of the tensor-core grouped matmul (matmul.cu's TC_TILE)
MOE_TC_ROWS = 64            # weight rows per block of it (TC_ROWS)
MOE_MAX_K = 8               # experts per token the fused down kernel sums (matmul.cu's MOE_MAX_K)
WEIGHT_TILE_ELEMS = 1 << 24  # prefill dequantizes at most this many weight values at once (32 MiB fp16)
MAX_GRID_Y = 65535


def gemv_split(n_out: int, pieces: int) -> int:
    """Warps that share one output row of ``pieces`` pieces: few rows -> more warps
    per row, so the grid still fills the GPU (896 rows x 4 warps vs 151936 rows x 1),
    but never a warp past the row's last 32 pieces (it would have nothing to do)."""
    split = 1 if n_out >= 8192 else 2 if n_out >= 2048 else 4
    while split > 1 and 32 * (split - 1) >= pieces:
        split //= 2
    return split


def row_pieces(w) -> int:
    """Pieces in one row of w (a thread takes one at a time)."""
    qk, pieces = device_block(w)
    return w.shape[-1] // qk * pieces


def prefill_chunk_rows(n_out: int, n_in: int) -> int:
    """Weight rows dequantized per prefill GEMM (a tile of <= WEIGHT_TILE_ELEMS values)."""
    return min(n_out, max(128, WEIGHT_TILE_ELEMS // n_in // 128 * 128))


def matmul_source(formats=(), defines: Mapping[str, str] | None = None):
    """matmul.cu with the kernels of ``formats`` (none: only the format-free ones,
    quantize_q8 and the prefill glue); ``defines``: macros set before it (the
    experiments matmul.cu keeps behind #if, e.g. ORCD_GEMV_BATCH; part of the source,
    so of its cache key)."""
    from orcd.quant.device import kernel_source

    src = kernel_source("orcd.ops", "matmul.cu", formats)
    if not defines:
        return src
    prelude = "".join(f"#define {name} {value}\n" for name, value in sorted(defines.items()))
    return replace(src, source=prelude + src.source)


def int8_capable(w) -> bool:
    """Whether w's format has dp4a kernels (int8 activations)."""
    return w.fmt.device is not None and w.fmt.device.int8


def mma_capable(w) -> bool:
    """Whether w's format has the int8 tensor-core GEMV (gemv_mma.cuh)."""
    return w.fmt.device is not None and w.fmt.device.mma


def tc_step(w) -> int:
    """Values per K step of the tensor-core tiles (moe_gemm_tc) for w's
    format: one block, at least 32 (matmul.cu's TC_BK)."""
    return max(32, w.fmt.device.qk)


def tc_takes(w, n_in: int) -> bool:
    """Whether the tensor-core tiles take rows of n_in values times w."""
    return w.fmt.device is not None and n_in % tc_step(w) == 0


def device_block(w) -> tuple[int, int]:
    """(values per kernel block, pieces per block) of w's format, as its device struct."""
    return w.fmt.device.qk, w.fmt.device.pieces


@dataclass(frozen=True)
class Q8Act:
    """Activations quantized for the int8 GEMVs (quantize_q8_ref's values):
    xq int8 [T, n] and xd float32 [T, n / 32], DeviceTensors."""

    xq: Any
    xd: Any

    @property
    def shape(self) -> tuple[int, int]:
        return self.xq.shape

    def rows(self, start: int, stop: int) -> "Q8Act":
        return Q8Act(self.xq.rows(start, stop), self.xd.rows(start, stop))

    @staticmethod
    def empty(arena, T: int, n: int) -> "Q8Act":
        """Room for T rows of n activations in ``arena``."""
        return Q8Act(arena.empty((T, n), np.int8), arena.empty((T, n // 32), np.float32))


def kptr(p: int) -> np.uint64:
    """A device pointer as a kernel argument."""
    return np.uint64(int(p))


class MatmulBase:
    """Per-format kernel modules and the checks every matmul launch makes. A
    subclass sets ``device``, ``compiler``, ``launch``, ``formats`` (type id ->
    format row, with_device'd), ``module`` (the format-free kernels) and
    ``_modules`` (type id -> module, filled at first use); ``defines`` (macros for the
    format modules' source, matmul_source) may be set too."""

    defines: Mapping[str, str] | None = None

    @staticmethod
    def _act_args(x, row: int) -> list:
        """Kernel arguments for activations from row ``row`` on: one fp32 pointer,
        or the int8 values and their scales."""
        n = x.shape[1]
        if isinstance(x, Q8Act):
            return [kptr(x.xq.ptr + row * n), kptr(x.xd.ptr + 4 * row * (n // 32))]
        return [kptr(x.ptr + 4 * row * n)]

    @staticmethod
    def _is_act(x) -> bool:
        return isinstance(x, Q8Act) or np.dtype(x.dtype) == np.float32

    def _fn(self, prefix: str, w=None, tail: str = ""):
        """The kernel ``prefix`` (format-free) or ``prefix + suffix + tail`` of w's format."""
        if w is None:
            return self.module.function(prefix)
        return self._format_module(w.fmt).function(f"{prefix}{w.fmt.device.suffix}{tail}")

    def _format_module(self, fmt):
        mod = self._modules.get(fmt.type_id)
        if mod is None:
            mod = self._modules[fmt.type_id] = self.compiler.load(
                self.device, matmul_source([fmt], self.defines))
        return mod

    def prepare(self, type_ids) -> None:
        """Compile the kernels of these formats now (a model's, before its first forward)."""
        for t in sorted(set(type_ids)):
            if t in self.formats:
                self._format_module(self.formats[t])

    def _check_row(self, w, n_in: int) -> None:
        if self.formats.get(w.type_id) != w.fmt:
            raise ValueError(f"no CUDA matmul kernel for tensor type {w.fmt.name} ({w.type_id})")
        qk, _ = device_block(w)
        if n_in % qk:
            raise ValueError(f"{w.fmt.name} rows of {n_in} values: the kernels need a multiple of {qk}")

    @staticmethod
    def _check_2d(w, what: str) -> tuple[int, int]:
        if len(w.shape) != 2:
            raise ValueError(f"{what} must be 2-D, got shape {w.shape}")
        return w.shape

    @staticmethod
    def _check_tensor(t, shape: tuple, what: str, dtype=np.float32) -> None:
        if tuple(t.shape) != tuple(shape) or np.dtype(t.dtype) != np.dtype(dtype):
            raise ValueError(f"{what} must be {np.dtype(dtype).name} {tuple(shape)}, got {t.dtype} {t.shape}")

    @staticmethod
    def _check_vector(t, dtype, what: str) -> int:
        if len(t.shape) != 1 or np.dtype(t.dtype) != np.dtype(dtype):
            raise ValueError(f"{what} must be a 1-D {np.dtype(dtype).name} tensor, got {t.dtype} {t.shape}")
        return t.shape[0]

    def _check_linear(self, x, w, b, out) -> tuple[int, int]:
        n_out, n_in = self._check_2d(w, "linear weight")
        if len(x.shape) != 2 or x.shape[1] != n_in:
            raise ValueError(f"linear x must be [T, {n_in}], got {x.shape}")
        T = x.shape[0]
        if not isinstance(x, Q8Act):
            self._check_tensor(x, (T, n_in), "linear x")
        self._check_tensor(out, (T, n_out), "linear out")
        if b is not None:
            self._check_tensor(b, (n_out,), "linear bias")
        self._check_row(w, n_in)
        return T, n_in
