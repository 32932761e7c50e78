"""The CUDA simulator itself (orcd.cudasim): that it runs kernels as a GPU would
where the project's kernels rely on it, and that it reports what a GPU would
get wrong (a divergent barrier, a misaligned load, a write past a buffer)
instead of passing or hanging.

The project's own kernels run on it in tests/cuda (the tests marked ``sim``).
"""

from __future__ import annotations

import numpy as np
import pytest

from orcd import cudasim
from orcd.backends.cuda.launch import LaunchError
from orcd.backends.cuda.nvrtc import KernelSource

pytestmark = pytest.mark.skipif(not cudasim.available(), reason="no C++ compiler for the CUDA simulator")

SOURCE = r"""
#include <cuda_fp16.h>
typedef unsigned int u32;

// out[i] = the warp-collective results a reduction, a scan and a vote need
extern "C" __global__ void collectives(const float* __restrict__ x, float* out, int* votes, int* lanes) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x & 31;
    float v = x[i];
    float s = v;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, o);
    float up = __shfl_up_sync(0xFFFFFFFFu, v, 1);
    float down = __shfl_down_sync(0xFFFFFFFFu, v, 3);
    float bcast = __shfl_sync(0xFFFFFFFFu, v, 5);
    const unsigned ballot = __ballot_sync(0xFFFFFFFFu, v > 0.f);
    out[4 * i] = s;
    out[4 * i + 1] = up;
    out[4 * i + 2] = down;
    out[4 * i + 3] = bcast;
    votes[i] = (int)ballot;
    lanes[i] = lane;
}

// block-wide sum through shared memory: two barriers
extern "C" __global__ void block_sum(const float* x, float* out, int n) {
    __shared__ float part[32];
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += x[blockIdx.x * n + i];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.f;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += part[w];
        out[blockIdx.x] = t;
    }
}

// dynamic shared memory, reversed through it
extern "C" __global__ void reverse(const int* x, int* out) {
    extern __shared__ int buf[];
    buf[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

// thread 0 waits at the block barrier while its warp waits for it at a shuffle:
// a hang on a GPU, a deadlock report here
extern "C" __global__ void divergent_barrier(int* out) {
    if (threadIdx.x == 0) __syncthreads();
    out[threadIdx.x] = (int)__shfl_xor_sync(0xFFFFFFFFu, 1.f, 1);
}

// a 16-byte load from an address that is only 4-byte aligned
extern "C" __global__ void misaligned(const float* x, float* out) {
    const float4 v = __ldg((const float4*)(x + 1));
    out[0] = v.x;
}

// one element too many
extern "C" __global__ void overflow(int* out, int n) {
    if (threadIdx.x <= n) out[threadIdx.x] = 7;
}

typedef unsigned short u16;
// one warp: D = A (16x16) B (16x8) + C with the fragments PTX gives each lane
extern "C" __global__ void mma(const u16* a, const u16* b, float* d) {
    const int lane = threadIdx.x, g = lane / 4, c = 2 * (lane % 4);
    auto pair = [](const u16* p) { return (u32)p[0] | ((u32)p[1] << 16); };
    u32 fa[4] = {pair(a + g * 16 + c), pair(a + (g + 8) * 16 + c), pair(a + g * 16 + 8 + c),
                 pair(a + (g + 8) * 16 + 8 + c)};
    u16 b0[2] = {b[c * 8 + g], b[(c + 1) * 8 + g]}, b1[2] = {b[(8 + c) * 8 + g], b[(9 + c) * 8 + g]};
    u32 fb[2] = {pair(b0), pair(b1)};
    float acc[4] = {1.f, 1.f, 1.f, 1.f};
    orcd_sim::mma_m16n8k16(acc, fa, fb);
    d[g * 8 + c] = acc[0];
    d[g * 8 + c + 1] = acc[1];
    d[(g + 8) * 8 + c] = acc[2];
    d[(g + 8) * 8 + c + 1] = acc[3];
}
"""


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return cudasim.Simulator(cache=tmp_path_factory.mktemp("sim"))


@pytest.fixture(scope="module")
def mod(sim):
    return sim.compiler.load(sim.device, KernelSource("probe.cu", SOURCE))


def test_warp_collectives_as_on_a_gpu(sim, mod):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(64).astype(np.float32)
    out, votes, lanes = sim.empty((64, 4)), sim.empty(64, np.int32), sim.empty(64, np.int32)
    sim.launcher(mod.function("collectives"), 1, 64, [np.uint64(sim.put(x).ptr), np.uint64(out.ptr),
                                                      np.uint64(votes.ptr), np.uint64(lanes.ptr)])
    got = sim.get(out)
    for w in range(2):
        xw = x[32 * w:32 * w + 32]
        gw = got[32 * w:32 * w + 32]
        np.testing.assert_allclose(gw[:, 0], xw.sum(), rtol=1e-5)
        np.testing.assert_array_equal(gw[:, 1], np.concatenate([xw[:1], xw[:-1]]))     # lane 0 keeps its own
        np.testing.assert_array_equal(gw[:, 2], np.concatenate([xw[3:], xw[-3:]]))
        np.testing.assert_array_equal(gw[:, 3], np.full(32, xw[5]))
        want = sum(1 << i for i in range(32) if xw[i] > 0)
        assert np.all(sim.get(votes)[32 * w:32 * w + 32].view(np.uint32) == want)
    np.testing.assert_array_equal(sim.get(lanes), np.arange(64) % 32)


def test_block_barrier_and_grid(sim, mod):
    x = np.random.default_rng(1).standard_normal((5, 1000)).astype(np.float32)
    out = sim.empty(5)
    sim.launcher(mod.function("block_sum"), 5, 256, [np.uint64(sim.put(x).ptr), np.uint64(out.ptr), 1000])
    np.testing.assert_allclose(sim.get(out), x.sum(axis=1), rtol=1e-4)


def test_dynamic_shared_memory(sim, mod):
    x = np.arange(96, dtype=np.int32)
    out = sim.empty(96, np.int32)
    sim.launcher(mod.function("reverse"), 1, 96, [np.uint64(sim.put(x).ptr), np.uint64(out.ptr)], shared=4 * 96)
    np.testing.assert_array_equal(sim.get(out), x[::-1])


def test_divergent_barrier_is_reported_as_a_deadlock(sim, mod):
    with pytest.raises(LaunchError, match="deadlock"):
        sim.launcher(mod.function("divergent_barrier"), 1, 64, [np.uint64(sim.empty(64, np.int32).ptr)])


def test_misaligned_vector_load_fails_the_launch(sim, mod):
    x = sim.put(np.zeros(16, np.float32))
    with pytest.raises(LaunchError, match="misaligned"):
        sim.launcher(mod.function("misaligned"), 1, 1, [np.uint64(x.ptr), np.uint64(sim.empty(1).ptr)])


def test_write_past_a_buffer_fails_the_launch(sim, mod):
    out = sim.empty(32, np.int32)
    sim.launcher(mod.function("overflow"), 1, 64, [np.uint64(out.ptr), 31])   # writes 0..31: fine
    with pytest.raises(LaunchError, match="past the end"):
        sim.launcher(mod.function("overflow"), 1, 64, [np.uint64(out.ptr), 32])


def test_mma_stand_in_multiplies(sim, mod):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((16, 16)).astype(np.float16)
    b = rng.standard_normal((16, 8)).astype(np.float16)
    d = sim.empty((16, 8))
    sim.launcher(mod.function("mma"), 1, 32, [np.uint64(sim.put(a.view(np.uint16)).ptr),
                                              np.uint64(sim.put(b.view(np.uint16)).ptr), np.uint64(d.ptr)])
    np.testing.assert_allclose(sim.get(d), a.astype(np.float64) @ b + 1.0, rtol=1e-5, atol=1e-5)


def test_unknown_kernel_and_bad_launch_are_clear(sim, mod):
    with pytest.raises(LaunchError, match="not found"):
        mod.function("nope")
    with pytest.raises(LaunchError, match="block"):
        sim.launcher(mod.function("reverse"), 1, 2048, [np.uint64(0), np.uint64(0)])


def test_builds_are_cached_by_content(sim, tmp_path):
    c = cudasim.SimCompiler(cache=tmp_path)
    src = KernelSource("k.cu", 'extern "C" __global__ void k(int* o) { o[0] = 3; }')
    c.load(sim.device, src)
    c.load(sim.device, src)
    c.load(sim.device, KernelSource("k.cu", src.source.replace("3", "4")))
    assert c.builds == 2
