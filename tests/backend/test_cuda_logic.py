"""The GPU layer's pure logic, on the CPU: error checking, accounting,
chunking, progress milestones, kernel cache keys, launch validation and
argument packing, residency classification, and import isolation."""

from __future__ import annotations

import ctypes
import enum
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from orcd.backends.cuda import driver
from orcd.backends.cuda.device import DeviceInfo
from orcd.backends.cuda.launch import KernelAttrs, LaunchError, dim3, pack_arg, pack_args, validate_launch
from orcd.backends.cuda.memory import Allocator, DeviceBuffer, VramLedger, align_up
from orcd.backends.cuda.nvrtc import KernelSource, cache_key, cache_root, compile_options, cubin_path, key_options
from orcd.backends.cuda.residency import classify
from orcd.backends.cuda.upload import Milestones, _jobs, plan_chunks, plan_rows
from orcd.errors import CudaError, VramOom
from orcd.ops.contract import Phase


class FakeResult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_OUT_OF_MEMORY = 2


# -- driver.check ---------------------------------------------------------------

def test_check_unpacks_values():
    ok = FakeResult.CUDA_SUCCESS
    assert driver.check((ok,), "cuInit", ok) is None
    assert driver.check((ok, 7), "cuDeviceGetCount", ok) == 7
    assert driver.check((ok, 1, 2), "cuMemGetInfo", ok) == (1, 2)


def test_check_raises_with_error_name_and_call():
    with pytest.raises(CudaError) as e:
        driver.check((FakeResult.CUDA_ERROR_OUT_OF_MEMORY, None), "cuMemAlloc", FakeResult.CUDA_SUCCESS)
    err = e.value
    assert err.code == "CUDA_ERROR"
    assert "CUDA_ERROR_OUT_OF_MEMORY" in err.message and "cuMemAlloc" in err.message
    assert err.details == {"cuda_error": "CUDA_ERROR_OUT_OF_MEMORY", "call": "cuMemAlloc"}
    assert driver.is_oom(err)


def test_importing_orcd_and_the_gpu_layer_touches_no_cuda():
    # Any import of cuda.*, cupy, nvmath or torch fails in this interpreter.
    code = textwrap.dedent("""
        import importlib, sys
        class Forbid:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("cuda", "cupy", "nvmath", "torch"):
                    raise ImportError("forbidden at import time: " + name)
        sys.meta_path.insert(0, Forbid())
        import orcd, orcd.vram
        for m in DRIVER_LAYER + BACKEND_LAYER:
            importlib.import_module("orcd.backends.cuda." + m)
        print("ok")
    """).replace("DRIVER_LAYER + BACKEND_LAYER", repr(DRIVER_LAYER + BACKEND_LAYER))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


DRIVER_LAYER = ("driver", "device", "memory", "upload", "nvrtc", "launch", "graph", "residency", "blas",
                "cublaslt", "tensor")
BACKEND_LAYER = ("backend", "loading", "ops", "steps", "sampler", "batch", "prefill")


def test_the_gpu_package_is_the_two_layers_and_the_driver_layer_never_imports_the_backend():
    # backends/cuda: the driver modules know nothing of models or ops (aot.py, the release
    # tool, reads the backend's kernel list)
    import ast
    from pathlib import Path

    import orcd.backends.cuda as pkg

    root = Path(pkg.__file__).parent
    assert {p.stem for p in root.glob("*.py")} == {"__init__", "aot", *DRIVER_LAYER, *BACKEND_LAYER}
    for name in DRIVER_LAYER:
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        upward = {m for m in imported if m.startswith("orcd.ops") or m.startswith("orcd.backends.cuda.")
                  and m.rsplit(".", 1)[1] in BACKEND_LAYER}
        assert not upward, f"{name}.py imports {sorted(upward)}"


# -- accounting -------------------------------------------------------------------

class FakeHeap(Allocator):
    """Allocator over a fake heap of ``capacity`` bytes (the driver's OOM)."""

    def __init__(self, capacity: int, budget: int | None = None) -> None:
        super().__init__(budget)
        self.capacity, self.live, self.next = capacity, {}, 0x10000

    def _raw_alloc(self, size, purpose):
        used = sum(self.live.values())
        if used + size > self.capacity:
            raise VramOom("fake OOM", requested=size, available=self.capacity - used)
        ptr, self.next = self.next, self.next + size
        self.live[ptr] = size
        return ptr

    def _raw_free(self, ptr):
        del self.live[ptr]


def test_align_up():
    assert [align_up(n) for n in (1, 255, 256, 257, 512)] == [256, 256, 256, 512, 512]


def test_usage_by_purpose_counts_aligned_bytes():
    heap = FakeHeap(1 << 20)
    w = heap.alloc(1000, "weights")
    k = heap.alloc(256, "kv_cache")
    assert w == DeviceBuffer(w.ptr, 1000, "weights")
    usage = heap.usage()
    assert usage["weights"] == 1024 and usage["kv_cache"] == 256 and usage["scratch"] == 0
    heap.free(w)
    assert heap.usage()["weights"] == 0 and heap.ledger.total == 256
    heap.free(k)
    assert heap.live == {}


def test_budget_refuses_before_touching_the_heap():
    heap = FakeHeap(1 << 30, budget=4096)
    heap.alloc(3000, "weights")  # 3072
    with pytest.raises(VramOom) as e:
        heap.alloc(2000, "scratch")  # 2048 > 1024 left
    assert e.value.details["requested"] == 2048
    assert e.value.details["available"] == 1024
    assert len(heap.live) == 1


def test_transaction_rolls_back_partial_allocations():
    heap = FakeHeap(10_000)
    keep = heap.alloc(2048, "weights")
    with pytest.raises(VramOom):
        with heap.transaction() as tx:
            tx.alloc(4096, "kv_cache")
            tx.alloc(2048, "scratch")
            tx.alloc(4096, "scratch")  # the heap has 1808 bytes left
    assert heap.live == {keep.ptr: 2048}
    assert heap.usage()["kv_cache"] == 0 and heap.usage()["scratch"] == 0
    # The worker keeps serving: a request that fits now succeeds.
    bufs = heap.alloc_all([(1024, "kv_cache"), (512, "scratch")])
    assert [b.purpose for b in bufs] == ["kv_cache", "scratch"]
    assert heap.ledger.total == 2048 + 1024 + 512


def test_free_all_by_purpose_and_bad_free():
    heap = FakeHeap(1 << 20)
    heap.alloc(100, "weights")
    s = heap.alloc(100, "scratch")
    heap.free_all("scratch")
    assert heap.usage()["scratch"] == 0 and heap.usage()["weights"] == 256
    with pytest.raises(ValueError):
        heap.free(s)
    with pytest.raises(ValueError):
        heap.alloc(0, "scratch")


def test_ledger_rejects_double_record():
    led = VramLedger()
    led.record(0x100, 256, "weights")
    with pytest.raises(ValueError):
        led.record(0x100, 256, "weights")


# -- chunking and progress -------------------------------------------------------

@pytest.mark.parametrize("nbytes,chunk", [(0, 4), (1, 4), (8, 4), (9, 4), (10_000_003, 1 << 20)])
def test_chunks_tile_the_range(nbytes, chunk):
    pieces = list(plan_chunks(nbytes, chunk))
    assert sum(n for _, n in pieces) == nbytes
    assert all(0 < n <= chunk for _, n in pieces)
    assert [o for o, _ in pieces] == list(range(0, nbytes, chunk))


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError):
        list(plan_chunks(10, 0))


def test_plan_rows_moves_whole_rows_within_the_chunk():
    pieces = list(plan_rows(10, 100, 112, 350))       # 3 rows a chunk (the larger side: 112 bytes)
    assert [(so, sn, do, dn) for so, sn, do, dn in pieces] == [
        (0, 300, 0, 336), (300, 300, 336, 336), (600, 300, 672, 336), (900, 100, 1008, 112)]
    assert list(plan_rows(2, 1000, 1008, 10)) == [(0, 1000, 0, 1008), (1000, 1000, 1008, 1008)]  # row > chunk


def test_upload_jobs_rebuild_the_vram_layout(host):
    # what the copy threads do with each job, on host memory: the result is to_vram's
    fmt = host.formats.by_name["MXFP4"]
    rows, n_in = 7, 2880
    raw = fmt.random_blocks(rows * n_in // 32, np.random.default_rng(0), 0.05)
    dst = np.zeros(rows * fmt.vram_row_bytes(n_in), np.uint8)
    staging = np.zeros(4096, np.uint8)
    jobs = _jobs((raw, 0, fmt, n_in), chunk=4096)
    assert len(jobs) > 1 and all(dst_n <= 4096 for *_, dst_n, _, _ in jobs)
    for src, _, off, n, dst_off, dst_n, f, n_elems in jobs:
        f.to_vram(src[off:off + n], n_elems, out=staging)
        dst[dst_off:dst_off + dst_n] = staging[:dst_n]
    np.testing.assert_array_equal(dst, fmt.to_vram(raw, n_in))
    f16 = host.formats.by_name["F16"]                  # rows as stored: plain byte chunks
    assert all(j[6] is None for j in _jobs((np.zeros(2 * 896 * 10, np.uint8), 0, f16, 896), chunk=1000))


def test_milestones_emit_each_step_once_in_order():
    seen = []
    m = Milestones(seen.append)
    for f in (0.0, 0.1, 0.6, 0.6, 0.74, 0.99, 1.0, 1.0):
        m(f)
    assert seen == [0, 25, 50, 75, 100]
    seen2 = []
    m2 = Milestones(seen2.append)
    m2(0.999)
    assert seen2 == [0, 25, 50, 75]


# -- NVRTC cache keys ------------------------------------------------------------

SRC = KernelSource("k.cu", "extern \"C\" __global__ void k() {}", {"a.cuh": "#define A 1"})


def test_cache_key_is_stable_and_sensitive():
    opts = compile_options("sm_90", ["-DX=1"])
    key = cache_key(SRC, opts, "sm_90", (13, 0))
    assert key == cache_key(KernelSource(SRC.name, SRC.source, dict(SRC.headers)), opts, "sm_90", (13, 0))
    variants = [
        cache_key(KernelSource("k.cu", SRC.source + " ", SRC.headers), opts, "sm_90", (13, 0)),
        cache_key(KernelSource("k.cu", SRC.source, {"a.cuh": "#define A 2"}), opts, "sm_90", (13, 0)),
        cache_key(KernelSource("k.cu", SRC.source, {"b.cuh": "#define A 1"}), opts, "sm_90", (13, 0)),
        cache_key(SRC, compile_options("sm_90", ["-DX=2"]), "sm_90", (13, 0)),
        cache_key(SRC, opts, "sm_89", (13, 0)),
        cache_key(SRC, opts, "sm_90", (13, 1)),
    ]
    assert len({key, *variants}) == 1 + len(variants)


def test_cache_key_has_no_ambiguous_concatenation():
    a = KernelSource("k.cu", "ab", {"c": "d"})
    b = KernelSource("k.cu", "a", {"bc": "d"})
    assert cache_key(a, [], "sm_90", (13, 0)) != cache_key(b, [], "sm_90", (13, 0))


def test_key_ignores_the_toolkit_include_path():
    # the path differs per machine; a cubin built ahead of time must still match
    a = compile_options("sm_90", ["--include-path=/usr/local/cuda/include"])
    b = compile_options("sm_90", ["--include-path=/opt/venv/nvidia/cu13/include"])
    assert key_options(a) == key_options(b) and key_options(a) != key_options(compile_options("sm_90"))


@pytest.fixture
def fake_nvrtc(monkeypatch):
    """KernelCompiler without NVRTC: a compile is recorded and returns the source's bytes."""
    import threading

    from orcd.backends.cuda import nvrtc

    compiled, gate = [], threading.Event()
    gate.set()

    def compile_(src, opts):
        gate.wait(5)
        compiled.append(src.name)
        return src.source.encode()

    monkeypatch.setattr(nvrtc, "nvrtc_version", lambda: (13, 0))
    monkeypatch.setattr(nvrtc, "_compile", compile_)
    return compiled, gate


def test_shipped_cubins_are_used_without_compiling(tmp_path, fake_nvrtc):
    from orcd.backends.cuda.nvrtc import KernelCompiler

    compiled, _ = fake_nvrtc
    shipped = tmp_path / "aot"
    builder = KernelCompiler("sm_90", cache=shipped, shipped=None)   # as orcd.backends.cuda.aot builds them
    builder.cubin(SRC)
    assert compiled == ["k.cu"]
    worker = KernelCompiler("sm_90", cache=tmp_path / "user", shipped=shipped)
    assert worker.cubin(SRC) == SRC.source.encode() and compiled == ["k.cu"] and worker.hits == 1
    other = KernelSource("k.cu", SRC.source + "\n", SRC.headers)    # not shipped: compiled
    worker.cubin(other)
    assert compiled == ["k.cu", "k.cu"] and worker.misses == 1


def test_prefetch_compiles_once_and_cubin_waits_for_it(tmp_path, fake_nvrtc):
    from orcd.backends.cuda.nvrtc import KernelCompiler

    compiled, gate = fake_nvrtc
    gate.clear()                                     # hold the compiles until cubin() is waiting
    comp = KernelCompiler("sm_90", cache=tmp_path, shipped=None)
    b = KernelSource("b.cu", "// b", {})
    jobs = comp.prefetch([SRC, b, SRC])
    assert len(jobs) == 2                            # the repeated source is one compile
    assert comp.prefetch([SRC]) == []                # already in flight
    import threading
    threading.Timer(0.2, gate.set).start()
    assert comp.cubin(b) == b"// b"                  # waits for the prefetch, no second compile
    for j in jobs:
        j.result()
    comp.close()
    assert sorted(compiled) == ["b.cu", "k.cu"] and comp.misses == 2
    assert comp.prefetch([SRC, b]) == []             # now cached on disk


def test_compile_options_put_the_architecture_first():
    opts = compile_options("sm_90", ["-DX=1"])
    assert opts[0] == "--gpu-architecture=sm_90" and opts[-1] == "-DX=1"


def test_cache_root_precedence(tmp_path):
    assert cache_root({"ORCD_CACHE_DIR": "/a", "XDG_CACHE_HOME": "/b"}) == __import__("pathlib").Path("/a")
    assert str(cache_root({"XDG_CACHE_HOME": "/b"})) == "/b/orcd"
    assert str(cache_root({})).endswith(".cache/orcd")
    p = cubin_path(tmp_path, SRC, "f" * 64, "sm_90")
    assert p.parent == tmp_path and p.name.startswith("k-sm_90-") and p.suffix == ".cubin"


def test_kernel_source_from_package_reads_shipped_kernels():
    src = KernelSource.from_package("orcd.backends.cuda.kernels", "gemm_simt.cu")
    assert 'extern "C" __global__ void gemm_f16_simt' in src.source


# -- launch validation and argument packing ---------------------------------------

INFO = DeviceInfo(index=0, name="fake", compute_capability=(9, 0), total_bytes=1 << 36, sm_count=132,
                  l2_bytes=50 << 20, max_threads_per_block=1024, max_block_dim=(1024, 1024, 64),
                  max_grid_dim=(2**31 - 1, 65535, 65535), max_shared_per_block=48 << 10,
                  max_shared_per_block_optin=227 << 10)
ATTRS = KernelAttrs(max_threads_per_block=512, static_shared=4096, num_regs=128)


def test_dim3_normalises_and_rejects():
    assert dim3(5, "grid") == (5, 1, 1)
    assert dim3((2, 3), "grid") == (2, 3, 1)
    with pytest.raises(LaunchError):
        dim3((1, 2, 3, 4), "grid")
    with pytest.raises(LaunchError):
        dim3(2.0, "grid")


def test_valid_launch_passes():
    validate_launch("k", (100, 1, 1), (512, 1, 1), 100 << 10, INFO, ATTRS)


@pytest.mark.parametrize("grid,block,shared,needle", [
    ((0, 1, 1), (32, 1, 1), 0, "grid.x=0"),
    ((1, 70000, 1), (32, 1, 1), 0, "grid.y=70000"),
    ((1, 1, 1), (32, 1, 65), 0, "block.z=65"),
    ((1, 1, 1), (32, 32, 1), 0, "1024 threads exceeds this kernel's limit of 512"),
    ((1, 1, 1), (32, 1, 1), 227 << 10, "shared"),
    ((1, 1, 1), (32, 1, 1), -1, "negative shared"),
])
def test_invalid_launches_name_the_problem(grid, block, shared, needle):
    with pytest.raises(LaunchError) as e:
        validate_launch("my_kernel", grid, block, shared, INFO, ATTRS)
    assert needle in e.value.message and "my_kernel" in e.value.message
    assert e.value.code == "CUDA_ERROR"


def test_pack_args_types_and_bytes():
    buf = DeviceBuffer(0xDEAD0000, 10, "scratch")
    keep, addrs = pack_args([buf, np.uint64(0x1234), 7, -1.5, np.int64(1 << 40), np.float16(2.0),
                             np.uint8(200), np.int32(-3)])
    assert ctypes.c_uint64.from_address(int(addrs[0])).value == 0xDEAD0000
    assert ctypes.c_uint64.from_address(int(addrs[1])).value == 0x1234
    assert ctypes.c_int32.from_address(int(addrs[2])).value == 7
    assert ctypes.c_float.from_address(int(addrs[3])).value == -1.5
    assert ctypes.c_int64.from_address(int(addrs[4])).value == 1 << 40
    assert np.frombuffer(ctypes.string_at(int(addrs[5]), 2), np.float16)[0] == 2.0
    assert ctypes.c_uint8.from_address(int(addrs[6])).value == 200
    assert ctypes.c_int32.from_address(int(addrs[7])).value == -3
    # each value at an address aligned to its size, inside the one buffer kept alive
    sizes = [8, 8, 4, 4, 8, 2, 1, 4]
    assert all(int(a) % s == 0 for a, s in zip(addrs, sizes))
    base = keep.ctypes.data
    assert all(base <= int(a) and int(a) + s <= base + keep.nbytes for a, s in zip(addrs, sizes))
    assert pack_arg(np.float16(2.0)).dtype == np.float16 and pack_arg(7).dtype == np.int32


@pytest.mark.parametrize("bad", [True, 1 << 31, "x", None])
def test_pack_arg_rejects_ambiguous_values(bad):
    with pytest.raises(LaunchError):
        pack_arg(bad)


# -- residency -------------------------------------------------------------------

def test_residency_classification():
    assert classify("w", 2, False, None) is None
    assert "host" in classify("w", 1, False, 0x1000)
    assert "managed" in classify("w", 2, True, None)
    assert "host address" in classify("w", 2, False, 0x1000)
    assert "not a CUDA allocation" in classify("w", None, False, None)


# -- batched decode inputs (backends/cuda/batch.py) ----------------------------------

def test_row_buckets():
    from orcd.backends.cuda.batch import bucket

    assert [bucket(n) for n in (1, 2, 3, 5, 16, 17, 40, 256, 257, 600)] == [1, 2, 4, 8, 16, 24, 48, 256, 512, 1024]


def test_a_decode_batch_pads_its_rows_into_the_spare_block():
    """3 sequences decoded as a bucket of 4 rows x 4 blocks: real rows keep their ids,
    positions and tables; the padding row decodes token 0 at position 0 of the spare
    block; every row reads its own table row."""
    from types import SimpleNamespace

    from orcd.backends.cuda.batch import BatchDecoder
    from orcd.backends.cuda.memory import to_host
    from orcd.cudasim import SimAllocator, SimDevice

    dev, alloc = SimDevice(), SimAllocator()
    dec = BatchDecoder(SimpleNamespace(device=dev, alloc=alloc, pipelined_rows=False, prefill_in_batch=False))
    pool = SimpleNamespace(k=[], v=[], spare=9)
    tables = np.array([[4, 2, 7, 1, 0], [3, 5, 0, 0, 0], [6, 8, 0, 0, 0]], np.int32)
    own = tables[[2, 0, 1]]                                     # rows name sequences 2, 0, 1
    view, (ids, pos) = dec._write_inputs(pool, 4, 4, own, [11, 12, 13], [100, 250, 70])
    assert view.batched and view.apart and view.n_ctx == 4 * 64   # distinct sequences: keys stored in-kernel
    folding = BatchDecoder(SimpleNamespace(device=dev, alloc=alloc, pipelined_rows=False, prefill_in_batch=True))
    assert not folding._write_inputs(pool, 4, 4, own, [11, 12, 13], [100, 250, 70])[0].apart   # a prompt's rows
    folding.close()
    assert to_host(dev, ids.ptr, 16).view(np.int32).tolist() == [11, 12, 13, 0]
    assert to_host(dev, pos.ptr, 16).view(np.int32).tolist() == [100, 250, 70, 0]
    assert to_host(dev, view.seq.ptr, 16).view(np.int32).tolist() == [0, 1, 2, 3]
    got = to_host(dev, view.tables.ptr, 64).view(np.int32).reshape(4, 4)
    np.testing.assert_array_equal(got, [[6, 8, 0, 0], [4, 2, 7, 1], [3, 5, 0, 0], [9, 9, 9, 9]])
    dec.close()
    assert alloc.usage().get("scratch", 0) == 0


def test_warming_runs_every_row_bucket_a_step_can_make_in_the_spare_block():
    """Before serving, one decode forward per rows bucket up to max_rows, each as
    wide as MIN_BLOCKS (the width of every step up to MIN_BLOCKS * 64 positions),
    every row at position 0 of the spare block: no sequence's KV is touched."""
    from types import SimpleNamespace

    from orcd.backends.cuda.batch import MIN_BLOCKS, BatchDecoder
    from orcd.backends.cuda.memory import to_host
    from orcd.cudasim import SimAllocator, SimDevice

    dev, alloc = SimDevice(), SimAllocator()
    seen = []

    class Model:
        def forward(self, ops, ids, pos, view, last_only):
            rows = ids.shape[0]
            seen.append((rows, view.n_ctx, ops.phase is Phase.ROWS,
                         set(to_host(dev, view.tables.ptr, 4 * rows * MIN_BLOCKS).view(np.int32)),
                         set(to_host(dev, pos.ptr, 4 * rows).view(np.int32))))
            return SimpleNamespace(rows=lambda a, b: SimpleNamespace(shape=(b - a, 7)))

    backend = SimpleNamespace(device=dev, alloc=alloc, graphs=False, pipelined_rows=False, prefill_in_batch=False,
                              ops=SimpleNamespace(phase=None), scratch=SimpleNamespace(reset=lambda: None))
    dec = BatchDecoder(backend)
    assert dec.n_logits is None
    assert dec.warm(Model(), SimpleNamespace(k=[], v=[], spare=9), max_rows=40) == 8
    assert [s[0] for s in seen] == [1, 2, 4, 8, 16, 24, 32, 48]
    assert all(s[1:] == (MIN_BLOCKS * 64, True, {9}, {0}) for s in seen)
    assert dec.n_logits == 7           # the width CudaBackend.warm_rows makes its samplers for
    dec.close()


def test_warm_tasks_capture_one_graph_each_and_skip_what_a_step_captured(monkeypatch):
    """warm_tasks: the one-row step first, one capture a task; a step that needs a
    graph before its task ran captures it (an eager forward, then the capture), and
    the task then only replays it."""
    from types import SimpleNamespace

    import orcd.backends.cuda.graph
    from orcd.backends.cuda.batch import BatchDecoder
    from orcd.cudasim import SimAllocator, SimDevice

    dev, alloc = SimDevice(), SimAllocator()
    forwards, captured = [], []

    class Model:
        def forward(self, ops, ids, pos, view, last_only):
            forwards.append(ids.shape[0])
            return SimpleNamespace(shape=(ids.shape[0], 7), rows=lambda a, b: SimpleNamespace(shape=(b - a, 7)))

    monkeypatch.setattr(orcd.backends.cuda.graph, "capture_like",
                        lambda device, forward, logits, what: captured.append(logits.shape[0]) or
                        SimpleNamespace(replay=lambda: forwards.append("replay"), close=lambda: None))
    backend = SimpleNamespace(device=dev, alloc=alloc, graphs=True, pipelined_rows=False, prefill=None,
                              prefill_in_batch=False,
                              prompt_last_in_batch=False, ops=SimpleNamespace(phase=None),
                              scratch=SimpleNamespace(reset=lambda: None))
    dec = BatchDecoder(backend)
    pool, model = SimpleNamespace(k=[], v=[], spare=9), Model()
    tasks = dec.warm_tasks(model, pool, max_rows=8)
    assert len(tasks) == 4
    tasks[0]()
    assert captured == [1] and dec.n_logits == 7
    tables = np.zeros((3, 8), np.int32)
    dec._decode(model, pool, tables, [0, 1, 2], [5, 6, 7], [3, 4, 5])     # a step of 3 rows: bucket 4
    assert forwards[-1] == 4 and captured == [1, 4]                       # eager, then captured
    for task in tasks[1:]:
        task()
    assert captured == [1, 4, 2, 8] and forwards[-1] == 8                 # bucket 4's task replayed
    assert forwards.count("replay") == 1
    dec.close()


def test_a_prefill_chunk_pads_first_at_the_positions_after_it():
    """A chunk of 5 tokens at position 100 replays as the 16-row bucket: 11 padding
    rows (token 0 at positions 105..115) come first, the chunk's tokens last, so
    its last token is the forward's last row; no bucket past 512 tokens."""
    from orcd.backends.cuda.prefill import BUCKETS, bucket, padded_inputs

    assert [bucket(n) for n in (2, 16, 17, 129, 512, 513)] == [16, 16, 32, 192, 512, None]
    assert list(BUCKETS) == sorted(BUCKETS)
    host = padded_inputs([7, 8, 9, 10, 11], 100, 16)
    ids, pos = host[:16].tolist(), host[16:].tolist()
    assert ids == [0] * 11 + [7, 8, 9, 10, 11]
    assert pos == list(range(105, 116)) + list(range(100, 105))


def test_a_prompt_chunk_replays_its_bucket_with_its_inputs_at_fixed_addresses(monkeypatch):
    """BatchDecoder._prompt writes the padded ids and positions, a zero seq and the
    sequence's table where its bucket's graph reads them; a wider table later takes
    a new buffer and drops that bucket's graphs (captured for the old addresses)."""
    from types import SimpleNamespace

    import orcd.backends.cuda.graph
    from orcd.backends.cuda.batch import BatchDecoder
    from orcd.backends.cuda.memory import to_host
    from orcd.cudasim import SimAllocator, SimDevice

    dev, alloc = SimDevice(), SimAllocator()
    seen = []

    class Model:
        def forward(self, ops, ids, pos, view, last_only):
            rows = ids.shape[0]
            width = view.tables.shape[1]
            seen.append((to_host(dev, ids.ptr, 4 * rows).view(np.int32).tolist(),
                         to_host(dev, pos.ptr, 4 * rows).view(np.int32).tolist(),
                         to_host(dev, view.seq.ptr, 4 * rows).view(np.int32).tolist(),
                         to_host(dev, view.tables.ptr, 4 * width).view(np.int32).tolist()))
            return SimpleNamespace(shape=(1, 7))

    monkeypatch.setattr(orcd.backends.cuda.graph, "capture_like", lambda device, forward, logits, what:
                        SimpleNamespace(replay=lambda: seen.append("replay"), close=lambda: None))
    backend = SimpleNamespace(device=dev, alloc=alloc, graphs=True, pipelined_rows=False, prefill=object(),
                              ops=None, scratch=SimpleNamespace(reset=lambda: None))
    dec, model, pool = BatchDecoder(backend), Model(), SimpleNamespace(k=[], v=[], spare=9)
    assert dec._prompt(model, pool, np.array([4, 2, 7], np.int32), [11, 12, 13], 64, 192) is not None
    ids, pos, seq, table = seen[0]
    assert ids == [0] * 13 + [11, 12, 13] and pos == list(range(67, 80)) + [64, 65, 66]
    assert seq == [0] * 16 and table == [4, 2, 7]
    dec._prompt(model, pool, np.array([4, 2, 7], np.int32), [5, 6], 0, 192)
    assert seen[-1] == "replay" and len(dec._graphs) == 1            # the same bucket's graph
    dec._prompt(model, pool, np.array([4, 2, 7, 1, 3], np.int32), [5, 6], 0, 320)
    assert seen[-1][3] == [4, 2, 7, 1, 3] and len(dec._graphs) == 1  # wider: a new buffer and graph
    dec.close()
    assert alloc.usage().get("scratch", 0) == 0


def test_a_prefill_chunk_that_fits_no_bucket_runs_eagerly():
    """PrefillGraphs.forward answers None (the caller's eager prefill) for one
    token, past the largest bucket, and where the padding would pass the cache."""
    from types import SimpleNamespace

    from orcd.backends.cuda.prefill import PrefillGraphs

    graphs = PrefillGraphs(SimpleNamespace())
    cache = SimpleNamespace(n_ctx=1024)
    assert graphs.forward(None, cache, [1], 0) is None
    assert graphs.forward(None, cache, list(range(600)), 0) is None
    assert graphs.forward(None, cache, list(range(100)), 1000) is None   # 1000 + 128 > 1024
