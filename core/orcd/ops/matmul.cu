// Quantized matmul family: GEMV for decode, weight dequantization to fp16/bf16
// scratch for the prefill GEMM, embedding lookup, and the per-token expert
// GEMV of a mixture of experts. Weights stay quantized, in their format's VRAM
// layout (base.cuh); each thread dequantizes one piece of a block into registers
// (the format structs the generated formats.cuh brings). Accumulation is fp32.
//
// GEMV layout: a block of 4 warps; `split` (1, 2 or 4) warps share one output
// row, so a block covers 4 / split rows. Within a row, lane l of part s takes
// pieces s * 32 + l, + 32 * split, ...: consecutive lanes read consecutive
// bytes of the row (coalesced), and every weight byte is read once for all
// T <= TM tokens. Sums: warp butterfly, then the split warps' partials added
// in a fixed order through shared memory -- no atomics, so the same inputs
// give the same bits.
#include "pdl.cuh"
#include "act.cuh"
#include "mma.cuh"
#include "base.cuh"
#include "formats.cuh"

#define GEMV_THREADS 128
#define GEMV_WARPS (GEMV_THREADS / 32)

// Activations as gemv_rows sees them: `piece` is called once per weight piece,
// `dot(t)` then gives that piece's dot with token t's row.
// ActF32: fp32 rows [nT, n_in]; the piece is dequantized once for all tokens.
template <class F>
struct ActF32 {
    const float* __restrict__ x;
    int n_in;
    float v[F::RUNS * F::RUN];
    int pos;
    __device__ __forceinline__ void piece(const u8* row, int nb, int b, int p) {
        F::load(row, nb, b, p, v);
        pos = b * F::QK + F::base(p);
    }
    __device__ __forceinline__ float dot(int t) const { return dot_piece<F>(v, x + (long long)t * n_in + pos); }
};

// ActQ8: int8 rows xq [nT, n_in] (read as ints) with per-32 scales xd [nT, n_in / 32]
// (quantize_q8); integer formats only (F::INT8), the piece dotted with dp4a. The piece
// is unpacked once for all T rows where the format splits dot8 (base.cuh's Int8Piece).
template <class F>
struct ActQ8 {
    const int* __restrict__ xq;
    const float* __restrict__ xd;
    int n_in;
    Int8Piece<F> w;
    int b;
    __device__ __forceinline__ void piece(const u8* row, int nb, int b_, int p) {
        w.unpack(row, nb, b_, p);
        b = b_;
    }
    __device__ __forceinline__ float dot(int t) const {
        return w.dot(xq + (long long)t * (n_in / 4) + b * (F::QK / 4),
                     xd + (long long)t * (n_in / 32) + b * (F::QK / 32));
    }
};

// NW = 1: out[t, row] = (residual[t, row] +) sum_k w[row, k] * x[t, k] (+ bias[row]);
// NW = 2 (gated): out[t, row] = silu(gate) * up, gate and up the sums of w's and w2's
// rows, each summed as NW = 1 sums it (activation.cu's swiglu_f32 of the two GEMVs, the
// same bits). For t < nT <= TM; x the activations A (ActF32 or ActQ8); out: [nT, out_stride];
// blk: this block's index among the blocks of w (blockIdx.x, or less in a multi-weight launch).
#if ORCD_GEMV_BATCH > 1
// a where ok, else b -- through an opaque selp, so that the compiler computes a (and
// loads its piece) unconditionally instead of moving that work behind a branch on ok.
// Selecting the new sum (not the dot) keeps acc + dot the expression the default loop
// has, so it contracts into the same FMA: on a card, masking the dot gave other bits.
__device__ __forceinline__ float pick(bool ok, float a, float b) {
#ifdef __CUDA_ARCH__
    float r;
    asm volatile("{ .reg .pred p; setp.ne.s32 p, %3, 0; selp.f32 %0, %1, %2, p; }"
                 : "=f"(r) : "f"(a), "f"(b), "r"((int)ok));
    return r;
#else   // the CPU simulator: the same value
    return ok ? a : b;
#endif
}
#endif

template <class F, int TM, int NW, class A>
__device__ __forceinline__ void gemv_rows(const u8* __restrict__ w, const u8* __restrict__ w2,
                                          long long row_bytes, A x, int nT, const float* __restrict__ bias,
                                          const float* __restrict__ residual, float* __restrict__ out,
                                          int out_stride, int n_out, int n_in, int split, int blk) {
    __shared__ float partial[NW][GEMV_WARPS][TM];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row = blk * (GEMV_WARPS / split) + warp / split, part = warp % split;
    const int nb = n_in / F::QK;
    float acc[NW][TM];
#pragma unroll
    for (int v = 0; v < NW; ++v)
#pragma unroll
        for (int t = 0; t < TM; ++t) acc[v][t] = 0.f;
    if (row < n_out) {
        const u8* wr[2] = {w + (long long)row * row_bytes, NW == 2 ? w2 + (long long)row * row_bytes : nullptr};
        const int c0 = part * 32 + lane, p = lane_piece<F>(c0), step = 32 * split / F::PIECES;
#if ORCD_GEMV_BATCH > 1
        // (an experiment, off unless the source defines it: bench_gemv.py --variant)
        // ORCD_GEMV_BATCH pieces loaded before any is dotted, so a lane waits for memory
        // once a batch: the loop below dots each piece as it loads it -- the compiler
        // cannot lift the next piece's loads above the loop's exit branch (SASS, sm_90).
        // Past the row's end a piece re-reads the batch's first block and its sum is
        // dropped: the same sums.
        constexpr int K = ORCD_GEMV_BATCH;
#pragma unroll 1
        for (int blk = c0 / F::PIECES; blk < nb; blk += K * step) {
            A xk[K][NW];
#pragma unroll
            for (int k = 0; k < K; ++k)
#pragma unroll
                for (int v = 0; v < NW; ++v) {
                    xk[k][v] = x;
                    xk[k][v].piece(wr[v], nb, blk + k * step < nb ? blk + k * step : blk, p);
                }
#pragma unroll
            for (int k = 0; k < K; ++k)
#pragma unroll
                for (int t = 0; t < TM; ++t)
                    if (t == 0 || t < nT)   // row 0 always (nT >= 1): no branch around its loads
#pragma unroll
                        for (int v = 0; v < NW; ++v)
                            acc[v][t] = pick(blk + k * step < nb, acc[v][t] + xk[k][v].dot(t), acc[v][t]);
        }
#else
        A xv[NW];
#pragma unroll
        for (int v = 0; v < NW; ++v) xv[v] = x;
#pragma unroll 2
        for (int blk = c0 / F::PIECES; blk < nb; blk += step) {
#pragma unroll
            for (int v = 0; v < NW; ++v) xv[v].piece(wr[v], nb, blk, p);
#pragma unroll
            for (int t = 0; t < TM; ++t)
                if (t < nT)
#pragma unroll
                    for (int v = 0; v < NW; ++v) acc[v][t] += xv[v].dot(t);
        }
#endif
    }
#pragma unroll
    for (int v = 0; v < NW; ++v)
#pragma unroll
        for (int t = 0; t < TM; ++t) {
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) acc[v][t] += __shfl_xor_sync(0xFFFFFFFFu, acc[v][t], off);
            if (lane == 0) partial[v][warp][t] = acc[v][t];
        }
    __syncthreads();
    if (part == 0 && lane < nT && row < n_out) {
        float s[NW];
#pragma unroll
        for (int v = 0; v < NW; ++v) {
            s[v] = 0.f;
            for (int k = 0; k < split; ++k) s[v] += partial[v][warp + k][lane];
        }
        const long long at = (long long)lane * out_stride + row;
        out[at] = gemv_out(s[0], s[NW - 1], NW == 2, bias ? bias + row : nullptr, residual ? residual + at : nullptr);
    }
}

template <class F>
__device__ __forceinline__ ActF32<F> act_f32(const float* x, int n_in) {
    ActF32<F> a;
    a.x = x;
    a.n_in = n_in;
    return a;
}

template <class F>
__device__ __forceinline__ ActQ8<F> act_q8(const int* xq, const float* xd, int n_in) {
    ActQ8<F> a;
    a.xq = xq;
    a.xd = xd;
    a.n_in = n_in;
    return a;
}

#include "matmul_experts.cuh"   // the MoE GEMVs and GEMMs, over gemv_rows

// Embedding rows: one thread per piece of row ids[t] (blockIdx.y = t); an id
// outside the table writes NaN.
template <class F>
__device__ __forceinline__ void embed_rows(const u8* __restrict__ table, long long row_bytes,
                                           const int* __restrict__ ids, int n_vocab,
                                           float* __restrict__ out, int D) {
    const int t = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= (D / F::QK) * F::PIECES) return;
    const int id = ids[t], blk = c / F::PIECES, p = c % F::PIECES;
    float v[F::RUNS * F::RUN];
    if (id >= 0 && id < n_vocab) {
        F::load(table + (long long)id * row_bytes, D / F::QK, blk, p, v);
    } else {
#pragma unroll
        for (int i = 0; i < F::RUNS * F::RUN; ++i) v[i] = __int_as_float(0x7FC00000);
    }
    float* o = out + (long long)t * D + blk * F::QK + F::base(p);
#pragma unroll
    for (int r = 0; r < F::RUNS; ++r)
#pragma unroll
        for (int i = 0; i < F::RUN; i += 4) {
            const float* vv = v + r * F::RUN + i;
            *(float4*)(o + r * F::STRIDE + i) = make_float4(vv[0], vv[1], vv[2], vv[3]);
        }
}

// Rows [row0, row0 + n_rows) of w as fp16 (or bf16) into out [n_rows, n_in]:
// the scratch operand of the prefill GEMM. One thread per piece, DQ_THREADS per block.
// A piece's values are runs at strided offsets, so a thread writing its own piece to
// global memory uses a fraction of each 32-byte sector it touches (8 of 64 bytes per
// store on Q4_K: the copy ran at ~0.6 TB/s on an H100). The block's pieces cover whole
// quant blocks, hence one contiguous range of out: the pieces are staged in shared
// memory at their offsets in that range, and the block writes it with 16-byte stores.
#define DQ_THREADS 256
template <class F, bool BF16>
__device__ __forceinline__ void dequant_rows(const u8* __restrict__ w, long long row_bytes, int row0,
                                             int n_rows, int n_in, u16* __restrict__ out) {
    constexpr int VPP = F::RUNS * F::RUN;   // values per piece
    static_assert(DQ_THREADS % F::PIECES == 0, "a block covers whole quant blocks");
    static_assert(VPP % 8 == 0, "the range is written in 16-byte stores");
    static_assert(F::PIECES * VPP == F::QK, "a piece holds its share of the block");
    __shared__ __align__(16) u16 stage[DQ_THREADS * VPP];
    const int per_row = (n_in / F::QK) * F::PIECES;
    const long long total = (long long)n_rows * per_row;
    const long long c0 = (long long)blockIdx.x * DQ_THREADS, c = c0 + threadIdx.x;
    if (c < total) {
        const int r_local = (int)(c / per_row), k = (int)(c % per_row);
        const int blk = k / F::PIECES, p = k % F::PIECES;
        float v[VPP];
        F::load(w + (long long)(row0 + r_local) * row_bytes, n_in / F::QK, blk, p, v);
        // the piece's offset in the block's range: whole quant blocks before it, then base(p)
        u16* o = stage + (threadIdx.x / F::PIECES) * F::QK + F::base(p);
#pragma unroll
        for (int r = 0; r < F::RUNS; ++r)
#pragma unroll
            for (int i = 0; i < F::RUN; i += 4) {
                u16 h[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float f = v[r * F::RUN + i + j];
                    h[j] = BF16 ? f32_to_bf16(f) : f32_to_f16(f);
                }
                *(uint2*)(o + r * F::STRIDE + i) = make_uint2((u32)h[0] | ((u32)h[1] << 16),
                                                              (u32)h[2] | ((u32)h[3] << 16));
            }
    }
    __syncthreads();
    const long long pieces = total - c0 < DQ_THREADS ? total - c0 : DQ_THREADS;
    const int n16 = (int)(pieces * VPP / 8);   // 16-byte chunks of the block's range
    uint4* dst = (uint4*)(out + c0 * VPP);     // pieces c0.. start at value c0 * VPP of out
    for (int i = threadIdx.x; i < n16; i += DQ_THREADS) dst[i] = ((const uint4*)stage)[i];
}

// The GEMV kernels' start: their block's weight rows into L2, then wait for the kernel before.
#define GEMV_PROLOGUE                                                                              \
    orcd_prefetch_rows(w, row_bytes, (long long)blockIdx.x * (GEMV_WARPS / split), GEMV_WARPS / split, \
                       n_out);                                                                     \
    orcd_prior_done();
#define GEMV_ARGS const u8* w, long long row_bytes, const float* x, int nT, const float* bias, \
    const float* residual, float* out, int n_out, int n_in, int split
#define GEMV_CALL(F, TM) gemv_rows<F, TM, 1>(w, nullptr, row_bytes, act_f32<F>(x, n_in), nT, bias, residual, out, \
                                             n_out, n_out, n_in, split, blockIdx.x)

// The int8 GEMV takes up to three weights of one format (and row size) times the same
// activations in one launch -- a decode batch's q, k and v: segment i is the next
// blocks##i blocks, with its own bias, output, rows and split, each row summed as it is
// alone. The residual is added to segment 0 (linear_add's one weight).
struct GemvSeg {
    const u8* w;
    const float* bias;
    float* out;
    int n_out, split, blk;
};
#define GEMV_SEG_ARGS(i) const u8 *w##i, const float *bias##i, float *out##i, int n##i, int split##i, int blocks##i
__device__ __forceinline__ GemvSeg gemv_seg(int b, GEMV_SEG_ARGS(0), GEMV_SEG_ARGS(1), GEMV_SEG_ARGS(2)) {
    if (b < blocks0) return {w0, bias0, out0, n0, split0, b};
    b -= blocks0;
    if (b < blocks1) return {w1, bias1, out1, n1, split1, b};
    (void)blocks2;
    return {w2, bias2, out2, n2, split2, b - blocks1};
}
#define GEMV_Q8_ARGS long long row_bytes, const int* xq, const float* xd, int nT, int n_in, \
    const float* residual, GEMV_SEG_ARGS(0), GEMV_SEG_ARGS(1), GEMV_SEG_ARGS(2)
// index math on the arguments only: allowed before the wait (tests/backend/test_pdl.py)
#define GEMV_SEGMENT const GemvSeg sg = gemv_seg(blockIdx.x, w0, bias0, out0, n0, split0, blocks0, w1, bias1, \
                                                 out1, n1, split1, blocks1, w2, bias2, out2, n2, split2, blocks2);
#define GEMV_Q8_PROLOGUE                                                                           \
    orcd_prefetch_rows(sg.w, row_bytes, (long long)sg.blk * (GEMV_WARPS / sg.split), GEMV_WARPS / sg.split, \
                       sg.n_out);                                                                  \
    orcd_prior_done();
#define GEMV_Q8_CALL(F, TM) gemv_rows<F, TM, 1>(sg.w, nullptr, row_bytes, act_q8<F>(xq, xd, n_in), nT, sg.bias, \
    (int)blockIdx.x < blocks0 ? residual : nullptr, sg.out, sg.n_out, sg.n_out, n_in, sg.split, sg.blk)
// gate and up rows (wg, wu: [n_ff, n_in] each) and silu(gate) * up, in one launch
#define GEMV_GATED_Q8(NAME, F, TM)                                                                    \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_q8_gated_##NAME##_t##TM(          \
        const u8* wg, const u8* wu, long long row_bytes, const int* xq, const float* xd, int nT,     \
        float* out, int n_ff, int n_in, int split) {                                                 \
        orcd_prefetch_rows(wg, row_bytes, (long long)blockIdx.x * (GEMV_WARPS / split), GEMV_WARPS / split, n_ff); \
        orcd_prefetch_rows(wu, row_bytes, (long long)blockIdx.x * (GEMV_WARPS / split), GEMV_WARPS / split, n_ff); \
        orcd_prior_done();                                                                           \
        gemv_rows<F, TM, 2>(wg, wu, row_bytes, act_q8<F>(xq, xd, n_in), nT, nullptr, nullptr, out,  \
                            n_ff, n_ff, n_in, split, blockIdx.x);                                    \
    }

#define FORMAT_KERNELS(NAME, F, TYPE_ID)                                                                     \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_##NAME##_t1(GEMV_ARGS) { GEMV_PROLOGUE GEMV_CALL(F, 1); } \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_##NAME##_t2(GEMV_ARGS) { GEMV_PROLOGUE GEMV_CALL(F, 2); } \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_##NAME##_t4(GEMV_ARGS) { GEMV_PROLOGUE GEMV_CALL(F, 4); } \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_##NAME##_t8(GEMV_ARGS) { GEMV_PROLOGUE GEMV_CALL(F, 8); } \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_##NAME##_t16(GEMV_ARGS) { GEMV_PROLOGUE GEMV_CALL(F, 16); } \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) moe_gemv_##NAME(                    \
        const u8* w, long long row_bytes, long long expert_bytes, const float* x, int x_per_pair,  \
        const int* ids, int k, int n_expert, const float* bias, float* out, int n_out, int n_in,   \
        int split) { orcd_prior_done();                                          \
        moe_gemv<F>(w, row_bytes, expert_bytes, RowsF32<F>{x, n_in}, x_per_pair, ids, k, n_expert, bias, \
                    out, n_out, n_in, split);                                                       \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) moe_gemm_##NAME(                    \
        const u8* w, long long row_bytes, long long expert_bytes, const float* xg, const int* tiles, \
        const float* bias, float* out, int n_out, int n_in, int split) { orcd_prior_done(); \
        moe_gemm<F>(w, row_bytes, expert_bytes, RowsF32<F>{xg, n_in}, tiles, bias, out, n_out, n_in,   \
                    split);                                                                         \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) moe_gemm_tc_##NAME(                  \
        const u8* w, long long row_bytes, long long expert_bytes, const float* xg, const int* tiles, \
        const float* bias, float* out, int n_out, int n_in) { orcd_prior_done(); \
        moe_gemm_tc<F>(w, row_bytes, expert_bytes, xg, tiles, bias, out, n_out, n_in);             \
    }                                                                                               \
    extern "C" __global__ void embed_##NAME(const u8* table, long long row_bytes, const int* ids,   \
                                            int n_vocab, float* out, int D) { orcd_prior_done(); \
        embed_rows<F>(table, row_bytes, ids, n_vocab, out, D);                                      \
    }                                                                                               \
    extern "C" __global__ void dequant_f16_##NAME(const u8* w, long long row_bytes, int row0,       \
                                                  int n_rows, int n_in, u16* out) { orcd_prior_done(); \
        dequant_rows<F, false>(w, row_bytes, row0, n_rows, n_in, out);                              \
    }                                                                                               \
    extern "C" __global__ void dequant_bf16_##NAME(const u8* w, long long row_bytes, int row0,      \
                                                   int n_rows, int n_in, u16* out) { orcd_prior_done(); \
        dequant_rows<F, true>(w, row_bytes, row0, n_rows, n_in, out);                               \
    }

// The int8-activation variants of the GEMV kernels, for the integer formats.
#define INT8_KERNELS(NAME, F, TYPE_ID)                                                                       \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_q8_##NAME##_t1(GEMV_Q8_ARGS) { GEMV_SEGMENT GEMV_Q8_PROLOGUE GEMV_Q8_CALL(F, 1); } \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_q8_##NAME##_t2(GEMV_Q8_ARGS) { GEMV_SEGMENT GEMV_Q8_PROLOGUE GEMV_Q8_CALL(F, 2); } \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_q8_##NAME##_t4(GEMV_Q8_ARGS) { GEMV_SEGMENT GEMV_Q8_PROLOGUE GEMV_Q8_CALL(F, 4); } \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_q8_##NAME##_t8(GEMV_Q8_ARGS) { GEMV_SEGMENT GEMV_Q8_PROLOGUE GEMV_Q8_CALL(F, 8); } \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_q8_##NAME##_t16(GEMV_Q8_ARGS) { GEMV_SEGMENT GEMV_Q8_PROLOGUE GEMV_Q8_CALL(F, 16); } \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_q8_##NAME##_t32(GEMV_Q8_ARGS) { GEMV_SEGMENT GEMV_Q8_PROLOGUE GEMV_Q8_CALL(F, 32); } \
    GEMV_GATED_Q8(NAME, F, 1) GEMV_GATED_Q8(NAME, F, 2) GEMV_GATED_Q8(NAME, F, 4) GEMV_GATED_Q8(NAME, F, 8)  \
    GEMV_GATED_Q8(NAME, F, 16)                                                                       \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) moe_gemv_q8_##NAME(                 \
        const u8* w, long long row_bytes, long long expert_bytes, const int* xq, const float* xd,  \
        int x_per_pair, const int* ids, int k, int n_expert, const float* bias, float* out,        \
        int n_out, int n_in, int split) { orcd_prior_done();                     \
        moe_gemv<F>(w, row_bytes, expert_bytes, RowsQ8<F>{xq, xd, n_in}, x_per_pair, ids, k, n_expert, \
                    bias, out, n_out, n_in, split);                                                 \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) moe_gate_up_q8_##NAME(                       \
        const u8* wg, const u8* wu, long long row_bytes, long long expert_bytes, const int* xq,     \
        const float* xd, const int* ids, int k, int n_expert, const float* bg, const float* bu,     \
        float alpha, float limit, signed char* hq, float* hd, int n_ff, int n_in) { orcd_prior_done(); \
        moe_gate_up_q8<F>(wg, wu, row_bytes, expert_bytes, xq, xd, ids, k, n_expert, bg, bu, alpha, \
                          limit, hq, hd, n_ff, n_in);                                               \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) moe_down_sum_q8_##NAME(                      \
        const u8* w, long long row_bytes, long long expert_bytes, const int* hq, const float* hd,   \
        const int* ids, const float* weights, int k, int n_expert, const float* bias,               \
        const float* residual, float* out, int D, int n_ff) { orcd_prior_done(); \
        moe_down_sum_q8<F>(w, row_bytes, expert_bytes, hq, hd, ids, weights, k, n_expert, bias,     \
                           residual, out, D, n_ff);                                                 \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) moe_gemm_q8_##NAME(                 \
        const u8* w, long long row_bytes, long long expert_bytes, const int* xq, const float* xd,  \
        const int* tiles, const float* bias, float* out, int n_out, int n_in, int split) { orcd_prior_done(); \
        moe_gemm<F>(w, row_bytes, expert_bytes, RowsQ8<F>{xq, xd, n_in}, tiles, bias, out, n_out,  \
                    n_in, split);                                                                   \
    }

// one set per format of the table (formats.cuh, generated: orcd.quant.device)
ORCD_FORMATS(FORMAT_KERNELS)
ORCD_INT8_FORMATS(INT8_KERNELS)
// the decode batch's GEMV on the int8 tensor cores, for the formats with mma_chunk
#include "gemv_mma.cuh"

// x [n_groups * 32] fp32 -> xq int8 and xd [n_groups]: per 32 values xd = amax / 127,
// xq = rint(x / xd) (0 where xd = 0), as matmul.py's quantize_q8_ref. One thread
// per group (rows of a multiple of 32 values flatten into groups); grid-stride.
extern "C" __global__ void quantize_q8(const float* __restrict__ x, long long n_groups,
                                       signed char* __restrict__ xq, float* __restrict__ xd) {
    orcd_prior_done();
    for (long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x; g < n_groups;
         g += (long long)gridDim.x * blockDim.x) {
        float v[32];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float4 f = __ldg((const float4*)(x + g * 32) + i);
            v[4 * i] = f.x; v[4 * i + 1] = f.y; v[4 * i + 2] = f.z; v[4 * i + 3] = f.w;
        }
        u32 w[8];
        const float d = quantize_group(v, w);
        uint4* o = (uint4*)(xq + g * 32);
        o[0] = make_uint4(w[0], w[1], w[2], w[3]);
        o[1] = make_uint4(w[4], w[5], w[6], w[7]);
        xd[g] = d;
    }
}

// -- prefill glue around the GEMM ------------------------------------------------------

// x [n] fp32 -> fp16 / bf16 (the GEMM's activation operand).
extern "C" __global__ void to_half(const float* __restrict__ x, u16* __restrict__ y, long long n, int bf16) {
    orcd_prior_done();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = bf16 ? f32_to_bf16(x[i]) : f32_to_f16(x[i]);
}

// out[t, col0 + j] = y[t, j] (+ bias[col0 + j]) for the GEMM's [T, cols] half result.
extern "C" __global__ void from_half(const u16* __restrict__ y, int T, int cols, const float* __restrict__ bias,
                                     float* __restrict__ out, int n_out, int col0, int bf16) {
    orcd_prior_done();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)T * cols) return;
    const int t = (int)(i / cols), j = (int)(i % cols);
    float v = bf16 ? bf16_to_f32(y[i]) : f16_to_f32(y[i]);
    if (bias) v += bias[col0 + j];
    out[(long long)t * n_out + col0 + j] = v;
}
