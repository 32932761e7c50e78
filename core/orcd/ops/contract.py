"""What a model forward may call (``Ops``) and what the engine, the scheduler and
the loader may ask of a backend (``Backend``), as typing Protocols.

The numpy reference (orcd.backends.cpu) and the CUDA backend implement both;
tests/backend/test_contract.py checks that each defines every member with the same
parameter names, so a forward written against one runs on the other.

Tensors are the backend's own (numpy arrays, DeviceTensors); shapes in the
comments. Scratch rule: an op's output lives until the next forward starts, and
within a forward it survives one attention call but not two. On the GPU outputs
come from two arenas; each attention call switches to the other one and empties
it, so a tensor made before attention i is overwritten after attention i + 1.
A forward therefore carries only the residual stream from layer to layer and
keeps nothing across two layers.
"""

from __future__ import annotations

import contextlib
import enum
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

Tensor = Any    # np.ndarray on the CPU, DeviceTensor on the GPU
Weight = Any    # CpuWeight (dequantized) or QWeight (the format's VRAM layout)


class Phase(enum.Enum):
    """What a forward's rows are: named once here, and each backend picks its kernels by it.

    PREFILL: consecutive prompt tokens of one sequence, in chunks (the engine's
      PREFILL_CHUNK or the backend's ``prefill_chunk``): on the GPU, GEMMs on the tensor
      cores and prefill attention, replayed per rows bucket (backends/cuda/prefill.py).
    DECODE: the next token of one sequence (T = 1): the fused single-token kernels
      (ops/fused.py), the whole step one CUDA graph.
    ROWS: one row each of many sequences (a decode batch, prompt rows folded into it):
      every row computed on its own by the same kernels whatever shares its step, so a
      request's tokens do not depend on its batch (backends/cuda/batch.py; the CPU sums each row
      alone, since BLAS orders a matrix product and a matrix-vector one differently).
    """

    PREFILL = "prefill"
    DECODE = "decode"
    ROWS = "rows"


def phase_of(n_tokens: int, batched: bool = False) -> Phase:
    """The phase of a forward of ``n_tokens`` (``batched``: rows of many sequences)."""
    return Phase.ROWS if batched else Phase.DECODE if n_tokens == 1 else Phase.PREFILL


@contextlib.contextmanager
def in_phase(ops, phase: Phase) -> Iterator[None]:
    """``ops.phase`` is ``phase`` for the block (a forward's ops read it; None: the
    phase follows from each call's rows)."""
    ops.phase = phase
    try:
        yield
    finally:
        ops.phase = None


@runtime_checkable
class Ops(Protocol):
    """The op set of orcd.ops (see its docstring for the math of each)."""

    def embed(self, table: Weight, ids: Tensor) -> Tensor: ...          # -> x [T, D]
    def rms_norm(self, x: Tensor, w: Tensor, eps: float) -> Tensor: ...
    def layer_norm(self, x: Tensor, w: Tensor, b: Tensor | None, eps: float) -> Tensor: ...
    def linear(self, x: Tensor, w: Weight, b: Tensor | None = None) -> Tensor: ...   # [T, n_out]
    def split(self, x: Tensor, sizes: Iterable[int]) -> list: ...
    def rope(self, x: Tensor, pos: Tensor, cfg) -> Tensor: ...
    def attention(self, q: Tensor, k: Tensor, v: Tensor, cache, layer: int, pos: Tensor, scale: float,
                  window: int = 0, sinks: Tensor | None = None, rope=None) -> Tensor: ...
    def add(self, a: Tensor, b: Tensor) -> Tensor: ...
    def silu(self, x: Tensor) -> Tensor: ...
    def gelu(self, x: Tensor) -> Tensor: ...
    def swiglu(self, gate: Tensor, up: Tensor) -> Tensor: ...
    def swiglu_oai(self, gate: Tensor, up: Tensor, alpha: float, limit: float) -> Tensor: ...
    def moe(self, x: Tensor, experts, n_used: int, alpha: float, limit: float) -> Tensor: ...
    def last_row(self, x: Tensor) -> Tensor: ...
    # fused: one launch per decode token on the GPU; compositions of the above elsewhere
    def linear_multi(self, x: Tensor, ws: Sequence[Weight], bs=None, norm=None) -> tuple: ...
    def gated_linear(self, x: Tensor, w_gate: Weight, w_up: Weight | None = None, norm=None) -> Tensor: ...
    def linear_add(self, a: Tensor, w: Weight, residual: Tensor, b: Tensor | None = None) -> Tensor: ...
    def moe_add(self, x: Tensor, experts, n_used: int, alpha: float, limit: float,
                norm=None) -> Tensor: ...


@runtime_checkable
class Backend(Protocol):
    """Compute for one model: weights in, logits out.

    Optional members, probed where used: ``make_runner(model, cache)`` (a faster
    single-request runner, engine.Runner's interface), ``sample_to_device`` (the
    pipelined decode), ``prefill_chunk`` (prompt tokens per forward),
    ``warm_rows(n)`` (after ``warm_batch``: the sampling state of n batched
    sequences made before serving), ``warm_tasks(model, pool, max_rows, n_ctx)``
    (warm_batch's work as a list of calls: the scheduler may run the first before
    serving and the rest while idle), ``check_residency()`` and ``device`` (GPU
    backends), ``synchronize()``."""

    ops: Ops

    def load_weights(self, mf, formats, names: Iterable[str],
                     progress: Callable[[float], None] | None = None) -> dict: ...
    def ids(self, ids) -> Tensor: ...                                   # int32 [T]
    def positions(self, start: int, n: int) -> Tensor: ...              # int32 [n]
    def to_host(self, x: Tensor) -> np.ndarray: ...                     # float32
    # one request: a cache of consecutive blocks, reused while the shape matches
    def new_kv_cache(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int,
                     head_dim_v: int | None = None): ...
    # many requests: one pool of blocks (orcd.kvcache), forwards through block tables
    def new_kv_pool(self, n_layer: int, n_blocks: int, n_head_kv: int, head_dim: int,
                    head_dim_v: int | None = None): ...
    def free_kv_pool(self, pool) -> None: ...
    # before serving: make the batched step of every row count up to max_rows, and the
    # scheduler's prompt chunks for its n_ctx, as fast the first time as later (GPU:
    # kernels loaded, graphs captured); how many it ran
    def warm_batch(self, model, pool, max_rows: int, n_ctx: int | None = None) -> int: ...
    # batched: every row on its own (prompt chunks first, then one decode per sequence),
    # computed alike whatever else shares the step. follow = (a launch_rows handle of the
    # step before, src): row i's id is that step's draw src[i] where src[i] >= 0
    def forward_batch(self, model, pool, tables, seq, ids, pos, n_ctx: int, batched: bool,
                      last_only: bool, follow=None) -> Tensor: ...
    def row(self, logits: Tensor, i: int) -> Tensor: ...
    def sample(self, logits: Tensor, params, seen: np.ndarray, rng: np.random.Generator) -> int: ...
    # one draw with the host's view: a grammar's mask, output counts, logprobs (a Sampled);
    # logits may be a host row (the scheduler copies a batch's rows once)
    def sample_step(self, logits: Tensor, params, seen: np.ndarray, rng: np.random.Generator, *,
                    n_prompt: int | None = None, allowed: np.ndarray | None = None): ...
    # a batch's draws (sampling.RowDraw: a key per sequence, its row, sample_step's
    # arguments); only the ids (and logprobs asked for) need reach the host
    def sample_rows(self, logits: Tensor, draws) -> list: ...
    # sample_rows without waiting: a handle whose result() gives sample_rows' list, and
    # which the next forward_batch may follow (pipelined steps, where the backend's
    # ``pipelined_rows`` is true; no logprobs or grammar masks among the draws)
    def launch_rows(self, logits: Tensor, draws): ...
    def release_rows(self, keys) -> None: ...                            # sequences that ended
    def memory_usage(self) -> dict[str, int]: ...
    def close(self) -> None: ...
