// What every device format struct and every kernel that reads weights share:
// the integer types, aligned read-only loads, half conversions, byte tricks, the
// int8 activation quantizer and the fp32 piece dot. The format structs live in
// simple.cuh (plain floats, ggml's 32-value quants), kquants.cuh and mxfp4.cuh,
// or in a plugin's header; the kernels see them through the generated
// formats.cuh (orcd.quant.device).
//
// Every format is a struct with the same shape, which the kernels in
// ops/matmul.cu are templated on:
//
//   QK     values per block            BYTES  bytes per GGUF block
//   PIECES pieces per block (one thread dequantizes one piece into registers)
//   RUNS x RUN values per piece: value v[r * RUN + i] sits at position
//          base(p) + r * STRIDE + i of the block (RUN is a multiple of 4, so
//          the matching activations load as float4; base(p) and STRIDE are even:
//          the tensor-core kernels store the values as pairs of halves)
//   load(row, nb, b, p, v)   dequantize piece p of block b of a row of nb blocks
//
// `row` points at one row in the format's VRAM layout (its row's DeviceFormat.planes,
// orcd/quant/format.py): either the GGUF blocks as stored, or the row's planes one
// after the other -- plane k holds byte range k of every block, padded to 16 bytes
// (plane_at). That keeps every quant load 16-byte aligned (128-bit loads) whatever
// the GGUF block size (MXFP4 17 bytes, Q4_0 18, Q6_K 210) and the scales apart.
//
// Integer formats (INT8 = true) also take activations quantized per 32 values
// (ops/matmul.cu's quantize_q8: x = xd[g] * xq[i], xq int8, rintf(x / xd) with
// xd = amax / 127) and dot a piece with them in integer math (dp4a):
//   dot8(row, nb, b, p, xq, xd) = sum over piece p of value_i * x_i
// with xq the block's first 4 activations as one int (xq + b * QK / 4; 16-byte
// aligned) and xd its first 32-group's scale (xd + b * QK / 32). Per value that
// is about a quarter of an instruction instead of an unpack, a convert and an
// fp32 FMA, and 1 byte of activation instead of 4.
//
// A batch of T rows dots one weight piece with T rows of activations. A format may
// split dot8 into an unpack and a dot so that the piece is read and unpacked once
// for all of them (Int8Piece below):
//   typedef ... Piece8;                    the piece as int8 words and scales
//   Piece8 unpack8(row, nb, b, p)
//   float dot8(const Piece8&, p, xq, xd)  (same arguments otherwise, same result)
// A format without the split still works: its dot8 runs once per row.
//
// The float expressions follow ggml's order (d * q + m, d * (q - 8), ...).
//
// Formats with int8 tensor-core support (MMA = true; ops/gemv_mma.cuh) also give a
// row's values as the weight operand of mma m16n8k32, in chunks of MMA_G groups of 32
// values (the unit the format loads at once: a block, or a part of one):
//   MmaChunk<MMA_G> mma_chunk(row, nb, c, q)
// holds, for group i of chunk c (values 32 (c * MMA_G + i) ..) and the lane's quad
// position q = lane % 4, the int8 values 4q..4q+3 (lo[i], a byte each) and 16+4q..16+4q+3
// (hi[i]), and the group's scales: value = d[i][h] * int8 - m[i], h the value's 16-half.
// MMA_S16: d[i][0] and d[i][1] differ (a scale per 16 values, Q6_K); MMA_MIN: m is not 0.
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
__device__ __forceinline__ uint2 ld64(const u8* p) { return __ldg((const uint2*)p); }
// The int8 activations (words and per-32 scales): read-only global loads, unless the
// including source defines ORCD_ACT_ANY_SPACE -- fused.cu's GEMVs that quantize their
// own input (own_q8) point them at shared memory, where __ldg faults on a card
// (CUDA_ERROR_INVALID_ADDRESS_SPACE; the simulator has one address space). Plain loads
// in every source would cost matmul.cu's 16-row Q4_0 GEMV 54% more instructions (SASS).
#ifdef ORCD_ACT_ANY_SPACE
template <class T> __device__ __forceinline__ T ld_act(const T* p) { return *p; }
#else
template <class T> __device__ __forceinline__ T ld_act(const T* p) { return __ldg(p); }
#endif
__device__ __forceinline__ uint4 ldx128(const int* __restrict__ xq) { return ld_act((const uint4*)xq); }
__device__ __forceinline__ uint2 ldx64(const int* __restrict__ xq) { return ld_act((const uint2*)xq); }
__device__ __forceinline__ float ldxd(const float* __restrict__ xd) { return ld_act(xd); }

// Byte offset of a plane in a VRAM row: the planes before it hold `before` bytes
// per block, each plane padded to 16 bytes (orcd/quant/format.py's to_vram).
__device__ __forceinline__ int plane_pad(int n) { return (n + 15) & ~15; }
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

// The 4 int8 activation words at xq (16-byte aligned).
__device__ __forceinline__ void x_words4(const int* __restrict__ xq, int* x) {
    const uint4 a = ldx128(xq);
    x[0] = (int)a.x; x[1] = (int)a.y; x[2] = (int)a.z; x[3] = (int)a.w;
}

// The 8 int8 activation words of 32 values (16-byte aligned).
__device__ __forceinline__ void x_words(const int* __restrict__ xq, int* x) {
    x_words4(xq, x);
    x_words4(xq + 4, x + 4);
}

// Signed 8-bit dot of four byte lanes plus c (dp4a); a <= 127 per lane here.
__device__ __forceinline__ int dot4(u32 a, int b, int c) { return __dp4a((int)a, b, c); }
__device__ __forceinline__ int ldx(const int* __restrict__ xq, int i) { return ld_act(xq + i); }

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

// Bytes q_i - off of four bytes q_i < 128 (off <= 128), as signed bytes: q + 128 - off
// stays within its byte (no carry into the next), and flipping bit 7 takes the 128 back
// off, mod 256 -- an add and a xor (or-ing bit 7 in first, then subtracting, took three).
// A format whose values are d * (q - off) dots the signed bytes directly instead of also
// summing the activations.
__device__ __forceinline__ u32 minus_bytes(u32 q, u32 off4) { return (q + (0x80808080u - off4)) ^ 0x80808080u; }

// One chunk of a row as mma_chunk gives it (see the top of this file).
template <int G>
struct MmaChunk {
    u32 lo[G], hi[G];
    float d[G][2], m[G];
};

// dot8 from a format's split (Piece8, unpack8 and the piece's dot8), in its struct.
#define ORCD_DOT8_FROM_PIECE                                                                   \
    __device__ static float dot8(const u8* row, int nb, int b, int p, const int* __restrict__ xq, \
                                 const float* __restrict__ xd) {                               \
        return dot8(unpack8(row, nb, b, p), p, xq, xd);                                        \
    }

// One weight piece as the int8 GEMV holds it across its rows: unpacked once where the
// format splits dot8 (base.cuh's Piece8), else its address, dot8 then running per row.
template <class...>
struct orcd_void { typedef void type; };
template <class F, class = void>
struct Int8Piece {
    const u8* row;
    int nb, b, p;
    __device__ __forceinline__ void unpack(const u8* row_, int nb_, int b_, int p_) {
        row = row_; nb = nb_; b = b_; p = p_;
    }
    __device__ __forceinline__ float dot(const int* __restrict__ xq, const float* __restrict__ xd) const {
        return F::dot8(row, nb, b, p, xq, xd);
    }
};
template <class F>
struct Int8Piece<F, typename orcd_void<typename F::Piece8>::type> {
    typename F::Piece8 k;
    int p;
    __device__ __forceinline__ void unpack(const u8* row, int nb, int b, int p_) {
        k = F::unpack8(row, nb, b, p_);
        p = p_;
    }
    __device__ __forceinline__ float dot(const int* __restrict__ xq, const float* __restrict__ xd) const {
        return F::dot8(k, p, xq, xd);
    }
};

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

// A GEMV lane takes pieces c0, c0 + stride, ... of a row (stride a multiple of 32): as
// (block, piece), piece lane_piece(c0) of blocks c0 / PIECES, + stride / PIECES, ... The
// loops step the block and keep the piece, the same pieces in the same order as dividing
// c each time, which cost ~25 instructions of 64-bit address arithmetic a piece (SASS of
// the Q4_K dp4a GEMV on sm_90: 120 -> 96 a piece).
template <class F>
__device__ __forceinline__ int lane_piece(int c0) {
    static_assert(32 % F::PIECES == 0, "a stride of 32 pieces is whole blocks");
    return c0 % F::PIECES;
}
