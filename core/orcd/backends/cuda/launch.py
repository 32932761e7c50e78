"""Validated kernel launches.

Before ``cuLaunchKernel`` the grid, block and shared memory are checked
against the device's limits and the kernel's own attributes, so a bad launch
is a clear ``LaunchError`` naming the kernel rather than a sticky context
error. Errors are checked after every launch; with ``ORCD_CUDA_DEBUG=1`` (or
``debug=True``) the launcher also synchronises after each launch, so a fault
is reported at the kernel that caused it. Arguments are packed by type:
``DeviceBuffer`` and ``np.uint64`` are pointers, a Python ``int`` is an
``int32``, a ``float`` a ``float32``, any numpy scalar keeps its dtype.

A kernel from a source that waits for its predecessor (``Kernel.pdl``, see
ops/pdl.cuh) launches through ``cuLaunchKernelEx`` with programmatic stream
serialization when the launcher's ``pdl`` is on (sm_90 and later): its blocks
may be scheduled while the previous kernel finishes, and a graph captured from
the stream keeps that edge.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from orcd.backends.cuda.memory import DeviceBuffer   # a plain dataclass module: no CUDA at import
from orcd.errors import CudaError

if TYPE_CHECKING:  # pragma: no cover
    from orcd.backends.cuda.device import CudaDevice, DeviceInfo

DEBUG_ENV = "ORCD_CUDA_DEBUG"
DEFAULT_SHARED_LIMIT = 48 * 1024  # dynamic shared memory allowed without opting in
MAX_CHECKED = 4096                 # launch configurations remembered as valid, per kernel

Dim3 = tuple[int, int, int]


class LaunchError(CudaError):
    """A launch configuration the device or the kernel cannot run (CUDA_ERROR)."""


@dataclass(frozen=True)
class KernelAttrs:
    max_threads_per_block: int  # lowered by register use / __launch_bounds__
    static_shared: int          # __shared__ arrays in the kernel
    num_regs: int


def dim3(v: int | Sequence[int], what: str) -> Dim3:
    t = (v,) if isinstance(v, (int, np.integer)) else tuple(v) if isinstance(v, (tuple, list)) else (v,)
    if not 1 <= len(t) <= 3 or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool)
                                       for x in t):
        raise LaunchError(f"{what} must be an int or 1-3 ints, got {v!r}")
    return tuple(int(x) for x in t) + (1,) * (3 - len(t))


def validate_launch(name: str, grid: Dim3, block: Dim3, shared: int,
                    info: "DeviceInfo", attrs: KernelAttrs) -> None:
    """Raise LaunchError for a configuration that cannot launch."""
    for axis, g, b, gmax, bmax in zip("xyz", grid, block, info.max_grid_dim, info.max_block_dim):
        if not 1 <= g <= gmax:
            raise LaunchError(f"{name}: grid.{axis}={g} outside 1..{gmax}")
        if not 1 <= b <= bmax:
            raise LaunchError(f"{name}: block.{axis}={b} outside 1..{bmax}")
    threads = block[0] * block[1] * block[2]
    limit = min(info.max_threads_per_block, attrs.max_threads_per_block)
    if threads > limit:
        raise LaunchError(f"{name}: block of {threads} threads exceeds this kernel's limit of "
                          f"{limit} ({attrs.num_regs} registers per thread)")
    if shared < 0:
        raise LaunchError(f"{name}: negative shared memory {shared}")
    if attrs.static_shared + shared > info.max_shared_per_block_optin:
        raise LaunchError(f"{name}: {attrs.static_shared} static + {shared} dynamic bytes of shared "
                          f"memory exceed the device's {info.max_shared_per_block_optin}")


_NUMPY_CODES = {("u", 1): "B", ("u", 2): "H", ("u", 4): "I", ("u", 8): "Q", ("i", 1): "b",
                ("i", 2): "h", ("i", 4): "i", ("i", 8): "q", ("f", 2): "e", ("f", 4): "f", ("f", 8): "d"}
_SIZES = {c: struct.calcsize(c) for c in "BHIQbhiqefd"}


def arg_code(a: Any) -> tuple[str, Any]:
    """(struct format code, value) of one kernel argument."""
    if type(a) is np.uint64:          # pointers: most arguments
        return "Q", int(a)
    if type(a) is int:
        if not -(1 << 31) <= a < (1 << 31):
            raise LaunchError(f"int argument {a} does not fit int32: pass np.int64 or np.uint64")
        return "i", a
    if type(a) is float:
        return "f", a
    if isinstance(a, np.generic) and not isinstance(a, np.bool_):
        code = _NUMPY_CODES.get((a.dtype.kind, a.dtype.itemsize))
        if code is not None:
            return code, a.item()
    if isinstance(a, DeviceBuffer):
        return "Q", a.ptr
    if isinstance(a, (bool, np.bool_)):
        raise LaunchError(f"ambiguous bool kernel argument {a!r}: pass np.int32 or np.uint8")
    raise LaunchError(f"unsupported kernel argument {a!r} of type {type(a).__name__}")


def pack_arg(a: Any) -> np.ndarray:
    """One kernel argument as a 1-element array whose bytes are its value."""
    code, value = arg_code(a)
    return np.frombuffer(struct.pack(code, value), dtype=np.dtype(code)).copy()


def pack_args(args: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(one buffer holding every value, naturally aligned, kept alive by the caller;
    the array of their addresses) for cuLaunchKernel's kernelParams. One struct
    pack per launch: a prefill launches ~1,000 kernels from Python."""
    fmt, values, offsets = ["="], [], []
    at = 0
    for a in args:
        code, value = arg_code(a)
        size = _SIZES[code]
        pad = -at % size
        if pad:
            fmt.append(f"{pad}x")
            at += pad
        fmt.append(code)
        values.append(value)
        offsets.append(at)
        at += size
    buf = np.frombuffer(struct.pack("".join(fmt), *values) or bytes(8), dtype=np.uint8)
    return buf, np.array(offsets, dtype=np.uint64) + np.uint64(buf.ctypes.data)


class Kernel:
    """A kernel function and its attributes, bound to a device."""

    def __init__(self, device: "CudaDevice", handle: Any, name: str, pdl: bool = False) -> None:
        from orcd.backends.cuda.driver import cu, driver_module

        a = driver_module().CUfunction_attribute
        self.device, self.handle, self.name = device, handle, name
        self.pdl = pdl    # it waits for the kernel before it (orcd_grid_wait): may start early
        self.attrs = KernelAttrs(
            max_threads_per_block=int(cu("cuFuncGetAttribute", a.CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, handle)),
            static_shared=int(cu("cuFuncGetAttribute", a.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, handle)),
            num_regs=int(cu("cuFuncGetAttribute", a.CU_FUNC_ATTRIBUTE_NUM_REGS, handle)))
        self._dynamic_limit = DEFAULT_SHARED_LIMIT
        self.checked: dict[tuple, tuple] = {}   # launch configuration -> (grid, block, early config)

    def allow_shared(self, nbytes: int) -> None:
        """Opt in to more than 48 KiB of dynamic shared memory (once per size)."""
        if nbytes <= self._dynamic_limit:
            return
        from orcd.backends.cuda.driver import cu, driver_module

        a = driver_module().CUfunction_attribute
        cu("cuFuncSetAttribute", self.handle, a.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes)
        self._dynamic_limit = nbytes


class Launcher:
    """Launches kernels on the device's stream; ``debug`` syncs after each;
    ``pdl``: a ``Kernel.pdl`` kernel may start before the previous one ends (on
    devices that have it: compute capability 9.0 and later)."""

    def __init__(self, device: "CudaDevice", debug: bool | None = None, pdl: bool = False) -> None:
        self.device = device
        self.debug = os.environ.get(DEBUG_ENV, "") not in ("", "0") if debug is None else debug
        self.pdl = bool(pdl) and device.info.compute_capability >= (9, 0)
        self.launches = 0
        self.debug_syncs = 0

    def __call__(self, kernel: Kernel, grid: int | Sequence[int], block: int | Sequence[int],
                 args: Sequence[Any], shared: int = 0) -> None:
        from orcd.backends.cuda.driver import cu

        stream = self.device.stream
        early = self.pdl and kernel.pdl
        key = (grid if isinstance(grid, (int, np.integer)) else tuple(grid),
               block if isinstance(block, (int, np.integer)) else tuple(block), shared, early)
        checked = kernel.checked.get(key)   # a configuration is validated once per kernel
        if checked is None:
            g, b = dim3(grid, f"{kernel.name}: grid"), dim3(block, f"{kernel.name}: block")
            validate_launch(kernel.name, g, b, shared, self.device.info, kernel.attrs)
            kernel.allow_shared(shared)
            if len(kernel.checked) >= MAX_CHECKED:   # prompts of every length: keep it bounded
                kernel.checked.clear()
            checked = kernel.checked[key] = (g, b, early_config(g, b, shared) if early else None)
        g, b, config = checked
        _keep, addresses = pack_args(args)  # _keep holds the values until the launch returns
        self.device.make_current()
        try:
            if config is None:
                cu("cuLaunchKernel", kernel.handle, *g, *b, shared, stream, addresses.ctypes.data, 0)
            else:
                config.hStream = stream
                cu("cuLaunchKernelEx", config, kernel.handle, addresses.ctypes.data, 0)
            if self.debug and not _capturing(stream):
                self.debug_syncs += 1
                cu("cuStreamSynchronize", stream)
        except CudaError as e:
            raise CudaError(f"kernel {kernel.name} grid={g} block={b} shared={shared}: {e.message}",
                            cuda_error=e.details.get("cuda_error"), call=e.details.get("call")) from None
        self.launches += 1


def early_config(g: Dim3, b: Dim3, shared: int) -> Any:
    """A CUlaunchConfig for ``cuLaunchKernelEx`` that allows programmatic stream
    serialization (the kernel waits for its predecessor itself)."""
    from orcd.backends.cuda.driver import driver_module

    drv = driver_module()
    attr = drv.CUlaunchAttribute()
    attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    config = drv.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = g
    config.blockDimX, config.blockDimY, config.blockDimZ = b
    config.sharedMemBytes = shared
    config.attrs = [attr]
    config.numAttrs = 1
    return config


def _capturing(stream: Any) -> bool:
    """A stream being captured into a graph must not be synchronised."""
    from orcd.backends.cuda.driver import cu, driver_module

    status = cu("cuStreamIsCapturing", stream)
    return status != driver_module().CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE
