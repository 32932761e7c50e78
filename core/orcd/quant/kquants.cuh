// Device dequantizers for ggml's K-quants (Q4_K, Q5_K, Q6_K); blocks as in
// kquants.py, format structs shaped as described in base.cuh.
//
// Q4_K / Q5_K are planar in VRAM with their 6-bit scales unpacked to bytes
// (kquants.py's scales_unpacked): piece p = 16 bytes of qs at 16 * p of the
// block's qs, i.e. values 16 * (p & 1) + k of sub-blocks 2 * (p >> 1) (low
// nibbles) and 2 * (p >> 1) + 1 (high nibbles): one 16-byte load of quants (and
// Q5_K's 16 qh bytes), two 2-byte loads of scales and mins, one 4-byte d, dmin.
// Q6_K (210 bytes, only 2-byte aligned as stored) is planar in VRAM: a row is its
// ql plane (128 bytes a block), qh (64), scales (16) and d (2) planes. Piece p =
// half h = p >> 2, l = 8 * (p & 3) .. +8 of its four 32-value groups: three
// 8-byte loads of quants and one 8-byte load of its half's scales.
#pragma once
#include "base.cuh"

// Piece p of a Q4_K / Q5_K block: the quants of sub-block j = 2 (p >> 1) (lo, low
// nibbles) and j + 1 (hi, high nibbles) four bytes a word, at 16 (p & 1) within
// each, with their scales dl and mins ml.
struct AffineKPiece {
    float dl0, ml0, dl1, ml1;
    u32 lo[4], hi[4];
};

// The planes of a Q4_K / Q5_K row of nb blocks (kquants.py: scales unpacked, then
// planar): qs (128 a block), Q5_K's qh (32), the scales sc[8] then mins m[8] (16),
// and d, dmin (4). dl = d * sc_j and ml = dmin * m_j as ggml's get_scale_min_k4
// gives them, from byte loads.
template <bool FIVE>
__device__ __forceinline__ AffineKPiece affine_k_piece(const u8* row, int nb, int b, int p) {
    AffineKPiece r;
    const int j = 2 * (p >> 1);
    const u8* scm = row + (FIVE ? 160 : 128) * nb + 16 * b;
    const u32 dm = ld32(row + (FIVE ? 176 : 144) * nb + 4 * b);
    const float d = f16_to_f32((u16)(dm & 0xFFFFu)), dmin = f16_to_f32((u16)(dm >> 16));
    const u32 sc = ld16(scm + j), m = ld16(scm + 8 + j);      // sub-blocks j (low byte) and j + 1
    r.dl0 = d * (float)(sc & 0xFFu);
    r.dl1 = d * (float)(sc >> 8);
    r.ml0 = dmin * (float)(m & 0xFFu);
    r.ml1 = dmin * (float)(m >> 8);
    const uint4 qs4 = ld128(row + 128 * b + 16 * p);
    const u32 qs[4] = {qs4.x, qs4.y, qs4.z, qs4.w};
    u32 qh[4] = {0, 0, 0, 0};
    if (FIVE) {
        const uint4 qh4 = ld128(row + 128 * nb + 32 * b + 16 * (p & 1));   // qh[l] for this piece's 16 l
        qh[0] = qh4.x >> j; qh[1] = qh4.y >> j; qh[2] = qh4.z >> j; qh[3] = qh4.w >> j;
    }
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        r.lo[w] = LOW_NIBBLES(qs[w]);
        r.hi[w] = HIGH_NIBBLES(qs[w]);
        if (FIVE) {
            r.lo[w] |= (qh[w] & 0x01010101u) << 4;
            r.hi[w] |= ((qh[w] >> 1) & 0x01010101u) << 4;
        }
    }
    return r;
}

template <bool FIVE>
struct FmtAffineK {  // x = (d * sc_j) * q - dmin * m_j
    static constexpr bool INT8 = true;
    static constexpr int QK = 256, BYTES = FIVE ? 176 : 144, PIECES = 8, RUNS = 2, RUN = 16, STRIDE = 32;
    __device__ static int base(int p) { return 64 * (p >> 1) + 16 * (p & 1); }
    __device__ static void load(const u8* row, int nb, int blk, int p, float* v) {
        const AffineKPiece k = affine_k_piece<FIVE>(row, nb, blk, p);
#pragma unroll
        for (int w = 0; w < 4; ++w)   // 4 bytes of qs at a time, as 2^23 + q
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                v[4 * w + i] = k.dl0 * (byte_float(k.lo[w], i) - MAGIC) - k.ml0;
                v[16 + 4 * w + i] = k.dl1 * (byte_float(k.hi[w], i) - MAGIC) - k.ml1;
            }
    }
    // x words 8j + 4(p & 1) + w (sub-block j) and 8 further on (j + 1)
    typedef AffineKPiece Piece8;
    __device__ static Piece8 unpack8(const u8* row, int nb, int blk, int p) {
        return affine_k_piece<FIVE>(row, nb, blk, p);
    }
    __device__ static float dot8(const Piece8& k, int p, const int* __restrict__ xq, const float* __restrict__ xd) {
        const int j = 2 * (p >> 1);
        int x0[4], x1[4];
        x_words4(xq + 8 * j + 4 * (p & 1), x0);
        x_words4(xq + 8 * j + 4 * (p & 1) + 8, x1);
        int s0 = 0, s1 = 0, n0 = 0, n1 = 0;   // sum q * xq and sum xq, per sub-block
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            s0 = dot4(k.lo[w], x0[w], s0);
            n0 = dot4(ONES, x0[w], n0);
            s1 = dot4(k.hi[w], x1[w], s1);
            n1 = dot4(ONES, x1[w], n1);
        }
        return ldxd(xd + j) * (k.dl0 * (float)s0 - k.ml0 * (float)n0) +
               ldxd(xd + j + 1) * (k.dl1 * (float)s1 - k.ml1 * (float)n1);
    }
    ORCD_DOT8_FROM_PIECE
    // tensor cores: chunk c = sub-blocks j = 2 (c & 3) and j + 1 of block c >> 2, the low
    // and high nibbles of the same 32 qs bytes (and qh bits j, j + 1 for Q5_K)
    static constexpr bool MMA = true, MMA_S16 = false, MMA_MIN = true;
    static constexpr int MMA_G = 2;
    __device__ static MmaChunk<2> mma_chunk(const u8* row, int nb, int c, int q) {
        const int b = c >> 2, j = 2 * (c & 3);
        const u8* qs = row + 128 * b + 16 * j + 4 * q;
        const u32 a = ld32(qs), e = ld32(qs + 16);
        MmaChunk<2> k;
        k.lo[0] = LOW_NIBBLES(a); k.hi[0] = LOW_NIBBLES(e);
        k.lo[1] = HIGH_NIBBLES(a); k.hi[1] = HIGH_NIBBLES(e);
        if (FIVE) {
            const u32 ha = ld32(row + 128 * nb + 32 * b + 4 * q), he = ld32(row + 128 * nb + 32 * b + 16 + 4 * q);
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                k.lo[i] |= ((ha >> (j + i)) & 0x01010101u) << 4;
                k.hi[i] |= ((he >> (j + i)) & 0x01010101u) << 4;
            }
        }
        const u8* scm = row + (FIVE ? 160 : 128) * nb + 16 * b;
        const u32 dm = ld32(row + (FIVE ? 176 : 144) * nb + 4 * b);
        const float d = f16_to_f32((u16)(dm & 0xFFFFu)), dmin = f16_to_f32((u16)(dm >> 16));
        const u32 sc = ld16(scm + j), mn = ld16(scm + 8 + j);
        k.d[0][0] = k.d[0][1] = d * (float)(sc & 0xFFu);
        k.d[1][0] = k.d[1][1] = d * (float)(sc >> 8);
        k.m[0] = dmin * (float)(mn & 0xFFu);
        k.m[1] = dmin * (float)(mn >> 8);
        return k;
    }
};
typedef FmtAffineK<false> FmtQ4_K;
typedef FmtAffineK<true> FmtQ5_K;

// Q6_K's planes in a row of nb blocks (ql 128, qh 64, scales 16, d 2 bytes a block).
struct Q6KPiece {
    u32 q[2][4];   // [w][g]: 4 quants 0..63 of group g at l + 4w, a byte each
    float d;
    u32 sc;        // the int8 scales of the piece's four groups, group g in byte g
};

__device__ __forceinline__ Q6KPiece q6k_piece(const u8* row, int nb, int blk, int p) {
    const int h = p >> 2, l = 8 * (p & 3);
    const u8* ql = row + 128 * blk + 64 * h + l;                 // groups 0 (low nibbles) and 2 (high)
    const uint2 a = ld64(ql), c = ld64(ql + 32);                  // c: groups 1 and 3
    const uint2 hi = ld64(row + 128 * nb + 64 * blk + 32 * h + l);  // top two bits of group g at 2g
    Q6KPiece r;
    const u32 aw[2] = {a.x, a.y}, cw[2] = {c.x, c.y}, hw[2] = {hi.x, hi.y};
#pragma unroll
    for (int w = 0; w < 2; ++w) {
        r.q[w][0] = LOW_NIBBLES(aw[w]) | ((hw[w] & 0x03030303u) << 4);
        r.q[w][1] = LOW_NIBBLES(cw[w]) | (((hw[w] >> 2) & 0x03030303u) << 4);
        r.q[w][2] = HIGH_NIBBLES(aw[w]) | (((hw[w] >> 4) & 0x03030303u) << 4);
        r.q[w][3] = HIGH_NIBBLES(cw[w]) | (((hw[w] >> 6) & 0x03030303u) << 4);
    }
    // group g's scale is byte 8h + (l >> 4) + 2g of the block's 16: of half h's eight,
    // bytes (l >> 4) + 0, 2, 4, 6, gathered by one permute (a byte picked at run time
    // out of 16 took ~5 instructions a group)
    const uint2 s8 = ld64(row + 192 * nb + 16 * blk + 8 * h);
    r.sc = __byte_perm(s8.x, s8.y, 0x6420u + 0x1111u * (u32)(l >> 4));
    r.d = f16_to_f32(ld16(row + 208 * nb + 2 * blk));
    return r;
}

// Scale of group g of a Q6_K piece: d * its int8 scale.
__device__ __forceinline__ float q6k_scale(const Q6KPiece& k, int g) {
    return k.d * (float)(signed char)byte_of(k.sc, g);
}

struct FmtQ6_K {  // planes: ql [128], qh [64], scales int8 [16], d f16 [2]: x = (d * sc) * (q - 32)
    static constexpr bool INT8 = true;
    static constexpr int QK = 256, BYTES = 210, PIECES = 8, RUNS = 4, RUN = 8, STRIDE = 32;
    // piece p: 8 values at l of each of the four 32-groups of half h: group g is
    // x words 32h + 8g + l / 4 (+1) and scale xd[4h + g]
    struct Piece8 {
        u32 q[2][4];   // as Q6KPiece's, less 32: signed bytes
        float dl[4];   // d * sc of each group
    };
    __device__ static Piece8 unpack8(const u8* row, int nb, int blk, int p) {
        const Q6KPiece k = q6k_piece(row, nb, blk, p);
        Piece8 r;
#pragma unroll
        for (int g = 0; g < 4; ++g) {
            r.q[0][g] = minus_bytes(k.q[0][g], 0x20202020u);
            r.q[1][g] = minus_bytes(k.q[1][g], 0x20202020u);
            r.dl[g] = q6k_scale(k, g);
        }
        return r;
    }
    __device__ static float dot8(const Piece8& k, int p, const int* __restrict__ xq, const float* __restrict__ xd) {
        const int h = p >> 2, l = 8 * (p & 3);
        float acc = 0.f;
#pragma unroll
        for (int g = 0; g < 4; ++g) {
            const uint2 x = ldx64(xq + 32 * h + 8 * g + l / 4);
            const int sq = dot4(k.q[1][g], (int)x.y, dot4(k.q[0][g], (int)x.x, 0));
            acc += k.dl[g] * ldxd(xd + 4 * h + g) * (float)sq;
        }
        return acc;
    }
    ORCD_DOT8_FROM_PIECE
    // tensor cores: chunk c = half h = c & 1 of block c >> 1, its four 32-value groups g
    // (ql bytes 32 (g & 1) + l, low nibbles for g < 2; qh bits 2g of byte l), a scale per 16
    static constexpr bool MMA = true, MMA_S16 = true, MMA_MIN = false;
    static constexpr int MMA_G = 4;
    __device__ static MmaChunk<4> mma_chunk(const u8* row, int nb, int c, int q) {
        const int b = c >> 1, h = c & 1;
        const u8* ql = row + 128 * b + 64 * h + 4 * q;
        const u8* qh = row + 128 * nb + 64 * b + 32 * h + 4 * q;
        const u32 l[4] = {ld32(ql), ld32(ql + 16), ld32(ql + 32), ld32(ql + 48)};
        const u32 hb[2] = {ld32(qh), ld32(qh + 16)};
        const uint2 sc = ld64(row + 192 * nb + 16 * b + 8 * h);   // scales 8h .. 8h + 7
        const float d = f16_to_f32(ld16(row + 208 * nb + 2 * b));
        MmaChunk<4> k;
#pragma unroll
        for (int g = 0; g < 4; ++g) {
            const u32 lo = (g < 2 ? LOW_NIBBLES(l[2 * (g & 1)]) : HIGH_NIBBLES(l[2 * (g & 1)]));
            const u32 hi = (g < 2 ? LOW_NIBBLES(l[2 * (g & 1) + 1]) : HIGH_NIBBLES(l[2 * (g & 1) + 1]));
            k.lo[g] = minus_bytes(lo | (((hb[0] >> (2 * g)) & 0x03030303u) << 4), 0x20202020u);
            k.hi[g] = minus_bytes(hi | (((hb[1] >> (2 * g)) & 0x03030303u) << 4), 0x20202020u);
            const u32 sw = g < 2 ? sc.x : sc.y;
            k.d[g][0] = d * (float)(signed char)byte_of(sw, (2 * g) & 3);
            k.d[g][1] = d * (float)(signed char)byte_of(sw, (2 * g + 1) & 3);
            k.m[g] = 0.f;
        }
        return k;
    }
    __device__ static int base(int p) { return 128 * (p >> 2) + 8 * (p & 3); }
    __device__ static void load(const u8* row, int nb, int blk, int p, float* v) {
        const Q6KPiece k = q6k_piece(row, nb, blk, p);
        float dl[4];
#pragma unroll
        for (int g = 0; g < 4; ++g) dl[g] = q6k_scale(k, g);
#pragma unroll
        for (int w = 0; w < 2; ++w)   // 4 values of each group at a time, as 2^23 + q
#pragma unroll
            for (int g = 0; g < 4; ++g)
#pragma unroll
                for (int i = 0; i < 4; ++i) v[8 * g + 4 * w + i] = dl[g] * (byte_float(k.q[w][g], i) - (MAGIC + 32.0f));
    }
};
