"""The KV cache: per-layer K and V rows in blocks of KV_BLOCK positions, and
block tables that say which blocks hold each sequence's positions.

One pool of blocks serves every sequence of a batch: sequence s keeps its
position p in row ``tables[s][p // KV_BLOCK] * KV_BLOCK + p % KV_BLOCK`` of
each layer's K and V (``kv_rows``). A single request holds a table of
consecutive blocks (then row == position); a batch of requests holds several
tables and each token of a forward names its sequence (``seq``). The block is
the decode attention's split and the prefill attention's key tile, so a split
or a tile never straddles two blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

KV_BLOCK = 64


def blocks_for(n_positions: int) -> int:
    return -(-int(n_positions) // KV_BLOCK)


@dataclass
class KVCache:
    """What a forward attends over.

    k, v: per layer [n_blocks * KV_BLOCK, n_kv, head_dim(_v)] rows (fp16)
    tables: [n_seqs, max_blocks] int32, each sequence's block ids in position order
    seq: [>= T] int32, each token's sequence (row of ``tables``) for a forward of T
         tokens (a single sequence: zeros)
    n_ctx: positions a sequence may hold (at most max_blocks * KV_BLOCK)
    batched: each token of a forward is one decode step of its own sequence (a
         batch of running requests); False: the tokens are consecutive positions of
         one sequence (a prompt chunk, or one request's decode step)
    apart: (batched) no token reads a key another token of the forward stores -- not
         so where a prompt's chunk rides in the batch as rows of one sequence's blocks
         (fold_prompts): a decode kernel may then store each row's key itself
    """

    k: list[Any]
    v: list[Any]
    tables: Any
    seq: Any
    n_ctx: int
    batched: bool = False
    apart: bool = False

    @property
    def n_blocks(self) -> int:
        return self.k[0].shape[0] // KV_BLOCK


def kv_rows(tables: np.ndarray, seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The K/V row of each token: its sequence's block for the position, and the offset in it."""
    pos = np.asarray(pos, dtype=np.int64)
    blocks = np.asarray(tables)[np.asarray(seq, dtype=np.int64), pos // KV_BLOCK]
    return blocks.astype(np.int64) * KV_BLOCK + pos % KV_BLOCK


def contiguous_table(n_blocks: int) -> np.ndarray:
    """One sequence owning blocks 0 .. n_blocks - 1 (row == position)."""
    return np.arange(n_blocks, dtype=np.int32).reshape(1, n_blocks)
