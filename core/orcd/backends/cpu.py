"""The numpy reference backend.

Weights are dequantized to float32 once at load (this backend exists for
development and tests), activations are float32 numpy arrays, the KV cache is
fp16 like llama.cpp's and the CUDA path's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable

import numpy as np

from orcd.gguf_file import ModelFile
from orcd.errors import InvalidRequest
from orcd.kvcache import KV_BLOCK, KVCache, blocks_for, contiguous_table, kv_rows
from orcd.ops import activation, attention, fused, llama_compat, matmul, moe, norm, rope, sampling
from orcd.ops.contract import Phase, in_phase
from orcd.ops.rope import rope_ref
from orcd.quant import FormatTable

ROUNDINGS = ("none", "ggml-cpu", "int8")


class CpuWeight(np.ndarray):
    """A dequantized weight that remembers its format (views keep it): the
    activation roundings depend on it."""

    fmt = None   # the QuantFormat row

    def __array_finalize__(self, obj) -> None:
        self.fmt = getattr(obj, "fmt", None)

    @property
    def type_id(self) -> int | None:
        return None if self.fmt is None else self.fmt.type_id


def as_weight(values: np.ndarray, fmt) -> CpuWeight:
    w = values.view(CpuWeight)
    w.fmt = fmt
    return w


class CpuOps:
    """The op set on numpy arrays (see orcd.ops for the contract).

    ``activation_rounding="ggml-cpu"`` rounds each matmul's input the way
    llama.cpp's CPU backend does (orcd.ops.llama_compat), for exact parity;
    ``"int8"`` the way the CUDA backend's int8 GEMVs do (the twin GPU tests
    compare with)."""

    embed = staticmethod(matmul.embed_ref)
    rms_norm = staticmethod(norm.rms_norm_ref)
    layer_norm = staticmethod(norm.layer_norm_ref)
    rope = staticmethod(rope.rope_ref)
    silu = staticmethod(activation.silu_ref)
    gelu = staticmethod(activation.gelu_ref)
    swiglu = staticmethod(activation.swiglu_ref)
    swiglu_oai = staticmethod(activation.swiglu_oai_ref)

    def __init__(self, activation_rounding: str = "none") -> None:
        if activation_rounding not in ROUNDINGS:
            raise InvalidRequest(f"activation_rounding must be one of {ROUNDINGS}")
        self.ggml_rounding = activation_rounding == "ggml-cpu"   # also llama.cpp's fp16 attention
        self._round = {"none": None, "ggml-cpu": llama_compat.round_activation,
                       "int8": llama_compat.round_int8}[activation_rounding]

    #: Phase.ROWS (forward_batch with batched=True): every row computed on its own, so a
    #: request's tokens do not depend on which others share its step (BLAS sums a
    #: matrix product and a matrix-vector product in different orders)
    phase: Phase | None = None

    @property
    def per_row(self) -> bool:
        return self.phase is Phase.ROWS

    def linear(self, x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
        if self._round is not None:
            x = self._round(x, getattr(w, "fmt", None))
        if self.per_row and x.shape[0] > 1:
            return np.concatenate([matmul.linear_ref(x[i:i + 1], np.asarray(w), b) for i in range(x.shape[0])])
        return matmul.linear_ref(x, np.asarray(w), b)

    # fused ops: compositions of the single ones (orcd.ops.fused), through self.linear
    def linear_multi(self, x, ws, bs=None, norm=None) -> tuple:
        return fused.linear_multi_ref(x, ws, bs, norm, linear=self.linear)

    def gated_linear(self, x, w_gate, w_up=None, norm=None) -> np.ndarray:
        return fused.gated_linear_ref(x, w_gate, w_up, norm, linear=self.linear)

    def linear_add(self, a, w, residual, b=None) -> np.ndarray:
        return fused.linear_add_ref(a, w, residual, b, linear=self.linear)

    def moe(self, x, experts, n_used: int, alpha: float, limit: float):
        return moe.moe_ref(x, experts, n_used, alpha, limit, linear=self.linear)

    def moe_add(self, x, experts, n_used: int, alpha: float, limit: float, norm=None):
        return moe.moe_add_ref(x, experts, n_used, alpha, limit, norm, linear=self.linear)

    @staticmethod
    def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a + b

    @staticmethod
    def split(x: np.ndarray, sizes: Iterable[int]) -> list[np.ndarray]:
        # along the last axis: [T, sum(sizes)] -> [T, s] for each s
        return np.split(x, np.cumsum(list(sizes))[:-1], axis=-1)

    @staticmethod
    def last_row(x: np.ndarray) -> np.ndarray:
        return x[-1:]

    def attention(self, q, k, v, cache: KVCache, layer: int, pos, scale: float,
                  window: int = 0, sinks=None, rope=None) -> np.ndarray:
        # q: [T, n_head*hd], k/v: [T, n_kv*hd]; stores k, v at pos, attends over 0..pos[-1];
        # rope: a RopeConfig applied to q and k first
        if rope is not None:
            q, k = rope_ref(q, pos, rope), rope_ref(k, pos, rope)
        seq = np.asarray(cache.seq)[:q.shape[0]]
        attention.kv_store_ref(cache.k[layer], cache.v[layer], k, v, kv_rows(cache.tables, seq, pos))
        return attention.paged_attention_ref(q, cache.k[layer], cache.v[layer], cache.tables, seq, pos,
                                             scale, window, sinks, round_fp16=self.ggml_rounding)


class CpuBackend:
    name = "cpu-reference"
    #: prompt tokens per prefill forward: small, because the engine checks cancellation
    #: and the inference deadline only between forwards (a 0.5B model: ~0.5 s a chunk)
    prefill_chunk = 64

    #: whether the scheduler queues a step before the ids of the step before reach the
    #: host (launch_rows, forward_batch's ``follow``): nothing overlaps on the CPU, so
    #: off here; the tests switch it on to run the GPU's pipelined steps on the reference
    pipelined_rows = False

    def __init__(self, activation_rounding: str = "none") -> None:
        self.ops = CpuOps(activation_rounding)
        self._last: dict = {}    # key -> the id launch_rows drew for it last (chained draws)

    def load_weights(self, mf: ModelFile, formats: FormatTable, names: Iterable[str],
                     progress: Callable[[float], None] | None = None) -> dict[str, np.ndarray]:
        names = list(names)
        total = sum(mf.tensors[n].n_bytes for n in names) or 1
        done, out = 0, {}
        for n in names:
            t = mf.tensors[n]
            fmt = formats[t.type_id]
            out[n] = as_weight(fmt.dequantize_tensor(t.data, t.shape), fmt)
            done += t.n_bytes
            if progress is not None:
                progress(done / total)
        return out

    def new_kv_cache(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int,
                     head_dim_v: int | None = None) -> KVCache:
        """One sequence's cache of n_ctx positions (consecutive blocks)."""
        n_blocks = blocks_for(n_ctx)
        pool = self.new_kv_pool(n_layer, n_blocks, n_head_kv, head_dim, head_dim_v)
        return self.kv_view(pool, contiguous_table(n_blocks), np.zeros(n_blocks * KV_BLOCK, np.int32), n_ctx)

    def new_kv_pool(self, n_layer: int, n_blocks: int, n_head_kv: int, head_dim: int,
                    head_dim_v: int | None = None) -> KVCache:
        """K and V rows for n_blocks blocks of every layer (no tables yet)."""
        hd_v = head_dim_v or head_dim
        rows = n_blocks * KV_BLOCK
        k = [np.zeros((rows, n_head_kv, head_dim), np.float16) for _ in range(n_layer)]
        v = [np.zeros((rows, n_head_kv, hd_v), np.float16) for _ in range(n_layer)]
        return KVCache(k, v, np.zeros((0, 0), np.int32), np.zeros(0, np.int32), 0)

    def forward_batch(self, model, pool: KVCache, tables, seq, ids, pos, n_ctx: int, batched: bool,
                      last_only: bool, follow=None):
        """One forward over ``pool`` (new_kv_pool) seen through ``tables`` [n_seqs,
        max_blocks]: T tokens ``ids`` at ``pos`` of sequences ``seq`` (host ints).
        ``batched``: every row on its own, logits for every row (folded prompt
        chunks first, then one decode per sequence); else one sequence's
        consecutive positions (``last_only``: the last row's logits).
        ``follow`` (batched only): (a launch_rows handle of the step before, src):
        row i takes that step's draw src[i] where src[i] >= 0, not ids[i]."""
        if follow is not None:
            drawn, src = follow
            ids = [drawn.ids[j] if j >= 0 else i for i, j in zip(ids, src)]
        view = self.kv_view(pool, tables, seq, n_ctx, batched)
        with in_phase(self.ops, Phase.ROWS if batched else None):
            return model.forward(self.ops, self.ids(ids), np.asarray(pos, np.int32), view, last_only=last_only)

    def free_kv_pool(self, pool: KVCache) -> None:
        pass   # numpy memory: freed with the last reference

    def warm_batch(self, model, pool: KVCache, max_rows: int, n_ctx: int | None = None) -> int:
        return 0   # nothing compiled or captured: every forward costs the same

    @staticmethod
    def row(logits, i: int):
        """Row i of a forward's logits [T, n_vocab], as ``sample`` takes it."""
        return logits[i:i + 1]

    @staticmethod
    def kv_view(pool: KVCache, tables, seq, n_ctx: int, batched: bool = False) -> KVCache:
        """The pool's rows seen through block tables [n_seqs, max_blocks] and the
        sequence of each token of the next forwards."""
        return KVCache(pool.k, pool.v, np.asarray(tables, np.int32), np.asarray(seq, np.int32), int(n_ctx),
                       batched)

    def ids(self, ids) -> np.ndarray:
        return np.asarray(ids, dtype=np.int32)

    def positions(self, start: int, n: int) -> np.ndarray:
        return np.arange(start, start + n, dtype=np.int32)

    def to_host(self, x) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    def sample(self, logits, params: sampling.SamplingParams, seen: np.ndarray,
               rng: np.random.Generator) -> int:
        return self.sample_step(logits, params, seen, rng).id

    def sample_step(self, logits, params: sampling.SamplingParams, seen: np.ndarray,
                    rng: np.random.Generator, *, n_prompt: int | None = None,
                    allowed: np.ndarray | None = None) -> sampling.Sampled:
        """One engine step: the id (and logprobs when ``params.logprobs`` is
        set); ``n_prompt`` splits ``seen`` into prompt and output, ``allowed``
        is a grammar's bitmask."""
        return sampling.sample_step(self.to_host(logits).reshape(-1), params, seen, rng,
                                    n_prompt, allowed)

    def sample_rows(self, logits, draws) -> list[sampling.Sampled]:
        """A batch's draws (sampling.RowDraw), each as ``sample_step`` of its row."""
        host = self.to_host(logits).reshape(len(logits), -1)
        return [self.sample_step(host[d.row], d.params, d.seen, d.rng, n_prompt=d.n_prompt,
                                 allowed=d.allowed) for d in draws]

    def launch_rows(self, logits, draws) -> "DrawnRows":
        """``sample_rows`` without waiting for the ids (Backend.launch_rows): here the
        draws run at once. A chained draw's ``seen`` lacks the id drawn for its key
        last, which this backend kept."""
        draws = [replace(d, seen=np.append(d.seen, self._last[d.key])) if d.chained else d for d in draws]
        got = self.sample_rows(logits, draws)
        for d, s in zip(draws, got):
            self._last[d.key] = s.id
        return DrawnRows(got)

    def release_rows(self, keys) -> None:
        for key in keys:
            self._last.pop(key, None)

    def memory_usage(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


class DrawnRows:
    """The CPU's launch_rows handle: the draws already made; ``ids`` for the next
    forward's ``follow``, ``result()`` as sample_rows returns them."""

    def __init__(self, got: list[sampling.Sampled]) -> None:
        self.got, self.ids = got, [s.id for s in got]

    def result(self) -> list[sampling.Sampled]:
        return self.got
