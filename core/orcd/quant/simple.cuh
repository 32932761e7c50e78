// Device dequantizers for plain floats (F32, F16, BF16) and ggml's 32-value
// legacy quants (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0); layouts as in simple.py, the
// struct shape as described in base.cuh.
#pragma once
#include "base.cuh"

// -- plain floats: a "block" is 8 consecutive values, one piece; rows as stored ----

struct FmtF32 {
    static constexpr bool INT8 = false;
    static constexpr int QK = 8, BYTES = 32, PIECES = 1, RUNS = 1, RUN = 8, STRIDE = 0;
    __device__ static int base(int) { return 0; }
    __device__ static void load(const u8* row, int, int b, int, float* v) {
        const u8* p = row + BYTES * b;
        uint4 a = ld128(p), c = ld128(p + 16);
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
    __device__ static void load(const u8* row, int, int b, int, float* v) {
        uint4 a = ld128(row + BYTES * b);
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

// -- ggml's 32-value quants, planar in VRAM: a row is its qs plane (16 bytes a block;
// Q8_0: 32), then Q5_*'s qh plane (4 bytes a block), then the d (or d, m) plane. One
// piece is one block: value i < 16 is the low nibble of qs byte i, 16 + i its high
// nibble (RUNS 2 x RUN 16); a lane reads its quants with one 16-byte load.

// Four fifth bits (bit 0..3 of b, b < 16) moved to bit 4 of bytes 0..3: one multiply
// puts copies of b at bits 4, 11, 18 and 25 (no two set bits meet, so no carries), and
// the mask keeps bit k of the copy at 4 + 7k, i.e. bit 4 of byte k -- a multiply and a
// mask where shifting each bit into place took ~9 instructions (Q5_0's eight words a
// block: 157 -> 108 SASS instructions a block in the one-row dp4a GEMV, sm_90).
__device__ __forceinline__ u32 spread_bits4(u32 b) {
    return (b * 0x02040810u) & 0x10101010u;
}

// A block's 32 quants, a byte each: lo[w] = values 4w..4w+3, hi[w] = 16+4w..16+4w+3,
// with the fifth bits of qh (bit j: value j) when FIFTH.
struct Nibbles {
    u32 lo[4], hi[4];
};

template <bool FIFTH>
__device__ __forceinline__ Nibbles nibbles(uint4 qs4, u32 qh) {
    const u32 qs[4] = {qs4.x, qs4.y, qs4.z, qs4.w};
    Nibbles n;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        n.lo[w] = LOW_NIBBLES(qs[w]);
        n.hi[w] = HIGH_NIBBLES(qs[w]);
        if (FIFTH) {
            n.lo[w] |= spread_bits4((qh >> (4 * w)) & 0xFu);
            n.hi[w] |= spread_bits4((qh >> (16 + 4 * w)) & 0xFu);
        }
    }
    return n;
}

// The block's quants as signed bytes q - off (off4: off in every byte), for the
// formats whose values are d * (q - off): their dot needs no sum of the activations.
__device__ __forceinline__ Nibbles minus_nibbles(Nibbles n, u32 off4) {
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        n.lo[w] = minus_bytes(n.lo[w], off4);
        n.hi[w] = minus_bytes(n.hi[w], off4);
    }
    return n;
}

// (sum q * xq, and with SUM sum xq, else 0) over the block's 32 values.
template <bool SUM>
__device__ __forceinline__ int2 nibbles_dot8(const Nibbles& n, const int* __restrict__ xq) {
    int x[8];
    x_words(xq, x);
    int s = 0, sx = 0;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        s = dot4(n.lo[w], x[w], s);
        s = dot4(n.hi[w], x[4 + w], s);
        if (SUM) {
            sx = dot4(ONES, x[w], sx);
            sx = dot4(ONES, x[4 + w], sx);
        }
    }
    return make_int2(s, sx);
}

// A 32-value block as its int8 dot reads it (base.cuh's Piece8): quants and d (, m).
struct NibblePiece {
    Nibbles n;
    float d, m;
};

// The dots of a NibblePiece with 32 int8 activations xq (scale xd): d * (q - off)
// formats (their quants already signed, minus_nibbles) and d * q + m ones.
__device__ __forceinline__ float signed_dot8(const NibblePiece& k, const int* __restrict__ xq,
                                             const float* __restrict__ xd) {
    return k.d * ldxd(xd) * (float)nibbles_dot8<false>(k.n, xq).x;
}
__device__ __forceinline__ float affine_dot8(const NibblePiece& k, const int* __restrict__ xq,
                                             const float* __restrict__ xd) {
    const int2 s = nibbles_dot8<true>(k.n, xq);
    return ldxd(xd) * (k.d * (float)s.x + k.m * (float)s.y);
}

// v[i] = value(2^23 + q_i) for the block's 32 values, in position order.
template <class Value>
__device__ __forceinline__ void nibbles_load(const Nibbles& n, float* v, Value value) {
#pragma unroll
    for (int w = 0; w < 4; ++w)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[4 * w + i] = value(byte_float(n.lo[w], i));
            v[16 + 4 * w + i] = value(byte_float(n.hi[w], i));
        }
}

// Planes of a row of nb blocks: qs (16 a block) at 0, then for Q5_* qh (4 a block),
// then the scales.
__device__ __forceinline__ uint4 qs16(const u8* row, int b) { return ld128(row + 16 * b); }
__device__ __forceinline__ u32 qh_word(const u8* row, int nb, int b) { return ld32(row + 16 * nb + 4 * b); }

// Chunk c = block c of a 32-value format as the tensor cores take it (base.cuh's
// mma_chunk): the quants of values 4q.. and 16+4q.. are the low and high nibbles of
// qs word q, their fifth bits (FIFTH) bits 4q.. and 16+4q.. of qh.
template <bool FIFTH>
__device__ __forceinline__ MmaChunk<1> mma_nibbles(const u8* row, int nb, int c, int q, u32 off4, float d, float m) {
    const u32 w = ld32(row + 16 * c + 4 * q);
    MmaChunk<1> k;
    k.lo[0] = LOW_NIBBLES(w);
    k.hi[0] = HIGH_NIBBLES(w);
    if (FIFTH) {
        const u32 qh = qh_word(row, nb, c);
        k.lo[0] |= spread_bits4((qh >> (4 * q)) & 0xFu);
        k.hi[0] |= spread_bits4((qh >> (16 + 4 * q)) & 0xFu);
    }
    if (off4) {
        k.lo[0] = minus_bytes(k.lo[0], off4);
        k.hi[0] = minus_bytes(k.hi[0], off4);
    }
    k.d[0][0] = k.d[0][1] = d;
    k.m[0] = m;
    return k;
}
#define ORCD_MMA_32(MIN)                                                        \
    static constexpr bool MMA = true, MMA_S16 = false, MMA_MIN = MIN;          \
    static constexpr int MMA_G = 1;

struct FmtQ4_0 {  // planes: qs [16], d f16 [2]: x = d * (q - 8)
    static constexpr bool INT8 = true;
    static constexpr int QK = 32, BYTES = 18, PIECES = 1, RUNS = 2, RUN = 16, STRIDE = 16;
    __device__ static int base(int) { return 0; }
    __device__ static float scale(const u8* row, int nb, int b) { return f16_to_f32(ld16(row + 16 * nb + 2 * b)); }
    __device__ static void load(const u8* row, int nb, int b, int, float* v) {
        const float d = scale(row, nb, b);
        nibbles_load(nibbles<false>(qs16(row, b), 0), v, [d](float f) { return d * (f - (MAGIC + 8.0f)); });
    }
    typedef NibblePiece Piece8;   // q - 8
    __device__ static Piece8 unpack8(const u8* row, int nb, int b, int) {
        return {minus_nibbles(nibbles<false>(qs16(row, b), 0), 0x08080808u), scale(row, nb, b), 0.f};
    }
    __device__ static float dot8(const Piece8& k, int, const int* __restrict__ xq, const float* __restrict__ xd) {
        return signed_dot8(k, xq, xd);
    }
    ORCD_DOT8_FROM_PIECE
    ORCD_MMA_32(false)
    __device__ static MmaChunk<1> mma_chunk(const u8* row, int nb, int c, int q) {
        return mma_nibbles<false>(row, nb, c, q, 0x08080808u, scale(row, nb, c), 0.f);
    }
};

struct FmtQ4_1 {  // planes: qs [16], d f16 + m f16 [4]: x = d * q + m
    static constexpr bool INT8 = true;
    static constexpr int QK = 32, BYTES = 20, PIECES = 1, RUNS = 2, RUN = 16, STRIDE = 16;
    __device__ static int base(int) { return 0; }
    __device__ static void load(const u8* row, int nb, int b, int, float* v) {
        const u32 dm = ld32(row + 16 * nb + 4 * b);
        const float d = f16_to_f32((u16)(dm & 0xFFFFu)), m = f16_to_f32((u16)(dm >> 16));
        nibbles_load(nibbles<false>(qs16(row, b), 0), v, [d, m](float f) { return d * (f - MAGIC) + m; });
    }
    typedef NibblePiece Piece8;
    __device__ static Piece8 unpack8(const u8* row, int nb, int b, int) {
        const u32 dm = ld32(row + 16 * nb + 4 * b);
        return {nibbles<false>(qs16(row, b), 0), f16_to_f32((u16)(dm & 0xFFFFu)), f16_to_f32((u16)(dm >> 16))};
    }
    __device__ static float dot8(const Piece8& k, int, const int* __restrict__ xq, const float* __restrict__ xd) {
        return affine_dot8(k, xq, xd);
    }
    ORCD_DOT8_FROM_PIECE
    ORCD_MMA_32(true)
    __device__ static MmaChunk<1> mma_chunk(const u8* row, int nb, int c, int q) {
        const u32 dm = ld32(row + 16 * nb + 4 * c);
        return mma_nibbles<false>(row, nb, c, q, 0u, f16_to_f32((u16)(dm & 0xFFFFu)), -f16_to_f32((u16)(dm >> 16)));
    }
};

struct FmtQ5_0 {  // planes: qs [16], qh [4], d f16 [2]: x = d * (q - 16)
    static constexpr bool INT8 = true;
    static constexpr int QK = 32, BYTES = 22, PIECES = 1, RUNS = 2, RUN = 16, STRIDE = 16;
    __device__ static int base(int) { return 0; }
    __device__ static float scale(const u8* row, int nb, int b) {
        return f16_to_f32(ld16(row + 16 * nb + plane_pad(4 * nb) + 2 * b));
    }
    __device__ static void load(const u8* row, int nb, int b, int, float* v) {
        const float d = scale(row, nb, b);
        nibbles_load(nibbles<true>(qs16(row, b), qh_word(row, nb, b)), v,
                     [d](float f) { return d * (f - (MAGIC + 16.0f)); });
    }
    typedef NibblePiece Piece8;   // q - 16
    __device__ static Piece8 unpack8(const u8* row, int nb, int b, int) {
        return {minus_nibbles(nibbles<true>(qs16(row, b), qh_word(row, nb, b)), 0x10101010u), scale(row, nb, b),
                0.f};
    }
    __device__ static float dot8(const Piece8& k, int, const int* __restrict__ xq, const float* __restrict__ xd) {
        return signed_dot8(k, xq, xd);
    }
    ORCD_DOT8_FROM_PIECE
    ORCD_MMA_32(false)
    __device__ static MmaChunk<1> mma_chunk(const u8* row, int nb, int c, int q) {
        return mma_nibbles<true>(row, nb, c, q, 0x10101010u, scale(row, nb, c), 0.f);
    }
};

struct FmtQ5_1 {  // planes: qs [16], qh [4], d f16 + m f16 [4]: x = d * q + m
    static constexpr bool INT8 = true;
    static constexpr int QK = 32, BYTES = 24, PIECES = 1, RUNS = 2, RUN = 16, STRIDE = 16;
    __device__ static int base(int) { return 0; }
    __device__ static u32 dm(const u8* row, int nb, int b) { return ld32(row + 16 * nb + plane_pad(4 * nb) + 4 * b); }
    __device__ static void load(const u8* row, int nb, int b, int, float* v) {
        const u32 w = dm(row, nb, b);
        const float d = f16_to_f32((u16)(w & 0xFFFFu)), m = f16_to_f32((u16)(w >> 16));
        nibbles_load(nibbles<true>(qs16(row, b), qh_word(row, nb, b)), v,
                     [d, m](float f) { return d * (f - MAGIC) + m; });
    }
    typedef NibblePiece Piece8;
    __device__ static Piece8 unpack8(const u8* row, int nb, int b, int) {
        const u32 w = dm(row, nb, b);
        return {nibbles<true>(qs16(row, b), qh_word(row, nb, b)), f16_to_f32((u16)(w & 0xFFFFu)),
                f16_to_f32((u16)(w >> 16))};
    }
    __device__ static float dot8(const Piece8& k, int, const int* __restrict__ xq, const float* __restrict__ xd) {
        return affine_dot8(k, xq, xd);
    }
    ORCD_DOT8_FROM_PIECE
    ORCD_MMA_32(true)
    __device__ static MmaChunk<1> mma_chunk(const u8* row, int nb, int c, int q) {
        const u32 w = dm(row, nb, c);
        return mma_nibbles<true>(row, nb, c, q, 0u, f16_to_f32((u16)(w & 0xFFFFu)), -f16_to_f32((u16)(w >> 16)));
    }
};

struct FmtQ8_0 {  // planes: qs int8 [32], d f16 [2]: x = d * q
    static constexpr bool INT8 = true;
    static constexpr int QK = 32, BYTES = 34, PIECES = 1, RUNS = 1, RUN = 32, STRIDE = 0;
    __device__ static int base(int) { return 0; }
    __device__ static float scale(const u8* row, int nb, int b) { return f16_to_f32(ld16(row + 32 * nb + 2 * b)); }
    __device__ static void load(const u8* row, int nb, int b, int, float* v) {
        const float d = scale(row, nb, b);
        const uint4 a = ld128(row + 32 * b), c = ld128(row + 32 * b + 16);
        const u32 w[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
        // int8 q: byte ^ 0x80 = q + 128, so 2^23 + 128 + q
#pragma unroll
        for (int i = 0; i < 32; ++i) v[i] = (byte_float(w[i / 4] ^ 0x80808080u, i % 4) - (MAGIC + 128.0f)) * d;
    }
    struct Piece8 {
        u32 w[8];
        float d;
    };
    __device__ static Piece8 unpack8(const u8* row, int nb, int b, int) {
        const uint4 a = ld128(row + 32 * b), c = ld128(row + 32 * b + 16);
        return {{a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w}, scale(row, nb, b)};
    }
    __device__ static float dot8(const Piece8& k, int, const int* __restrict__ xq, const float* __restrict__ xd) {
        int x[8];
        x_words(xq, x);
        int s = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) s = dot4(k.w[i], x[i], s);
        return k.d * ldxd(xd) * (float)s;
    }
    ORCD_DOT8_FROM_PIECE
    ORCD_MMA_32(false)
    __device__ static MmaChunk<1> mma_chunk(const u8* row, int nb, int c, int q) {
        MmaChunk<1> k;
        k.lo[0] = ld32(row + 32 * c + 4 * q);
        k.hi[0] = ld32(row + 32 * c + 16 + 4 * q);
        k.d[0][0] = k.d[0][1] = scale(row, nb, c);
        k.m[0] = 0.f;
        return k;
    }
};
