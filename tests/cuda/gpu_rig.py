"""What the CUDA tests share: the ``Gpu`` rig behind conftest's ``gpu`` fixture,
the GGUF type ids by name, and the comparison helpers.

``from gpu_rig import rel, randn`` works from any module here: tests/cuda has
no __init__.py, so pytest puts this folder on sys.path. Nothing CUDA is
imported at import time (CI has no GPU): every CUDA import sits inside the
function that needs it.
"""

from __future__ import annotations

import contextlib
import importlib
from functools import cached_property

import numpy as np

from orcd.devkit.testing import gpu_available

# Without a GPU the tests marked ``sim`` run on the CUDA simulator (orcd.cudasim),
# which runs kernels thousands of times slower: they take their small shapes.
SIMULATED = not gpu_available()


def sized(full, small):
    """``full`` on a GPU, ``small`` on the simulator (test parameters)."""
    return small if SIMULATED else full


TYPES = {"F32": 0, "F16": 1, "BF16": 30, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
         "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "MXFP4": 39}
ARENA_BYTES = sized(256 << 20, 32 << 20)


def rel(out: np.ndarray, ref: np.ndarray) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN left in ``out`` (the poison) fails."""
    assert np.isfinite(out).all(), "an output was not written (NaN poison left)"
    return float(np.linalg.norm(out.astype(np.float64) - ref) / np.linalg.norm(ref))


def q8_ref(x: np.ndarray) -> np.ndarray:
    """The activations the int8 kernels multiply by (quantize_q8_ref's), in float64."""
    from orcd.ops.matmul import quantize_q8_ref

    q, d = quantize_q8_ref(x)
    return (q.reshape(*x.shape[:-1], -1, 32) * d[..., None].astype(np.float64)).reshape(x.shape)


def randn(rng, *shape, scale=1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def upload(dev, alloc, arr: np.ndarray, purpose: str = "test"):
    """A fresh allocation holding ``arr``'s bytes (a DeviceBuffer)."""
    from orcd.backends.cuda.memory import from_host

    arr = np.ascontiguousarray(arr)
    buf = alloc.alloc(max(arr.nbytes, 1), purpose)
    from_host(dev, arr, buf.ptr)
    return buf


def _kernels(module: str, cls: str, **options) -> cached_property:
    """A rig attribute that builds ``module.cls(dev, compiler, launcher, **options)`` on first access."""
    def build(self):
        return getattr(importlib.import_module(module), cls)(self.dev, self.compiler, self.launcher, **options)

    return cached_property(build)


class Gpu:
    """A device, its allocator, compiler and launcher, and the kernel families,
    each compiled on first use (a module that needs one family pays for one).

    Buffers made by put / empty / weight are recorded, so that ``scope()`` can
    free the ones made inside it; those made outside any scope live until the
    allocator's ``free_all`` at the end of the session."""

    # -- kernel families, each compiled on first access ----------------------------------

    # the fp32-activation kernels (int8 ones: tests/cuda/test_int8.py); no default
    # scratch: pass scratch=gpu.arena. The simulator has no cuBLASLt: its prefill GEMM
    # is the SIMT kernel (gemm_simt.cu), which it runs like any other.
    mm = _kernels("orcd.ops.matmul", "MatmulKernels", int8="off", gemm="simt" if SIMULATED else "cublaslt")
    norm = _kernels("orcd.ops.norm", "NormKernels")
    rope = _kernels("orcd.ops.rope", "RopeKernels")
    act = _kernels("orcd.ops.activation", "ActivationKernels")
    attn = _kernels("orcd.ops.attention", "AttentionKernels")
    moe = _kernels("orcd.ops.moe", "MoeKernels")
    fused = _kernels("orcd.ops.fused", "FusedKernels")
    layout = _kernels("orcd.ops.layout", "LayoutKernels")

    def __init__(self, dev, alloc, compiler, launcher) -> None:
        self.dev, self.alloc, self.compiler, self.launcher = dev, alloc, compiler, launcher
        self._bufs: list = []

    @cached_property
    def arena(self):
        """Scratch for prefill GEMMs, allocated once for the session (outside any scope)."""
        from orcd.backends.cuda.tensor import Arena

        buf = self.alloc.alloc(ARENA_BYTES, "scratch")
        return Arena(buf.ptr, buf.nbytes)

    # -- tensors ----------------------------------------------------------------------

    def put(self, arr: np.ndarray):
        """Upload a host array: a DeviceTensor of its shape and dtype."""
        from orcd.backends.cuda.tensor import DeviceTensor

        arr = np.ascontiguousarray(arr)
        buf = upload(self.dev, self.alloc, arr)
        self._bufs.append(buf)
        return DeviceTensor(buf.ptr, arr.shape, arr.dtype)

    def empty(self, shape, dtype=np.float32):
        """A poisoned output: every byte 0xFF, which is NaN in any float type and -1
        in any signed int, so an element a kernel never writes shows."""
        from orcd.backends.cuda.memory import fill_bytes
        from orcd.backends.cuda.tensor import DeviceTensor

        shape = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        buf = self.alloc.alloc(max(nbytes, 1), "test")
        self._bufs.append(buf)
        fill_bytes(self.dev, buf.ptr, 0xFF, nbytes)
        return DeviceTensor(buf.ptr, shape, np.dtype(dtype))

    def get(self, t) -> np.ndarray:
        from orcd.backends.cuda.memory import to_host

        return to_host(self.dev, t.ptr, t.nbytes).view(t.dtype).reshape(t.shape)

    def weight(self, host, type_name: str, shape, rng, std: float = 0.05):
        """(QWeight of fresh random blocks of ``TYPES[type_name]``, its float64 dequantization)."""
        from orcd.backends.cuda.tensor import QWeight

        fmt = host.formats[TYPES[type_name]]
        shape = tuple(shape)
        raw = fmt.random_blocks(int(np.prod(shape)) // fmt.block_elems, rng, std)
        t = self.put(fmt.to_vram(raw, shape[-1]))      # the format's VRAM layout, as the backend uploads
        ref = fmt.dequantize_tensor(raw, shape).astype(np.float64)
        return QWeight(t.ptr, shape, fmt.type_id, fmt), ref

    def paging(self, tables, seq, n_ctx: int, batched: bool = False, apart: bool = False):
        """A KVCache view for the attention kernels: block tables [n_seqs, max_blocks]
        and each token's sequence, on the device (the layer's K/V tensors come apart)."""
        from orcd.kvcache import KVCache

        return KVCache([], [], self.put(np.asarray(tables, np.int32)), self.put(np.asarray(seq, np.int32)),
                       int(n_ctx), batched, apart)

    @contextlib.contextmanager
    def scope(self):
        """Free the buffers that put / empty / weight make inside the block when it ends."""
        mark = len(self._bufs)
        try:
            yield self
        finally:
            for buf in self._bufs[mark:]:
                self.alloc.free(buf)
            del self._bufs[mark:]
