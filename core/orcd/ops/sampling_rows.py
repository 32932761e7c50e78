"""A batch's draws in two launches: the rows of many CudaSamplers at once.

A batch of B decodes (the scheduler's step) draws B tokens, each with its own
sequence's sampler: its seen mask, output counts, bias and scratch. Sampled
one by one that is 2B launches and B parameter copies, and on the host ~100 us
of Python a row, longer than the GPU's whole step at 16 rows. Here each row's
SampleRow (its sampler's buffers, its logits row, its parameters and output)
and its SampleArgs go to the device in one copy, then sample_prepare_rows
(grid n_part x B) and sample_select_rows (grid B) run the same code as
sample_prepare / sample_select: a row's id is the one it gets sampled alone.
Draws that want logprobs keep the per-sampler path (CudaSampler.sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orcd.ops.sampling import _PREP_THREADS, _SELECT_THREADS, SAMPLE_ARGS, CudaSampler

from orcd.sampling import SamplingParams

#: sampling.cu SampleRow: twelve device pointers
SAMPLE_ROW = np.dtype([(name, "<u8") for name in (
    "logits", "seen", "counts", "bias", "allowed", "args", "x", "w", "part_max", "part_arg",
    "out_id", "info")])


@dataclass
class Row:
    """One row of a batched draw: ``sampler``'s draw (its state, ``params`` at
    draw counter ``step``, a grammar's bitmask ``allowed`` or None) from the
    float32 logits at ``logits_ptr`` into the int32 at ``out_ptr``."""
    sampler: CudaSampler
    logits_ptr: int
    out_ptr: int
    params: SamplingParams
    step: int
    allowed: np.ndarray | None = None


class RowBatch:
    """``RowBatch(device, compiler, launcher, n_vocab, allocator)``; then per
    step ``launch(rows)``, each row a ``Row``. Every sampler has ``n_vocab`` ids."""

    def __init__(self, device, compiler, launcher, n_vocab: int, allocator) -> None:
        from orcd.backends.cuda.nvrtc import KernelSource

        self.device, self.launcher, self.alloc = device, launcher, allocator
        self.n_vocab = int(n_vocab)
        module = compiler.load(device, KernelSource.from_package("orcd.ops", CudaSampler.SOURCE))
        self._prepare = module.function("sample_prepare_rows")
        self._select = module.function("sample_select_rows")
        self._follow = module.function("follow_ids")
        self.cap, self.buf, self.host = 0, None, None
        self.args = np.zeros(0, SAMPLE_ARGS)

    def launch(self, rows: list[Row]) -> None:
        """Queue every row's draw: its sampler's bitmask and bias, then one copy of
        the rows and their parameters, then both kernels (stream-ordered, no sync)."""
        from orcd.backends.cuda.memory import from_host_async

        B = len(rows)
        if not B:
            return
        self._reserve(B)
        table = np.empty((B, len(SAMPLE_ROW.names)), np.uint64)        # [B, 12]
        for i, r in enumerate(rows):
            if r.sampler.n_vocab != self.n_vocab:
                raise ValueError(f"a sampler of {r.sampler.n_vocab} ids in a batch of {self.n_vocab}")
            r.sampler.write_args(self.args[i:i + 1], r.params, r.step, r.allowed)
            table[i] = r.sampler.row_pointers(int(r.logits_ptr), self.buf.ptr + self._args_at(i),
                                              int(r.out_ptr))
        head = table.view(np.uint8).reshape(-1)
        self.host[:head.size] = head
        args = self.args[:B].view(np.uint8)
        at = self._args_at(0)
        self.host[at:at + args.size] = args
        from_host_async(self.device, self.host[:at + args.size], self.buf.ptr)
        s, table_ptr = rows[0].sampler, np.uint64(self.buf.ptr)
        self.launcher(self._prepare, (s.n_part, B), _PREP_THREADS, [table_ptr, self.n_vocab])
        self.launcher(self._select, B, _SELECT_THREADS, [table_ptr, s.n_part, self.n_vocab, s.n_pad])

    def follow(self, ids_ptr: int, src_ptr: int, prev_ptr: int, n: int) -> None:
        """Queue ids[i] = prev[src[i]] where src[i] >= 0 (int32 device arrays of n):
        a pipelined step's rows take the ids the step before drew on the device."""
        if n:
            self.launcher(self._follow, -(-n // 128), 128,
                          [np.uint64(ids_ptr), np.uint64(src_ptr), np.uint64(prev_ptr), n])

    def _args_at(self, i: int) -> int:
        return self.cap * SAMPLE_ROW.itemsize + i * SAMPLE_ARGS.itemsize

    def _reserve(self, n: int) -> None:
        """Room for n rows; growing waits for the device (a queued copy may read the old slab)."""
        if n <= self.cap:
            return
        if self.buf is not None:
            self.device.synchronize()
            self.alloc.free(self.buf)
        self.cap = max(n, 2 * self.cap, 16)
        size = self.cap * (SAMPLE_ROW.itemsize + SAMPLE_ARGS.itemsize)
        self.buf = self.alloc.alloc(size, "workspace")
        self.host = np.zeros(size, np.uint8)     # kept alive: source of the async copy
        self.args = np.zeros(self.cap, SAMPLE_ARGS)

    def close(self) -> None:
        if self.buf is not None:
            self.alloc.free(self.buf)
            self.buf = None
