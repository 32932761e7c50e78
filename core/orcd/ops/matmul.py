"""Matrix ops: quantized linear layers and embedding lookup.

The reference works on weights the CPU backend dequantized to float32 at load;
the CUDA kernels read the GGUF blocks and dequantize in registers.
"""

from __future__ import annotations

import numpy as np

from orcd.ops.matmul_base import (BATCH_GEMV_Q8_T, BATCH_GEMV_T, GATED_Q8_TM, GEMV_MAX_T, GEMV_Q8_TM, GEMV_ROWS,
                                  GEMV_SEGMENTS, GEMV_TM, INT8_AUTO_MIN_VALUES, INT8_MODES, MAX_GRID_Y, MMA_ROWS,
                                  MMA_THREADS, Q8Act, device_block, gemv_split, int8_capable, kptr, matmul_source,
                                  mma_capable, prefill_chunk_rows, row_pieces)
from orcd.ops.matmul_experts import ExpertMatmuls


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
# modules are imported lazily, so importing orcd.ops never touches CUDA. The kernels'
# shapes, Q8Act and the checks: matmul_base.py; the expert matmuls: matmul_experts.py.
# ======================================================================================

class MatmulKernels(ExpertMatmuls):
    """Quantized linear layers, embedding lookup and expert GEMV on the GPU.

    Every method only enqueues kernels on the device's stream: no host sync,
    no allocation, no read of device memory on the host, so the decode path
    (T <= GEMV_MAX_T) can be captured in a CUDA graph. Prefill (T > GEMV_MAX_T)
    dequantizes the weight a tile at a time into arena scratch and runs a
    cuBLASLt GEMM through ``orcd.backends.cuda.blas.Gemm`` (nvmath; not graph-captured).
    """

    def __init__(self, device, compiler, launcher, gemm_dtype: str = "float16", scratch=None,
                 int8: str = "auto", gemm: str = "cublaslt", allocator=None, formats=None,
                 mma: bool = False, defines: dict[str, str] | None = None,
                 prompt_gemv: int = GEMV_MAX_T) -> None:
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
        CudaBackend's). ``defines``: macros for the per-format kernels' source (the
        experiments matmul.cu keeps behind #if; bench/bench_gemv.py --variant).
        ``prompt_gemv``: ``linear`` of up to this many rows (at most BATCH_GEMV_Q8_T) takes
        the int8 GEMVs where the format has them, as a decode batch's rows do, instead of
        an fp16 copy of the weight and the GEMM: a short prompt reads each weight once
        and makes no copy (issue 15). GEMV_MAX_T (the default) until a card times it."""
        if gemm_dtype not in ("float16", "bfloat16"):
            raise ValueError(f"gemm_dtype must be float16 or bfloat16, got {gemm_dtype!r}")
        from orcd.quant.builtin import builtin_table
        from orcd.quant.device import with_device

        self.device, self.launch, self.compiler = device, launcher, compiler
        self.formats = {f.type_id: f for f in with_device(builtin_table() if formats is None else formats)}
        self.module = compiler.load(device, matmul_source())   # format-free kernels
        self._modules: dict[int, object] = {}
        self.defines = dict(defines or {})
        self.gemm_dtype = gemm_dtype
        self.scratch = scratch
        if int8 not in INT8_MODES:
            raise ValueError(f"int8 must be one of {INT8_MODES}, got {int8!r}")
        self.int8_off = int8 == "off"
        self.mma = bool(mma)
        self.int8_min_values = INT8_AUTO_MIN_VALUES if int8 == "auto" else 0
        self._gemm = None
        self._gemm_impl, self._allocator = gemm, allocator
        if not GEMV_MAX_T <= int(prompt_gemv) <= BATCH_GEMV_Q8_T:
            raise ValueError(f"prompt_gemv must be {GEMV_MAX_T}..{BATCH_GEMV_Q8_T}, got {prompt_gemv!r}")
        self.prompt_gemv = int(prompt_gemv)
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
        if T <= self.prompt_gemv and arena is not None and self.use_int8(w, batch=True):
            self.last_prefill = "gemv"
            xa = x if isinstance(x, Q8Act) else self.quantize(x, arena)
            self.gemv(xa, w, b, out, scratch=arena)   # one launch: prompt_gemv <= BATCH_GEMV_Q8_T
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
        T = x.shape[0]
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
        args = [kptr(w_gate.ptr), kptr(up), np.int64(w_gate.row_bytes), *self._act_args(x, 0), T, kptr(out.ptr)]
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
                    [kptr(x.ptr), np.int64(groups), kptr(q.xq.ptr), kptr(q.xd.ptr)])
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
                        [kptr(table.ptr), np.int64(table.row_bytes), kptr(ids.ptr + 4 * s),
                         n_vocab, kptr(out.ptr + 4 * s * D), D])

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
                    [kptr(w.ptr), np.int64(w.row_bytes), *self._act_args(x, 0), T,
                     kptr(b.ptr if b is not None else 0), kptr(residual.ptr if residual is not None else 0),
                     kptr(out.ptr), n_out, n_in, split])

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
            args += [kptr(w.ptr), kptr(b.ptr if b is not None else 0), kptr(out.ptr), w.shape[0], split, n]
            blocks += n
        args += [kptr(0), kptr(0), kptr(0), 0, 1, 0] * (GEMV_SEGMENTS - len(segs))
        self.launch(self._fn("gemv_q8_", w0, f"_t{tm}"), blocks, 32 * GEMV_ROWS,
                    [np.int64(w0.row_bytes), *self._act_args(x, 0), T, n_in,
                     kptr(residual.ptr if residual is not None else 0), *args])

    def _gemv_mma(self, x, w, b, out, residual=None) -> None:
        T, n_in = x.shape
        n_out = w.shape[0]
        tiles = next(n for n in (1, 2, 4) if 8 * n >= T)   # 8 tokens a tile
        self.launch(self._fn("gemv_mma_", w, f"_n{tiles}"), -(-n_out // MMA_ROWS), MMA_THREADS,
                    [kptr(w.ptr), np.int64(w.row_bytes), *self._act_args(x, 0), T,
                     kptr(b.ptr if b is not None else 0), kptr(residual.ptr if residual is not None else 0),
                     kptr(out.ptr), n_out, n_in])

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
                        [kptr(x.ptr), kptr(x16.ptr), np.int64(n), int(bf16)])
            for r0 in range(0, n_out, chunk):
                rows = min(chunk, n_out - r0)
                self._dequant(w, r0, rows, w16.ptr, bf16)
                self._gemm(x16.ptr, w16.ptr, y16.ptr, T, rows, n_in, self.gemm_dtype)
                self.launch(self._fn("from_half"), -(-(T * rows) // 256), 256,
                            [kptr(y16.ptr), T, rows, kptr(b.ptr if b is not None else 0),
                             kptr(out.ptr), n_out, r0, int(bf16)])
        finally:
            arena.offset = mark  # stream order makes the scratch free for the next op

    def _dequant(self, w, row0: int, rows: int, dst: int, bf16: bool) -> None:
        n_in = w.shape[-1]
        self._check_row(w, n_in)
        qk, pieces = device_block(w)
        n = rows * (n_in // qk) * pieces
        self.launch(self._fn(f"dequant_{'bf16' if bf16 else 'f16'}_", w), -(-n // 256), 256,
                    [kptr(w.ptr), np.int64(w.row_bytes), row0, rows, n_in, kptr(dst)])

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

