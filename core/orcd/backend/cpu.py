"""The numpy reference backend.

Weights are dequantized to float32 once at load (this backend exists for
development and tests), activations are float32 numpy arrays, the KV cache is
fp16 like llama.cpp's and the CUDA path's.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from orcd.gguf_file import ModelFile
from orcd.kvcache import KVCache
from orcd.ops import activation, attention, matmul, moe, norm, rope, sampling
from orcd.quant import FormatTable


class CpuOps:
    """The op set on numpy arrays (see orcd.ops for the contract)."""

    embed = staticmethod(matmul.embed_ref)
    linear = staticmethod(matmul.linear_ref)
    rms_norm = staticmethod(norm.rms_norm_ref)
    layer_norm = staticmethod(norm.layer_norm_ref)
    rope = staticmethod(rope.rope_ref)
    silu = staticmethod(activation.silu_ref)
    gelu = staticmethod(activation.gelu_ref)
    swiglu = staticmethod(activation.swiglu_ref)
    swiglu_oai = staticmethod(activation.swiglu_oai_ref)
    moe = staticmethod(moe.moe_ref)

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

    @staticmethod
    def attention(q, k, v, cache: KVCache, layer: int, pos, scale: float,
                  window: int = 0, sinks=None) -> np.ndarray:
        # q: [T, n_head*hd], k/v: [T, n_kv*hd]; stores k, v at pos, attends over 0..pos[-1]
        attention.kv_store_ref(cache.k[layer], cache.v[layer], k, v, pos)
        return attention.attention_ref(q, cache.k[layer], cache.v[layer], pos, scale, window, sinks)


class CpuBackend:
    name = "cpu-reference"
    ops = CpuOps()

    def load_weights(self, mf: ModelFile, formats: FormatTable, names: Iterable[str],
                     progress: Callable[[float], None] | None = None) -> dict[str, np.ndarray]:
        names = list(names)
        total = sum(mf.tensors[n].n_bytes for n in names) or 1
        done, out = 0, {}
        for n in names:
            t = mf.tensors[n]
            out[n] = formats[t.type_id].dequantize_tensor(t.data, t.shape)
            done += t.n_bytes
            if progress is not None:
                progress(done / total)
        return out

    def new_kv_cache(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int,
                     head_dim_v: int | None = None) -> KVCache:
        hd_v = head_dim_v or head_dim
        k = [np.zeros((n_ctx, n_head_kv, head_dim), np.float16) for _ in range(n_layer)]
        v = [np.zeros((n_ctx, n_head_kv, hd_v), np.float16) for _ in range(n_layer)]
        return KVCache(k, v, n_ctx)

    def ids(self, ids) -> np.ndarray:
        return np.asarray(ids, dtype=np.int32)

    def positions(self, start: int, n: int) -> np.ndarray:
        return np.arange(start, start + n, dtype=np.int32)

    def to_host(self, x) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    def sample(self, logits, params: sampling.SamplingParams, seen: np.ndarray,
               rng: np.random.Generator) -> int:
        return sampling.sample_ref(self.to_host(logits).reshape(-1), params, seen, rng)

    def memory_usage(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass
