// Host stand-ins for the per-thread CUDA builtins that core/orcd/quant/*.cuh use, so the
// format structs compile as plain C++ and can be checked against the numpy
// dequantizers on a machine without a GPU (tests/backend/test_kernel_formats_host.py).
//
// Each definition follows the device semantics, not a convenient host one:
// __byte_perm is PTX prmt's default mode, __dp4a works on signed byte lanes,
// and __ldg refuses a load the GPU would fault on (misaligned for its width).
#pragma once

#include <math.h>   // fabsf, fmaxf, rintf, ...: device math functions, same names on the host

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#define __device__
#define __forceinline__ inline

struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline int2 make_int2(int x, int y) { return {x, y}; }
inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// funnel shift right: the low 32 bits of (hi:lo) >> (shift & 31).
inline unsigned int __funnelshift_r(unsigned int lo, unsigned int hi, unsigned int shift) {
    const unsigned long long v = ((unsigned long long)hi << 32) | lo;
    return (unsigned int)(v >> (shift & 31));
}

// What a fault the GPU would take does here: abort, or (in the simulator, which
// defines it) record the fault and fail the launch once the block has run.
#ifndef ORCD_SIM_FAULT
#define ORCD_SIM_FAULT(msg) (std::fputs(msg, stderr), std::abort())
#endif

// A read-only load. memcpy keeps the host build free of aliasing assumptions;
// the checks keep it honest about what the GPU would accept: an aligned address, and
// (in the simulator) a global one -- ld.global.nc of a shared address faults on a card.
#ifndef ORCD_SIM_GLOBAL_ONLY
#define ORCD_SIM_GLOBAL_ONLY(p) ((void)0)
#endif
template <class T>
inline T __ldg(const T* p) {
    if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) ORCD_SIM_FAULT("misaligned read-only load\n");
    ORCD_SIM_GLOBAL_ONLY(p);
    T v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }

// IEEE single arithmetic rounded to nearest, each step on its own: what the _rn
// intrinsics promise on the GPU (the host build has -ffp-contract=off, x86-64 SSE
// evaluates float in float).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }

// CUDA's __byte_perm: byte i of the result is byte (s >> 4i) & 7 of the 8-byte
// value y:x (x = bytes 0..3). Only the low 3 bits of each selector nibble count
// (the CUDA math API's definition, which llama.cpp's table lookups rely on too);
// PTX prmt's sign-replicate mode is not what the intrinsic exposes.
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
    const uint64_t xy = (uint64_t)y << 32 | x;
    unsigned int r = 0;
    for (int i = 0; i < 4; ++i) {
        const unsigned int sel = (s >> (4 * i)) & 7u;
        r |= ((unsigned int)(xy >> (8 * sel)) & 0xFFu) << (8 * i);
    }
    return r;
}

// c + the dot of a and b as four signed 8-bit lanes.
inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; ++i) c += (int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
    return c;
}

// IEEE binary16 <-> float32 (round to nearest even, subnormals, inf; NaN stays
// a NaN), which simple.cuh takes from PTX cvt on the device.
inline float f16_to_f32(unsigned short h) {
    const unsigned int sign = (unsigned int)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0) {  // zero or subnormal: m * 2^-24, exact in float32
        const float f = (float)m * 0x1p-24f;
        return __uint_as_float(__float_as_uint(f) | sign);
    }
    if (e == 0x1F) return __uint_as_float(sign | 0x7F800000u | (m << 13));
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

inline unsigned short f32_to_f16(float f) {
    const unsigned int u = __float_as_uint(f), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (unsigned short)(sign | 0x7E00u);      // NaN
    if (a >= 0x477FF000u) return (unsigned short)(sign | 0x7C00u);     // >= 65520 rounds to inf
    if (a < 0x38800000u) {  // below 2^-14: adding 0.5 rounds |f| to a multiple of 2^-24 (RNE)
        const float r = __uint_as_float(a) + 0.5f;
        return (unsigned short)(sign | (__float_as_uint(r) - 0x3F000000u));
    }
    // normal: rebias the exponent and round the 13 dropped bits to nearest even
    const unsigned int odd = (a >> 13) & 1u;
    return (unsigned short)(sign | ((a + 0xC8000FFFu + odd) >> 13));
}

inline float bf16_to_f32(unsigned short h) { return __uint_as_float((unsigned int)h << 16); }

inline unsigned short f32_to_bf16(float f) {
    const unsigned int u = __float_as_uint(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)((u >> 16) | 0x40u);  // quiet NaN
    return (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
