"""The CUDA backend: the same ops and forwards as the numpy reference, on one GPU.

Weights stay in their GGUF blocks in "weights" allocations (1-D tensors and
biases as f32), the KV cache is fp16 in "kv_cache" allocations (one pooled
cache: batch 1 serves one request at a time), activations are fp32 scratch.

Scratch is two bump arenas used in turn (orcd.backends.cuda.ops, with the op
set); ids and positions live in a separate small arena.

Decode (one token) is captured once as a CUDA graph per (model, cache) and
replayed: the token id and position go host → device from pinned memory into
fixed buffers the graph reads; every kernel reads positions from there. The
device sampler can write its id straight into that buffer (``sample_to_device``)
so the next step is queued before the host has read the id (steps.py).
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from orcd.backends.cuda.ops import SCRATCH_START, CudaOps, Scratch, ScratchFull  # noqa: F401
from orcd.backends.cuda.batch import BatchDecoder
from orcd.backends.cuda.prefill import FOLD_CHUNK, UNFOLDED_CHUNK, PrefillGraphs
from orcd.backends.cuda.loading import WeightLoading
from orcd.backends.cuda.sampler import BackendSampling
from orcd.backends.cuda.steps import StepIO
from orcd.backends.cuda.tensor import Arena, DeviceTensor, QWeight
from orcd.errors import InvalidRequest
from orcd.kvcache import KV_BLOCK, KVCache, blocks_for, contiguous_table
from orcd.ops import sampling
from orcd.ops.contract import Phase, phase_of
from orcd.ops.matmul_base import BATCH_GEMV_Q8_T

IO_BYTES = 1 << 20         # ids and positions of eager forwards
PROMPT_GEMV = BATCH_GEMV_Q8_T   # prompt chunks of up to 32 rows through the int8 GEMVs (prompt_gemv)


def kernel_sources(formats, type_ids=None) -> list:
    """Every kernel source the backend loads for weights of ``type_ids`` (None:
    every format of ``formats`` with device code; () : none of the per-format
    modules): what start-up compiles in parallel (KernelCompiler.prefetch) and what
    orcd.backends.cuda.aot builds ahead of time."""
    from orcd.backends.cuda.nvrtc import KernelSource
    from orcd.ops import activation, attention, fused, layout, moe, norm, rope, sampling
    from orcd.ops.matmul_base import matmul_source
    from orcd.quant.device import with_device

    rows = with_device(formats)
    fixed = [KernelSource.from_package("orcd.ops", k.SOURCE) for k in
             (norm.NormKernels, rope.RopeKernels, activation.ActivationKernels, attention.AttentionKernels,
              moe.MoeKernels, sampling.CudaSampler, layout.LayoutKernels)]
    per_format = [matmul_source([f]) for f in rows if type_ids is None or f.type_id in type_ids]
    return [*fixed, matmul_source(), fused._kernel_source(rows), *per_format]

class CudaRunner:
    """``forward(ids, start) -> logits`` like engine.Runner: prefill eager,
    a single token through the backend's captured decode graph."""

    def __init__(self, backend: "CudaBackend", model, cache: KVCache) -> None:
        self.backend, self.model, self.cache = backend, model, cache

    def forward(self, ids, start: int) -> DeviceTensor:
        n = len(ids)
        if n == 0 or start < 0 or start + n > self.cache.n_ctx:
            raise InvalidRequest(f"positions {start}..{start + n - 1} outside the context "
                                 f"of {self.cache.n_ctx}")
        if phase_of(n) is Phase.DECODE:   # the captured step; a prefill chunk runs eagerly or by bucket
            return self.backend.decode_step(self.model, self.cache, int(ids[0]), start)
        return self.backend.eager(self.model, self.cache, list(ids), start)

    def forward_pending(self, start: int) -> DeviceTensor:
        """The decode step at ``start`` on the token the last ``sample_to_device``
        left on the device (queued before that token reaches the host)."""
        if not 0 <= start < self.cache.n_ctx:
            raise InvalidRequest(f"position {start} outside the context of {self.cache.n_ctx}")
        return self.backend.decode_step(self.model, self.cache, None, start)


class CudaBackend(BackendSampling, WeightLoading):
    #: the scheduler runs prompt chunks in forwards of their own, UNFOLDED_CHUNK
    #: tokens a step (each the replayed prefill graph of its rows bucket: the prompt
    #: GEMMs), so a new prompt stalls the running streams for one chunk at most, and
    #: each prompt's last token is its sequence's first decode row (its first draw is
    #: pipelined like the others). ``fold_prompts=on`` folds them into the decode batch
    #: instead, FOLD_CHUNK tokens a step through the per-row GEMVs: slower everywhere
    #: it was measured (H100, bench/load.py: 64 clients 2,095 vs 2,746 tok/s, a long
    #: prompt's TTFT 56.5 vs 8.4 ms)
    prefill_in_batch = False
    prompt_last_in_batch = True
    batch_prefill_chunk = UNFOLDED_CHUNK
    #: prompt tokens a scheduler step may run in all (chunks of several prompts, each its
    #: own forward); ``prompt_step`` raises it, to measure bursts' TTFT against the
    #: running streams' step time
    batch_prompt_tokens = UNFOLDED_CHUNK
    #: whether the scheduler queues step k+1 before step k's ids reach the host
    #: (launch_rows and forward_batch's ``follow``: taking ids, detokenizing and SSE
    #: overlap the GPU); the ``pipelined_steps`` option (H200, bench/load.py: +15%
    #: tok/s at 1 and 16 clients), on unless ``pipelined_steps=off``
    pipelined_rows = True

    def __init__(self, index: int = 0, budget: int | None = None, debug: bool | None = None,
                 kernel_cache=None, graphs: bool = True, int8: str = "auto",
                 gemm: str = "cublaslt", formats=None, prefill_graphs: bool = True,
                 moe_tc: bool = True, pipelined_steps: bool = True, fold_prompts: bool = False,
                 prompt_step: int | str = UNFOLDED_CHUNK, mma: bool = False, pdl: bool = True,
                 self_quantize: bool = False, prompt_gemv: int | str = PROMPT_GEMV) -> None:
        """``formats``: the format table the weight kernels are made for (default: the
        built-in formats; ``load_weights`` switches to the table it is given).
        ``prefill_graphs``: a request's prompt chunks replay a graph per rows bucket
        (prefill.py) instead of launching eagerly from Python (H100: Qwen-0.5B's
        pp512 3.8x, phi3-mini's 1.7x; bench/RESULTS.md).
        ``moe_tc``: a prompt's grouped experts on the tensor cores (matmul.cu's
        moe_gemm_tc) instead of fp32 tiles of 8 pairs (GPT-OSS's pp512 8.7x with
        prefill_graphs).
        ``pipelined_steps``: the scheduler's steps pipelined (``pipelined_rows``).
        ``fold_prompts``: the scheduler folds prompt chunks into the decode batch
        (``prefill_in_batch``) instead of running them as prefill graphs (see above).
        ``prompt_step``: prompt tokens a scheduler step may run in all
        (``batch_prompt_tokens``; the scheduler takes at least one chunk, and one
        chunk when folding: Scheduler.step_tokens).
        ``mma``: a decode batch's GEMVs on the int8 tensor cores (ops/gemv_mma.cuh)
        where the format has them, else the dp4a GEMV. Off by default: on an H100 it
        made 16 rows 1.29x faster and one row 1.45x slower (RESULTS), and one kernel
        must serve every rows bucket.
        ``pdl``: kernels start while the one before them finishes (programmatic
        dependent launch, ops/pdl.cuh; sm_90 and later); the same bits either way.
        On by default: on an H100 it took Qwen-0.5B's decode from 922 to 991 tok/s
        and phi3-mini's from 389 to 402 (RESULTS).
        ``self_quantize``: a single token's int8 GEMVs norm and quantize their input
        in each block (fused.ToQ8) instead of after an rms_norm_q8 / quantize_q8
        launch; the same bits either way. Off: on the H100 it saved Qwen 3% and cost
        phi3-mini 2.4x (every block quantizes its 3,072 or 8,192 values again).
        ``prompt_gemv``: prompt chunks of up to this many rows through the int8 GEMVs
        instead of fp16 weight copies and the GEMM (MatmulKernels' prompt_gemv). 32 by
        default: on an H100, 16 HTTP clients of Qwen-0.5B got 4,133 tok/s against 3,375
        with 8 (server steps 3.38 ms against 3.98: a short prompt costs less), 4 clients
        1,945 against 1,452 (RESULTS).
        Each off only to measure against."""
        from orcd.backends.cuda.device import CudaDevice

        self.device = CudaDevice(index)
        self.name = f"cuda:{index}"
        self.sm = self.device.info.arch
        self.graphs = graphs
        self._prefill_graphs = prefill_graphs
        self.pipelined_rows = bool(pipelined_steps)
        self.batch_prompt_tokens = int(prompt_step)   # the scheduler holds it to at least a chunk
        if fold_prompts:
            self.prefill_in_batch, self.prompt_last_in_batch = True, False
            self.batch_prefill_chunk = FOLD_CHUNK
        self.moe_tc = moe_tc
        self.steps = None
        self._positions = 0       # positions the rope tables must cover (the largest cache made)
        self.scratch = self._graph = self._kv = self.batch = self.prefill = None
        self._kv_bufs: list = []
        self._rope: dict = {}
        try:
            self._setup(budget, debug, kernel_cache, int8, gemm, formats, mma, pdl, self_quantize, prompt_gemv)
        except BaseException:
            self.close()
            raise

    def _setup(self, budget, debug, kernel_cache, int8, gemm, formats, mma, pdl, self_quantize,
               prompt_gemv) -> None:
        from orcd.backends.cuda.driver import cu
        from orcd.backends.cuda.launch import Launcher
        from orcd.backends.cuda.memory import DeviceAllocator
        from orcd.backends.cuda.nvrtc import KernelCompiler
        from orcd.ops.activation import ActivationKernels
        from orcd.ops.attention import AttentionKernels
        from orcd.ops.fused import FusedKernels
        from orcd.ops.layout import LayoutKernels
        from orcd.ops.matmul import MatmulKernels
        from orcd.ops.moe import MoeKernels
        from orcd.ops.norm import NormKernels
        from orcd.ops.rope import RopeKernels

        v = int(cu("cuDriverGetVersion"))
        self.cuda_runtime_version = f"{v // 1000}.{v % 1000 // 10}"
        self.alloc = DeviceAllocator(self.device, budget)
        self.launcher = Launcher(self.device, debug, pdl=pdl)
        from orcd.quant.builtin import builtin_table

        compiler = KernelCompiler(self.sm, cache=kernel_cache, cuda_headers=True)
        self.compiler = compiler
        # every source compiles at once (a cold cache pays the longest compile, not the sum);
        # the constructors below each wait for their own
        compiler.prefetch(kernel_sources(formats if formats is not None else builtin_table(), type_ids=()))
        args = (self.device, compiler, self.launcher)
        # int8 "off" / "auto" / "all": dp4a decode GEMVs; gemm: the prefill GEMM's backend;
        # mma: a decode batch's GEMVs on the int8 tensor cores
        self._mm_options = dict(int8=int8, gemm=gemm, allocator=self.alloc, mma=mma, prompt_gemv=int(prompt_gemv))
        self.mm = MatmulKernels(*args, formats=formats, **self._mm_options)
        self.norm, self.rope_k, self.act = NormKernels(*args), RopeKernels(*args), ActivationKernels(*args)
        self.attn, self.moe_k = AttentionKernels(*args), MoeKernels(*args)
        self.layout = LayoutKernels(*args)
        self.fused = FusedKernels(*args, formats=formats, self_quantize=self_quantize)
        self._kernel_args = args
        self.sampler = None  # made at the first sample, when the vocabulary size is known
        self.rows_sampler = None   # likewise, for batches (sample_rows)
        self.scratch = Scratch(self.alloc, SCRATCH_START)
        self._io_buf = self.alloc.alloc(IO_BYTES, "scratch")
        self.io = Arena(self._io_buf.ptr, IO_BYTES)
        # decode inputs: [token id, position] at fixed device addresses, fed from pinned memory
        self._step_buf = self.alloc.alloc(8, "scratch")
        self.step_ids = DeviceTensor(self._step_buf.ptr, (1,), np.dtype(np.int32))
        self.step_pos = DeviceTensor(self._step_buf.ptr + 4, (1,), np.dtype(np.int32))
        self.device.make_current()
        self.steps = StepIO(self.device, self.step_ids, self.step_pos)
        self.ops = CudaOps(self)
        self.batch = BatchDecoder(self)
        self.prefill = PrefillGraphs(self) if self._prefill_graphs else None

    # -- weights and cache -------------------------------------------------------

    def new_kv_cache(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int,
                     head_dim_v: int | None = None) -> KVCache:
        """The pooled cache when the shape matches, else a new one (the old one freed
        first); all-or-nothing: VramOom leaves no part of it allocated."""
        from orcd.backends.cuda.memory import from_host

        hd_v = head_dim_v or head_dim
        key = (n_layer, n_ctx, n_head_kv, head_dim, hd_v)
        if self._kv is not None and self._kv_key == key:
            return self._kv
        self.free_kv_cache()
        n_blocks = blocks_for(n_ctx)          # one sequence holding consecutive blocks
        rows = n_blocks * KV_BLOCK
        k_shape, v_shape = (rows, n_head_kv, head_dim), (rows, n_head_kv, hd_v)
        table, seq = contiguous_table(n_blocks), np.zeros(rows, np.int32)
        with self.alloc.transaction() as tx:
            ks = [tx.alloc(int(np.prod(k_shape)) * 2, "kv_cache") for _ in range(n_layer)]
            vs = [tx.alloc(int(np.prod(v_shape)) * 2, "kv_cache") for _ in range(n_layer)]
            tb, sb = tx.alloc(table.nbytes, "kv_cache"), tx.alloc(seq.nbytes, "kv_cache")
        from_host(self.device, table, tb.ptr)
        from_host(self.device, seq, sb.ptr)
        self._kv_bufs, self._kv_key = tx.buffers, key
        self.cover_positions(rows)
        f16, i32 = np.dtype(np.float16), np.dtype(np.int32)
        self._kv = KVCache([DeviceTensor(b.ptr, k_shape, f16) for b in ks],
                           [DeviceTensor(b.ptr, v_shape, f16) for b in vs],
                           DeviceTensor(tb.ptr, table.shape, i32), DeviceTensor(sb.ptr, seq.shape, i32), n_ctx)
        return self._kv

    def new_kv_pool(self, n_layer: int, n_blocks: int, n_head_kv: int, head_dim: int,
                    head_dim_v: int | None = None) -> KVCache:
        """K and V rows for n_blocks blocks of every layer, for forward_batch; all or
        nothing (VramOom leaves nothing allocated); free_kv_pool gives them back."""
        return self.batch.new_pool(n_layer, n_blocks, n_head_kv, head_dim, head_dim_v)

    def free_kv_pool(self, pool: KVCache) -> None:
        self.batch.free_pool(pool)

    def forward_batch(self, model, pool: KVCache, tables, seq, ids, pos, n_ctx: int, batched: bool,
                      last_only: bool, follow=None) -> DeviceTensor:
        """One forward over ``pool`` seen through ``tables`` [n_seqs, max_blocks]: T
        tokens ``ids`` at ``pos`` of sequences ``seq`` (host ints); see CpuBackend.
        A batch of decodes replays a captured graph (batch.py); ``follow``'s ids
        are copied into its inputs on the device."""
        return self.batch.forward(model, pool, tables, seq, ids, pos, n_ctx, batched, last_only, follow)

    def warm_batch(self, model, pool: KVCache, max_rows: int, n_ctx: int | None = None) -> int:
        """Capture the replayed step of every row count up to ``max_rows`` now, and the
        scheduler's prompt chunks where they run as graphs of their own (batch.py)."""
        return self.batch.warm(model, pool, max_rows, n_ctx)

    def warm_tasks(self, model, pool: KVCache, max_rows: int, n_ctx: int | None = None) -> list:
        """warm_batch's captures one by one (batch.BatchDecoder.warm_tasks), for
        the scheduler to run the first before serving and the rest when idle; a step
        that comes first captures its own graph (an eager forward, then the capture)."""
        return self.batch.warm_tasks(model, pool, max_rows, n_ctx)

    def cover_positions(self, n: int) -> None:
        """Rope tables made from now on cover positions < n (a cache or pool that large exists)."""
        self._positions = max(self._positions, int(n))

    @staticmethod
    def row(logits: DeviceTensor, i: int) -> DeviceTensor:
        return logits.rows(i, i + 1)

    def free_kv_cache(self) -> None:
        self._drop_graph()
        if self._kv_bufs:
            self.device.synchronize()  # no kernel may still read it
        for buf in self._kv_bufs:
            self.alloc.free(buf)
        self._kv_bufs, self._kv = [], None

    def rope_table(self, cfg):
        """cos/sin of ``cfg`` for every position of the current cache (built once)."""
        from orcd.backends.cuda.memory import from_host
        from orcd.ops.rope import RopeTable

        if not self._positions:
            raise InvalidRequest("rope needs a KV cache: call new_kv_cache or new_kv_pool first")
        n_pos = self._positions
        table = self._rope.get(cfg)
        if table is None or table.n_pos < n_pos:
            if table is not None:   # graphs captured on the old table must not replay
                self.device.synchronize()
                self._drop_graph()
                for buf in table.bufs:
                    self.alloc.free(buf)
            cos, sin = RopeTable.host_arrays(cfg, n_pos)
            with self.alloc.transaction() as tx:
                bufs = [tx.alloc(a.nbytes, "workspace") for a in (cos, sin)]
            for a, buf in zip((cos, sin), bufs):
                from_host(self.device, a, buf.ptr)
            table = RopeTable(cfg, n_pos, bufs[0].ptr, bufs[1].ptr)
            table.bufs = bufs
            self._rope[cfg] = table
        return table

    # -- forwards ----------------------------------------------------------------

    def make_runner(self, model, cache: KVCache) -> CudaRunner:
        return CudaRunner(self, model, cache)

    def eager(self, model, cache: KVCache, ids: list[int], start: int,
              last_only: bool = True) -> DeviceTensor:
        if last_only and self.graphs and self.prefill is not None:
            logits = self.prefill.forward(model, cache, ids, start)   # prefill.py
            if logits is not None:
                return logits
        while True:
            self.scratch.reset()
            self.io.reset()
            try:
                return model.forward(self.ops, self.ids(ids), self.positions(start, len(ids)), cache,
                                     last_only=last_only)
            except ScratchFull as e:
                self._grow_scratch(e.args[0])

    def decode_step(self, model, cache: KVCache, token: int | None, pos: int) -> DeviceTensor:
        """One token through the captured graph; ``token`` None: the id the sampler
        left in step_ids (sample_to_device)."""
        self.device.make_current()
        self.steps.write_inputs(token, pos)
        g = self._graph
        if self.graphs and g is not None and g[0] is model and g[1] is cache:
            g[2].replay()
            return g[3]
        logits = self._decode_eager(model, cache)   # also sizes the scratch, builds rope tables
        if self.graphs:
            self._capture(model, cache, logits)
        return logits

    def _decode_eager(self, model, cache: KVCache) -> DeviceTensor:
        while True:
            self.scratch.reset()
            try:
                return model.forward(self.ops, self.step_ids, self.step_pos, cache)
            except ScratchFull as e:
                self._grow_scratch(e.args[0])

    def _capture(self, model, cache: KVCache, logits: DeviceTensor) -> None:
        from orcd.backends.cuda.graph import capture_like

        if self._graph is not None:   # the one decode graph it replaces (prefill and batch graphs stay)
            self._graph[2].close()
            self._graph = None
        self.scratch.reset()
        graph = capture_like(self.device, lambda: model.forward(self.ops, self.step_ids, self.step_pos, cache),
                             logits, "decode")
        self._graph = (model, cache, graph, logits)

    def _drop_graph(self) -> None:
        if self.batch is not None:
            self.batch.drop_graphs()
        if self.prefill is not None:
            self.prefill.drop_graphs()
        if self._graph is not None:
            self._graph[2].close()
            self._graph = None

    def _grow_scratch(self, needed: int) -> None:
        self.device.synchronize()
        self._drop_graph()
        size = max(2 * self.scratch.per_arena, needed)
        self.scratch.free()
        self.scratch = Scratch(self.alloc, size)

    # -- host side -----------------------------------------------------------------

    def _io(self, values: np.ndarray) -> DeviceTensor:
        from orcd.backends.cuda.memory import from_host

        if values.nbytes > self.io.capacity:
            raise InvalidRequest(f"{values.size} tokens in one forward; at most "
                                 f"{self.io.capacity // 8} per call")
        if self.io.offset + values.nbytes > self.io.capacity:
            self.io.reset()  # earlier ids/positions were consumed in stream order
        t = self.io.empty(values.shape, values.dtype)
        from_host(self.device, values, t.ptr)
        return t

    def ids(self, ids) -> DeviceTensor:
        return self._io(np.asarray(ids, dtype=np.int32).reshape(-1))

    def positions(self, start: int, n: int) -> DeviceTensor:
        return self._io(np.arange(start, start + n, dtype=np.int32))

    def to_host(self, x) -> np.ndarray:
        from orcd.backends.cuda.memory import to_host

        if not isinstance(x, DeviceTensor):
            raise TypeError(f"to_host takes a DeviceTensor, got {type(x).__name__}")
        raw = to_host(self.device, x.ptr, x.nbytes)
        return raw.view(x.dtype).reshape(x.shape).astype(np.float32)

    def synchronize(self) -> None:
        self.device.synchronize()

    def memory_usage(self) -> dict[str, int]:
        usage = self.alloc.usage()
        usage.pop("test", None)
        return usage

    def check_residency(self) -> bool:
        from orcd.backends.cuda.residency import check_pointers

        ptrs = [(f"weights@{p:#x}", p) for p, _, _ in self.alloc.ledger.pointers("weights")]
        return not check_pointers(self.device, ptrs)

    def close(self) -> None:
        if getattr(self, "device", None) is None:
            return
        self.device.synchronize()
        self._drop_graph()
        for part in (self.batch, self.prefill):
            if part is not None:
                part.close()
        for obj in (getattr(self, "mm", None), getattr(self, "sampler", None),
                    getattr(self, "rows_sampler", None), getattr(self, "compiler", None)):
            if hasattr(obj, "close"):
                obj.close()
        if hasattr(self, "alloc"):
            self.alloc.free_all()
        self._kv, self._kv_bufs, self._rope = None, [], {}
        if getattr(self, "steps", None) is not None:
            self.steps.close()
        self.device.close()
        self.device = None
