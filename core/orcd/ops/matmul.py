"""Matrix ops: quantized linear layers and embedding lookup.

The reference works on weights the CPU backend dequantized to float32 at load;
the CUDA kernels read the GGUF blocks and dequantize in registers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def linear_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    # x: [T, n_in], w: [n_out, n_in], b: [n_out] -> [T, n_out]
    # w @ x.T runs several times faster than x @ w.T on the BLAS we test with
    y = np.ascontiguousarray((w @ x.T).T)
    return y if b is None else y + b


def quantize_q8_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [..., n] float32 -> (q int8 [..., n], d float32 [..., n / 32]): per 32
    values d = amax / 127 and q = round-half-even(x / d), q = 0 where d = 0.
    The int8 decode GEMVs (matmul.cu's quantize_q8) see exactly these values."""
    g = np.ascontiguousarray(x, dtype=np.float32).reshape(*x.shape[:-1], -1, 32)
    d = np.abs(g).max(axis=-1, keepdims=True) / np.float32(127)
    q = np.rint(np.divide(g, d, out=np.zeros_like(g), where=d > 0))
    return q.astype(np.int8).reshape(x.shape), d[..., 0]


def embed_ref(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    # table: [n_vocab, D], ids: [T] -> [T, D]
    return table[ids].astype(np.float32)


# ======================================================================================
# CUDA kernels (matmul.cu): everything below runs on the GPU machine only. CUDA
# modules are imported lazily, so importing orcd.ops never touches CUDA.
# ======================================================================================

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


def _kernel_source(formats=()):
    """matmul.cu with the kernels of ``formats`` (none: only the format-free ones,
    quantize_q8 and the prefill glue)."""
    from orcd.quant.device import kernel_source

    return kernel_source("orcd.ops", "matmul.cu", formats)


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


class MatmulKernels:
    """Quantized linear layers, embedding lookup and expert GEMV on the GPU.

    Every method only enqueues kernels on the device's stream: no host sync,
    no allocation, no read of device memory on the host, so the decode path
    (T <= GEMV_MAX_T) can be captured in a CUDA graph. Prefill (T > GEMV_MAX_T)
    dequantizes the weight a tile at a time into arena scratch and runs a
    cuBLASLt GEMM through ``orcd.backends.cuda.blas.Gemm`` (nvmath; not graph-captured).
    """

    def __init__(self, device, compiler, launcher, gemm_dtype: str = "float16", scratch=None,
                 int8: str = "auto", gemm: str = "cublaslt", allocator=None, formats=None,
                 mma: bool = False) -> None:
        """Compile matmul.cu for ``device`` with ``compiler`` (a KernelCompiler);
        launch with ``launcher``. ``gemm_dtype`` ("float16" or "bfloat16") is the
        prefill GEMM's operand type; ``scratch`` an optional default Arena.
        ``int8``: where the decode GEMVs quantize their activations to int8 per 32
        values (quantize_q8) and dot them with dp4a (fewer instructions per weight
        value, the activation rounding llama.cpp's GPU GEMVs also make): "off",
        "all" integer formats, or "auto" (integer formats, where one input's
        weights hold >= INT8_AUTO_MIN_VALUES values).
        ``gemm``: the prefill GEMM's implementation (orcd.backends.cuda.blas.Gemm: "cublaslt",
        "nvmath" or "simt", on an fp16 copy of each weight tile); ``allocator`` holds its workspace. ``formats``: the
        format table whose rows get kernels (default: the built-in formats); each
        format's kernels are a module of their own, compiled at first use or by
        ``prepare``, so a model compiles only the formats it holds.
        ``mma``: ``gemv`` (a decode batch's rows) takes the int8 tensor cores for the
        formats that have them (gemv_mma.cuh), else the dp4a GEMV (the default, as
        CudaBackend's)."""
        if gemm_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"gemm_dtype must be float16 or bfloat16, got {gemm_dtype!r}")
        from orcd.quant.builtin import builtin_table
        from orcd.quant.device import with_device

        self.device, self.launch, self.compiler = device, launcher, compiler
        self.formats = {f.type_id: f for f in with_device(builtin_table() if formats is None else formats)}
        self.module = compiler.load(device, _kernel_source())   # format-free kernels
        self._modules: dict[int, object] = {}
        self.gemm_dtype = gemm_dtype
        self.scratch = scratch
        if int8 not in INT8_MODES:
            raise ValueError(f"int8 must be one of {INT8_MODES}, got {int8!r}")
        self.int8_off = int8 == "off"
        self.mma = bool(mma)
        self.int8_min_values = INT8_AUTO_MIN_VALUES if int8 == "auto" else 0
        self._gemm = None
        self._gemm_impl, self._allocator = gemm, allocator
        self.last_prefill = None   # "gemm" or "gemv": which path the last T > GEMV_MAX_T call took

    # -- public ops --------------------------------------------------------------------

    def linear(self, x, w, b, out, scratch=None) -> None:
        """out[T, n_out] = x[T, n_in] @ w.T (+ b). x, b, out float32 DeviceTensors;
        w a QWeight [n_out, n_in]. T <= 8: GEMV, weights dequantized in registers.
        Larger T: fp16 tiles + tensor-core GEMM with scratch from ``scratch`` (or
        the default arena), else GEMV over 8-token slices."""
        T, n_in = self._check_linear(x, w, b, out)
        arena = scratch if scratch is not None else self.scratch
        if T <= GEMV_MAX_T:
            self._gemv(self.activations(x, w, arena), w, b, out)
            return
        if isinstance(x, Q8Act):
            raise ValueError(f"linear: int8 activations are for T <= {GEMV_MAX_T} tokens, got {T}")
        if arena is not None and self._gemm_ready():
            self.last_prefill = "gemm"
            self._prefill(x, w, b, out, arena)
            return
        self.last_prefill = "gemv"
        for s in range(0, T, GEMV_MAX_T):
            e = min(T, s + GEMV_MAX_T)
            self._gemv(x.rows(s, e), w, b, out.rows(s, e))

    @staticmethod
    def gemv_rows(x) -> int:
        """Rows one ``gemv`` launch takes of activations x (float32 or int8)."""
        return BATCH_GEMV_Q8_T if isinstance(x, Q8Act) else BATCH_GEMV_T

    def gemv(self, x, w, b, out, scratch=None, residual=None) -> None:
        """linear for up to ``gemv_rows(x)`` rows, always by the GEMV: each row summed
        alike whatever T (a batch of decodes: a row's logits do not depend on its
        batch). x float32 or int8 activations. ``residual`` ([T, n_out]): out =
        residual + (x @ w.T + b) in the same launch, the bits of ops.add after it."""
        T, _ = self._check_linear(x, w, b, out)
        arena = scratch if scratch is not None else self.scratch
        x = self.activations(x, w, arena)
        if T > self.gemv_rows(x):
            raise ValueError(f"gemv: at most {self.gemv_rows(x)} rows per launch, got {T}")
        if residual is not None and tuple(residual.shape) != tuple(out.shape):
            raise ValueError(f"gemv: a residual {residual.shape} is added into out {out.shape}: same shape")
        if self._on_mma(x, w):
            self._gemv_mma(x, w, b, out, residual)
        else:
            self._gemv(x, w, b, out, residual)

    def gemv_multi(self, x, ws, bs, outs, scratch=None) -> None:
        """``gemv`` of each weight of ws (with bias bs[i] into outs[i]) for the same
        rows of x: the dp4a int8 GEMVs of one format and row size share a launch, up
        to GEMV_SEGMENTS at a time (a decode batch's q, k and v), each row of each
        summed as its own launch sums it; the others launch one by one."""
        T, n_in = x.shape
        for w, b, out in zip(ws, bs, outs):
            if self._check_linear(x, w, b, out)[0] > self.gemv_rows(x):
                raise ValueError(f"gemv_multi: at most {self.gemv_rows(x)} rows per launch, got {T}")
        groups: dict = {}
        for i, w in enumerate(ws):
            if isinstance(x, Q8Act) and int8_capable(w) and not self._on_mma(x, w):
                group = groups.setdefault((w.type_id, w.row_bytes), [[]])
                if len(group[-1]) == GEMV_SEGMENTS:
                    group.append([])
                group[-1].append(i)
            else:
                self.gemv(x, w, bs[i], outs[i], scratch=scratch)
        for launches in groups.values():
            for idx in launches:
                self._gemv_q8(x, [(ws[i], bs[i], outs[i]) for i in idx])

    def gates(self, x, w_gate, w_up) -> bool:
        """Whether ``gated`` takes x by w_gate (and w_up): int8 activations of at most
        ``gated_rows`` rows, weights of one integer format and shape."""
        ws = (w_gate,) if w_up is None else (w_gate, w_up)
        return (isinstance(x, Q8Act) and all(int8_capable(w) for w in ws)
                and x.shape[0] <= self.gated_rows(x, w_gate)
                and (w_up is None or (w_up.fmt == w_gate.fmt and w_up.shape == w_gate.shape
                                      and w_up.row_bytes == w_gate.row_bytes)))

    def gated_rows(self, x, w_gate) -> int:
        """Rows one ``gated`` launch takes: as ``gemv`` on the tensor cores; 16 by dp4a
        (two accumulators a row: at 32 rows 168 registers a thread, not instantiated)."""
        return self.gemv_rows(x) if self._on_mma(x, w_gate) else GATED_Q8_TM[-1]

    def gated(self, x, w_gate, w_up, out) -> None:
        """out [T, n_ff] = silu(x @ w_gate.T) * (x @ w_up.T) for a decode batch's rows
        in one launch (where ``gates``): the bits of the two ``gemv`` calls and swiglu;
        w_up None: w_gate holds gate then up ([2 n_ff, n_in])."""
        T, n_in = x.shape
        n_ff = out.shape[1]
        if (not self.gates(x, w_gate, w_up) or tuple(out.shape) != (T, n_ff) or w_gate.shape[1] != n_in
                or w_gate.shape[0] != (n_ff if w_up is not None else 2 * n_ff)):
            raise ValueError(f"gated: x {x.shape}, gate {w_gate.shape}, out {out.shape}, or not int8 GEMVs")
        up = w_up.ptr if w_up is not None else w_gate.ptr + n_ff * w_gate.row_bytes
        args = [_ptr(w_gate.ptr), _ptr(up), np.int64(w_gate.row_bytes), *self._act_args(x, 0), T, _ptr(out.ptr)]
        if self._on_mma(x, w_gate):
            tiles = next(n for n in (1, 2, 4) if 8 * n >= T)
            self.launch(self._fn("gemv_mma_gated_", w_gate, f"_n{tiles}"), -(-n_ff // MMA_ROWS), MMA_THREADS,
                        [*args, n_ff, n_in])
            return
        # the split the GEMV of gate alone takes (all of w_gate's rows): the same sums
        tm = next(m for m in GATED_Q8_TM if m >= T)
        split = gemv_split(w_gate.shape[0], row_pieces(w_gate))
        self.launch(self._fn("gemv_q8_gated_", w_gate, f"_t{tm}"), -(-n_ff // (GEMV_ROWS // split)),
                    32 * GEMV_ROWS, [*args, n_ff, n_in, split])

    def _on_mma(self, x, w) -> bool:
        """Whether ``gemv`` of x by w runs on the int8 tensor cores (``mma`` on, int8
        activations, a format with mma_chunk), else dp4a or fp32."""
        return isinstance(x, Q8Act) and self.mma and mma_capable(w)

    def quantize(self, x, arena) -> Q8Act:
        """x float32 [T, n] (n a multiple of 32) -> its int8 activations, in ``arena``."""
        T, n = x.shape
        if n % 32 or np.dtype(x.dtype) != np.float32:
            raise ValueError(f"quantize: x must be float32 [T, 32k], got {x.dtype} {x.shape}")
        q = Q8Act.empty(arena, T, n)
        groups = T * n // 32
        self.launch(self._fn("quantize_q8"), max(1, min(1024, -(-groups // 128))), 128,
                    [_ptr(x.ptr), np.int64(groups), _ptr(q.xq.ptr), _ptr(q.xd.ptr)])
        return q

    def use_int8(self, *ws, batch: bool = False) -> bool:
        """Whether one input's GEMVs over the weights ws take int8 activations.
        ``batch`` (rows of a decode batch): wherever the formats can, whatever the
        size -- T rows read the activations T times per weight piece, and fp32 ones
        made the GEMVs L1-bound (Qwen's Q5_0 at T = 8: 20 us a call, 64% of a step)."""
        values = sum(int(np.prod(w.shape[-2:])) for w in ws)
        return (not self.int8_off and all(int8_capable(w) for w in ws)
                and (batch or values >= self.int8_min_values))

    def activations(self, x, w, arena):
        """What a decode GEMV of ``w`` reads: x as is, or (``use_int8``, scratch
        at hand) its int8 activations. Given int8 activations, checks them."""
        if isinstance(x, Q8Act):
            if not int8_capable(w):
                raise ValueError(f"int8 activations given for a {w.fmt.name} weight")
            return x
        if arena is not None and self.use_int8(w):
            return self.quantize(x, arena)
        return x

    def embed(self, table, ids, out) -> None:
        """out[T, D] = dequantized rows ids[T] (int32, read on the device) of the
        QWeight table [n_vocab, D]; an id outside the table gives a NaN row."""
        n_vocab, D = self._check_2d(table, "embed table")
        T = self._check_vector(ids, np.int32, "ids")
        self._check_tensor(out, (T, D), "embed out")
        self._check_row(table, D)
        qk, pieces = device_block(table)
        kernel = self._fn("embed_", table)
        n = D // qk * pieces
        for s in range(0, T, MAX_GRID_Y):
            e = min(T, s + MAX_GRID_Y)
            self.launch(kernel, (-(-n // 128), e - s), 128,
                        [_ptr(table.ptr), np.int64(table.row_bytes), _ptr(ids.ptr + 4 * s),
                         n_vocab, _ptr(out.ptr + 4 * s * D), D])

    def moe_linear(self, x, w, b, expert_ids, out, scratch=None) -> None:
        """out[T, k, n_out] = x_t(,slot) @ w[e].T (+ b[e]) with e = expert_ids[t, slot]
        (int32 on the device; an id outside 0..n_expert-1 gives NaN). w: QWeight
        [n_expert, n_out, n_in]; b: [n_expert, n_out] or None; x: [T, n_in] (one
        row per token) or [T * k, n_in] (one per slot). Reads only chosen experts."""
        if len(w.shape) != 3:
            raise ValueError(f"moe_linear weight must be [n_expert, n_out, n_in], got {w.shape}")
        n_expert, n_out, n_in = w.shape
        if len(expert_ids.shape) != 2 or np.dtype(expert_ids.dtype) != np.int32:
            raise ValueError(f"expert_ids must be int32 [T, k], got {expert_ids.dtype} {expert_ids.shape}")
        T, k = expert_ids.shape
        if tuple(x.shape) not in ((T, n_in), (T * k, n_in)) or not self._is_act(x):
            raise ValueError(f"moe_linear x must be float32 [{T}, {n_in}] or [{T * k}, {n_in}], "
                             f"got {getattr(x, 'dtype', 'int8')} {x.shape}")
        per_pair = x.shape[0] == T * k and k > 1
        self._check_tensor(out, (T, k, n_out), "moe_linear out")
        if b is not None:
            self._check_tensor(b, (n_expert, n_out), "moe_linear bias")
        self._check_row(w, n_in)
        x = self.activations(x, w, scratch if scratch is not None else self.scratch)
        q8 = isinstance(x, Q8Act)
        kernel = self._fn(f"moe_gemv_{'q8_' if q8 else ''}", w)
        split = gemv_split(n_out, row_pieces(w))
        grid_x = -(-n_out // (GEMV_ROWS // split))
        step = MAX_GRID_Y // k * k   # whole tokens per launch
        expert_bytes = w.fmt.vram_tensor_bytes((n_out, n_in))
        for s in range(0, T * k, step):
            e = min(T * k, s + step)
            x_row = s if per_pair else s // k
            self.launch(kernel, (grid_x, e - s), 32 * GEMV_ROWS,
                        [_ptr(w.ptr), np.int64(w.row_bytes), np.int64(expert_bytes),
                         *self._act_args(x, x_row), int(per_pair), _ptr(expert_ids.ptr + 4 * s), k,
                         n_expert, _ptr(b.ptr if b is not None else 0), _ptr(out.ptr + 4 * s * n_out),
                         n_out, n_in, split])

    def moe_gemm_tc(self, xg, w, b, tiles, out) -> None:
        """moe_gemm on the tensor cores: the same product for tiles of up to
        MOE_TC_TILE pairs, fp16 operands (x and the dequantized weights rounded),
        fp32 sums; xg float32. n_in must be a multiple of max(32, the format's block)."""
        n_expert, n_out, n_in = self._check_grouped("moe_gemm_tc", xg, w, b, tiles, out)
        if isinstance(xg, Q8Act) or np.dtype(xg.dtype) != np.float32 or not tc_takes(w, n_in):
            raise ValueError(f"moe_gemm_tc x must be float32 with n_in a multiple of {tc_step(w)}, "
                             f"got {xg.dtype} {xg.shape}")
        # TC_ROWS weight rows per block; shared memory for a tile of x and one of w, (step + 8) halves a row
        self.launch(self._fn("moe_gemm_tc_", w), (-(-n_out // MOE_TC_ROWS), tiles.shape[0]), 128,
                    [_ptr(w.ptr), np.int64(w.row_bytes), np.int64(w.fmt.vram_tensor_bytes((n_out, n_in))),
                     _ptr(xg.ptr), _ptr(tiles.ptr), _ptr(b.ptr if b is not None else 0), _ptr(out.ptr),
                     n_out, n_in],
                    shared=(MOE_TC_TILE + MOE_TC_ROWS) * (tc_step(w) + 8) * 2)

    def moe_gemm(self, xg, w, b, tiles, out, scratch=None) -> None:
        """Prefill's grouped expert matmul: out[i] = xg[i] @ w[e].T (+ b[e]) for
        every row i of each used tile (e, start, rows) of ``tiles`` ([n_tiles, 3]
        int32 on the device, from MoeKernels.group). xg: [N, n_in], out: [N, n_out],
        one row per (token, slot) pair in grouped order. Each tile reads its
        expert's weight rows once for up to MOE_TILE pairs."""
        n_expert, n_out, n_in = self._check_grouped("moe_gemm", xg, w, b, tiles, out)
        split = gemv_split(n_out, row_pieces(w))
        xg = self.activations(xg, w, scratch if scratch is not None else self.scratch)
        q8 = isinstance(xg, Q8Act)
        self.launch(self._fn(f"moe_gemm_{'q8_' if q8 else ''}", w),
                    (-(-n_out // (GEMV_ROWS // split)), tiles.shape[0]), 32 * GEMV_ROWS,
                    [_ptr(w.ptr), np.int64(w.row_bytes),
                     np.int64(w.fmt.vram_tensor_bytes((n_out, n_in))), *self._act_args(xg, 0), _ptr(tiles.ptr),
                     _ptr(b.ptr if b is not None else 0), _ptr(out.ptr), n_out, n_in, split])

    def _check_grouped(self, name: str, xg, w, b, tiles, out) -> tuple[int, int, int]:
        """A grouped expert matmul's operands checked; (n_expert, n_out, n_in)."""
        if len(w.shape) != 3:
            raise ValueError(f"{name} weight must be [n_expert, n_out, n_in], got {w.shape}")
        n_expert, n_out, n_in = w.shape
        N = xg.shape[0]
        if tuple(xg.shape) != (N, n_in) or not self._is_act(xg):
            raise ValueError(f"{name} x must be float32 [{N}, {n_in}], got {xg.shape}")
        self._check_tensor(out, (N, n_out), f"{name} out")
        if len(tiles.shape) != 2 or tiles.shape[1] != 3 or np.dtype(tiles.dtype) != np.int32:
            raise ValueError(f"{name} tiles must be int32 [n_tiles, 3], got {tiles.dtype} {tiles.shape}")
        if not 0 < tiles.shape[0] <= MAX_GRID_Y:
            raise ValueError(f"{name}: {tiles.shape[0]} tiles (at most {MAX_GRID_Y} per launch)")
        if b is not None:
            self._check_tensor(b, (n_expert, n_out), f"{name} bias")
        self._check_row(w, n_in)
        return n_expert, n_out, n_in

    def moe_gate_up_q8(self, xa: "Q8Act", ex, ids, alpha: float, limit: float, h: "Q8Act") -> None:
        """h[t * k + s] = swiglu_oai(x_t . gate[e] + bg[e], x_t . up[e] + bu[e]) for e =
        ids[t, s], quantized per 32 values into h (Q8Act [T * k, n_ff]); x as int8
        activations xa [T, D]. One launch for every chosen expert's gate, up and SwiGLU."""
        n_expert, n_ff, D = ex.gate_w.shape
        T, k = ids.shape
        if ex.up_w.shape != ex.gate_w.shape or ex.up_w.type_id != ex.gate_w.type_id or n_ff % 32:
            raise ValueError(f"moe gate/up: gate {ex.gate_w.shape}, up {ex.up_w.shape} (n_ff a multiple of 32)")
        if tuple(xa.shape) != (T, D) or tuple(h.shape) != (T * k, n_ff) or not int8_capable(ex.gate_w):
            raise ValueError(f"moe gate/up: x {xa.shape}, h {h.shape} for ids {ids.shape}")
        w = ex.gate_w
        self._check_row(w, D)
        self.launch(self._fn("moe_gate_up_q8_", w), (n_ff // 32, T * k), 256,
                    [_ptr(w.ptr), _ptr(ex.up_w.ptr), np.int64(w.row_bytes),
                     np.int64(w.fmt.vram_tensor_bytes((n_ff, D))), _ptr(xa.xq.ptr), _ptr(xa.xd.ptr),
                     _ptr(ids.ptr), k, n_expert, _ptr(ex.gate_b.ptr), _ptr(ex.up_b.ptr), float(alpha),
                     float(limit), _ptr(h.xq.ptr), _ptr(h.xd.ptr), n_ff, D])

    def moe_down_sum_q8(self, h: "Q8Act", w, b, ids, weights, residual, out) -> None:
        """out[t] = residual[t] + sum_s weights[t, s] * (h[t * k + s] . w[e].T + b[e]), e =
        ids[t, s], in choice order: the experts' down projections, their weighted sum
        and the residual add in one launch. w: QWeight [n_expert, D, n_ff]."""
        n_expert, D, n_ff = w.shape
        T, k = ids.shape
        if not 0 < k <= MOE_MAX_K or tuple(h.shape) != (T * k, n_ff) or not int8_capable(w):
            raise ValueError(f"moe down: h {h.shape} for ids {ids.shape} (k <= {MOE_MAX_K}), {w.fmt.name}")
        self._check_tensor(residual, (T, D), "moe down residual")
        self._check_tensor(out, (T, D), "moe down out")
        self._check_row(w, n_ff)
        self.launch(self._fn("moe_down_sum_q8_", w), (-(-D // 8), T), 256,
                    [_ptr(w.ptr), np.int64(w.row_bytes), np.int64(w.fmt.vram_tensor_bytes((D, n_ff))),
                     _ptr(h.xq.ptr), _ptr(h.xd.ptr), _ptr(ids.ptr), _ptr(weights.ptr), k, n_expert,
                     _ptr(b.ptr), _ptr(residual.ptr), _ptr(out.ptr), D, n_ff])

    def dequantize(self, w, out, row0: int = 0) -> None:
        """Rows [row0, row0 + out.shape[0]) of the QWeight w as float16 (or
        bfloat16: out dtype uint16 means bf16 bits) into out [rows, n_in]."""
        n_out, n_in = self._check_2d(w, "weight")
        rows = out.shape[0]
        if out.shape != (rows, n_in) or not 0 <= row0 <= row0 + rows <= n_out:
            raise ValueError(f"dequantize: out {out.shape} at row {row0} does not fit weight {w.shape}")
        bf16 = np.dtype(out.dtype) == np.uint16
        self._dequant(w, row0, rows, out.ptr, bf16)

    # -- paths -------------------------------------------------------------------------

    def _gemv(self, x, w, b, out, residual=None) -> None:
        if isinstance(x, Q8Act):
            self._gemv_q8(x, [(w, b, out)], residual)
            return
        T, n_in = x.shape
        n_out = w.shape[0]
        tm = next(m for m in GEMV_TM if m >= T)
        split = gemv_split(n_out, row_pieces(w))
        self.launch(self._fn("gemv_", w, f"_t{tm}"), -(-n_out // (GEMV_ROWS // split)), 32 * GEMV_ROWS,
                    [_ptr(w.ptr), np.int64(w.row_bytes), *self._act_args(x, 0), T,
                     _ptr(b.ptr if b is not None else 0), _ptr(residual.ptr if residual is not None else 0),
                     _ptr(out.ptr), n_out, n_in, split])

    def _gemv_q8(self, x, segs, residual=None) -> None:
        # segs: 1 to GEMV_SEGMENTS (w, b, out) of one format and row size, one launch;
        # each weight's blocks and split as its own launch would have them
        T, n_in = x.shape
        w0 = segs[0][0]
        tm = next(m for m in GEMV_Q8_TM if m >= T)
        args, blocks = [], 0
        for w, b, out in segs:
            split = gemv_split(w.shape[0], row_pieces(w))
            n = -(-w.shape[0] // (GEMV_ROWS // split))
            args += [_ptr(w.ptr), _ptr(b.ptr if b is not None else 0), _ptr(out.ptr), w.shape[0], split, n]
            blocks += n
        args += [_ptr(0), _ptr(0), _ptr(0), 0, 1, 0] * (GEMV_SEGMENTS - len(segs))
        self.launch(self._fn("gemv_q8_", w0, f"_t{tm}"), blocks, 32 * GEMV_ROWS,
                    [np.int64(w0.row_bytes), *self._act_args(x, 0), T, n_in,
                     _ptr(residual.ptr if residual is not None else 0), *args])

    def _gemv_mma(self, x, w, b, out, residual=None) -> None:
        T, n_in = x.shape
        n_out = w.shape[0]
        tiles = next(n for n in (1, 2, 4) if 8 * n >= T)   # 8 tokens a tile
        self.launch(self._fn("gemv_mma_", w, f"_n{tiles}"), -(-n_out // MMA_ROWS), MMA_THREADS,
                    [_ptr(w.ptr), np.int64(w.row_bytes), *self._act_args(x, 0), T,
                     _ptr(b.ptr if b is not None else 0), _ptr(residual.ptr if residual is not None else 0),
                     _ptr(out.ptr), n_out, n_in])

    @staticmethod
    def _act_args(x, row: int) -> list:
        """Kernel arguments for activations from row ``row`` on: one fp32 pointer,
        or the int8 values and their scales."""
        n = x.shape[1]
        if isinstance(x, Q8Act):
            return [_ptr(x.xq.ptr + row * n), _ptr(x.xd.ptr + 4 * row * (n // 32))]
        return [_ptr(x.ptr + 4 * row * n)]

    @staticmethod
    def _is_act(x) -> bool:
        return isinstance(x, Q8Act) or np.dtype(x.dtype) == np.float32

    def _prefill(self, x, w, b, out, arena) -> None:
        # x16 [T, n_in]; per tile: w16 [rows, n_in] -> y16 [T, rows] -> out[:, r0:r0+rows] (+ b)
        T, n_in = x.shape
        n_out = w.shape[0]
        bf16 = self.gemm_dtype == "bfloat16"
        chunk = prefill_chunk_rows(n_out, n_in)
        mark = arena.offset
        try:
            x16 = arena.empty((T, n_in), np.uint16)
            w16 = arena.empty((chunk, n_in), np.uint16)
            y16 = arena.empty((T, chunk), np.uint16)
            n = T * n_in
            self.launch(self._fn("to_half"), -(-n // 256), 256,
                        [_ptr(x.ptr), _ptr(x16.ptr), np.int64(n), int(bf16)])
            for r0 in range(0, n_out, chunk):
                rows = min(chunk, n_out - r0)
                self._dequant(w, r0, rows, w16.ptr, bf16)
                self._gemm(x16.ptr, w16.ptr, y16.ptr, T, rows, n_in, self.gemm_dtype)
                self.launch(self._fn("from_half"), -(-(T * rows) // 256), 256,
                            [_ptr(y16.ptr), T, rows, _ptr(b.ptr if b is not None else 0),
                             _ptr(out.ptr), n_out, r0, int(bf16)])
        finally:
            arena.offset = mark  # stream order makes the scratch free for the next op

    def _dequant(self, w, row0: int, rows: int, dst: int, bf16: bool) -> None:
        n_in = w.shape[-1]
        self._check_row(w, n_in)
        qk, pieces = device_block(w)
        n = rows * (n_in // qk) * pieces
        self.launch(self._fn(f"dequant_{'bf16' if bf16 else 'f16'}_", w), -(-n // 256), 256,
                    [_ptr(w.ptr), np.int64(w.row_bytes), row0, rows, n_in, _ptr(dst)])

    def _gemm_ready(self) -> bool:
        if self._gemm is None:
            try:
                if self._gemm_impl != "simt":
                    import nvmath  # noqa: F401
                if self._gemm_impl == "nvmath":
                    import cupy  # noqa: F401
            except ImportError as e:
                # a slower path, not a silent one: say why once per kernel set
                import warnings
                warnings.warn(f"prefill GEMM without tensor cores ({e.name} is missing; "
                              f"install orcd[cuda]): long prompts use GEMV slices", stacklevel=2)
                self._gemm = False
            else:
                from orcd.backends.cuda.blas import Gemm

                self._gemm = Gemm(self.device, self._gemm_impl, self.compiler, self.launch,
                                  allocator=self._allocator)
        return self._gemm is not False

    def close(self) -> None:
        """Release the prefill GEMM's handle, plans and workspace (if it was made)."""
        if self._gemm:
            self._gemm.close()
        self._gemm = None

    # -- checks and helpers ------------------------------------------------------------

    def _fn(self, prefix: str, w=None, tail: str = ""):
        """The kernel ``prefix`` (format-free) or ``prefix + suffix + tail`` of w's format."""
        if w is None:
            return self.module.function(prefix)
        return self._format_module(w.fmt).function(f"{prefix}{w.fmt.device.suffix}{tail}")

    def _format_module(self, fmt):
        mod = self._modules.get(fmt.type_id)
        if mod is None:
            mod = self._modules[fmt.type_id] = self.compiler.load(self.device, _kernel_source([fmt]))
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


def _ptr(p: int) -> np.uint64:
    return np.uint64(int(p))
