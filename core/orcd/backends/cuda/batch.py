"""forward_batch on the GPU: a KV pool shared by many sequences, prompt chunks
run eagerly, and a batch of decodes replayed from a CUDA graph.

A batch of decodes is captured once per (rows bucket, blocks bucket): its
inputs (token ids, positions, each row's sequence and every sequence's block
table) live at fixed device addresses, rewritten before each replay. A batch of
n rows runs as the next bucket up; the padding rows decode token 0 at position 0
of the pool's spare block, which no sequence owns, so they can only write there.
Every kernel computes a row on its own (Phase.ROWS), so a row's logits do
not depend on the bucket, the padding or the other rows.
"""

from __future__ import annotations

import numpy as np

from orcd.backends.cuda.ops import ScratchFull
from orcd.backends.cuda.tensor import DeviceTensor
from orcd.errors import InvalidRequest
from orcd.kvcache import KV_BLOCK, KVCache
from orcd.ops.contract import Phase, in_phase

#: rows of a replayed step: decodes plus a folded prompt chunk (scheduler.py) land
#: between the powers of two often enough to be worth a graph of their own
ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
#: the fewest blocks a replayed step attends over: the decode kernel's splits past
#: a row's last key exit at once, so a wider graph costs a few idle blocks, while
#: each new (rows, blocks) pair costs a capture in the middle of serving
MIN_BLOCKS = 8


def bucket(n: int, sizes=ROW_BUCKETS) -> int:
    """The smallest size >= n (a power of two past the list)."""
    for s in sizes:
        if s >= n:
            return s
    return 1 << (int(n) - 1).bit_length()


class Replays:
    """Captured graphs of one backend (key -> (graph, logits)) and the device
    buffers their inputs are written to before each replay (key -> (buffer, ...))."""

    def __init__(self, backend) -> None:
        self.b = backend
        self._graphs: dict = {}
        self._inputs: dict = {}

    def drop_graphs(self) -> None:
        for graph, _ in self._graphs.values():
            graph.close()
        self._graphs.clear()

    def close(self) -> None:
        self.drop_graphs()
        for buf, *_ in self._inputs.values():
            self.b.alloc.free(buf)
        self._inputs.clear()

    def _int32_inputs(self, rows: int, vectors: int, table_shape: tuple = ()) -> tuple:
        """One scratch buffer of ``vectors`` int32 fields of ``rows`` each (ids,
        positions, ...), then an int32 table of ``table_shape`` if given: (buffer, the
        fields..., the table), each field a DeviceTensor at its place in the buffer."""
        i32 = np.dtype(np.int32)
        n_table = int(np.prod(table_shape)) if table_shape else 0
        buf = self.b.alloc.alloc(4 * (vectors * rows + n_table), "scratch")
        fields = [DeviceTensor(buf.ptr + 4 * k * rows, (rows,), i32) for k in range(vectors)]
        if table_shape:
            fields.append(DeviceTensor(buf.ptr + 4 * vectors * rows, tuple(table_shape), i32))
        return (buf, *fields)

    def _replay(self, key, forward, what: str) -> DeviceTensor:
        """The logits of ``forward()`` (a model forward reading inputs already written
        at fixed addresses): key's graph replayed, else an eager run (the scratch
        grown as it needs), then captured for next time."""
        b = self.b
        got = self._graphs.get(key)
        if got is not None and b.graphs:
            got[0].replay()
            return got[1]
        while True:
            b.scratch.reset()
            try:
                logits = forward()
                break
            except ScratchFull as e:
                b._grow_scratch(e.args[0])   # drops every graph
        if b.graphs:
            from orcd.backends.cuda.graph import capture_like

            b.scratch.reset()
            self._graphs[key] = (capture_like(b.device, forward, logits, what), logits)
        return logits


class BatchDecoder(Replays):
    """The pool, prompt chunks and graph-replayed decode batches of one backend:
    graphs per (id(model), id(pool), rows, blocks), inputs per
    (rows, blocks) as (buffer, ids, pos, seq, tables; the buffer also holds follow's src)."""

    n_logits: int | None = None   # the logits' width, once ``warm`` ran a forward

    # -- the pool ------------------------------------------------------------------

    def new_pool(self, n_layer: int, n_blocks: int, n_head_kv: int, head_dim: int,
                 head_dim_v: int | None) -> KVCache:
        """n_blocks usable blocks plus the spare one padding rows write to (all or nothing)."""
        b = self.b
        rows = (n_blocks + 1) * KV_BLOCK
        k_shape, v_shape = (rows, n_head_kv, head_dim), (rows, n_head_kv, head_dim_v or head_dim)
        with b.alloc.transaction() as tx:
            ks = [tx.alloc(int(np.prod(k_shape)) * 2, "kv_cache") for _ in range(n_layer)]
            vs = [tx.alloc(int(np.prod(v_shape)) * 2, "kv_cache") for _ in range(n_layer)]
        f16 = np.dtype(np.float16)
        pool = KVCache([DeviceTensor(x.ptr, k_shape, f16) for x in ks],
                       [DeviceTensor(x.ptr, v_shape, f16) for x in vs], None, None, rows)
        pool.buffers, pool.spare = tx.buffers, n_blocks
        b.cover_positions(rows)
        return pool

    def free_pool(self, pool: KVCache) -> None:
        b = self.b
        b.device.synchronize()   # no kernel may still read it
        for key in [k for k in self._graphs if k[1] == id(pool)]:
            self._graphs.pop(key)[0].close()
        for buf in getattr(pool, "buffers", ()):
            b.alloc.free(buf)
        pool.buffers = []

    # -- forwards ------------------------------------------------------------------

    def forward(self, model, pool: KVCache, tables, seq, ids, pos, n_ctx: int, batched: bool,
                last_only: bool, follow=None) -> DeviceTensor:
        """See CpuBackend.forward_batch; logits [T or 1, n_vocab] in the scratch. One
        sequence's prompt chunk replays the prefill graph of its rows bucket where
        it can (``_prompt``), else runs eagerly."""
        if batched:
            return self._decode(model, pool, tables, seq, ids, pos, follow)
        if follow is not None:
            raise ValueError("forward_batch: follow is for batched steps")
        table, at = np.asarray(tables, np.int32), np.asarray(pos).reshape(-1)
        start = int(at[0]) if at.size else 0
        if last_only and table.shape[0] == 1 and np.array_equal(at, np.arange(start, start + len(ids))):
            logits = self._prompt(model, pool, table[0], ids, start, n_ctx)
            if logits is not None:
                return logits
        b = self.b
        while True:
            b.scratch.reset()
            b.io.reset()
            view = KVCache(pool.k, pool.v, b._io(np.asarray(tables, np.int32)),
                           b._io(np.asarray(seq, np.int32).reshape(-1)), int(n_ctx), False)
            try:
                return model.forward(b.ops, b.ids(ids), b._io(np.asarray(pos, np.int32).reshape(-1)),
                                     view, last_only=last_only)
            except ScratchFull as e:
                b._grow_scratch(e.args[0])

    def _prompt(self, model, pool: KVCache, table: np.ndarray, ids, start: int, n_ctx: int,
                check: bool = True) -> DeviceTensor | None:
        """The last token's logits [1, n_vocab] of one sequence's prompt chunk at
        ``start``, replayed from the prefill graph of its rows bucket (prefill.py:
        padding first, at the positions after the chunk, through the sequence's own
        table at a fixed address); None where it must run eagerly: no graphs, no
        bucket, or padding that would land on the sequence's own keys (``check``)."""
        from orcd.backends.cuda.prefill import bucket as prompt_bucket
        from orcd.backends.cuda.prefill import padded_inputs, padding_is_safe

        b, n = self.b, len(ids)
        rows = prompt_bucket(n)
        if b.prefill is None or not b.graphs or rows is None or (
                check and not padding_is_safe(table, start, n, rows)):
            return None
        host = np.concatenate([padded_inputs(ids, start, rows), np.zeros(rows, np.int32), table])
        buf, d_ids, d_pos, d_seq, d_table = self._prompt_buffers(rows, table.size)
        self._write(host, buf.ptr)
        view = KVCache(pool.k, pool.v, d_table, d_seq, int(n_ctx), False)
        return self._replay((id(model), id(pool), "prompt", rows, int(n_ctx)),
                            lambda: model.forward(b.ops, d_ids, d_pos, view, last_only=True), "prompt chunk")

    def _prompt_buffers(self, rows: int, width: int):
        # ids, positions, seq (zeros), then one table as wide as the widest seen: with
        # every row in sequence 0 the kernels never use the table's row length, so a
        # graph captured with one width replays right with a narrower table written
        key = ("prompt", rows)
        got = self._inputs.get(key)
        if got is None or got[4].shape[1] < width:
            if got is not None:
                self._drop_prompt_graphs(rows)
                self.b.alloc.free(got[0])
            got = self._inputs[key] = self._int32_inputs(rows, 3, (1, width))
        return got

    def _drop_prompt_graphs(self, rows: int) -> None:
        for key in [k for k in self._graphs if k[2:4] == ("prompt", rows)]:
            self._graphs.pop(key)[0].close()

    def _write(self, host: np.ndarray, ptr: int) -> None:
        """Inputs to a fixed device address; pipelined steps queue the copy without
        waiting (the step before still runs; the driver stages the pageable source
        before the call returns)."""
        from orcd.backends.cuda.memory import from_host, from_host_async

        (from_host_async if self.b.pipelined_rows else from_host)(self.b.device, host, ptr)

    def _decode(self, model, pool: KVCache, tables, seq, ids, pos, follow=None) -> DeviceTensor:
        # one row per token: row i runs ids[i] at pos[i] with table tables[seq[i]]; with
        # follow = (pending, src), rows with src >= 0 take pending's draw src on the device
        pos = np.asarray(pos, np.int64).reshape(-1)
        n = pos.size
        tables = np.asarray(tables, np.int32)
        own = tables[np.asarray(seq, np.int64).reshape(-1)]                # [n, width]
        if pos.min(initial=0) < 0 or (n and pos.max() // KV_BLOCK >= own.shape[1]):
            raise InvalidRequest("a decode position lies past its sequence's block table")
        rows = bucket(n)
        blocks = max(MIN_BLOCKS, bucket(int(pos.max(initial=0)) // KV_BLOCK + 1))
        view, inputs = self._write_inputs(pool, rows, blocks, own, ids, pos, follow)
        ops = self.b.ops

        def forward() -> DeviceTensor:
            with in_phase(ops, Phase.ROWS):
                return model.forward(ops, inputs[0], inputs[1], view, last_only=False)
        logits = self._replay((id(model), id(pool), rows, blocks), forward, "batch decode")
        return logits.rows(0, n)

    def warm(self, model, pool: KVCache, max_rows: int, n_ctx: int | None = None) -> int:
        """Run every ``warm_tasks`` capture now; the count run."""
        tasks = self.warm_tasks(model, pool, max_rows, n_ctx)
        for task in tasks:
            task()
        self.b.device.synchronize()
        return len(tasks)

    def warm_tasks(self, model, pool: KVCache, max_rows: int, n_ctx: int | None = None) -> list:
        """One capture each: the step of every rows bucket up to ``max_rows`` (each at
        MIN_BLOCKS; the rows write position 0 of the spare block) and, where the
        scheduler runs prompt chunks of their own (``prompt_last_in_batch``), the
        prefill graph of every bucket up to its chunk, for ``n_ctx`` (their rows write
        only the spare block): so that no step under load waits for a kernel load or
        a capture. The one-row step comes first (a lone request's; its logits give
        ``n_logits``). A task whose graph a step captured already replays it."""
        from orcd.backends.cuda.prefill import BUCKETS

        b = self.b
        sizes = [r for r in ROW_BUCKETS if r < bucket(max_rows)] + [bucket(max_rows)]
        tasks = [lambda rows=rows: self._warm_rows(model, pool, rows) for rows in sizes]
        if n_ctx and b.prompt_last_in_batch and b.prefill is not None and b.graphs:
            table = np.full(-(-int(n_ctx) // KV_BLOCK), pool.spare, np.int32)
            tasks[1:1] = [lambda rows=rows: self._prompt(model, pool, table, [0] * rows, 0, n_ctx, check=False)
                          for rows in BUCKETS if rows <= b.batch_prefill_chunk]
        return tasks

    def _warm_rows(self, model, pool: KVCache, rows: int) -> None:
        logits = self._decode(model, pool, [[pool.spare]], [0] * rows, [0] * rows, [0] * rows)
        self.n_logits = int(logits.shape[-1])    # the samplers' width (CudaBackend.warm_rows)

    def _write_inputs(self, pool, rows: int, blocks: int, own: np.ndarray, ids, pos, follow=None):
        """Write the (rows, blocks) bucket's inputs: real rows first, then padding."""
        n = own.shape[0]
        host = np.zeros(4 * rows + rows * blocks, np.int32)
        host[:n] = np.asarray(ids, np.int32).reshape(-1)
        host[rows:rows + n] = pos
        host[2 * rows:3 * rows] = np.arange(rows)                          # row i: its own table row
        host[3 * rows:4 * rows] = -1                                       # src: the host's id
        if follow is not None:
            host[3 * rows:3 * rows + n] = follow[1]
        table = np.full((rows, blocks), pool.spare, np.int32)              # padding: the spare block
        width = min(blocks, own.shape[1])
        table[:n, :width] = own[:, :width]
        host[4 * rows:] = table.reshape(-1)
        buf, d_ids, d_pos, d_seq, d_tables = self._buffers(rows, blocks)
        self._write(host, buf.ptr)
        if follow is not None:
            follow[0].feed(d_ids.ptr, buf.ptr + 4 * 3 * rows, n)
        # rows of distinct sequences unless prompt chunks are folded into the batch
        view = KVCache(pool.k, pool.v, d_tables, d_seq, blocks * KV_BLOCK, True, apart=not self.b.prefill_in_batch)
        return view, (d_ids, d_pos)

    def _buffers(self, rows: int, blocks: int):
        got = self._inputs.get((rows, blocks))
        if got is None:
            # ids, positions, each row's table row, follow's src (written, not read by the
            # graph), then the tables
            buf, ids, pos, seq, _src, tables = self._int32_inputs(rows, 4, (rows, blocks))
            got = self._inputs[(rows, blocks)] = (buf, ids, pos, seq, tables)
        return got
