// Device dequantizers for plain floats (F32, F16, BF16) and ggml's 32-value
// legacy quants (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0); layouts as in simple.py, the
// struct shape as described in base.cuh.
#pragma once
#include "base.cuh"

// -- plain floats: a "block" is 8 consecutive values, one piece -------------------

struct FmtF32 {
    static constexpr bool INT8 = false;
    static constexpr int QK = 8, BYTES = 32, PIECES = 1, RUNS = 1, RUN = 8, STRIDE = 0;
    __device__ static int base(int) { return 0; }
    __device__ static void load(const u8* b, int, float* v) {
        uint4 a = ld128(b), c = ld128(b + 16);
        u32 w[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = __uint_as_float(w[i]);
    }
};

template <bool BF16>
struct FmtHalf {
    static constexpr bool INT8 = false;
    static constexpr int QK = 8, BYTES = 16, PIECES = 1, RUNS = 1, RUN = 8, STRIDE = 0;
    __device__ static int base(int) { return 0; }
    __device__ static void load(const u8* b, int, float* v) {
        uint4 a = ld128(b);
        u32 w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            u16 lo = (u16)(w[i] & 0xFFFFu), hi = (u16)(w[i] >> 16);
            v[2 * i] = BF16 ? bf16_to_f32(lo) : f16_to_f32(lo);
            v[2 * i + 1] = BF16 ? bf16_to_f32(hi) : f16_to_f32(hi);
        }
    }
};
typedef FmtHalf<false> FmtF16;
typedef FmtHalf<true> FmtBF16;

// -- legacy quants: piece p = qs bytes 4p..4p+3, i.e. values 4p..4p+3 (low
// nibbles) and 16+4p..16+4p+3 (high nibbles); Q8_0's piece is 8 int8 values.

// Four fifth bits (bit 0..3 of b) moved to bit 4 of bytes 0..3.
__device__ __forceinline__ u32 spread_bits4(u32 b) {
    return ((b & 1u) | ((b & 2u) << 7) | ((b & 4u) << 14) | ((b & 8u) << 21)) << 4;
}

// The 8 values of a legacy piece as 2^23 + q: q[i] from low nibbles, q[4 + i] high.
// qh (optional, Q5_*): bit j is the fifth bit of value j.
template <bool FIFTH>
__device__ __forceinline__ void piece_quants(u32 qs, u32 qh, int p, float* f) {
    u32 lo = LOW_NIBBLES(qs), hi = HIGH_NIBBLES(qs);
    if (FIFTH) {
        lo |= spread_bits4((qh >> (4 * p)) & 0xFu);
        hi |= spread_bits4((qh >> (16 + 4 * p)) & 0xFu);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[i] = byte_float(lo, i);
        f[4 + i] = byte_float(hi, i);
    }
}

// Integer sums of a legacy piece: (sum q * xq, sum xq) over its 8 values, q from
// the low/high nibbles of qs (+ fifth bits from qh when FIFTH).
template <bool FIFTH>
__device__ __forceinline__ int2 piece_dot8(u32 qs, u32 qh, int p, const int* __restrict__ xq) {
    u32 lo = LOW_NIBBLES(qs), hi = HIGH_NIBBLES(qs);
    if (FIFTH) {
        lo |= spread_bits4((qh >> (4 * p)) & 0xFu);
        hi |= spread_bits4((qh >> (16 + 4 * p)) & 0xFu);
    }
    const int x0 = ldx(xq, p), x1 = ldx(xq, 4 + p);
    return make_int2(dot4(hi, x1, dot4(lo, x0, 0)), dot4(ONES, x1, dot4(ONES, x0, 0)));
}

struct FmtQ4_0 {  // [d f16][qs 16]: x = d * (q - 8)
    static constexpr bool INT8 = true;
    static constexpr int QK = 32, BYTES = 18, PIECES = 4, RUNS = 2, RUN = 4, STRIDE = 16;
    __device__ static float dot8(const u8* b, int p, const int* __restrict__ xq, const float* __restrict__ xd) {
        const int2 s = piece_dot8<false>(ld32_a2(b + 2 + 4 * p), 0, p, xq);
        return f16_to_f32(ld16(b)) * __ldg(xd) * (float)(s.x - 8 * s.y);
    }
    __device__ static int base(int p) { return 4 * p; }
    __device__ static void load(const u8* b, int p, float* v) {
        const float d = f16_to_f32(ld16(b));
        float f[8];
        piece_quants<false>(ld32_a2(b + 2 + 4 * p), 0, p, f);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = d * (f[i] - (MAGIC + 8.0f));
    }
};

struct FmtQ4_1 {  // [d f16][m f16][qs 16]: x = d * q + m
    static constexpr bool INT8 = true;
    static constexpr int QK = 32, BYTES = 20, PIECES = 4, RUNS = 2, RUN = 4, STRIDE = 16;
    __device__ static float dot8(const u8* b, int p, const int* __restrict__ xq, const float* __restrict__ xd) {
        const u32 dm = ld32(b);
        const int2 s = piece_dot8<false>(ld32(b + 4 + 4 * p), 0, p, xq);
        return __ldg(xd) * (f16_to_f32((u16)(dm & 0xFFFFu)) * (float)s.x + f16_to_f32((u16)(dm >> 16)) * (float)s.y);
    }
    __device__ static int base(int p) { return 4 * p; }
    __device__ static void load(const u8* b, int p, float* v) {
        const u32 dm = ld32(b);
        const float d = f16_to_f32((u16)(dm & 0xFFFFu)), m = f16_to_f32((u16)(dm >> 16));
        float f[8];
        piece_quants<false>(ld32(b + 4 + 4 * p), 0, p, f);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = d * (f[i] - MAGIC) + m;
    }
};

struct FmtQ5_0 {  // [d f16][qh 4][qs 16]: x = d * (q - 16)
    static constexpr bool INT8 = true;
    static constexpr int QK = 32, BYTES = 22, PIECES = 4, RUNS = 2, RUN = 4, STRIDE = 16;
    __device__ static float dot8(const u8* b, int p, const int* __restrict__ xq, const float* __restrict__ xd) {
        const int2 s = piece_dot8<true>(ld32_a2(b + 6 + 4 * p), ld32_a2(b + 2), p, xq);
        return f16_to_f32(ld16(b)) * __ldg(xd) * (float)(s.x - 16 * s.y);
    }
    __device__ static int base(int p) { return 4 * p; }
    __device__ static void load(const u8* b, int p, float* v) {
        const float d = f16_to_f32(ld16(b));
        float f[8];
        piece_quants<true>(ld32_a2(b + 6 + 4 * p), ld32_a2(b + 2), p, f);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = d * (f[i] - (MAGIC + 16.0f));
    }
};

struct FmtQ5_1 {  // [d f16][m f16][qh 4][qs 16]: x = d * q + m
    static constexpr bool INT8 = true;
    static constexpr int QK = 32, BYTES = 24, PIECES = 4, RUNS = 2, RUN = 4, STRIDE = 16;
    __device__ static float dot8(const u8* b, int p, const int* __restrict__ xq, const float* __restrict__ xd) {
        const u32 dm = ld32(b);
        const int2 s = piece_dot8<true>(ld32(b + 8 + 4 * p), ld32(b + 4), p, xq);
        return __ldg(xd) * (f16_to_f32((u16)(dm & 0xFFFFu)) * (float)s.x + f16_to_f32((u16)(dm >> 16)) * (float)s.y);
    }
    __device__ static int base(int p) { return 4 * p; }
    __device__ static void load(const u8* b, int p, float* v) {
        const u32 dm = ld32(b);
        const float d = f16_to_f32((u16)(dm & 0xFFFFu)), m = f16_to_f32((u16)(dm >> 16));
        float f[8];
        piece_quants<true>(ld32(b + 8 + 4 * p), ld32(b + 4), p, f);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = d * (f[i] - MAGIC) + m;
    }
};

struct FmtQ8_0 {  // [d f16][qs int8 x 32]: x = d * q; piece p = values 8p..8p+7
    static constexpr bool INT8 = true;
    static constexpr int QK = 32, BYTES = 34, PIECES = 4, RUNS = 1, RUN = 8, STRIDE = 0;
    __device__ static float dot8(const u8* b, int p, const int* __restrict__ xq, const float* __restrict__ xd) {
        const u8* qs = b + 2 + 8 * p;
        const int s = dot4(ld32_a2(qs + 4), ldx(xq, 2 * p + 1), dot4(ld32_a2(qs), ldx(xq, 2 * p), 0));
        return f16_to_f32(ld16(b)) * __ldg(xd) * (float)s;
    }
    __device__ static int base(int p) { return 8 * p; }
    __device__ static void load(const u8* b, int p, float* v) {
        const float d = f16_to_f32(ld16(b));
        const u8* qs = b + 2 + 8 * p;
        // int8 q: byte ^ 0x80 = q + 128, so 2^23 + 128 + q
        const u32 w[2] = {ld32_a2(qs) ^ 0x80808080u, ld32_a2(qs + 4) ^ 0x80808080u};
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = (byte_float(w[i / 4], i % 4) - (MAGIC + 128.0f)) * d;
    }
};
