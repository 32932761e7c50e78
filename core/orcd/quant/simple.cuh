// Device dequantizers for plain floats (F32, F16, BF16) and ggml's 32-value
// legacy quants (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0); layouts as in simple.py.
//
// Every format is a struct with the same shape, which the kernels in
// ops/matmul.cu are templated on:
//
//   QK     values per block            BYTES  bytes per block
//   PIECES pieces per block (one thread dequantizes one piece into registers)
//   RUNS x RUN values per piece: value v[r * RUN + i] sits at position
//          base(p) + r * STRIDE + i of the block (RUN is a multiple of 4, so
//          the matching activations load as float4)
//   load(block, p, v)   dequantize piece p of the block at `block` into v
//
// Integer formats (INT8 = true) also take activations quantized per 32 values
// (ops/matmul.cu's quantize_q8: x = xd[g] * xq[i], xq int8, rintf(x / xd) with
// xd = amax / 127) and dot a piece with them in integer math (dp4a):
//   dot8(block, p, xq, xd) = sum over piece p of value_i * x_i
// with xq the block's first 4 activations as one int (xq + blk * QK / 4) and
// xd its first 32-group's scale (xd + blk * QK / 32). Per value that is about
// a quarter of an instruction instead of an unpack, a convert and an fp32 FMA,
// and 1 byte of activation instead of 4.
//
// Loads are as wide as the block layout allows: 16 bytes for the plain floats
// (a "block" is 8 values), 4 bytes for Q4_1/Q5_1 (4-byte aligned blocks), 2
// bytes for Q4_0/Q5_0/Q8_0 (18/22/34-byte blocks are only 2-byte aligned).
// The float expressions follow ggml's order (d * q + m, d * (q - 8), ...).
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#ifdef __CUDACC__  // (a host build of these structs, for checking, brings its own)
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u16 h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
#endif

// Read-only loads of a given alignment.
__device__ __forceinline__ u16 ld16(const u8* p) { return __ldg((const unsigned short*)p); }
__device__ __forceinline__ u32 ld32(const u8* p) { return __ldg((const unsigned int*)p); }
__device__ __forceinline__ u32 ld32_a2(const u8* p) { return (u32)ld16(p) | ((u32)ld16(p + 2) << 16); }
// Four bytes at any address (MXFP4's 17-byte blocks): the two aligned words that
// hold them and one funnel shift, instead of four byte loads. The second word may
// reach up to 3 bytes past the last block; device allocations are whole pages.
__device__ __forceinline__ u32 ld32_a1(const u8* p) {
    const unsigned long long a = (unsigned long long)p;
    const u32* w = (const u32*)(a & ~3ull);
    return __funnelshift_r(__ldg(w), __ldg(w + 1), (u32)(a & 3) * 8);
}
__device__ __forceinline__ uint4 ld128(const u8* p) { return __ldg((const uint4*)p); }
__device__ __forceinline__ u32 byte_of(u32 w, int k) { return (w >> (8 * k)) & 0xFFu; }

// 2^23 + byte k of w, exactly, in one byte permute: small integers become floats
// without an int->float conversion; the kernels subtract 2^23 (+ the format's
// offset) in the same float add, which is exact for these ranges.
#define MAGIC 8388608.0f
__device__ __forceinline__ float byte_float(u32 w, int k) {
    return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540 + k));
}
#define LOW_NIBBLES(w) ((w) & 0x0F0F0F0Fu)
#define ONES 0x01010101

// Signed 8-bit dot of four byte lanes plus c (dp4a); a <= 127 per lane here.
__device__ __forceinline__ int dot4(u32 a, int b, int c) { return __dp4a((int)a, b, c); }
__device__ __forceinline__ int ldx(const int* __restrict__ xq, int i) { return __ldg(xq + i); }

// One group of 32 activations -> 8 ints of int8 (q = rint(v / d)) and the scale
// d = amax / 127 (q = 0 where d = 0): matmul.py's quantize_q8_ref, bit for bit.
__device__ __forceinline__ float quantize_group(const float* v, u32* q) {
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) amax = fmaxf(amax, fabsf(v[i]));
    const float d = amax / 127.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        u32 packed = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int qv = d > 0.f ? (int)rintf(v[4 * i + j] / d) : 0;
            packed |= ((u32)qv & 0xFFu) << (8 * j);
        }
        q[i] = packed;
    }
    return d;
}
#define HIGH_NIBBLES(w) (((w) >> 4) & 0x0F0F0F0Fu)

// sum_i v[i] * x[pos_i] over one dequantized piece v (RUNS x RUN values) and the
// fp32 activations at its positions: xt points at the piece's first position, in
// global memory (read-only loads) or, with SMEM, in shared memory.
template <class F, bool SMEM = false>
__device__ __forceinline__ float dot_piece(const float* v, const float* __restrict__ xt) {
    float s = 0.f;
#pragma unroll
    for (int r = 0; r < F::RUNS; ++r)
#pragma unroll
        for (int i = 0; i < F::RUN; i += 4) {
            const float4* p4 = (const float4*)(xt + r * F::STRIDE + i);
            const float4 xv = SMEM ? *p4 : __ldg(p4);
            const float* vv = v + r * F::RUN + i;
            s = fmaf(vv[0], xv.x, s);
            s = fmaf(vv[1], xv.y, s);
            s = fmaf(vv[2], xv.z, s);
            s = fmaf(vv[3], xv.w, s);
        }
    return s;
}

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
