"""Prefill chunks of one request replayed from CUDA graphs.

An eager prefill of a small model is host-bound: the H100 ran Qwen2.5-0.5B's
512-token prefill in 38 ms of wall time for 4.8 ms of kernels (bench/RESULTS.md),
the rest being ~850 launches from Python. A chunk of n tokens runs instead as
the graph of its rows bucket (the smallest of BUCKETS >= n), captured the first
time that bucket is seen for this model and cache, then replayed with one launch.

The bucket's ids and positions live at fixed device addresses, rewritten before
each replay. Padding goes *first*: rows 0 .. pad-1 decode token 0 at the
positions just past the chunk (start + n ..), the real tokens follow in order,
so the chunk's last token is the forward's last row (``last_only``). That is
safe because every kernel treats a row on its own and attention masks by each
row's position: a real row never sees a key past its own position, and the
padding's keys land on positions of this sequence that are still empty and that
each later token overwrites before any row can read them. A chunk whose padding
would run past the cache, or longer than the largest bucket, runs eagerly.
"""

from __future__ import annotations

import numpy as np

from orcd.backends.cuda.batch import Replays
from orcd.backends.cuda.tensor import DeviceTensor
from orcd.kvcache import KV_BLOCK

#: rows of a replayed prefill chunk; a prompt pads up to the next one
BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
#: the scheduler's prompt tokens per step where it does not fold them into the decode
#: batch (the default): the running streams wait at most one 256-row prefill
#: graph a step. Chunks start at multiples of it, so a chunk's padding (to at most
#: the next multiple of 64 past its last token, for every bucket up to 256) stays in
#: the blocks reserved for the prompt and its first output token
UNFOLDED_CHUNK = 256
#: prompt tokens per step folded into the decode batch (``fold_prompts=on``)
FOLD_CHUNK = 32


def bucket(n: int) -> int | None:
    """The rows a chunk of n tokens replays as, or None past the largest bucket."""
    return next((b for b in BUCKETS if b >= n), None)


def padded_inputs(ids, start: int, rows: int) -> np.ndarray:
    """[ids (rows), positions (rows)] as one int32 array: padding first at the
    positions after the chunk, then the chunk's tokens at start, start + 1, ..."""
    n = len(ids)
    pad = rows - n
    host = np.zeros(2 * rows, np.int32)
    host[pad:rows] = np.asarray(ids, np.int32)
    host[rows:rows + pad] = np.arange(start + n, start + n + pad)
    host[rows + pad:] = np.arange(start, start + n)
    return host


def padding_is_safe(table: np.ndarray, start: int, n: int, rows: int) -> bool:
    """Whether a chunk of n tokens at ``start`` padded to ``rows`` through the block
    ``table`` writes its padding (positions start + n ..) only to KV rows that no
    position before it holds: every block up to the padding's last is a block of
    its own (a scheduler's table repeats the sequence's first block past the
    blocks it reserved)."""
    last = (start + rows - 1) // KV_BLOCK
    return last < len(table) and len(np.unique(table[:last + 1])) == last + 1


class PrefillGraphs(Replays):
    """The prefill graphs of one backend: graphs per (id(model), id(cache), rows
    bucket), inputs per rows as (buffer, ids, pos)."""

    def forward(self, model, cache, ids, start: int) -> DeviceTensor | None:
        """The last token's logits [1, n_vocab] of the chunk ``ids`` at ``start``,
        or None when the chunk does not fit a bucket (the caller runs it eagerly)."""
        n = len(ids)
        rows = bucket(n)
        if n < 2 or rows is None or start + rows > cache.n_ctx:
            return None
        d_ids, d_pos = self._write_inputs(rows, padded_inputs(ids, start, rows))
        return self._replay((id(model), id(cache), rows),
                            lambda: model.forward(self.b.ops, d_ids, d_pos, cache, last_only=True), "prefill")

    def _write_inputs(self, rows: int, host: np.ndarray):
        from orcd.backends.cuda.memory import from_host_async

        got = self._inputs.get(rows)
        if got is None:
            got = self._inputs[rows] = self._int32_inputs(rows, 2)   # ids, positions
        from_host_async(self.b.device, host, got[0].ptr)   # ordered before the replay, no wait
        return got[1], got[2]
