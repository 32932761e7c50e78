"""How much VRAM a model needs, and the refusal when it does not fit.

Pure arithmetic (CPU-testable): weights are the GGUF tensors' bytes as they
are (block formats stay packed on the device), each rounded up to the
allocator's 256-byte alignment; the KV cache is fp16 K and V for every layer
and position; scratch covers one prefill micro-batch's activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from orcd.errors import InsufficientVram

ALIGNMENT = 256
FP16_BYTES = 2
FP32_BYTES = 4
#: cuBLASLt workspace, loaded kernel modules, small per-step buffers.
FIXED_OVERHEAD = 64 << 20
#: the KV pool may take at most this share of the device memory free after the
#: weights (less one prefill's scratch); the rest is for scratch growth and tables
KV_POOL_FREE_SHARE = 0.9


def align_up(n: int, alignment: int = ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


def weight_bytes(tensor_bytes: Iterable[int]) -> int:
    """Device bytes of the weights: each tensor's bytes, 256-byte aligned."""
    return sum(align_up(int(n)) for n in tensor_bytes)


def kv_bytes_per_token(n_layer: int, n_head_kv: int, head_dim: int, head_dim_v: int | None = None,
                       elem_bytes: int = FP16_BYTES) -> int:
    """K and V of one context position over all layers (fp16 by default)."""
    return n_layer * n_head_kv * (head_dim + (head_dim_v or head_dim)) * elem_bytes


def kv_cache_bytes(n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int,
                   elem_bytes: int = FP16_BYTES) -> int:
    """K and V for every layer and position:
    n_layer × n_ctx × n_head_kv × head_dim × 2 (K, V) × 2 bytes (fp16)."""
    return n_ctx * kv_bytes_per_token(n_layer, n_head_kv, head_dim, elem_bytes=elem_bytes)


def scratch_bytes(n_embd: int, n_ff: int, n_head: int, n_ctx: int, n_vocab: int,
                  n_batch: int = 512, flash_attention: bool = False) -> int:
    """Activations of one prefill micro-batch of ``n_batch`` tokens (fp32).

    A handful of [n_batch, max(n_embd, 2·n_ff)] buffers (residual, normed
    input, QKV / gate+up, output), one row of logits per sequence
    ([n_batch, n_vocab] at worst), and, unless attention is tiled, one layer's
    scores [n_head, n_batch, n_ctx]."""
    width = max(n_embd, 2 * n_ff)
    activations = 4 * n_batch * width * FP32_BYTES
    logits = n_batch * n_vocab * FP32_BYTES
    scores = 0 if flash_attention else n_head * n_batch * n_ctx * FP32_BYTES
    return align_up(activations + logits + scores) + FIXED_OVERHEAD


def kv_pool_blocks(per_token: int, n_ctx: int, max_batch: int, block: int, *,
                   budget_bytes: int | None = None, free_bytes: int | None = None) -> int:
    """Blocks of ``block`` positions in the continuous-batching KV pool.

    ``budget_bytes`` (``--kv-cache-size-mb``) is the whole pool when given.
    Else each of the ``max_batch`` slots may hold a full context of ``n_ctx``
    (as llama-server's ``-np N`` with N times the context), so a request never
    waits for KV while a slot is free; on a device at most what ``free_bytes``
    holds. Never less than one full context: what the load's VRAM check counted,
    and what the largest request allowed needs."""
    block_bytes = per_token * block
    one_context = -(-n_ctx // block)
    want = max_batch * one_context if budget_bytes is None else budget_bytes // block_bytes
    if free_bytes is not None:
        want = min(want, free_bytes // block_bytes)
    return max(one_context, want)


@dataclass(frozen=True)
class VramEstimate:
    weights: int
    kv_cache: int
    scratch: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.scratch


def estimate(tensor_bytes: Iterable[int], *, n_layer: int, n_ctx: int, n_head: int,
             n_head_kv: int, head_dim: int, n_embd: int, n_ff: int, n_vocab: int,
             n_batch: int = 512, flash_attention: bool = False) -> VramEstimate:
    """Everything the worker allocates before serving a context of ``n_ctx``."""
    return VramEstimate(
        weights=weight_bytes(tensor_bytes),
        kv_cache=kv_cache_bytes(n_layer, n_ctx, n_head_kv, head_dim),
        scratch=scratch_bytes(n_embd, n_ff, n_head, n_ctx, n_vocab, n_batch, flash_attention),
    )


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def check_fits(required: int, free: int, device: int, model_path: str | Path) -> None:
    """Refuse to load a model that needs more VRAM than the device has free."""
    if required > free:
        raise InsufficientVram(
            f"{model_path} needs {required} bytes ({_gib(required)}) of VRAM but "
            f"device {device} has {free} bytes ({_gib(free)}) free",
            required=required, available=free, device=device, model_path=str(model_path))


def estimate_for_model(model, hp, n_ctx: int, **kwargs) -> VramEstimate:
    """``estimate`` from an open ``ModelFile`` and its arch's hyper-parameters
    (``n_layer``, ``n_head``, ``n_head_kv``, ``head_dim``, ``n_embd``, ``n_vocab``,
    and ``n_ff`` or, for mixture-of-experts, ``n_ff_exp``)."""
    n_ff = hp.get("n_ff") or hp.get("n_ff_exp") or 4 * hp["n_embd"]
    return estimate((t.n_bytes for t in model.tensors.values()),
                    n_layer=hp["n_layer"], n_ctx=n_ctx, n_head=hp["n_head"],
                    n_head_kv=hp.get("n_head_kv") or hp["n_head"], head_dim=hp["head_dim"],
                    n_embd=hp["n_embd"], n_ff=n_ff, n_vocab=hp["n_vocab"], **kwargs)
