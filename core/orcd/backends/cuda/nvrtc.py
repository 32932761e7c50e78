"""Run-time compilation of CUDA C++ with NVRTC, and an on-disk cubin cache.

Sources are ``KernelSource`` objects: a name, the ``.cu`` text and the headers
it may include, all in memory (no include paths), so the cache key below sees
every byte that can change the result. Core kernels ship as package data in
``orcd/backends/cuda/kernels``; a plugin ships its own with ``KernelSource.from_package``.
A cubin is compiled for the device's real architecture (``sm_90`` on
H100/H200) and cached under ``<orcd cache>/kernels/`` keyed by sha256 of
source, headers, options, architecture and the NVRTC version.

Start-up does not wait on compiles it can avoid: cubins built ahead of time for
the common architectures ship inside the package (``orcd/backends/cuda/aot``, made by
``python -m orcd.backends.cuda.aot`` when the wheel is built) under the same keys, and
``prefetch`` compiles what is missing on a pool of threads while the weights
upload (NVRTC releases the GIL), so a first start costs the longest compile,
not their sum.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

from orcd.errors import CudaError

#: Options every compile gets, before the caller's.
DEFAULT_OPTIONS = ("-std=c++17", "-default-device")


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """orcd's cache: $ORCD_CACHE_DIR, else $XDG_CACHE_HOME/orcd, else ~/.cache/orcd."""
    env = os.environ if env is None else env
    if env.get("ORCD_CACHE_DIR"):
        return Path(env["ORCD_CACHE_DIR"])
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]) / "orcd"
    return Path.home() / ".cache" / "orcd"


def kernel_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    return cache_root(env) / "kernels"


@dataclass(frozen=True)
class KernelSource:
    name: str                                  # e.g. "gemm_simt.cu"; shows in errors
    source: str
    headers: Mapping[str, str] = field(default_factory=dict)  # include name -> text

    @property
    def pdl(self) -> bool:
        """Every kernel of this source waits for the kernel before it (ops/pdl.cuh), so
        the launcher may start it early (programmatic dependent launch)."""
        return PDL_INCLUDE in self.source

    @classmethod
    def from_package(cls, package: str, name: str, headers: Sequence[str] = ()) -> "KernelSource":
        """Read ``name`` (and ``headers``) shipped as package data of ``package``; the
        package's headers it includes (``#include "x.cuh"``) come with it."""
        root = resources.files(package)
        text = (root / name).read_text()
        given = {h: (root / h).read_text() for h in headers}
        return cls(name, text, {**package_headers(package, [text, *given.values()]), **given})


PDL_INCLUDE = '#include "pdl.cuh"'
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def package_headers(package: str, texts: Sequence[str]) -> dict[str, str]:
    """The headers of ``package`` that ``texts`` include, and those they include."""
    root, found = resources.files(package), {}
    todo = [n for t in texts for n in _INCLUDE.findall(t)]
    while todo:
        name = todo.pop()
        if name in found or not (root / name).is_file():
            continue                      # generated or another package's: given by the caller
        found[name] = (root / name).read_text()
        todo.extend(_INCLUDE.findall(found[name]))
    return found


def cuda_include_dir() -> str | None:
    """The CUDA toolkit's headers (cuda_fp16.h, cuda_bf16.h, ...), which NVRTC
    does not ship built in: found by cuda-pathfinder, else $CUDA_HOME/include."""
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        found = find_nvidia_header_directory("cudart")
        if found:
            return found
    except (ImportError, RuntimeError):
        pass
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            return str(Path(root) / "include")
    return None


def compile_options(arch: str, options: Sequence[str] = ()) -> list[str]:
    """The full option list: real architecture first, defaults, the caller's."""
    return [f"--gpu-architecture={arch}", *DEFAULT_OPTIONS, *options]


def key_options(options: Sequence[str]) -> list[str]:
    """The options as the cache key sees them: a toolkit include path is this
    machine's path, so it counts as "the toolkit headers" (their content is the
    NVRTC version's, which the key holds), and a shipped cubin's key matches."""
    return ["--include-path=<cuda-toolkit>" if o.startswith("--include-path=") else o for o in options]


def shipped_dir() -> Path:
    """The cubins built ahead of time that ship in the package (may be absent)."""
    return Path(str(resources.files("orcd.backends.cuda"))) / "aot"


def cache_key(src: KernelSource, options: Sequence[str], arch: str,
              nvrtc_version: tuple[int, int]) -> str:
    """sha256 over everything that can change the cubin."""
    h = hashlib.sha256()

    def put(s: str) -> None:
        b = s.encode()
        h.update(len(b).to_bytes(8, "little"))  # length-prefixed: no ambiguous joins
        h.update(b)

    put(src.source)
    for name in sorted(src.headers):
        put(name)
        put(src.headers[name])
    for opt in options:
        put(opt)
    put(arch)
    put("nvrtc-%d.%d" % tuple(nvrtc_version))
    return h.hexdigest()


def cubin_path(cache: Path, src: KernelSource, key: str, arch: str) -> Path:
    stem = Path(src.name).stem
    return cache / f"{stem}-{arch}-{key[:32]}.cubin"


def nvrtc_version() -> tuple[int, int]:
    from orcd.backends.cuda.driver import rtc

    major, minor = rtc("nvrtcVersion")
    return int(major), int(minor)


def _compile(src: KernelSource, options: list[str]) -> bytes:
    from orcd.backends.cuda.driver import nvrtc_module, rtc

    nv = nvrtc_module()
    names = sorted(src.headers)
    prog = rtc("nvrtcCreateProgram", src.source.encode(), src.name.encode(), len(names),
               [src.headers[n].encode() for n in names], [n.encode() for n in names])
    try:
        opts = [o.encode() for o in options]
        result = nv.nvrtcCompileProgram(prog, len(opts), opts)[0]
        if result != nv.nvrtcResult.NVRTC_SUCCESS:
            log = _program_log(prog)
            raise CudaError(f"NVRTC could not compile {src.name} "
                            f"({' '.join(options)}): {getattr(result, 'name', result)}\n{log}",
                            cuda_error=getattr(result, "name", str(result)),
                            call="nvrtcCompileProgram", log=log)
        size = rtc("nvrtcGetCUBINSize", prog)
        cubin = b" " * size
        rtc("nvrtcGetCUBIN", prog, cubin)
        return cubin
    finally:
        rtc("nvrtcDestroyProgram", prog)


def _program_log(prog: Any) -> str:
    from orcd.backends.cuda.driver import rtc

    size = rtc("nvrtcGetProgramLogSize", prog)
    log = b" " * size
    rtc("nvrtcGetProgramLog", prog, log)
    return log.rstrip(b"\0 ").decode(errors="replace")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class KernelCompiler:
    """Compiles for one architecture and caches cubins on disk.

    ``hits`` and ``misses`` count cache lookups (tests and /metrics read them);
    ``shipped`` is a read-only directory of cubins built ahead of time under the
    same keys (default: the package's, shipped_dir(); None: none)."""

    def __init__(self, arch: str, cache: Path | None = None, cuda_headers: bool = False,
                 shipped: Path | None | str = "package") -> None:
        self.arch = arch
        self.cache = kernel_cache_dir() if cache is None else Path(cache)
        self.shipped = shipped_dir() if shipped == "package" else shipped
        self.version = nvrtc_version()
        # Toolkit headers come by include path, which the cache key sees only
        # as a path: the NVRTC version in the key stands for their content.
        self.base_options: list[str] = []
        if cuda_headers:
            inc = cuda_include_dir()
            if inc is None:
                raise CudaError("CUDA toolkit headers (cuda_fp16.h) not found; set CUDA_HOME",
                                cuda_error="HEADERS", call="cuda_include_dir")
            self.base_options.append(f"--include-path={inc}")
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._inflight: dict[str, Future] = {}
        self._pool: ThreadPoolExecutor | None = None

    def cubin(self, src: KernelSource, options: Sequence[str] = ()) -> bytes:
        opts, key = self._key(src, options)
        found = self._cached(src, key)
        if found is not None:
            with self._lock:
                self.hits += 1
            return found
        with self._lock:
            job = self._inflight.get(key)
        if job is not None:      # a prefetch is compiling it: wait for that one
            return job.result()
        with self._lock:
            self.misses += 1
        return self._compile_and_store(src, opts, key)

    def prefetch(self, sources: Sequence[KernelSource], threads: int | None = None) -> list[Future]:
        """Compile the sources that are not cached yet, in parallel, without waiting;
        ``cubin`` of one of them waits for its compile. Returns the compiles started."""
        started = []
        for src in sources:
            opts, key = self._key(src, ())
            with self._lock:
                if key in self._inflight or self._cached(src, key) is not None:
                    continue
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(threads or min(16, os.cpu_count() or 4),
                                                    thread_name_prefix="orcd-nvrtc")
                self.misses += 1
                job = self._inflight[key] = self._pool.submit(self._compile_and_store, src, opts, key)
            started.append(job)
        return started

    def _key(self, src: KernelSource, options: Sequence[str]) -> tuple[list[str], str]:
        opts = compile_options(self.arch, [*self.base_options, *options])
        return opts, cache_key(src, key_options(opts), self.arch, self.version)

    def _cached(self, src: KernelSource, key: str) -> bytes | None:
        for root in (self.cache, self.shipped):
            if root is not None:
                path = cubin_path(Path(root), src, key, self.arch)
                if path.is_file():
                    return path.read_bytes()
        return None

    def _compile_and_store(self, src: KernelSource, opts: list[str], key: str) -> bytes:
        try:
            data = _compile(src, opts)
            _write_atomic(cubin_path(self.cache, src, key, self.arch), data)
            return data
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def close(self) -> None:
        """Finish the compiles under way and stop the pool."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def load(self, device, src: KernelSource, options: Sequence[str] = ()) -> "Module":
        return Module(device, self.cubin(src, options), src.name, pdl=src.pdl)


class Module:
    """A loaded cubin; ``function(name)`` looks up an ``extern "C"`` kernel."""

    def __init__(self, device, cubin: bytes, name: str = "module", pdl: bool = False) -> None:
        from orcd.backends.cuda.driver import cu

        device.make_current()
        self.device = device
        self.name = name
        self.pdl = pdl            # its kernels may launch before the previous one ends
        self.handle = cu("cuModuleLoadData", cubin)
        self._functions: dict[str, Any] = {}

    def function(self, name: str):
        from orcd.backends.cuda.launch import Kernel

        if name not in self._functions:
            from orcd.backends.cuda.driver import cu

            self.device.make_current()
            try:
                handle = cu("cuModuleGetFunction", self.handle, name.encode())
            except CudaError as e:
                raise CudaError(f"kernel {name!r} not found in {self.name} "
                                f"(is it extern \"C\"?): {e.message}",
                                cuda_error=e.details.get("cuda_error"), call="cuModuleGetFunction") from None
            self._functions[name] = Kernel(self.device, handle, name, pdl=self.pdl)
        return self._functions[name]
