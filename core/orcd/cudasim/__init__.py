"""orcd's CUDA simulator: the project's kernel sources built as host C++ and run on
the CPU, one fiber per CUDA thread, so CI (which has no GPU) runs the real
kernels -- the same ``.cu`` text NVRTC compiles, through the same Python
launchers -- against the numpy references.

It is a correctness tool, not an emulator of timing: blocks run one after
another and the threads of a block interleave only at barriers and warp
collectives (``sim.h``, ``runtime.cpp``). What it checks is what most kernel
bugs are: indexing, bounds, which thread writes what, reductions, barriers
(a divergent ``__syncthreads`` or a shuffle missing a lane is reported as a
deadlock, a misaligned vector load aborts). What it cannot check: races that
need concurrent blocks, inline PTX (kernels keep it behind ``#ifdef
__CUDACC__`` with a portable fallback) and the GPU's FMA contraction (the host
build rounds every product), so compare with tolerances, not bits.

Use::

    sim = Simulator()                      # compiler + launcher + host "device memory"
    mm = MatmulKernels(sim.device, sim.compiler, sim.launcher, int8="off")
    x = sim.put(np_array)                  # a DeviceTensor over host memory
    mm.linear(x, w, None, out); sim.get(out)

Nothing here imports CUDA; it needs a C++17 compiler (``$CXX`` or g++).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from orcd.backends.cuda.launch import LaunchError, dim3, pack_args
from orcd.backends.cuda.memory import ALIGNMENT, Allocator, DeviceBuffer
from orcd.backends.cuda.tensor import DeviceTensor

MAX_THREADS = 1024
MAX_SHARED = 227 * 1024          # an sm_90 block's dynamic shared memory after opting in
GUARD, GUARD_BYTE = 256, 0xA5    # bytes after each simulated allocation, checked after launches
_FILES = ("sim.h", "builtins.h", "runtime.cpp")
_ALIGN = r"(?:__align__\s*\(\s*\d+\s*\)\s*)?"
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+" + _ALIGN + r"([A-Za-z_][\w:]*(?:\s+[A-Za-z_][\w:]*)*?)\s+"
                            + _ALIGN + r"(\w+)\s*\[\s*\]\s*;")
_KERNEL = re.compile(r'extern\s+"C"\s+void\s+(\w+)\s*\(')
_MARK = "orcd_sim_source_begins"


def compiler_path() -> str | None:
    """The C++ compiler the simulator builds with: $CXX, else g++ on PATH."""
    return os.environ.get("CXX") or shutil.which("g++")


def available() -> bool:
    return compiler_path() is not None


def cache_dir() -> Path:
    from orcd.backends.cuda.nvrtc import cache_root

    return cache_root() / "sim"


def rewrite(text: str) -> str:
    """CUDA's ``extern __shared__ T name[];`` (the launch's dynamic shared memory) as
    a pointer into the simulator's per-block buffer; everything else as is."""
    return _EXTERN_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(orcd_sim::dynamic_shared);", text)


@dataclass(frozen=True)
class SimDeviceInfo:
    """The limits validate-style checks read (an sm_90-like device)."""

    name: str = "orcd simulator"
    arch: str = "sim"
    max_threads_per_block: int = MAX_THREADS
    max_block_dim: tuple = (1024, 1024, 64)
    max_grid_dim: tuple = (2**31 - 1, 65535, 65535)
    max_shared_per_block_optin: int = MAX_SHARED
    sm_count: int = 132             # an H100's: what launch shapes are sized by


class SimDevice:
    """Stands where a CudaDevice goes. Its memory is host memory: orcd.backends.cuda.memory's
    to_host / from_host / fill_bytes see ``simulated`` and copy with numpy."""

    simulated = True
    info = SimDeviceInfo()
    name = info.name
    index = 0
    stream = None

    def make_current(self) -> None:
        pass

    def synchronize(self) -> None:
        pass

    @staticmethod
    def to_host(ptr: int, nbytes: int) -> np.ndarray:
        return host_view(ptr, nbytes).copy()

    @staticmethod
    def from_host(src: np.ndarray, ptr: int) -> None:
        host_view(ptr, src.nbytes)[:] = np.ascontiguousarray(src).reshape(-1).view(np.uint8)

    @staticmethod
    def fill_bytes(ptr: int, value: int, nbytes: int) -> None:
        host_view(ptr, nbytes)[:] = value

    def close(self) -> None:
        pass


def host_view(ptr: int, nbytes: int) -> np.ndarray:
    """The bytes at a simulated device address, as a writable uint8 array."""
    if nbytes == 0:
        return np.zeros(0, np.uint8)
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))


class SimKernel:
    def __init__(self, module: "SimModule", name: str) -> None:
        self.module, self.name = module, name
        self.fn = ctypes.cast(getattr(module.lib, f"orcd_sim_tramp_{name}"), ctypes.c_void_p)


class SimModule:
    def __init__(self, lib: ctypes.CDLL, name: str, kernels: Sequence[str]) -> None:
        self.lib, self.name, self.kernels = lib, name, frozenset(kernels)
        self.lib.orcd_sim_launch.restype = ctypes.c_int
        self.lib.orcd_sim_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_uint] * 6 + [
            ctypes.c_ulong]
        self.lib.orcd_sim_error.restype = ctypes.c_char_p
        self._functions: dict[str, SimKernel] = {}

    def function(self, name: str) -> SimKernel:
        if name not in self.kernels:
            raise LaunchError(f"kernel {name!r} not found in {self.name} (is it extern \"C\"?)")
        if name not in self._functions:
            self._functions[name] = SimKernel(self, name)
        return self._functions[name]


class SimCompiler:
    """``load(device, KernelSource)`` like orcd.backends.cuda.nvrtc.KernelCompiler, building a
    shared library per source (cached on disk by a hash of everything that goes in)."""

    def __init__(self, cache: Path | None = None, opt: str = "-O1") -> None:
        self.cache = cache_dir() if cache is None else Path(cache)
        self.opt = opt
        self.cxx = compiler_path()
        if self.cxx is None:
            raise RuntimeError("the CUDA simulator needs a C++ compiler: install g++ or set $CXX")
        self.builds = 0

    def load(self, device, src, options: Sequence[str] = ()) -> SimModule:
        if options:
            raise ValueError(f"the simulator takes no NVRTC options, got {list(options)}")
        root = resources.files("orcd.cudasim")
        runtime = {f: (root / f).read_text() for f in _FILES}
        key = self._key(src, runtime)
        lib_path = self.cache / f"{Path(src.name).stem}-{key[:32]}.so"
        names_path = lib_path.with_suffix(".kernels")
        if not (lib_path.is_file() and names_path.is_file()):
            self._build(src, runtime, lib_path, names_path)
        names = names_path.read_text().split()
        return SimModule(ctypes.CDLL(str(lib_path)), src.name, names)

    def _key(self, src, runtime: dict) -> str:
        h = hashlib.sha256()
        for part in (src.name, src.source, *sorted(f"{k}\0{v}" for k, v in src.headers.items()),
                     *(runtime[f] for f in _FILES), self.opt, self.cxx):
            h.update(part.encode() + b"\0")
        return h.hexdigest()

    def _build(self, src, runtime: dict, lib_path: Path, names_path: Path) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache) as tmp:
            d = Path(tmp)
            for f, text in runtime.items():
                (d / f).write_text(text)
            (d / "cuda_fp16.h").write_text("#pragma once\n")   # sim.h has __half and __half2
            for name, text in src.headers.items():
                (d / name).write_text(rewrite(text))
            (d / src.name).write_text(rewrite(src.source))
            head = f'#include "sim.h"\nstatic const int {_MARK} = 0;\n#include "{src.name}"\n'
            (d / "pre.cpp").write_text(head)
            flags = ["-std=c++17", "-w", "-ffp-contract=off", f"-I{d}"]
            pre = self._run([self.cxx, *flags, "-E", "-P", str(d / "pre.cpp")], src.name)
            kernels = sorted(set(_KERNEL.findall(pre.split(_MARK, 1)[1])))
            tramps = "".join(f'extern "C" void orcd_sim_tramp_{k}(void** a) {{ orcd_sim::invoke(&{k}, a); }}\n'
                             for k in kernels)
            (d / "unit.cpp").write_text(head + '#include "runtime.cpp"\n' + tramps)
            out = d / "lib.so"
            self._run([self.cxx, *flags, self.opt, "-shared", "-fPIC", "-o", str(out), str(d / "unit.cpp")],
                      src.name)
            self.builds += 1
            os.replace(out, lib_path)
            names_path.write_text("\n".join(kernels))

    @staticmethod
    def _run(cmd: list[str], what: str) -> str:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"the simulator could not build {what}:\n{r.stderr[-4000:]}")
        return r.stdout


class SimLauncher:
    """``launcher(kernel, grid, block, args, shared=0)`` as orcd.backends.cuda.launch.Launcher:
    the same argument packing, the grid run to completion before it returns, then
    ``after()`` (the allocator's guard check)."""

    def __init__(self, after=None) -> None:
        self.launches = 0
        self.after = after

    def __call__(self, kernel: SimKernel, grid, block, args: Sequence[Any], shared: int = 0) -> None:
        g, b = dim3(grid, f"{kernel.name}: grid"), dim3(block, f"{kernel.name}: block")
        info = SimDeviceInfo()
        for axis, gv, bv, gmax, bmax in zip("xyz", g, b, info.max_grid_dim, info.max_block_dim):
            if not 1 <= gv <= gmax or not 1 <= bv <= bmax:
                raise LaunchError(f"{kernel.name}: grid.{axis}={gv} / block.{axis}={bv} out of range")
        if b[0] * b[1] * b[2] > MAX_THREADS or not 0 <= shared <= MAX_SHARED:
            raise LaunchError(f"{kernel.name}: block {b} with {shared} bytes of shared memory")
        _keep, addresses = pack_args(args)
        lib = kernel.module.lib
        if lib.orcd_sim_launch(kernel.fn, addresses.ctypes.data, *g, *b, shared) != 0:
            raise LaunchError(f"{kernel.name} grid={g} block={b}: {lib.orcd_sim_error().decode()}")
        self.launches += 1
        if self.after is not None:
            self.after()


class SimAllocator(Allocator):
    """Host memory standing in for device memory: 256-byte aligned numpy buffers,
    accounted by purpose like the device allocator (a budget gives VramOom), each
    followed by a guard zone that ``check()`` verifies after every launch, so a
    kernel that writes past the end of a buffer fails its test."""

    def __init__(self, budget: int | None = None) -> None:
        super().__init__(budget)
        self._arrays: dict[int, tuple[np.ndarray, int]] = {}

    def alloc(self, nbytes: int, purpose: str) -> DeviceBuffer:
        buf = super().alloc(nbytes, purpose)
        raw, size = self._arrays[buf.ptr]
        self._arrays[buf.ptr] = (raw, nbytes)      # guarded from the last byte asked for
        host_view(buf.ptr + nbytes, size - nbytes + GUARD)[:] = GUARD_BYTE
        return buf

    def _raw_alloc(self, size: int, purpose: str) -> int:
        raw = np.empty(size + ALIGNMENT + GUARD, np.uint8)
        ptr = -(-raw.ctypes.data // ALIGNMENT) * ALIGNMENT
        self._arrays[ptr] = (raw, size)
        return ptr

    def _raw_free(self, ptr: int) -> None:
        del self._arrays[ptr]

    def check(self) -> None:
        for ptr, (raw, nbytes) in self._arrays.items():
            end = raw.ctypes.data + raw.nbytes
            guard = host_view(ptr + nbytes, min(GUARD, end - ptr - nbytes))
            if not np.all(guard == GUARD_BYTE):
                guard[:] = GUARD_BYTE     # reported once: later launches are not blamed for it
                raise LaunchError(f"a kernel wrote past the end of the {nbytes}-byte buffer at {ptr:#x}")


class Simulator:
    """A device, compiler, launcher and allocator for running kernel families on the CPU."""

    def __init__(self, cache: Path | None = None, budget: int | None = None) -> None:
        self.device = SimDevice()
        self.compiler = SimCompiler(cache)
        self.alloc = SimAllocator(budget)
        self.launcher = SimLauncher(after=self.alloc.check)

    def put(self, arr: np.ndarray, purpose: str = "test") -> DeviceTensor:
        arr = np.ascontiguousarray(arr)
        buf = self.alloc.alloc(max(arr.nbytes, 1), purpose)
        self.device.from_host(arr, buf.ptr)
        return DeviceTensor(buf.ptr, arr.shape, arr.dtype)

    def empty(self, shape, dtype=np.float32, purpose: str = "test") -> DeviceTensor:
        """Poisoned like the GPU rig's: every byte 0xFF (NaN / -1)."""
        shape = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        buf = self.alloc.alloc(max(nbytes, 1), purpose)
        self.device.fill_bytes(buf.ptr, 0xFF, nbytes)
        return DeviceTensor(buf.ptr, shape, np.dtype(dtype))

    def get(self, t: DeviceTensor) -> np.ndarray:
        return self.device.to_host(t.ptr, t.nbytes).view(t.dtype).reshape(t.shape)
