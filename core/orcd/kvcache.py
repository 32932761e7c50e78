"""The KV cache: per-layer K and V buffers of a fixed context, allocated once
per request (or reused from a pool) by the backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class KVCache:
    k: list[Any]   # per layer: [n_ctx, n_head_kv, head_dim]
    v: list[Any]   # per layer: [n_ctx, n_head_kv, head_dim_v]
    n_ctx: int
