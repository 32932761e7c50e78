"""Continuous batching: many requests decoded together, each as if alone.

The shape of nano-vllm's scheduler on orcd's backend API. Requests wait in a
FIFO; one is admitted when fewer than ``max_batch`` run and the pool has free
blocks for its whole prompt + max_tokens (reserved then, so a running sequence
never waits for memory and nothing is ever preempted). Each ``step()``:

1. ends every sequence that was cancelled or ran past its deadline;
2. admits waiting sequences, oldest first (one that does not fit yet holds
   the ones behind it back, so a large request is not starved);
3. runs one batched forward (``forward_batch(batched=True)``) over the last
   token of every sequence past its prompt and, where the backend folds
   prompts into the batch (``prefill_in_batch``), the next chunks of the
   oldest unfinished prompts, at most one chunk of rows in all; elsewhere
   those chunks run first, each in a forward of its own, at most one chunk of
   tokens in all. Either way a long prompt delays the running streams by one
   chunk per step. A backend with ``prompt_last_in_batch`` (the GPU)
   runs a prompt's last token as the sequence's first decode row instead of
   in its last chunk, so a new sequence's first draw is one of the step's
   draws (pipelined like the others) and its prompt forwards need no logits;
4. draws each sequence's next token from its row (``sample_rows``: the
   sequence's own generator, penalties and grammar, kept by the backend).

Pipelined steps (a backend with ``pipelined_rows``: the GPU's
``pipelined_steps`` option): step 4 only
queues the draws (``launch_rows``), and the next step's forward takes each
sequence's id from them on the device (``follow``); the ids of step k reach
the host -- taken, detokenized, streamed -- while step k+1 runs. A sequence
that ends at step k has then already a row in step k+1, whose draw is dropped;
a sequence whose in-flight draw is its last by max_tokens gets no row. Draws
that need the host between draws (a grammar, logprobs, frequency or presence
penalties: ``Engine.host_steps``) make their steps synchronous again.

A decode row's logits do not depend on what else shares its forward (the
backend's per-row contract, tests/engine/test_batch_forward.py), each sequence keeps
its own seeded generator, and every request runs through here: so a greedy or
seeded request gives the same tokens alone and under load.

A backend failure ends the sequences of the failed forward (or the row whose
sampling failed) with an OrcdError and frees their blocks; the others go on.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from orcd.engine import (PREFILL_CHUNK, GenerateRequest, GenerateResult, Generation, TokenEvent,
                         interrupt)
from orcd.errors import OrcdError, VramOom, as_orcd_error
from orcd.kvblocks import BlockAllocator
from orcd.kvcache import KV_BLOCK, blocks_for

#: the most sequences one decode step may hold (``orcd serve --max-batch``)
MAX_BATCH = 256


@dataclass(eq=False)
class Sequence:
    """One request in the scheduler, from queued to ended."""

    req: GenerateRequest
    on_token: Callable[[TokenEvent], None]
    tag: Any = None                     # the caller's handle (the worker's Job)
    blocks: list[int] = field(default_factory=list)   # its KV blocks while admitted
    table: np.ndarray | None = None     # int32 [width]: its block table, made once at admission
    gen: Generation | None = None       # made at admission: sampling, stop rules, output
    n_cached: int = 0                   # prompt tokens in the KV cache so far
    n_prefill: int = 0                  # prompt tokens run as prompt rows (the rest: a decode row)
    pending: Any = None                 # the Inflight holding its draw not taken yet
    done: bool = False                  # ended (a draw still in flight is dropped)
    result: GenerateResult | None = None   # when it ended well
    error: OrcdError | None = None         # when it did not

    @property
    def n_positions(self) -> int:
        return len(self.req.prompt_ids) + self.req.max_tokens

    @property
    def prefilling(self) -> bool:
        return self.n_cached < self.n_prefill


@dataclass(eq=False)
class Inflight:
    """A pipelined step's draws on their way to the host: the backend's handle
    (``launch_rows``) and the sequence of each draw, in order."""

    handle: Any
    seqs: list[Sequence]

    def __post_init__(self) -> None:
        self.index = {id(seq): j for j, seq in enumerate(self.seqs)}   # a sequence's draw


class Scheduler:
    """Runs the requests of one engine (orcd.engine.Engine: the loaded model,
    its backend, the request checks) together, over one KV pool of
    ``n_blocks`` blocks of KV_BLOCK positions. Not thread-safe: one thread
    calls ``add`` and ``step``; other threads may read the counts."""

    def __init__(self, engine, n_blocks: int, max_batch: int) -> None:
        lm = engine.lm
        self.engine, self.backend, self.model = engine, lm.backend, lm.model
        self.max_batch = int(max_batch)
        # every block table is as wide as the context: n_ctx, and with it each
        # kernel's shape, is then the same whatever else shares a forward
        self.width = blocks_for(lm.n_ctx)
        self.n_ctx = self.width * KV_BLOCK
        hp = lm.hp
        self.blocks = BlockAllocator(n_blocks)
        self.pool = self.backend.new_kv_pool(hp.n_layer, n_blocks, hp.n_head_kv, hp.head_dim,
                                             hp.get("head_dim_v"))
        # folding (``prefill_in_batch``, the GPU's fold_prompts=on): prompt chunks ride
        # in the decode batch; else each chunk runs in a forward of its own, a chunk of
        # tokens a step in all, and (``prompt_last_in_batch``, the GPU) a prompt's last
        # token is its sequence's first decode row
        self.fold = bool(getattr(self.backend, "prefill_in_batch", False))
        self.last_in_batch = not self.fold and bool(getattr(self.backend, "prompt_last_in_batch", False))
        self.chunk = int(getattr(self.backend, "batch_prefill_chunk",
                                 getattr(self.backend, "prefill_chunk", PREFILL_CHUNK)))
        # prompt tokens a step may run in all (``batch_prompt_tokens``; folded: one chunk,
        # the rows the step's graphs are made for): several prompts' chunks in a burst
        self.step_tokens = self.chunk if self.fold else max(
            self.chunk, int(getattr(self.backend, "batch_prompt_tokens", self.chunk)))
        self.pipelined = bool(getattr(self.backend, "pipelined_rows", False))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.inflight: Inflight | None = None   # the last step's draws, pipelined
        self.batch_size = 0                 # rows of the last step's decode forward
        self._warming: deque = deque()      # start-up captures left for idle time

    @property
    def max_rows(self) -> int:
        """The most rows one batched forward can hold: every decode, plus a chunk folded in."""
        return self.max_batch + (self.chunk if self.fold else 0)

    def warm_up(self, lazy: bool = False) -> int:
        """Before serving: the backend readies the batched forward of every row count
        a step can make (on the GPU each would otherwise load kernels and capture
        a graph in the middle of someone's stream), and where it can
        (``warm_rows``) the sampling state of every sequence a step may hold.
        ``lazy`` (the server's start-up), with a backend that warms in tasks
        (``warm_tasks``): only the first now, the rest one at a time while idle
        (``warming``, ``warm_next``). How many forwards it ran now."""
        tasks = getattr(self.backend, "warm_tasks", None)
        if tasks is None:
            n = self.backend.warm_batch(self.model, self.pool, self.max_rows, self.n_ctx)
        else:
            self._warming = deque(tasks(self.model, self.pool, self.max_rows, self.n_ctx))
            n = 0
            while self._warming and (n == 0 or not lazy):
                self.warm_next()
                n += 1
        warm_rows = getattr(self.backend, "warm_rows", None)
        if warm_rows is not None:
            warm_rows(self.max_batch)
        return n

    @property
    def warming(self) -> bool:
        """Whether start-up work is left for idle time (``warm_up(lazy=True)``)."""
        return bool(self._warming)

    def warm_next(self) -> None:
        """One piece of the start-up work left (the caller's thread, while no request runs)."""
        if self._warming:
            self._warming.popleft()()

    # -- the caller's side -------------------------------------------------------
    def add(self, req: GenerateRequest, on_token: Callable[[TokenEvent], None] = lambda ev: None,
            tag: Any = None) -> Sequence:
        """Queue a request; it is admitted at once if ``can_start`` said so.
        Raises InvalidRequest (Engine.check) or VramOom (larger than the pool)."""
        self.engine.check(req)
        seq = Sequence(req, on_token, tag, n_prefill=len(req.prompt_ids) - self.last_in_batch)
        self.check_fits(seq.n_positions)
        self.waiting.append(seq)
        self._admit()
        return seq

    def check_fits(self, n_positions: int) -> None:
        """VramOom when a request of ``n_positions`` could not fit even the empty
        pool (it would wait for ever); only that request fails."""
        need = blocks_for(n_positions)
        if need > self.blocks.n_blocks:
            raise VramOom(f"the request needs {need} KV blocks ({n_positions} positions: "
                          f"prompt + max_tokens) but the whole pool holds {self.blocks.n_blocks}",
                          field="max_tokens")

    def can_start(self, n_positions: int) -> bool:
        """Whether a request of ``n_positions`` added now would be admitted at once."""
        return (not self.waiting and len(self.running) < self.max_batch
                and blocks_for(n_positions) <= self.blocks.n_free)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[Sequence]:
        """One scheduling step (see the module's text). Returns the sequences
        that ended in it, each with ``result`` or ``error``, blocks freed."""
        ended = self._reap()
        self._admit()
        ended += self._prefill()
        ended += self._decode()
        return ended

    def abort(self, err: OrcdError) -> list[Sequence]:
        """End every sequence with ``err`` (a fault in the scheduler itself)."""
        self.inflight = None
        return [self._end(seq, err) for seq in [*self.waiting, *self.running]]

    def close(self) -> None:
        """Give the pool back to the backend (after every sequence ended)."""
        self.backend.free_kv_pool(self.pool)

    # -- a step's parts ----------------------------------------------------------
    def _reap(self) -> list[Sequence]:
        ended = []
        for seq in [*self.waiting, *self.running]:
            try:
                interrupt(seq.req)
            except OrcdError as e:     # Cancelled or InferenceTimeout
                ended.append(self._end(seq, e))
        return ended

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            need = blocks_for(seq.n_positions)
            if need > self.blocks.n_free:
                return
            self.waiting.popleft()
            seq.blocks = self.blocks.take(need)
            seq.table = self._table(seq.blocks)
            seq.gen = Generation(seq.req, self.engine.tokenizer, seq.on_token)
            self.running.append(seq)

    def _prefill(self) -> list[Sequence]:
        """Unfolded prompts: the next chunks of the oldest unfinished prompts, each
        in a forward of its own, at most one chunk of tokens in all; after a
        prompt's last chunk, the sequence's first token (unless that comes from
        its first decode row: ``last_in_batch``)."""
        if self.fold:
            return []
        ended = []
        for seq, start, n in self._chunks():
            ids = list(seq.req.prompt_ids[start:start + n])
            try:
                logits = self._forward([seq], [ids], [list(range(start, start + n))], batched=False)
            except Exception as e:   # a backend failure ends this sequence only
                ended.append(self._end(seq, as_orcd_error(e)))
                continue
            seq.n_cached += n
            if not seq.prefilling and not self.last_in_batch:
                ended += self._sample([seq], logits, [0])
        return ended

    def _chunks(self) -> list[tuple[Sequence, int, int]]:
        """This step's prompt chunks, (sequence, start, length): the next chunk of
        each unfinished prompt, oldest first, while they stay within ``step_tokens``
        in all (one chunk of tokens unless the backend allows more)."""
        chunks, budget = [], self.step_tokens
        for seq in self.running:
            if not seq.prefilling:
                continue
            start, n = self._next_chunk(seq)
            if n > budget:
                break                     # oldest first: a later prompt never overtakes
            budget -= n
            chunks.append((seq, start, n))
        return chunks

    def _next_chunk(self, seq: Sequence) -> tuple[int, int]:
        """(start, length) of ``seq``'s next prompt chunk: chunks start at multiples
        of the chunk whatever else runs, so a prompt's rows are the same alone or not."""
        start = seq.n_cached
        return start, min(self.chunk - start % self.chunk, seq.n_prefill - start)

    def _decode(self) -> list[Sequence]:
        """One batched forward: every sequence's last token and, folding, the
        next chunks of unfinished prompts; then the next token of each sequence
        whose last row was a decode or the end of its prompt. Pipelined, the
        draws are queued and the step before's taken meanwhile."""
        prev, self.inflight = self.inflight, None
        seqs, ids, pos, src = self._rows()
        self.batch_size = sum(not s.prefilling for s in seqs)
        ended, drawn = [], []
        if seqs:
            follow = (prev.handle, src) if prev is not None and max(src) >= 0 else None
            try:
                logits = self._forward(seqs, ids, pos, batched=True, follow=follow)
            except Exception as e:   # every sequence of the failed forward ends; the pool stays
                err = as_orcd_error(e)
                ended = [self._end(s, err) for s in seqs]
                return ended + self._take(prev)
            last = np.cumsum([len(i) for i in ids]) - 1    # each sequence's last row
            for seq, i in zip(seqs, ids):
                if seq.prefilling:
                    seq.n_cached += len(i)
            drawn = [(s, int(r)) for s, r in zip(seqs, last) if not s.prefilling]
        if drawn and self.pipelined and not any(self.engine.host_steps(s.req, s.gen.params) for s, _ in drawn):
            ended += self._launch(drawn, logits)
            return ended + self._take(prev)
        ended += self._take(prev)     # before drawing: the draws see every id taken
        drawn = [(s, r) for s, r in drawn if not s.done]
        if drawn:
            ended += self._sample([s for s, _ in drawn], logits, [r for _, r in drawn])
        return ended

    def _rows(self) -> tuple[list[Sequence], list[list[int]], list[list[int]], list[int]]:
        """This step's sequences with their token ids and positions: folding,
        first the next chunk of each prompt
        while the step's prompt rows stay within one chunk, then each decode's
        last token. A prompt's chunks start at multiples of the chunk whatever
        else runs, so its rows are the same alone or not. Last, each row's src:
        the index of its sequence's draw in flight (its id is that draw's), or -1."""
        seqs, ids, pos = [], [], []
        for s, start, n in (self._chunks() if self.fold else ()):
            seqs.append(s)
            ids.append(list(s.req.prompt_ids[start:start + n]))
            pos.append(list(range(start, start + n)))
        src = [-1] * sum(len(i) for i in ids)
        for s in self.running:
            if s.prefilling:
                continue
            taken = len(s.gen.ids)
            if s.pending is None:
                # the last token taken (before any draw: the prompt's last, last_in_batch)
                ids.append([int(s.gen.seen[s.gen.n_prompt + taken - 1])])
                src.append(-1)
            elif taken + 1 < s.req.max_tokens:
                ids.append([0])                                   # the token in flight...
                src.append(s.pending.index[id(s)])                # ... drawn here
                taken += 1
            else:
                continue                  # the draw in flight is its last
            seqs.append(s)
            pos.append([s.gen.n_prompt + taken - 1])                  # ... and its position
        return seqs, ids, pos, src

    def _forward(self, seqs: list[Sequence], ids: list[list[int]], pos: list[list[int]],
                 batched: bool, follow=None):
        """Logits on the backend: [rows, n_vocab] batched (one table per sequence,
        its rows in order), else the chunk's last row [1, n_vocab]."""
        tables = np.stack([s.table for s in seqs])    # [n_seqs, width]
        rows = [k for k, i in enumerate(ids) for _ in i] if batched else [0] * len(ids[0])
        flat_ids = [t for i in ids for t in i]
        flat_pos = [p for q in pos for p in q]
        kw = {} if follow is None else {"follow": follow}
        return self.backend.forward_batch(self.model, self.pool, tables, rows, flat_ids, flat_pos,
                                          self.n_ctx, batched=batched, last_only=not batched, **kw)

    def _table(self, blocks: list[int]) -> np.ndarray:
        # padded with the sequence's own first block: never read past its positions.
        # Blocks are reserved for the whole request at admission, so the table never
        # changes: made once, not as a list of width ints per sequence per step (with
        # a 32k context that was 2,048 Python ints a row, the step's largest host cost)
        table = np.full(self.width, blocks[0], np.int32)
        table[:len(blocks)] = blocks
        return table

    def _sample(self, seqs: list[Sequence], logits, rows: list[int]) -> list[Sequence]:
        """Row rows[i] of ``logits`` is seqs[i]'s next-token distribution: draw all
        at once (the backend keeps each sequence's sampling state), then take
        each id in order."""
        if not seqs:
            return []
        ended, live, draws = [], [], []
        for seq, row in zip(seqs, rows):
            try:
                draws.append(seq.gen.draw(seq, row))
                live.append(seq)
            except Exception as e:   # the grammar's mask failed: this sequence only
                ended.append(self._end(seq, as_orcd_error(e)))
        try:
            got = self.backend.sample_rows(logits, draws) if draws else []
        except Exception as e:   # the sampler failed: the rows it drew for end
            err = as_orcd_error(e)
            return ended + [self._end(seq, err) for seq in live]
        return ended + self._take_ids(live, got)

    def _launch(self, drawn: list[tuple[Sequence, int]], logits) -> list[Sequence]:
        """Queue the draws of a pipelined step (the row of each sequence); ``_take``
        takes them during the next step. Chained: a draw right after one in flight."""
        seqs = [s for s, _ in drawn]
        draws = [replace(s.gen.draw(s, r), chained=s.pending is not None) for s, r in drawn]
        try:
            handle = self.backend.launch_rows(logits, draws)
        except Exception as e:   # the sampler failed: the rows it drew for end
            err = as_orcd_error(e)
            return [self._end(seq, err) for seq in seqs]
        self.inflight = Inflight(handle, seqs)
        for seq in seqs:
            seq.pending = self.inflight
        return []

    def _take(self, prev: Inflight | None) -> list[Sequence]:
        """The ids of a pipelined step before, taken by the sequences still running."""
        if prev is None:
            return []
        for seq in prev.seqs:
            if seq.pending is prev:
                seq.pending = None
        try:
            got = prev.handle.result()
        except Exception as e:
            err = as_orcd_error(e)
            return [self._end(seq, err) for seq in prev.seqs if not seq.done]
        live = [(seq, step) for seq, step in zip(prev.seqs, got) if not seq.done]
        return self._take_ids([seq for seq, _ in live], [step for _, step in live])

    def _take_ids(self, seqs, got) -> list[Sequence]:
        """Each sequence takes its sampled id in order; those done end."""
        ended = []
        for seq, step in zip(seqs, got):
            try:
                done = seq.gen.take(step)
            except Exception as e:   # a grammar or callback failure ends this sequence only
                ended.append(self._end(seq, as_orcd_error(e)))
                continue
            if done:
                ended.append(self._end(seq))
        return ended

    def _end(self, seq: Sequence, err: OrcdError | None = None) -> Sequence:
        """Take ``seq`` out, free its blocks at once, and sum it up."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.give_back(seq.blocks)
        seq.blocks, seq.table, seq.done = [], None, True
        if seq.gen is not None:
            self.backend.release_rows([seq])
        if err is None:
            try:
                seq.result = seq.gen.result()
            except Exception as e:   # the last text piece's callback
                err = as_orcd_error(e)
        seq.error = err
        return seq
