"""The GPU layer on a real device (pytest marker ``cuda``; skipped without a GPU).

Run on the GPU machine with ``scripts/gpu-test.sh`` (docs/gpu-testing.md).
Every comparison uses fresh random data, and outputs are poisoned first.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gpu_rig import upload
from orcd.errors import CudaError, InvalidRequest, VramOom

pytestmark = pytest.mark.cuda

KERNELS = r"""
extern "C" __global__ void add_scalar(float* x, float v, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += v;
}
extern "C" __global__ void scale(float* x, float s, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}
extern "C" __global__ void big_shared(float* x) {
    extern __shared__ float buf[];
    buf[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    x[threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}
"""


@pytest.fixture
def alloc(dev):
    """Overrides conftest's session allocator: these tests read the ledger and
    the device's free memory, so each gets an allocator of its own."""
    from orcd.backends.cuda.memory import DeviceAllocator

    a = DeviceAllocator(dev)
    yield a
    a.free_all()


@pytest.fixture(scope="module")
def module(dev, compiler):
    from orcd.backends.cuda.nvrtc import KernelSource

    return compiler.load(dev, KernelSource("runtime_test.cu", KERNELS))


def get(dev, buf, dtype, count):
    from orcd.backends.cuda.memory import to_host

    return to_host(dev, buf.ptr, count * np.dtype(dtype).itemsize).view(dtype)


# -- device ----------------------------------------------------------------------

def test_discovery(dev):
    from orcd.backends.cuda.device import device_count, list_devices

    assert device_count() >= 1
    info = list_devices()[dev.index]
    assert info == dev.info and info.name
    assert info.compute_capability >= (7, 0) and info.arch == "sm_%d%d" % info.compute_capability
    free, total = dev.mem_info()
    assert 0 < free <= total == info.total_bytes
    assert info.sm_count > 0 and info.l2_bytes > 0
    assert info.max_shared_per_block_optin >= info.max_shared_per_block > 0
    print(f"\n{info}")


def test_bad_device_id_names_the_devices(dev):
    from orcd.backends.cuda.device import CudaDevice, device_count

    for bad in (device_count(), -1, 99):
        with pytest.raises(InvalidRequest) as e:
            CudaDevice(bad)
        assert f"no CUDA device {bad}" in e.value.message
        assert dev.info.name in e.value.message and e.value.field == "gpu_device"


# -- memory ----------------------------------------------------------------------

def test_alloc_free_accounting(dev, alloc):
    free0, _ = dev.mem_info()
    big = alloc.alloc(256 << 20, "weights")
    small = alloc.alloc(1000, "kv_cache")
    assert big.ptr % 256 == 0 and small.ptr % 256 == 0
    assert alloc.usage()["weights"] == 256 << 20 and alloc.usage()["kv_cache"] == 1024
    assert dev.mem_info()[0] <= free0 - (256 << 20)
    data = np.random.default_rng().integers(0, 256, 1000, dtype=np.uint8)
    from orcd.backends.cuda.memory import from_host, to_host

    from_host(dev, data, small.ptr)
    assert np.array_equal(to_host(dev, small.ptr, 1000), data)
    alloc.free(big)
    alloc.free(small)
    assert alloc.ledger.total == 0
    assert dev.mem_info()[0] >= free0 - (8 << 20)


def test_budget_oom_leaves_the_worker_intact(dev):
    from orcd.backends.cuda.memory import DeviceAllocator, to_host

    alloc = DeviceAllocator(dev, budget=64 << 20)
    weights = np.random.default_rng().integers(0, 256, 16 << 20, dtype=np.uint8)
    w = upload(dev, alloc, weights, "weights")
    free_before = dev.mem_info()[0]
    with pytest.raises(VramOom) as e:
        with alloc.transaction() as tx:
            tx.alloc(32 << 20, "kv_cache")
            tx.alloc(32 << 20, "scratch")  # 16 + 32 + 32 > 64 MiB
    assert e.value.code == "VRAM_OOM" and e.value.retriable
    assert e.value.details["requested"] == 32 << 20 and e.value.details["available"] == 16 << 20
    usage = alloc.usage()
    assert (usage["weights"], usage["kv_cache"], usage["scratch"]) == (16 << 20, 0, 0)
    assert dev.mem_info()[0] >= free_before - (2 << 20)  # the partial kv_cache went back
    s = alloc.alloc(8 << 20, "scratch")  # the next request is served
    assert np.array_equal(to_host(dev, w.ptr, weights.nbytes), weights)
    alloc.free(s)
    alloc.free_all()


def test_driver_oom_is_vram_oom(dev, alloc):
    with pytest.raises(VramOom) as e:
        alloc.alloc(2 * dev.info.total_bytes, "kv_cache")
    assert e.value.details["requested"] == 2 * dev.info.total_bytes
    assert 0 < e.value.details["available"] <= dev.info.total_bytes
    assert alloc.ledger.total == 0
    alloc.free(alloc.alloc(1 << 20, "scratch"))  # the context is fine


# -- upload ----------------------------------------------------------------------

@pytest.mark.parametrize("copy_threads", [1, 4])
def test_chunked_upload_round_trip(dev, alloc, tmp_path, copy_threads):
    from orcd.backends.cuda.memory import fill_bytes, to_host
    from orcd.backends.cuda.upload import Milestones, Uploader

    rng = np.random.default_rng()
    sizes = [(3 << 20) + 123, 1 << 20, 77, (5 << 20) + 1]
    path = tmp_path / "blob.bin"
    path.write_bytes(rng.integers(0, 256, sum(sizes), dtype=np.uint8).tobytes())
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    offs = np.cumsum([0, *sizes])
    srcs = [mm[offs[i]:offs[i + 1]] for i in range(len(sizes))]
    bufs = [alloc.alloc(n, "weights") for n in sizes]
    for b in bufs:
        fill_bytes(dev, b.ptr, 0xA5, b.nbytes)
    fractions, percents = [], []
    milestones = Milestones(percents.append)
    with Uploader(dev, chunk_bytes=1 << 20, copy_threads=copy_threads) as up:
        total = up.upload_many([(s, b.ptr) for s, b in zip(srcs, bufs)],
                               lambda f: (fractions.append(f), milestones(f)))
    assert total == sum(sizes)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert len(fractions) >= 10 and percents == [0, 25, 50, 75, 100]
    for s, b in zip(srcs, bufs):
        assert np.array_equal(to_host(dev, b.ptr, b.nbytes), np.asarray(s))


@pytest.mark.parametrize("copy_threads", [1, 4])
def test_upload_with_the_planes_made_on_the_card(dev, alloc, compiler, copy_threads):
    # the backend's way (CudaBackend._upload): planar formats gathered by LayoutKernels
    # from device staging buffers, launched from every copy thread onto the one stream
    # (a launcher of its own: conftest's is session-wide, over the allocator this module replaces)
    from orcd.backends.cuda.launch import Launcher
    from orcd.backends.cuda.memory import to_host
    from orcd.backends.cuda.upload import Uploader, staging_slots
    from orcd.ops.layout import LayoutKernels
    from orcd.quant.builtin import builtin_table

    rng, table, chunk = np.random.default_rng(), builtin_table(), 1 << 20
    items, expect = [], []
    for name, rows, n in [("MXFP4", 2880, 2880), ("Q5_0", 700, 896), ("Q4_K", 300, 3072), ("Q6_K", 500, 4864)]:
        fmt = table.by_name[name]
        raw = fmt.random_blocks(rows * n // fmt.block_elems, rng, 0.05)
        buf = alloc.alloc(rows * fmt.vram_row_bytes(n), "weights")
        items.append((raw, buf.ptr, fmt, n))
        expect.append((buf, fmt.to_vram(raw, n)))
    n_slots = staging_slots(2, copy_threads)
    stage = alloc.alloc(n_slots * chunk, "scratch")
    repack = LayoutKernels(dev, compiler, Launcher(dev))
    with Uploader(dev, chunk_bytes=chunk, copy_threads=copy_threads, repack=repack,
                  device_staging=[stage.ptr + i * chunk for i in range(n_slots)]) as up:
        up.upload_many(items)
    for buf, want in expect:
        assert np.array_equal(to_host(dev, buf.ptr, buf.nbytes), want)
    alloc.free(stage)


# -- NVRTC -----------------------------------------------------------------------

def test_nvrtc_compile_and_disk_cache(dev, tmp_path):
    from orcd.backends.cuda.nvrtc import KernelCompiler, KernelSource

    src = KernelSource("cache_test.cu", KERNELS, {"unused.cuh": "#define UNUSED 1\n"})
    first = KernelCompiler(dev.info.arch, cache=tmp_path)
    cubin = first.cubin(src)
    assert (first.misses, first.hits) == (1, 0) and cubin[:4] == b"\x7fELF"
    files = list(tmp_path.glob(f"cache_test-{dev.info.arch}-*.cubin"))
    assert len(files) == 1
    second = KernelCompiler(dev.info.arch, cache=tmp_path)  # a fresh process would do the same
    assert second.cubin(src) == cubin and (second.misses, second.hits) == (0, 1)
    second.cubin(src, ["-DVARIANT=2"])
    assert second.misses == 1 and len(list(tmp_path.glob("*.cubin"))) == 2
    mod = second.load(dev, src)
    assert mod.function("scale").attrs.max_threads_per_block > 0


def test_nvrtc_error_shows_the_log(dev, tmp_path):
    from orcd.backends.cuda.nvrtc import KernelCompiler, KernelSource

    comp = KernelCompiler(dev.info.arch, cache=tmp_path)
    bad = KernelSource("broken.cu", 'extern "C" __global__ void f(float* x) { x[0] = no_such_name; }')
    with pytest.raises(CudaError) as e:
        comp.cubin(bad)
    assert "no_such_name" in e.value.message and "broken.cu" in e.value.message
    assert "no_such_name" in e.value.details["log"]
    assert not list(tmp_path.glob("*.cubin"))


def test_missing_kernel_is_a_clear_error(module):
    with pytest.raises(CudaError) as e:
        module.function("not_there")
    assert "not_there" in e.value.message


def test_toolkit_headers_compile(dev, tmp_path):
    from orcd.backends.cuda.nvrtc import KernelCompiler, KernelSource

    comp = KernelCompiler(dev.info.arch, cache=tmp_path, cuda_headers=True)
    src = KernelSource("half.cu", '#include <cuda_fp16.h>\n'
                       'extern "C" __global__ void h(__half* x) { x[0] = __float2half(1.5f); }')
    assert comp.cubin(src)[:4] == b"\x7fELF"


# -- launches --------------------------------------------------------------------

def test_launch_validation_errors_leave_the_context_usable(dev, alloc, module):
    from orcd.backends.cuda.launch import LaunchError, Launcher

    launch = Launcher(dev, debug=False)
    add = module.function("add_scalar")
    x = np.random.default_rng().standard_normal(1000).astype(np.float32)
    buf = upload(dev, alloc, x)
    for grid, block, shared in [((0,), (128,), 0), ((8,), (2048,), 0), ((1,), (32, 32, 2), 0),
                                ((8,), (128,), dev.info.max_shared_per_block_optin + 1)]:
        with pytest.raises(LaunchError):
            launch(add, grid, block, [buf, 1.0, x.size], shared=shared)
    with pytest.raises(LaunchError):
        launch(add, (8,), (128,), [buf, 1.0, True])
    launch(add, (8,), (128,), [buf, 2.5, x.size])
    np.testing.assert_array_equal(get(dev, buf, np.float32, x.size), x + np.float32(2.5))
    assert launch.launches == 1


def test_large_dynamic_shared_memory_opts_in(dev, alloc, module):
    from orcd.backends.cuda.launch import Launcher

    launch = Launcher(dev)
    n = 1024
    x = np.random.default_rng().standard_normal(n).astype(np.float32)
    buf = upload(dev, alloc, x)
    launch(module.function("big_shared"), 1, n, [buf], shared=100 << 10)  # > 48 KiB
    np.testing.assert_array_equal(get(dev, buf, np.float32, n), x[::-1])


def test_debug_mode_synchronises_after_each_launch(dev, alloc, module, monkeypatch):
    from orcd.backends.cuda.driver import cu
    from orcd.backends.cuda.launch import Launcher

    monkeypatch.setenv("ORCD_CUDA_DEBUG", "1")
    launch = Launcher(dev)
    assert launch.debug
    buf = upload(dev, alloc, np.zeros(1 << 20, np.float32) + 1)
    for _ in range(3):
        launch(module.function("scale"), 1 << 12, 256, [buf, 2.0, 1 << 20])
        cu("cuStreamQuery", dev.stream)  # raises CUDA_ERROR_NOT_READY unless the launch finished
    assert launch.debug_syncs == 3
    monkeypatch.setenv("ORCD_CUDA_DEBUG", "0")
    assert not Launcher(dev).debug


def test_debug_mode_reports_a_fault_at_its_kernel(tmp_path):
    # A trap poisons the context, so it runs in a child process.
    code = textwrap.dedent(f"""
        from orcd.backends.cuda.device import CudaDevice
        from orcd.backends.cuda.launch import Launcher
        from orcd.backends.cuda.nvrtc import KernelCompiler, KernelSource
        from orcd.errors import CudaError
        dev = CudaDevice(0)
        comp = KernelCompiler(dev.info.arch, cache={str(tmp_path)!r})
        mod = comp.load(dev, KernelSource("trap.cu", 'extern "C" __global__ void boom() {{ asm("trap;"); }}'))
        try:
            Launcher(dev, debug=True)(mod.function("boom"), 1, 32, [])
        except CudaError as e:
            print("CAUGHT", e.message)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "CAUGHT kernel boom" in out.stdout, out.stdout + out.stderr
    assert "CUDA_ERROR" in out.stdout


# -- graphs ----------------------------------------------------------------------

def test_captured_graph_replays_like_eager_launches(dev, alloc, module):
    from orcd.backends.cuda.graph import capture
    from orcd.backends.cuda.launch import Launcher

    launch = Launcher(dev, debug=True)  # debug must not sync inside a capture
    n = 4097
    x = np.random.default_rng().standard_normal(n).astype(np.float32)
    eager, graphed = upload(dev, alloc, x), upload(dev, alloc, x)

    def step(buf):
        launch(module.function("add_scalar"), (n + 255) // 256, 256, [buf, 1.25, n])
        launch(module.function("scale"), (n + 255) // 256, 256, [buf, -0.5, n])

    before = launch.debug_syncs
    with capture(dev, lambda: step(graphed)) as graph:
        assert launch.debug_syncs == before
        np.testing.assert_array_equal(get(dev, graphed, np.float32, n), x)  # captured, not run
        for _ in range(3):
            step(eager)
            graph.replay()
        dev.synchronize()
    np.testing.assert_array_equal(get(dev, graphed, np.float32, n), get(dev, eager, np.float32, n))
    assert not np.array_equal(get(dev, eager, np.float32, n), x)


# -- residency -------------------------------------------------------------------

def test_residency_passes_weights_and_flags_pinned_host(dev, alloc):
    from orcd.backends.cuda.driver import cu
    from orcd.backends.cuda.residency import check_pointers

    weights = [alloc.alloc(1 << 20, "weights") for _ in range(3)]
    named = [(f"w{i}", b.ptr) for i, b in enumerate(weights)]
    assert check_pointers(dev, named) == []
    host = int(cu("cuMemHostAlloc", 1 << 20, 0))
    try:
        problems = check_pointers(dev, [*named, ("pinned", host)])
        assert len(problems) == 1 and "pinned" in problems[0] and "host" in problems[0]
    finally:
        cu("cuMemFreeHost", host)


# -- GEMM ------------------------------------------------------------------------

def _bf16_bits(x):  # float32 -> bf16 bits (round to nearest even)
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _bf16_value(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("impl", ["nvmath", "simt"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("m,n,k", [(1, 256, 512), (64, 96, 128), (300, 1000, 768)])
def test_gemm_matches_numpy(dev, alloc, impl, dtype, m, n, k):
    from orcd.backends.cuda.blas import Gemm
    from orcd.backends.cuda.memory import fill_bytes

    rng = np.random.default_rng()
    a32, b32 = rng.standard_normal((m, k), np.float32), rng.standard_normal((n, k), np.float32)
    if dtype == "float16":
        a_bits, b_bits = a32.astype(np.float16).view(np.uint16), b32.astype(np.float16).view(np.uint16)
        a_val, b_val = a32.astype(np.float16).astype(np.float64), b32.astype(np.float16).astype(np.float64)
    else:
        a_bits, b_bits = _bf16_bits(a32), _bf16_bits(b32)
        a_val, b_val = _bf16_value(a_bits).astype(np.float64), _bf16_value(b_bits).astype(np.float64)
    A, B = upload(dev, alloc, a_bits), upload(dev, alloc, b_bits)
    C = alloc.alloc(m * n * 2, "scratch")
    fill_bytes(dev, C.ptr, 0xFF, m * n * 2)  # NaN in both fp16 and bf16
    gemm = Gemm(dev, impl=impl)
    for _ in range(2):  # the second call reuses the plan with reset operands
        gemm(A.ptr, B.ptr, C.ptr, m, n, k, dtype)
    dev.synchronize()
    bits = get(dev, C, np.uint16, m * n).reshape(m, n)
    out = bits.view(np.float16).astype(np.float64) if dtype == "float16" else _bf16_value(bits)
    ref = a_val @ b_val.T
    assert np.isfinite(out).all()
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel < 1e-2, f"{impl} {dtype} relative error {rel:.2e}"
    gemm.close()
