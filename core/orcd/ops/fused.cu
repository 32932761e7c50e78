// Fused decode GEMVs (one token): several projections of the same input in one
// launch, with the RMSNorm of the input as a prologue and a SwiGLU or residual
// epilogue. A decode step is latency-bound (hundreds of microsecond-sized
// kernels), so every launch saved is ~2-4 us.
//
// Layout as matmul.cu's gemv_rows: a block of 4 warps; `split` warps share one
// output row (block covers 4 / split rows); lane l of part s takes pieces
// s * 32 + l, + 32 * split, ... of the row; warp butterfly, then the split
// warps' partials summed in a fixed order: no atomics, bitwise reproducible.
//
// Up to three segments (weight, bias, output) follow each other along
// blockIdx.x; a block serves one segment, so the runtime format switch is
// uniform per block. Gated mode: the warps of a block split between the same
// row of two weights (gate in segment 0, up in segment 1); one writes silu(gate) * up.
//
// RMSNorm prologue: y = (x / s * g) @ W.T is computed as (x * g) @ W.T / s, with
// x * g staged once per block in shared memory (n_in floats, dynamic) while the
// block sums x^2 -- measured: a per-warp norm with g loaded beside x in every
// dot tripled the gated GEMV's L1 traffic (12-15 us instead of ~5 on H200).
#define ORCD_ACT_ANY_SPACE   // own_q8 points the activations at shared memory (base.cuh)
#include "pdl.cuh"
#include "act.cuh"
#include "base.cuh"
#include "formats.cuh"

#define FG_THREADS 128
#define FG_WARPS (FG_THREADS / 32)

// This lane's share of row `wr` . x: pieces c0, c0 + stride, ...
template <class F, bool NORM>
__device__ __forceinline__ float row_dot_t(const u8* __restrict__ wr, const float* __restrict__ x,
                                           int n_in, int c0, int stride) {
    const int nb = n_in / F::QK;
    float acc = 0.f;
    const int p = lane_piece<F>(c0), step = stride / F::PIECES;
#pragma unroll 2
    for (int blk = c0 / F::PIECES; blk < nb; blk += step) {
        float v[F::RUNS * F::RUN];
        F::load(wr, nb, blk, p, v);
        const int pos = blk * F::QK + F::base(p);
        acc += dot_piece<F, NORM>(v, x + pos);
    }
    return acc;
}

// The format switch (GGML type ids, from the generated formats.cuh); uniform per block.
template <bool NORM>
__device__ __forceinline__ float row_dot(int type, const u8* wr, const float* x, int n_in, int c0,
                                         int stride) {
#define ROW_DOT_CASE(NAME, F, TYPE_ID) \
    case TYPE_ID: return row_dot_t<F, NORM>(wr, x, n_in, c0, stride);
    switch (type) { ORCD_FORMATS(ROW_DOT_CASE) }
#undef ROW_DOT_CASE
    return __int_as_float(0x7FC00000);  // the host checks types; never silently zero
}

// This lane's share of row `wr` . x with int8 activations (xq as ints, xd per 32;
// integer formats only: F::dot8).
template <class F>
__device__ __forceinline__ float row_dot8_t(const u8* __restrict__ wr, const int* __restrict__ xq,
                                            const float* __restrict__ xd, int n_in, int c0, int stride) {
    const int nb = n_in / F::QK;
    float acc = 0.f;
    const int p = lane_piece<F>(c0), step = stride / F::PIECES;
#pragma unroll 2
    for (int blk = c0 / F::PIECES; blk < nb; blk += step) {
        acc += F::dot8(wr, nb, blk, p, xq + blk * (F::QK / 4), xd + blk * (F::QK / 32));
    }
    return acc;
}

__device__ __forceinline__ float row_dot8(int type, const u8* wr, const int* xq, const float* xd, int n_in,
                                          int c0, int stride) {
#define ROW_DOT8_CASE(NAME, F, TYPE_ID) \
    case TYPE_ID: return row_dot8_t<F>(wr, xq, xd, n_in, c0, stride);
    switch (type) { ORCD_INT8_FORMATS(ROW_DOT8_CASE) }
#undef ROW_DOT8_CASE
    return __int_as_float(0x7FC00000);  // the host sends only integer formats here
}

// Stage x * g into shared memory xs [n_in] and return 1 / sqrt(mean(x^2) + eps),
// the same on every thread (fixed-order block sum: deterministic).
__device__ __forceinline__ float stage_norm(const float* __restrict__ x, const float* __restrict__ g,
                                            int n_in, float eps, float* xs) {
    __shared__ float red[FG_WARPS];
    float ss = 0.f;
    for (int i = threadIdx.x; i < n_in / 4; i += FG_THREADS) {
        const float4 v = __ldg((const float4*)x + i), w = __ldg((const float4*)g + i);
        ss = fmaf(v.x, v.x, ss);
        ss = fmaf(v.y, v.y, ss);
        ss = fmaf(v.z, v.z, ss);
        ss = fmaf(v.w, v.w, ss);
        ((float4*)xs)[i] = make_float4(v.x * w.x, v.y * w.y, v.z * w.z, v.w * w.w);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, off);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();  // also: xs complete
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < FG_WARPS; ++w) total += red[w];
    return 1.f / sqrtf(total / (float)n_in + eps);
}

struct Seg {
    const u8* w; long long row_bytes; int type; const float* bias; float* out; int n_out; int split;
};

#define SEG_ARGS(i) const u8 *w##i, long long rb##i, int type##i, const float *b##i, float *out##i, \
    int n##i, int split##i, int blocks##i
#define SEG(i) Seg{w##i, rb##i, type##i, b##i, out##i, n##i, split##i}

// Activations: fp32 in global memory, fp32 normed (staged), or int8 (Q8: xq, xqd).
enum { ACT_F32 = 0, ACT_NORM = 1, ACT_Q8 = 2 };

template <int MODE>
__device__ __forceinline__ void gemv_fused_body(const float* __restrict__ x, const int* __restrict__ xq,
                                                const float* __restrict__ xqd, int n_in,
                                                const float* __restrict__ g, float eps,
                                                const float* __restrict__ residual, int gated,
                                                const Seg& s, int local_block, const Seg& up) {
    constexpr bool NORM = MODE == ACT_NORM;
    __shared__ float partial[FG_WARPS];
    extern __shared__ float4 xs4[];   // NORM: x * g [n_in], staged once per block
    float* xs = (float*)xs4;
    const float inv = NORM ? stage_norm(x, g, n_in, eps, xs) : 1.f;
    const float* xd = NORM ? xs : x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // gated: "virtual" rows alternate gate and up of one output row, so the two
    // dots of a row run in parallel warps (split <= 2 keeps both in the block)
    const int vrow = local_block * (FG_WARPS / s.split) + warp / s.split, part = warp % s.split;
    const int row = gated ? vrow >> 1 : vrow;
    const bool is_up = gated && (vrow & 1);
    const int type = is_up ? up.type : s.type;
    const u8* w = is_up ? up.w : s.w;
    const long long row_bytes = is_up ? up.row_bytes : s.row_bytes;
    float acc = 0.f;
    if (row < s.n_out) {
        const u8* wr = w + (long long)row * row_bytes;
        acc = MODE == ACT_Q8 ? row_dot8(type, wr, xq, xqd, n_in, part * 32 + lane, 32 * s.split)
                             : row_dot<NORM>(type, wr, xd, n_in, part * 32 + lane, 32 * s.split);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, off);
    if (lane == 0) partial[warp] = acc;
    __syncthreads();
    if (part != 0 || lane != 0 || row >= s.n_out || is_up) return;
    float y = 0.f, u = 0.f;
    for (int k = 0; k < s.split; ++k) y += partial[warp + k];
    if (NORM) y *= inv;
    if (gated) {
        for (int k = 0; k < s.split; ++k) u += partial[warp + s.split + k];
        if (NORM) u *= inv;
    }
    s.out[row] = gemv_out(y, u, gated, s.bias ? s.bias + row : nullptr, residual ? residual + row : nullptr);
}

// x: [1, n_in]; g: the RMSNorm weight [n_in] or null; residual: [n_out0] or null
// (one segment only). Plain mode: out_i[row] = (x @ w_i.T)[row] (+ b_i) (+ residual).
// Gated mode (blocks1 == blocks2 == 0, split0 <= 2, blocks0 covering 2 * n0
// virtual rows): out0 = silu(x @ w0.T) * (x @ w1.T).
// grid blocks0 + blocks1 + blocks2, block FG_THREADS.
// (No __launch_bounds__: with it ptxas spills this many-format kernel; without, 64
// registers and no spills -- checked with -Xptxas -v for sm_90.)
// The segment of this block, field by field (no struct copies through local memory).
#define BLOCK_SEGMENT                                                                              \
    const int b = blockIdx.x;                                                                      \
    const int i = b < blocks0 ? 0 : b < blocks0 + blocks1 ? 1 : 2;                                 \
    const int local = i == 0 ? b : i == 1 ? b - blocks0 : b - blocks0 - blocks1;                   \
    (void)blocks2;                                                                                 \
    const Seg s{i == 0 ? w0 : i == 1 ? w1 : w2, i == 0 ? rb0 : i == 1 ? rb1 : rb2,                 \
                i == 0 ? type0 : i == 1 ? type1 : type2, i == 0 ? b0 : i == 1 ? b1 : b2,           \
                i == 0 ? out0 : i == 1 ? out1 : out2, i == 0 ? n0 : i == 1 ? n1 : n2,             \
                i == 0 ? split0 : i == 1 ? split1 : split2};                                       \
    const Seg up = SEG(1);

// The weight rows of the block's segment into L2 (gemv_fused_body's row mapping).
__device__ __forceinline__ void prefetch_segment(const Seg& s, const Seg& up, int local_block, int gated) {
    const long long per = FG_WARPS / s.split, v0 = local_block * per;
    if (gated) {   // virtual rows alternate gate and up of one output row
        orcd_prefetch_rows(s.w, s.row_bytes, v0 >> 1, (per + 1) >> 1, s.n_out);
        orcd_prefetch_rows(up.w, up.row_bytes, v0 >> 1, (per + 1) >> 1, s.n_out);
    } else {
        orcd_prefetch_rows(s.w, s.row_bytes, v0, per, s.n_out);
    }
}

extern "C" __global__ void
gemv_fused(const float* __restrict__ x, int n_in, const float* __restrict__ g, float eps,
           const float* __restrict__ residual, int gated, SEG_ARGS(0), SEG_ARGS(1), SEG_ARGS(2)) {
    BLOCK_SEGMENT
    prefetch_segment(s, up, local, gated);
    orcd_prior_done();
    if (g) gemv_fused_body<ACT_NORM>(x, nullptr, nullptr, n_in, g, eps, residual, gated, s, local, up);
    else gemv_fused_body<ACT_F32>(x, nullptr, nullptr, n_in, g, eps, residual, gated, s, local, up);
}

// One row x [n] (times 1 / sqrt(mean(x^2) + eps) * g when g is given) quantized per
// 32 values -> xq [n] int8 (as u32), xd [n / 32]: quantize_q8's and rms_norm_q8's
// arithmetic, for a block of FG_THREADS, into global or shared memory.
__device__ __forceinline__ void q8_row(const float* __restrict__ xr, const float* __restrict__ g, float eps,
                                       int n, u32* xq, float* xd) {
    float s = 1.f;
    if (g) {
        __shared__ float red[FG_WARPS];
        float ss = 0.f;
        for (int i = threadIdx.x; i < n; i += FG_THREADS) ss = fmaf(xr[i], xr[i], ss);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, off);
        if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
        __syncthreads();
        float total = 0.f;
#pragma unroll
        for (int w = 0; w < FG_WARPS; ++w) total += red[w];
        s = sqrtf(total / (float)n + eps);
    }
    for (int grp = threadIdx.x; grp < n / 32; grp += FG_THREADS) {
        float v[32];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float4 f = __ldg((const float4*)(xr + 32 * grp) + i);
            v[4 * i] = f.x; v[4 * i + 1] = f.y; v[4 * i + 2] = f.z; v[4 * i + 3] = f.w;
        }
        if (g) {
#pragma unroll
            for (int i = 0; i < 32; ++i) v[i] = v[i] / s * __ldg(g + 32 * grp + i);
        }
        u32 q[8];
        xd[grp] = quantize_group(v, q);
        uint4* o = (uint4*)(xq + 8 * grp);
        o[0] = make_uint4(q[0], q[1], q[2], q[3]);
        o[1] = make_uint4(q[4], q[5], q[6], q[7]);
    }
}

// The int8 GEMVs' own quantizing: given x (fp32, normed first when g is given), each
// block quantizes it into the dynamic shared memory xs (n bytes of xq, then n / 32
// floats of xd) -- the bits rms_norm_q8 or quantize_q8 would write, one launch fewer --
// and points xq and xqd there; without x they stay the quantized input given.
template <class IntPtr, class FloatPtr>   // the kernels' parameters, __restrict__ or not
__device__ __forceinline__ void own_q8(const float* __restrict__ x, const float* __restrict__ g, float eps,
                                       int n, float4* xs, IntPtr& xq, FloatPtr& xqd) {
    if (!x) return;
    q8_row(x, g, eps, n, (u32*)xs, (float*)((char*)xs + n));
    __syncthreads();
    xq = (const int*)xs;
    xqd = (const float*)((const char*)xs + n);
}

// As gemv_fused on int8 activations (xq as ints, xqd per 32 values): integer formats
// only. With x non-null each block quantizes x itself first (normed when g is given;
// dynamic shared memory n_in + n_in / 8 bytes): a decode step's GEMVs then need no
// rms_norm_q8 or quantize_q8 launch.
extern "C" __global__ void
gemv_fused_q8(const float* __restrict__ x, const float* __restrict__ g, float eps, const int* __restrict__ xq,
              const float* __restrict__ xqd, int n_in, const float* __restrict__ residual, int gated,
              SEG_ARGS(0), SEG_ARGS(1), SEG_ARGS(2)) {
    BLOCK_SEGMENT
    prefetch_segment(s, up, local, gated);
    orcd_prior_done();
    extern __shared__ float4 xs4[];
    own_q8(x, g, eps, n_in, xs4, xq, xqd);   // not given quantized: quantized here
    gemv_fused_body<ACT_Q8>(nullptr, xq, xqd, n_in, nullptr, 0.f, residual, gated, s, local, up);
}

// Gated mode on int8 activations with whole rows per warp (split 1): warp w takes
// output rows GR * w .. + GR - 1, gate and up of each, and loads all 2 GR pieces of a
// step before it dots any (memory-level parallelism a warp per row of 28 pieces, as
// Qwen's 896-wide rows, lacked; and a quarter of the blocks: one wave, not 2.3 on H100).
// Each row's lane sums and butterfly are gemv_fused_q8's, so the same bits.
#define GR 2
template <class F>
__device__ __forceinline__ void gated_rows8_t(const u8* __restrict__ wg, const u8* __restrict__ wu,
                                              long long rb, int row0, int n_ff, const int* __restrict__ xq,
                                              const float* __restrict__ xd, int n_in, float* g, float* u) {
    const int nb = n_in / F::QK, lane = threadIdx.x & 31;
    const u8* rg[GR];
    const u8* ru[GR];
#pragma unroll
    for (int r = 0; r < GR; ++r) {   // rows past n_ff read the last row; their sums go nowhere
        const long long row = min(row0 + r, n_ff - 1);
        rg[r] = wg + row * rb;
        ru[r] = wu + row * rb;
        g[r] = u[r] = 0.f;
    }
    const int p = lane_piece<F>(lane);
#pragma unroll 1
    for (int blk = lane / F::PIECES; blk < nb; blk += 32 / F::PIECES) {
        Int8Piece<F> pg[GR], pu[GR];
#pragma unroll
        for (int r = 0; r < GR; ++r) {
            pg[r].unpack(rg[r], nb, blk, p);
            pu[r].unpack(ru[r], nb, blk, p);
        }
        const int* xqb = xq + blk * (F::QK / 4);
        const float* xdb = xd + blk * (F::QK / 32);
#pragma unroll
        for (int r = 0; r < GR; ++r) {
            g[r] += pg[r].dot(xqb, xdb);
            u[r] += pu[r].dot(xqb, xdb);
        }
    }
}

// out[row] = silu(x @ wg.T) * (x @ wu.T), wg and wu of format F, rows of rb bytes.
// One kernel per format (gemv_gated_q8_<suffix>): each gets the registers its own
// pieces need (one switch over all formats took 134 for every format, 3 blocks an SM).
// grid ceil(n_ff / (FG_WARPS * GR)), block FG_THREADS.
template <class F>
__device__ __forceinline__ void gemv_gated_q8_t(const int* __restrict__ xq, const float* __restrict__ xqd,
                                                int n_in, const u8* __restrict__ wg, const u8* __restrict__ wu,
                                                long long rb, float* __restrict__ out, int n_ff) {
    const int row0 = (blockIdx.x * FG_WARPS + (threadIdx.x >> 5)) * GR;
    if (row0 >= n_ff) return;   // a whole warp: no shuffle partner left behind
    float g[GR], u[GR];
    gated_rows8_t<F>(wg, wu, rb, row0, n_ff, xq, xqd, n_in, g, u);
#pragma unroll
    for (int r = 0; r < GR; ++r) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            g[r] += __shfl_xor_sync(0xFFFFFFFFu, g[r], off);
            u[r] += __shfl_xor_sync(0xFFFFFFFFu, u[r], off);
        }
        if ((threadIdx.x & 31) == 0 && row0 + r < n_ff) out[row0 + r] = gemv_out(g[r], u[r], true, nullptr, nullptr);
    }
}
#define GATED_KERNEL(NAME, F, TYPE_ID)                                                               \
    extern "C" __global__ void __launch_bounds__(FG_THREADS) gemv_gated_q8_##NAME(                  \
        const float* x, const float* g, float eps, const int* xq, const float* xqd, int n_in,       \
        const u8* wg, const u8* wu, long long rb, float* out, int n_ff) {                           \
        orcd_prefetch_rows(wg, rb, (long long)blockIdx.x * FG_WARPS * GR, FG_WARPS * GR, n_ff);     \
        orcd_prefetch_rows(wu, rb, (long long)blockIdx.x * FG_WARPS * GR, FG_WARPS * GR, n_ff);     \
        orcd_prior_done();                                                                         \
        extern __shared__ float4 xs4[];                                                            \
        own_q8(x, g, eps, n_in, xs4, xq, xqd);                                                     \
        gemv_gated_q8_t<F>(xq, xqd, n_in, wg, wu, rb, out, n_ff);                                  \
    }
ORCD_INT8_FORMATS(GATED_KERNEL)
#undef GATED_KERNEL

// y = x / sqrt(mean(x^2) + eps) * g for one row per block (FG_THREADS), quantized
// per 32 values as quantize_q8 does -> xq [rows, n] int8, xqd [rows, n / 32].
extern "C" __global__ void rms_norm_q8(const float* __restrict__ x, const float* __restrict__ g, float eps,
                                       int n, signed char* __restrict__ xq, float* __restrict__ xqd) {
    orcd_prior_done();
    q8_row(x + (long long)blockIdx.x * n, g, eps, n, (u32*)(xq + (long long)blockIdx.x * n),
           xqd + (long long)blockIdx.x * (n / 32));
}
