// Device dequantizer for MXFP4 (GGML type 39); block as in mxfp4.py, format
// struct shaped as described in base.cuh.
//
// A GGUF block is [e uint8][qs 16], 17 bytes, so GGUF rows are only byte
// aligned; in VRAM a row is planar: its qs plane (16 bytes a block, one 16-byte
// load per block) then its e plane (a byte a block). One piece is one block:
// values 0..15 from the low nibbles, 16..31 from the high. x = kvalue[q] *
// 2^(e - 128) with the E2M1 values doubled (0 1 2 3 4 6 8 12) and bit 3 of the
// nibble the sign.
#pragma once
#include "base.cuh"

// GGML_E8M0_TO_FP32_HALF: e < 2 gives the float32 subnormals 2^-128, 2^-127.
__device__ __forceinline__ float e8m0_half(u32 e) {
    return __uint_as_float(e < 2 ? (0x00200000u << e) : ((e - 1) << 23));
}

// Four E2M1 codes (bits 0..3 of bytes 0..3 of n4) times d. The doubled
// magnitudes of codes 0..7 (0 1 2 3 4 6 8 12) are a byte table in two words:
// one byte permute looks all four up; bit 3 of a code is the sign.
__device__ __forceinline__ void e2m1x4(u32 n4, float d, float* v) {
    const u32 idx = n4 & 0x07070707u;
    const u32 t = idx | (idx >> 4);                       // codes packed a nibble each
    const u32 mags = __byte_perm(0x03020100u, 0x0C080604u, (t & 0xFFu) | ((t >> 8) & 0xFF00u));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const u32 sign = (n4 << (28 - 8 * i)) & 0x80000000u;
        v[i] = __uint_as_float(__float_as_uint(byte_float(mags, i) - MAGIC) ^ sign) * d;
    }
}

// The eight E2M1 codes of one qs word as signed bytes of the doubled values:
// .x = the low nibbles' (values 4w..4w+3), .y = the high nibbles' (16+4w..).
// A 16-entry table in four words, looked up with __byte_perm's 3-bit indices:
// the low and high halves of the table, then bit 3 of each code picks between
// them, then the bytes are put in value order (three permutes per four codes
// instead of a mask-and-negate per code).
__device__ __forceinline__ int2 e2m1x8_i8(u32 q4) {
    const u32 T0 = 0x03020100u, T1 = 0x0C080604u;   //  0  1  2  3  4  6  8  12
    const u32 T2 = 0xFDFEFF00u, T3 = 0xF4F8FAFCu;   // -0 -1 -2 -3 -4 -6 -8 -12
    const u32 pick = 0x32103210u | ((q4 & 0x88888888u) >> 1);
    u32 t[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const u32 s = q4 >> (16 * i);
        t[i] = __byte_perm(__byte_perm(T0, T1, s), __byte_perm(T2, T3, s), pick >> (16 * i));
    }
    return make_int2((int)__byte_perm(t[0], t[1], 0x6420), (int)__byte_perm(t[0], t[1], 0x7531));
}

struct FmtMXFP4 {  // planes: qs [16], e [1]
    static constexpr bool INT8 = true;
    static constexpr int QK = 32, BYTES = 17, PIECES = 1, RUNS = 2, RUN = 16, STRIDE = 16;
    __device__ static int base(int) { return 0; }
    __device__ static float scale(const u8* row, int nb, int b) { return e8m0_half(__ldg(row + 16 * nb + b)); }
    struct Piece8 {   // the doubled values as signed bytes: lo[w] values 4w.., hi[w] 16 + 4w..
        int2 v[4];
        float d;
    };
    __device__ static Piece8 unpack8(const u8* row, int nb, int b, int) {
        const uint4 q4 = ld128(row + 16 * b);
        return {{e2m1x8_i8(q4.x), e2m1x8_i8(q4.y), e2m1x8_i8(q4.z), e2m1x8_i8(q4.w)}, scale(row, nb, b)};
    }
    __device__ static float dot8(const Piece8& k, int, const int* __restrict__ xq, const float* __restrict__ xd) {
        int x[8];
        x_words(xq, x);
        int s = 0;
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            s = dot4((u32)k.v[w].x, x[w], s);
            s = dot4((u32)k.v[w].y, x[4 + w], s);
        }
        return k.d * (ldxd(xd) * (float)s);  // not d * xd first: e < 3 makes it subnormal
    }
    ORCD_DOT8_FROM_PIECE
    __device__ static void load(const u8* row, int nb, int b, int, float* v) {
        const float d = scale(row, nb, b);
        const uint4 q4 = ld128(row + 16 * b);
        const u32 qs[4] = {q4.x, q4.y, q4.z, q4.w};
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            e2m1x4(LOW_NIBBLES(qs[w]), d, v + 4 * w);
            e2m1x4(HIGH_NIBBLES(qs[w]), d, v + 16 + 4 * w);
        }
    }
};
