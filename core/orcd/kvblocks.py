"""Which blocks of one KV pool are free: the scheduler's allocator.

A sequence takes every block it can need (prompt + max_tokens) when it is
admitted and gives them all back when it ends, so a running sequence never
waits for memory and nothing is ever preempted. Blocks need not be
consecutive: a sequence's block table lists its own (orcd.kvcache).
"""

from __future__ import annotations

from collections import deque

from orcd.errors import InternalError


class BlockAllocator:
    """Free block ids of a pool of ``n_blocks``, handed out first-freed-last
    (a FIFO), so a block just released is not the next one written."""

    def __init__(self, n_blocks: int) -> None:
        if n_blocks < 1:
            raise InternalError(f"a KV pool needs at least one block, got {n_blocks}")
        self.n_blocks = int(n_blocks)
        self._free: deque[int] = deque(range(self.n_blocks))

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def n_used(self) -> int:
        return self.n_blocks - len(self._free)

    def take(self, n: int) -> list[int]:
        """``n`` free block ids; the caller checked ``n_free`` (a shortfall is a bug)."""
        if n > len(self._free):
            raise InternalError(f"{n} KV blocks asked for, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def give_back(self, blocks: list[int]) -> None:
        if len(self._free) + len(blocks) > self.n_blocks:   # else two sequences would share one
            raise InternalError("more KV blocks given back than were taken")
        self._free.extend(blocks)
