// The mixture-of-experts GEMVs and GEMMs of matmul.cu (included there, after gemv_rows
// and the activation sources it reads): a token's chosen experts, a prompt's pairs
// grouped per expert (fp32 FMA and tensor-core tiles), and one token's experts in two
// int8 kernels. Launchers: orcd.ops.matmul_experts; kernels: matmul.cu's FORMAT_KERNELS
// and INT8_KERNELS.
#pragma once

// Row r of the activations, as a gemv_rows source (the MoE kernels index rows).
template <class F>
struct RowsF32 {
    const float* x;
    int n_in;
    __device__ __forceinline__ ActF32<F> row(long long r) const { return act_f32<F>(x + r * n_in, n_in); }
};
template <class F>
struct RowsQ8 {
    const int* xq;
    const float* xd;
    int n_in;
    __device__ __forceinline__ ActQ8<F> row(long long r) const {
        return act_q8<F>(xq + r * (n_in / 4), xd + r * (n_in / 32), n_in);
    }
};

// One (token, slot) pair per blockIdx.y: expert e = ids[pair] picks the weight
// [n_out, n_in] at w + e * expert_bytes and the bias row e; x is per token
// ([T, n_in]) or per pair ([T * k, n_in]). An id outside 0..n_expert-1 writes NaN.
template <class F, class X>
__device__ __forceinline__ void moe_gemv(const u8* __restrict__ w, long long row_bytes,
                                         long long expert_bytes, X x,
                                         int x_per_pair, const int* __restrict__ ids, int k,
                                         int n_expert, const float* __restrict__ bias,
                                         float* __restrict__ out, int n_out, int n_in, int split) {
    const int pair = blockIdx.y;
    const int e = ids[pair];
    float* out_p = out + (long long)pair * n_out;
    if (e < 0 || e >= n_expert) {  // uniform per block: no barrier is skipped by part of it
        const int row = blockIdx.x * (GEMV_WARPS / split) + (threadIdx.x >> 5) / split;
        if ((threadIdx.x & 31) == 0 && (threadIdx.x >> 5) % split == 0 && row < n_out)
            out_p[row] = __int_as_float(0x7FC00000);
        return;
    }
    const float* b_p = bias ? bias + (long long)e * n_out : nullptr;
    gemv_rows<F, 1, 1>(w + (long long)e * expert_bytes, nullptr, row_bytes, x.row(x_per_pair ? pair : pair / k),
                       1, b_p, nullptr, out_p, n_out, n_out, n_in, split, blockIdx.x);
}

// Prefill's grouped expert matmul: one tile of up to MOE_TILE pairs routed to
// the same expert per blockIdx.y (tiles from moe.cu's moe_group). xg and out
// hold one row per pair in grouped order, so a tile's rows are contiguous and
// the expert's weight rows are dequantized once for all of them. Unused tiles
// (rows 0) return at once: the grid is sized for the worst-case tile count.
#define MOE_TILE 8
template <class F, class X>
__device__ __forceinline__ void moe_gemm(const u8* __restrict__ w, long long row_bytes,
                                         long long expert_bytes, X xg,
                                         const int* __restrict__ tiles, const float* __restrict__ bias,
                                         float* __restrict__ out, int n_out, int n_in, int split) {
    const int* tl = tiles + 3 * blockIdx.y;
    const int e = tl[0], start = tl[1], rows = tl[2];
    if (rows == 0) return;  // uniform per block
    gemv_rows<F, MOE_TILE, 1>(w + (long long)e * expert_bytes, nullptr, row_bytes, xg.row(start), rows,
                              bias ? bias + (long long)e * n_out : nullptr, nullptr,
                              out + (long long)start * n_out, n_out, n_out, n_in, split, blockIdx.x);
}


// -- one token's experts in two kernels (decode, int8 activations) -------------------
// With moe.cu's moe_norm_route_q8 these are a MoE block: gate, up and the clamped
// SwiGLU of every chosen expert, its output quantized to int8 for the down GEMV;
// then down, the experts' weighted sum and the residual add. Each weight byte is
// read once; no atomics: every output is summed in a fixed order.

#include "moe_q8.cuh"   // swiglu_oai, warp_sums and the gate/up block

// Block (blockIdx.x, pair = blockIdx.y) of moe_gate_up_rows, x and ids from global memory.
template <class F>
__device__ __forceinline__ void moe_gate_up_q8(const u8* __restrict__ wg, const u8* __restrict__ wu,
                                               long long row_bytes, long long expert_bytes,
                                               const int* __restrict__ xq, const float* __restrict__ xd,
                                               const int* __restrict__ ids, int k, int n_expert,
                                               const float* __restrict__ bg, const float* __restrict__ bu,
                                               float alpha, float limit, signed char* __restrict__ hq,
                                               float* __restrict__ hd, int n_ff, int n_in) {
    const int pair = blockIdx.y;
    moe_gate_up_rows<F>(wg, wu, row_bytes, expert_bytes, xq + (long long)(pair / k) * (n_in / 4),
                        xd + (long long)(pair / k) * (n_in / 32), ids[pair], n_expert, bg, bu, alpha,
                        limit, hq, hd, n_ff, n_in, pair, blockIdx.x);
}

// Row r = blockIdx.x * MOE_WARPS + warp of token t = blockIdx.y:
// out[t, r] = residual[t, r] + sum_j weights[t, j] * (h_{t,j} . wd[e_j][r] + bd[e_j][r]),
// summed over the k <= MOE_MAX_K chosen experts in choice order (as moe_ref).
template <class F>
__device__ __forceinline__ void moe_down_sum_q8(const u8* __restrict__ w, long long row_bytes,
                                                long long expert_bytes, const int* __restrict__ hq,
                                                const float* __restrict__ hd, const int* __restrict__ ids,
                                                const float* __restrict__ weights, int k, int n_expert,
                                                const float* __restrict__ bias, const float* __restrict__ residual,
                                                float* __restrict__ out, int D, int n_ff) {
    const int t = blockIdx.y, lane = threadIdx.x & 31;
    const int r = blockIdx.x * MOE_WARPS + (threadIdx.x >> 5);
    if (r >= D) return;   // whole warps: no barrier below
    const int* id = ids + (long long)t * k;
    bool ok = true;
    for (int j = 0; j < k; ++j) ok &= id[j] >= 0 && id[j] < n_expert;
    float acc[MOE_MAX_K];
#pragma unroll
    for (int j = 0; j < MOE_MAX_K; ++j) acc[j] = 0.f;
    if (ok) {
        const int nb = n_ff / F::QK;
        const int p = lane_piece<F>(lane);
        for (int blk = lane / F::PIECES; blk < nb; blk += 32 / F::PIECES) {
#pragma unroll
            for (int j = 0; j < MOE_MAX_K; ++j)
                if (j < k) {
                    const long long pj = (long long)t * k + j;
                    acc[j] += F::dot8(w + id[j] * expert_bytes + (long long)r * row_bytes, nb, blk, p,
                                      hq + pj * (n_ff / 4) + blk * (F::QK / 4),
                                      hd + pj * (n_ff / 32) + blk * (F::QK / 32));
                }
        }
    }
    warp_sums<MOE_MAX_K>(acc);
    if (lane != 0) return;
    float m = 0.f;
#pragma unroll
    for (int j = 0; j < MOE_MAX_K; ++j)
        if (j < k) m += weights[(long long)t * k + j] * (acc[j] + (ok ? bias[(long long)id[j] * D + r] : 0.f));
    out[(long long)t * D + r] = ok ? residual[(long long)t * D + r] + m : __int_as_float(0x7FC00000);
}

// -- a prompt's grouped expert matmul on the tensor cores --------------------------------
// tc_tile: one block of 4 warps per (TC_ROWS = 64 weight rows, tile of up to TC_TILE = 64
// pairs routed to one expert).
// Per K step of TC_BK values (one block of the format, at least 32): the 64 weight rows
// are dequantized into shared memory as fp16, one piece per thread as dequant_rows does,
// the tile's activations rounded to fp16 beside them; then warp w multiplies its 16 rows
// of x by the 64 weight rows with mma.sync m16n8k16 (fp16 operands, fp32 accumulators),
// fragments laid out as attention.cu's prefill lays them. Each weight is dequantized once
// per 64 pairs, in the SM, never written out as fp16 (moe_gemm above: once per 8 pairs,
// fp32 FMA). The same tile for the dense prefill (one launch per linear, no fp16 copy)
// lost to cuBLASLt on the fp16 copy on the H100, bench/RESULTS.md ("gemm_tc"): removed.
#define TC_TILE 64
#define TC_ROWS 64
#define TC_THREADS 128
#define TC_BK(F) ((F::QK) < 32 ? 32 : (F::QK))

__device__ __forceinline__ u32 f16_pair(float lo, float hi) {
    return (u32)f32_to_f16(lo) | ((u32)f32_to_f16(hi) << 16);
}

// Weights: the TC_ROWS x BK tile at column k0 of the weight rows row0.., fp16 into Ws.
template <class F>
__device__ __forceinline__ void tc_load_weights(const u8* __restrict__ we, long long row_bytes, int row0,
                                                int n_out, int nb, int k0, u32* Ws, int ld) {
    constexpr int BLOCKS = TC_BK(F) / F::QK, PER_ROW = BLOCKS * F::PIECES;
    for (int i = threadIdx.x; i < TC_ROWS * PER_ROW; i += TC_THREADS) {
        const int r = i / PER_ROW, j = i % PER_ROW, p = j % F::PIECES;
        float v[F::RUNS * F::RUN];
        if (row0 + r < n_out) {
            F::load(we + (long long)(row0 + r) * row_bytes, nb, k0 / F::QK + j / F::PIECES, p, v);
        } else {
#pragma unroll
            for (int q = 0; q < F::RUNS * F::RUN; ++q) v[q] = 0.f;
        }
        u32* d = Ws + (r * ld + (j / F::PIECES) * F::QK + F::base(p)) / 2;   // pairs of halves
#pragma unroll
        for (int rr = 0; rr < F::RUNS; ++rr)
#pragma unroll
            for (int q = 0; q < F::RUN; q += 2)
                d[(rr * F::STRIDE + q) / 2] = f16_pair(v[rr * F::RUN + q], v[rr * F::RUN + q + 1]);
    }
}

// out[r, row0 + j] = x[r] . we[row0 + j] (+ bias[row0 + j]) for the tile's rows r < rows
// (x, out: the tile's first rows) and the block's TC_ROWS weight rows row0 + j < n_out.
template <class F>
__device__ __forceinline__ void tc_tile(const u8* __restrict__ we, long long row_bytes,
                                        const float* __restrict__ xt, int rows,
                                        const float* __restrict__ bias, float* __restrict__ out,
                                        int n_out, int n_in) {
    constexpr int BK = TC_BK(F), LD = BK + 8;   // halves per shared row (+8: no bank conflicts)
    extern __shared__ __align__(16) unsigned char tc_smem[];
    u32* Xs = (u32*)tc_smem;                    // [TC_TILE][LD] halves, as pairs
    u32* Ws = Xs + TC_TILE * LD / 2;            // [TC_ROWS][LD] halves
    const int row0 = blockIdx.x * TC_ROWS, tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, c = lane & 3;
    const int ra = 16 * warp + g, rb = ra + 8;  // this thread's two rows of x in the tile
    float acc[TC_ROWS / 8][4];
#pragma unroll
    for (int n = 0; n < TC_ROWS / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

    for (int k0 = 0; k0 < n_in; k0 += BK) {
        for (int i = tid; i < TC_TILE * BK / 4; i += TC_THREADS) {   // the tile's rows of x
            const int r = i / (BK / 4), q = (i % (BK / 4)) * 4;
            float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
            if (r < rows) x = *(const float4*)(xt + (long long)r * n_in + k0 + q);
            u32* d = Xs + (r * LD + q) / 2;
            d[0] = f16_pair(x.x, x.y);
            d[1] = f16_pair(x.z, x.w);
        }
        tc_load_weights<F>(we, row_bytes, row0, n_out, n_in / F::QK, k0, Ws, LD);
        __syncthreads();
#pragma unroll
        for (int d0 = 0; d0 < BK; d0 += 16) {
            const u32 a[4] = {Xs[(ra * LD + d0) / 2 + c], Xs[(rb * LD + d0) / 2 + c],
                              Xs[(ra * LD + d0 + 8) / 2 + c], Xs[(rb * LD + d0 + 8) / 2 + c]};
#pragma unroll
            for (int n = 0; n < TC_ROWS / 8; ++n) {
                const u32* wr = Ws + ((n * 8 + g) * LD + d0) / 2 + c;
                const u32 b[2] = {wr[0], wr[4]};
                mma_f16_16816(acc[n], a, b);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int n = 0; n < TC_ROWS / 8; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {   // C: (g, 2c + i % 2) and (g + 8, ...)
            const int r = i < 2 ? ra : rb, col = row0 + n * 8 + 2 * c + (i & 1);
            if (r < rows && col < n_out) out[(long long)r * n_out + col] = acc[n][i] + (bias ? bias[col] : 0.f);
        }
}

// The grouped expert matmul: tile blockIdx.y = (expert, first pair, pairs) of moe_group.
template <class F>
__device__ __forceinline__ void moe_gemm_tc(const u8* __restrict__ w, long long row_bytes,
                                            long long expert_bytes, const float* __restrict__ xg,
                                            const int* __restrict__ tiles, const float* __restrict__ bias,
                                            float* __restrict__ out, int n_out, int n_in) {
    const int* tl = tiles + 3 * blockIdx.y;
    const int e = tl[0], start = tl[1], rows = tl[2];
    if (rows == 0) return;  // uniform per block
    tc_tile<F>(w + (long long)e * expert_bytes, row_bytes, xg + (long long)start * n_in, rows,
               bias ? bias + (long long)e * n_out : nullptr, out + (long long)start * n_out, n_out, n_in);
}
