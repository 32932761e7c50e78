"""The host side of decode steps on the GPU: their inputs and outputs, and the
device sampler behind the engine's ``sample``.

A decode step is one CUDA graph that reads its token id and position from two
device ints (``step_ids``, ``step_pos``). ``StepIO`` fills them from a ring of
pinned slots and copies sampled ids back into the same ring, each copy fenced
by an event, so nothing on the critical path waits for the GPU: the engine can
queue step k+1 (whose token the sampler left in ``step_ids``) before it reads
token k on the host, and detokenizing, stop strings and SSE overlap the GPU.
"""

from __future__ import annotations

import ctypes

import numpy as np

from orcd.backends.cuda.tensor import DeviceTensor
from orcd.ops import sampling
from orcd.ops.sampling_rows import Row, RowBatch

SLOTS = 2          # steps in flight: the one running and the one queued behind it
SLOT_INTS = 4      # per slot: token in, position in, sampled id out, padding


class PendingToken:
    """A sampled id on its way to the host; ``result()`` waits for it."""

    def __init__(self, io: "StepIO", slot: int) -> None:
        self.io, self.slot = io, slot

    def result(self) -> int:
        from orcd.backends.cuda.driver import cu

        cu("cuEventSynchronize", self.io.out_events[self.slot])
        return int(self.io.view[self.slot, 2])


class StepIO:
    """Pinned slots and events for decode-step inputs and sampled ids."""

    def __init__(self, device, step_ids: DeviceTensor, step_pos: DeviceTensor) -> None:
        from orcd.backends.cuda.driver import cu, driver_module

        if step_pos.ptr != step_ids.ptr + 4:
            raise ValueError("step_pos must follow step_ids: one 8-byte copy fills both")
        self.device, self.step_ids, self.step_pos = device, step_ids, step_pos
        self.pinned, self.in_events, self.out_events = None, [], []
        flags = driver_module().CUevent_flags.CU_EVENT_DISABLE_TIMING
        device.make_current()
        self.pinned = int(cu("cuMemHostAlloc", 4 * SLOT_INTS * SLOTS, 0))
        self.view = np.ctypeslib.as_array((ctypes.c_int32 * (SLOT_INTS * SLOTS)).from_address(self.pinned))
        self.view = self.view.reshape(SLOTS, SLOT_INTS)
        for events in (self.in_events, self.out_events):
            for _ in range(SLOTS):
                ev = cu("cuEventCreate", flags)
                cu("cuEventRecord", ev, device.stream)   # "done": the slot is free
                events.append(ev)
        self._in = self._out = 0

    def _slot_ptr(self, slot: int, index: int) -> int:
        return self.pinned + 4 * (SLOT_INTS * slot + index)

    def write_inputs(self, token: int | None, pos: int) -> None:
        """Queue the copy of the next step's inputs: the position, and the token id
        unless it is None (the sampler left it in step_ids on the device)."""
        from orcd.backends.cuda.driver import cu

        slot, self._in = self._in, (self._in + 1) % SLOTS
        cu("cuEventSynchronize", self.in_events[slot])      # its copy two steps ago has read it
        self.view[slot, 0], self.view[slot, 1] = -1 if token is None else token, pos
        stream = self.device.stream
        if token is None:
            cu("cuMemcpyHtoDAsync", self.step_pos.ptr, self._slot_ptr(slot, 1), 4, stream)
        else:
            cu("cuMemcpyHtoDAsync", self.step_ids.ptr, self._slot_ptr(slot, 0), 8, stream)
        cu("cuEventRecord", self.in_events[slot], stream)

    def read_output(self, src: DeviceTensor) -> PendingToken:
        """Queue the copy of a sampled id (int32 on the device) to the host."""
        from orcd.backends.cuda.driver import cu

        slot, self._out = self._out, (self._out + 1) % SLOTS
        cu("cuEventSynchronize", self.out_events[slot])     # its last id has been read
        stream = self.device.stream
        cu("cuMemcpyDtoHAsync", self._slot_ptr(slot, 2), src.ptr, 4, stream)
        cu("cuEventRecord", self.out_events[slot], stream)
        return PendingToken(self, slot)

    def close(self) -> None:
        from orcd.backends.cuda.driver import cu

        for ev in self.in_events + self.out_events:
            cu("cuEventDestroy", ev)
        self.in_events, self.out_events = [], []
        if self.pinned is not None:
            cu("cuMemFreeHost", self.pinned)
            self.pinned = None


class DeviceSampling:
    """orcd.ops.sampling.CudaSampler behind the engine's ``sample_step(logits,
    params, seen, rng, n_prompt, allowed)``: the seen mask and the output counts
    live on the device and the sampler marks each chosen id, so a request's
    consecutive calls (seen growing by the last chosen id) need no host traffic
    but the id itself (and a grammar's bitmask, the logprobs asked for); any
    other ``seen`` re-uploads mask and counts, and only when a penalty needs them.
    ``enqueue(..., chained=True)`` samples the token that follows the last one
    sampled without the host having read it (the mask on the device is current)."""

    def __init__(self, backend, n_vocab: int) -> None:
        self.b, self.n_vocab = backend, n_vocab
        self.kernels = sampling.CudaSampler(*backend._kernel_args, n_vocab, allocator=backend.alloc)
        self.out = backend.alloc.alloc(4, "workspace")
        self.out_id = DeviceTensor(self.out.ptr, (1,), np.dtype(np.int32))
        self.seen, self.last, self.step, self.mask_ok = None, -1, 0, False

    def enqueue(self, logits, params: sampling.SamplingParams, seen, out_id, chained: bool = False,
                n_prompt: int | None = None, allowed: np.ndarray | None = None) -> None:
        """Queue the sampling of the next id into ``out_id`` (int32 on the device);
        ``n_prompt`` splits ``seen`` for the output counts, ``allowed`` is a
        grammar's bitmask."""
        self.follow(params, seen, chained, n_prompt)
        self.kernels.sample(logits.view(-1), params, self.step, out_id, allowed)

    def follow(self, params: sampling.SamplingParams, seen, chained: bool = False,
               n_prompt: int | None = None) -> None:
        """Ready this sampler's device state for the draw after ``seen``: the draw
        counter, and the seen mask and counts re-uploaded unless ``seen`` is the
        last draw's plus the id it chose (see the class)."""
        if chained:                   # the id before is the last one this sampler chose
            self.step += 1
            self.seen = None
        else:
            seen = np.asarray(seen, dtype=np.int64).reshape(-1)
            prev = self.seen
            follows = (prev is not None and len(seen) == len(prev) + 1 and seen[-1] == self.last
                       and np.array_equal(seen[:-1], prev))
            # the draw counter is the draw's index in the request (len(seen) - n_prompt),
            # also after draws this sampler chained without the host (launch below)
            self.step = self.step + 1 if follows else len(seen) - n_prompt if n_prompt is not None else 0
            if not follows:
                self.mask_ok = False
            if (params.repetition_penalty != 1.0 or params.counts_output) and not self.mask_ok:
                self.kernels.reset(seen, n_prompt)
                self.mask_ok = True
            self.seen = seen

    def __call__(self, logits, params: sampling.SamplingParams, seen, n_prompt=None,
                 allowed=None) -> sampling.Sampled:
        from orcd.backends.cuda.memory import to_host

        self.enqueue(logits, params, seen, self.out_id, n_prompt=n_prompt, allowed=allowed)
        if params.logprobs is not None:
            got = self.kernels.logprobs()
            self.last = got.id
            return got
        self.last = int(to_host(self.b.device, self.out.ptr, 4).view(np.int32)[0])
        return sampling.Sampled(self.last)

    def close(self) -> None:
        self.kernels.close()


class RowSamplers:
    """The device sampler for a batch's rows (``CudaBackend.sample_rows``): one
    DeviceSampling per running sequence, so its seen mask, output counts and
    draw counter stay on the device from one draw to the next, exactly as a
    request alone keeps them. Each row's kernels are queued in turn on the
    stream, then every id crosses to the host in one copy: a batch of B rows
    moves B ints, not B rows of logits."""

    def __init__(self, backend, n_vocab: int) -> None:
        self.b, self.n_vocab = backend, n_vocab
        self.by_key: dict = {}
        self.spare: list[DeviceSampling] = []   # samplers of ended sequences, reset
        self.out, self.cap = None, 0
        self.batch: RowBatch | None = None     # the draws without logprobs, in two launches
        self.ring: IdRing | None = None        # launch's ids, device and pinned

    def sample(self, logits, draws) -> list[sampling.Sampled]:
        from orcd.backends.cuda.memory import to_host

        self._reserve(len(draws))
        i32 = np.dtype(np.int32)
        chosen, rows = [], []
        row_bytes = logits.nbytes // logits.shape[0]
        for i, d in enumerate(draws):
            s = self._sampler(d.key)
            if d.params.logprobs is not None:   # its own launches, then logprobs() reads them
                s.enqueue(logits.rows(d.row, d.row + 1), d.params, d.seen,
                          DeviceTensor(self.out.ptr + 4 * i, (1,), i32), n_prompt=d.n_prompt,
                          allowed=d.allowed)
            else:
                s.follow(d.params, d.seen, chained=d.chained, n_prompt=d.n_prompt)
                rows.append(Row(s.kernels, logits.ptr + d.row * row_bytes, self.out.ptr + 4 * i,
                                d.params, s.step, d.allowed))
            chosen.append(s)
        if rows:
            if self.batch is None:
                self.batch = RowBatch(*self.b._kernel_args, self.n_vocab, self.b.alloc)
            self.batch.launch(rows)
        ids = to_host(self.b.device, self.out.ptr, 4 * len(draws)).view(np.int32)
        got = []
        for s, d, tok in zip(chosen, draws, ids):
            s.last = int(tok)
            got.append(s.kernels.logprobs() if d.params.logprobs is not None else sampling.Sampled(s.last))
        return got

    def launch(self, logits, draws) -> "PendingRows":
        """Queue a batch's draws and the copy of their ids to the host, without
        waiting (the scheduler's pipelined step). Draws that need the host between
        draws (logprobs, a grammar's mask) are refused: ``sample`` takes them."""
        if self.ring is None:
            self.ring = IdRing(self.b.device, self.b.alloc)
        slot, out = self.ring.take(len(draws))
        rows, chosen = [], []
        row_bytes = logits.nbytes // logits.shape[0]
        for i, d in enumerate(draws):
            if d.params.logprobs is not None or d.allowed is not None:
                raise ValueError("launch: a draw with logprobs or a grammar needs the host; use sample")
            s = self._sampler(d.key)
            s.follow(d.params, d.seen, chained=d.chained, n_prompt=d.n_prompt)
            rows.append(Row(s.kernels, logits.ptr + d.row * row_bytes, out + 4 * i, d.params, s.step))
            chosen.append(s)
        if rows:
            if self.batch is None:
                self.batch = RowBatch(*self.b._kernel_args, self.n_vocab, self.b.alloc)
            self.batch.launch(rows)
        self.ring.send(slot, len(draws))
        return PendingRows(self, slot, out, chosen)

    def release(self, keys) -> None:
        for key in keys:
            s = self.by_key.pop(key, None)
            if s is not None:   # a reused sampler must never look like it follows its last draw
                s.seen, s.last, s.step, s.mask_ok = None, -1, 0, False
                self.spare.append(s)

    def prepare(self, n: int) -> None:
        """Make n sequences' samplers, the ids' buffers and the batch kernels now:
        a new DeviceSampling loads its module, allocates its buffers and clears its
        mask with waiting copies, which in the middle of a burst of new requests
        would hold every running stream's step (``CudaBackend.warm_rows``)."""
        self._reserve(n)
        if self.ring is None:
            self.ring = IdRing(self.b.device, self.b.alloc)
        if self.batch is None:
            self.batch = RowBatch(*self.b._kernel_args, self.n_vocab, self.b.alloc)
        while len(self.by_key) + len(self.spare) < n:
            self.spare.append(DeviceSampling(self.b, self.n_vocab))

    def _sampler(self, key) -> DeviceSampling:
        s = self.by_key.get(key)
        if s is None:
            s = self.spare.pop() if self.spare else DeviceSampling(self.b, self.n_vocab)
            self.by_key[key] = s
        return s

    def _reserve(self, n: int) -> None:
        if n > self.cap:
            if self.out is not None:
                self.b.device.synchronize()
                self.b.alloc.free(self.out)
            self.cap = max(n, 2 * self.cap, 16)
            self.out = self.b.alloc.alloc(4 * self.cap, "workspace")

    def close(self) -> None:
        for s in [*self.by_key.values(), *self.spare]:
            s.close()
        self.by_key, self.spare = {}, []
        if self.batch is not None:
            self.batch.close()
            self.batch = None
        if self.ring is not None:
            self.ring.close()
            self.ring = None


class IdRing:
    """Where pipelined draws leave their ids: SLOTS device arrays, each copied to its
    pinned twin behind an event. Slot k of step k is read by step k+1's follow_ids
    and by the host while step k+1 runs; step k+2 reuses it."""

    def __init__(self, device, alloc) -> None:
        self.device, self.alloc = device, alloc
        self.cap, self.dev, self.pinned, self.events, self._next = 0, None, None, [], 0

    def take(self, n: int) -> tuple[int, int]:
        """The next slot, with room for n ids: (slot, device pointer of its ids)."""
        from orcd.backends.cuda.driver import cu

        if n > self.cap:
            self._grow(n)
        slot, self._next = self._next, (self._next + 1) % SLOTS
        cu("cuEventSynchronize", self.events[slot])      # its last copy has landed
        return slot, self.dev.ptr + 4 * self.cap * slot

    def send(self, slot: int, n: int) -> None:
        """Queue the copy of slot's n ids to the host, and its event."""
        from orcd.backends.cuda.driver import cu

        stream = self.device.stream
        if n:
            cu("cuMemcpyDtoHAsync", self.pinned + 4 * self.cap * slot, self.dev.ptr + 4 * self.cap * slot,
               4 * n, stream)
        cu("cuEventRecord", self.events[slot], stream)

    def read(self, slot: int, n: int) -> np.ndarray:
        """Slot's n ids on the host (waits for their copy)."""
        from orcd.backends.cuda.driver import cu

        cu("cuEventSynchronize", self.events[slot])
        view = (ctypes.c_int32 * n).from_address(self.pinned + 4 * self.cap * slot)
        return np.ctypeslib.as_array(view).copy()

    def _grow(self, n: int) -> None:
        from orcd.backends.cuda.driver import cu, driver_module

        self.device.synchronize()     # no queued copy or follow_ids still reads the old arrays
        self.close()
        self.cap = max(n, 64)
        self.dev = self.alloc.alloc(4 * self.cap * SLOTS, "workspace")
        self.device.make_current()
        self.pinned = int(cu("cuMemHostAlloc", 4 * self.cap * SLOTS, 0))
        flags = driver_module().CUevent_flags.CU_EVENT_DISABLE_TIMING
        for _ in range(SLOTS):
            ev = cu("cuEventCreate", flags)
            cu("cuEventRecord", ev, self.device.stream)
            self.events.append(ev)

    def close(self) -> None:
        from orcd.backends.cuda.driver import cu

        for ev in self.events:
            cu("cuEventDestroy", ev)
        self.events = []
        if self.pinned is not None:
            cu("cuMemFreeHost", self.pinned)
            self.pinned = None
        if self.dev is not None:
            self.alloc.free(self.dev)
            self.dev = None


class PendingRows:
    """A pipelined step's draws (``RowSamplers.launch``): ``ids_ptr`` is where the
    next step's follow_ids reads them on the device; ``result()`` waits for them
    on the host, as ``sample`` returns them."""

    def __init__(self, samplers: RowSamplers, slot: int, ids_ptr: int, chosen: list) -> None:
        self.samplers, self.slot, self.ids_ptr, self.chosen = samplers, slot, ids_ptr, chosen

    def feed(self, ids_ptr: int, src_ptr: int, n: int) -> None:
        """Queue ids[i] = this step's draw src[i] where src[i] >= 0 (device int32 arrays of n)."""
        self.samplers.batch.follow(ids_ptr, src_ptr, self.ids_ptr, n)

    def result(self) -> list[sampling.Sampled]:
        ids = self.samplers.ring.read(self.slot, len(self.chosen))
        for s, tok in zip(self.chosen, ids):
            s.last = int(tok)
        return [sampling.Sampled(int(tok)) for tok in ids]
