// The host side of orcd's CUDA simulator: what a kernel source needs to compile
// as plain C++ and run on the CPU, one CUDA thread per fiber (runtime.cpp).
//
// builtins.h holds the per-thread builtins (bit tricks, dp4a, halves); this file
// adds the execution model: thread and block indices, shared memory, barriers
// and the warp-collective operations. Every collective is a rendezvous of the
// lanes named in its mask, so a kernel whose lanes disagree (a missing lane, a
// divergent barrier) deadlocks here exactly where it would be undefined on the
// GPU -- and the simulator reports it instead of hanging.
#pragma once

namespace orcd_sim {
void fault(const char* what);   // the first fault of a launch fails it (runtime.cpp)
void global_only(const void* p);  // faults where p is in the launch's dynamic shared memory
}
#define ORCD_SIM_FAULT(msg) orcd_sim::fault(msg)
#define ORCD_SIM_GLOBAL_ONLY(p) orcd_sim::global_only(p)
#include "builtins.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#define __global__
#define __host__
#define __noinline__
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
// static: one copy per kernel instantiation, shared by the block's fibers (blocks run one at a time)
#define __shared__ static
#define __constant__ static const

struct dim3 {
    unsigned int x, y, z;
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) int4 { int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }

namespace orcd_sim {
struct Fiber;
extern dim3 block_idx, block_dim, grid_dim;
extern Fiber* current;
extern unsigned char* dynamic_shared;
const dim3& thread_idx();
int lane_id();
void sync_block();
// lanes of the current warp named in `mask` meet; each deposits `value` and gets the
// whole warp's deposits back in `all` (32 slots, lanes outside the mask untouched)
void warp_exchange(unsigned mask, uint64_t value, uint64_t* all);
}  // namespace orcd_sim

#define threadIdx (orcd_sim::thread_idx())
#define blockIdx (orcd_sim::block_idx)
#define blockDim (orcd_sim::block_dim)
#define gridDim (orcd_sim::grid_dim)
#define warpSize 32

inline void __syncthreads() { orcd_sim::sync_block(); }
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
    uint64_t all[32];
    orcd_sim::warp_exchange(mask, 0, all);
}

namespace orcd_sim {
template <class T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp operations move values of at most 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T>
inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}
// value of lane `src` (own value where src is outside 0..31 or not in the mask, as the GPU does)
template <class T>
inline T shfl_from(unsigned mask, T v, int src) {
    uint64_t all[32];
    warp_exchange(mask, to_bits(v), all);
    if (src < 0 || src > 31 || !((mask >> src) & 1u)) return v;
    return from_bits<T>(all[src]);
}
}  // namespace orcd_sim

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    const int lane = orcd_sim::lane_id();
    return orcd_sim::shfl_from(mask, v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lm, int width = 32) {
    const int lane = orcd_sim::lane_id(), src = lane ^ lm;
    return orcd_sim::shfl_from(mask, v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
    const int lane = orcd_sim::lane_id(), seg = lane & (width - 1);
    return orcd_sim::shfl_from(mask, v, seg >= (int)d ? lane - (int)d : lane);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
    const int lane = orcd_sim::lane_id(), seg = lane & (width - 1);
    return orcd_sim::shfl_from(mask, v, seg + (int)d < width ? lane + (int)d : lane);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    uint64_t all[32];
    orcd_sim::warp_exchange(mask, pred ? 1 : 0, all);
    unsigned r = 0;
    for (int l = 0; l < 32; ++l)
        if (((mask >> l) & 1u) && all[l]) r |= 1u << l;
    return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }
template <class T>
inline unsigned __match_any_sync(unsigned mask, T v) {
    uint64_t all[32];
    const uint64_t mine = orcd_sim::to_bits(v);
    orcd_sim::warp_exchange(mask, mine, all);
    unsigned r = 0;
    for (int l = 0; l < 32; ++l)
        if (((mask >> l) & 1u) && all[l] == mine) r |= 1u << l;
    return r;
}

// -- integer and float intrinsics ------------------------------------------------------
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : x > 1.f ? 1.f : x; }
inline int __float2int_rn(float x) { return (int)rintf(x); }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __int2float_rn(int i) { return (float)i; }

// CUDA's global min/max: one template for the integer types, fminf/fmaxf for floats
template <class T>
inline T min(T a, T b) { return a < b ? a : b; }
template <class T>
inline T max(T a, T b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// atomics: fibers of one block run one at a time and blocks one after another
template <class T>
inline T atomicAdd(T* p, T v) { const T old = *p; *p = old + v; return old; }
template <class T>
inline T atomicMax(T* p, T v) { const T old = *p; *p = old > v ? old : v; return old; }
template <class T>
inline T atomicMin(T* p, T v) { const T old = *p; *p = old < v ? old : v; return old; }
template <class T>
inline T atomicExch(T* p, T v) { const T old = *p; *p = v; return old; }
template <class T>
inline T atomicCAS(T* p, T cmp, T v) { const T old = *p; if (old == cmp) *p = v; return old; }
inline void __threadfence() {}
inline void __threadfence_block() {}

// -- cuda_fp16.h: __half and __half2 as bit patterns -----------------------------------
struct __half {
    unsigned short x;
};
struct alignas(4) __half2 {
    __half x, y;
};
inline __half __float2half_rn(float f) { return __half{f32_to_f16(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __half2float(__half h) { return f16_to_f32(h.x); }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float2half2_rn(float a) { return __floats2half2_rn(a, a); }
inline float2 __half22float2(__half2 h) { return make_float2(__half2float(h.x), __half2float(h.y)); }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }

// -- tensor cores: mma.sync.m16n8k16.row.col.f32.f16.f16.f32 as a warp collective ----
// Fragments as PTX lays them out (g = lane / 4, c = lane % 4; two halves per u32,
// the lower index in the low half): A 16x16 {(g, 2c), (g+8, 2c), (g, 8+2c), (g+8, 8+2c)},
// B 16x8 {(k 2c, n g), (k 8+2c, n g)}, C/D 16x8 {(g, 2c), (g+8, 2c)}.
namespace orcd_sim {
inline void mma_m16n8k16(float* c, const unsigned* a, const unsigned* b) {
    uint64_t a01[32], a23[32], bb[32];
    warp_exchange(0xFFFFFFFFu, a[0] | (uint64_t)a[1] << 32, a01);
    warp_exchange(0xFFFFFFFFu, a[2] | (uint64_t)a[3] << 32, a23);
    warp_exchange(0xFFFFFFFFu, b[0] | (uint64_t)b[1] << 32, bb);
    float A[16][16], B[16][8];
    auto lo = [](uint64_t v, int word) { return f16_to_f32((unsigned short)(v >> (32 * word))); };
    auto hi = [](uint64_t v, int word) { return f16_to_f32((unsigned short)(v >> (32 * word + 16))); };
    for (int l = 0; l < 32; ++l) {
        const int g = l / 4, k = 2 * (l % 4);
        A[g][k] = lo(a01[l], 0), A[g][k + 1] = hi(a01[l], 0);
        A[g + 8][k] = lo(a01[l], 1), A[g + 8][k + 1] = hi(a01[l], 1);
        A[g][8 + k] = lo(a23[l], 0), A[g][9 + k] = hi(a23[l], 0);
        A[g + 8][8 + k] = lo(a23[l], 1), A[g + 8][9 + k] = hi(a23[l], 1);
        B[k][g] = lo(bb[l], 0), B[k + 1][g] = hi(bb[l], 0);
        B[8 + k][g] = lo(bb[l], 1), B[9 + k][g] = hi(bb[l], 1);
    }
    const int g = lane_id() / 4, n = 2 * (lane_id() % 4);
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i / 2), col = n + i % 2;
        float s = c[i];
        for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
        c[i] = s;
    }
}

// mma.sync.m16n8k32.row.col.s32.s8.s8.s32 (k32) and m16n8k16 (k16), int8 operands as
// PTX lays them out (four int8 per u32, the lower index in the low byte): A 16xK
// {(g, 4c), (g+8, 4c), (g, 16+4c), (g+8, 16+4c)} (k16: the first two), B Kx8
// {(k 4c, n g), (k 16+4c, n g)} (k16: the first), C/D 16x8 as above, exact int32 sums.
template <int K>
inline void mma_s8(int* c, const unsigned* a, const unsigned* b) {
    uint64_t a01[32], a23[32], bb[32];
    warp_exchange(0xFFFFFFFFu, a[0] | (uint64_t)a[1] << 32, a01);
    warp_exchange(0xFFFFFFFFu, K == 32 ? (a[2] | (uint64_t)a[3] << 32) : 0, a23);
    warp_exchange(0xFFFFFFFFu, b[0] | (uint64_t)(K == 32 ? b[1] : 0) << 32, bb);
    int A[16][32], B[32][8];
    auto byte = [](uint64_t v, int word, int i) { return (int)(signed char)(v >> (32 * word + 8 * i)); };
    for (int l = 0; l < 32; ++l) {
        const int g = l / 4, k = 4 * (l % 4);
        for (int i = 0; i < 4; ++i) {
            A[g][k + i] = byte(a01[l], 0, i), A[g + 8][k + i] = byte(a01[l], 1, i);
            A[g][16 + k + i] = byte(a23[l], 0, i), A[g + 8][16 + k + i] = byte(a23[l], 1, i);
            B[k + i][g] = byte(bb[l], 0, i), B[16 + k + i][g] = byte(bb[l], 1, i);
        }
    }
    const int g = lane_id() / 4, n = 2 * (lane_id() % 4);
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i / 2), col = n + i % 2;
        int s = c[i];
        for (int k = 0; k < K; ++k) s += A[row][k] * B[k][col];
        c[i] = s;
    }
}
}  // namespace orcd_sim

// -- launching: a trampoline per kernel calls it with arguments from a void** array ---
namespace orcd_sim {
template <class... A, std::size_t... I>
inline void call(void (*fn)(A...), void** args, std::index_sequence<I...>) {
    fn(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}
template <class... A>
inline void invoke(void (*fn)(A...), void** args) {
    call(fn, args, std::index_sequence_for<A...>{});
}
}  // namespace orcd_sim
