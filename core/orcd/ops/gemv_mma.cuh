// The decode batch's GEMV on the int8 tensor cores (mma.sync m16n8k32 s8): the rows of
// a batch of decodes (CudaOps.per_row) times a weight in its format's VRAM layout, for
// the formats whose struct has mma_chunk (MMA = true; base.cuh). Included by matmul.cu.
//
// A block of MMA_WARPS warps owns 16 weight rows; warp w takes the row's chunks w,
// w + MMA_WARPS, ... (a chunk: MMA_G groups of 32 values). Per group the weights are
// the A operand (16 rows x 32 values, unpacked once) and each tile of 8 activation rows
// the B operand (int8, quantize_q8), one MMA per tile: the int32 sums are exact, so a
// group's sum for (row, token) does not depend on the other tokens. Each is scaled in
// fp32 (d_w * d_x, less m_w * d_x * sum x for formats with an offset) and added to the
// lane's sum of its warp's groups, in group order; the warps' sums then add in warp order.
// Every (row, token) sees the same operations whatever the batch, its place in it and
// the other rows: a stream's logits are the same alone or batched (the dp4a GEMV
// gemv_rows sums in another order: this kernel serves every rows bucket alike).
//
// Fragments (PTX's, g = lane / 4, q = lane % 4): A {row g, g + 8} x {values 4q.., 16+4q..}
// is mma_chunk's lo/hi of rows g and g + 8; B is token 8n + g's values 4q.., 16+4q..;
// C holds (row g or g + 8, token 8n + 2q or 8n + 2q + 1).
#pragma once
#include "pdl.cuh"
#include "act.cuh"
#include "mma.cuh"

#define MMA_WARPS 8
#define MMA_THREADS (32 * MMA_WARPS)
#define MMA_ROWS 16

// acc[(row r, token j)] += the group's int sums s scaled: s[2r + j] for rows (g, g + 8)
// and tokens (t0, t0 + 1), with row scales d[r] and token scales dx[j].
__device__ __forceinline__ void mma_scale(float* acc, const int* s, const float* d, const float* dx) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int j = 0; j < 2; ++j) acc[2 * r + j] = fmaf((float)s[2 * r + j], d[r] * dx[j], acc[2 * r + j]);
}

// acc (this lane's C: rows g, g + 8 x tokens 2q, 2q + 1 of a tile) += group i of the
// chunk k (rows g, g + 8) times the tile's activations b, scaled as the header says.
template <class F>
__device__ __forceinline__ void mma_chunk_step(float* acc, const MmaChunk<F::MMA_G>* k, int i,
                                               const u32* b, const float* dx) {
    const u32 a[4] = {k[0].lo[i], k[1].lo[i], k[0].hi[i], k[1].hi[i]};
    if (F::MMA_S16) {   // a scale per 16 values: the two halves apart
        int s[4] = {0, 0, 0, 0}, s2[4] = {0, 0, 0, 0};
        mma_s8_k16(s, a, b);
        mma_s8_k16(s2, a + 2, b + 1);
        const float d0[2] = {k[0].d[i][0], k[1].d[i][0]}, d1[2] = {k[0].d[i][1], k[1].d[i][1]};
        mma_scale(acc, s, d0, dx);
        mma_scale(acc, s2, d1, dx);
    } else {
        int s[4] = {0, 0, 0, 0};
        mma_s8_k32(s, a, b);
        const float d[2] = {k[0].d[i][0], k[1].d[i][0]};
        mma_scale(acc, s, d, dx);
    }
    if (F::MMA_MIN) {   // - m * (sum of the token's group): ones times B
        const u32 ones[4] = {ONES, ONES, ONES, ONES};
        int sx[4] = {0, 0, 0, 0};
        mma_s8_k32(sx, ones, b);
        const float m[2] = {-k[0].m[i], -k[1].m[i]};
        mma_scale(acc, sx, m, dx);
    }
}

// NW = 1: out[t, row] = (residual[t, row] +) sum_k w[row, k] * x[t, k] (+ bias[row]);
// NW = 2 (gated): out[t, row] = silu(gate) * up, gate and up the sums of w and w2's
// rows (activation.cu's swiglu_f32 of the two GEMVs). For t < nT <= 8 * TN, rows
// 16 blockIdx.x ..; x the int8 activations xq [nT, n_in] (read as ints) and xd [nT, n_in / 32].
template <class F, int TN, int NW>
__device__ __forceinline__ void gemv_mma(const u8* __restrict__ w, const u8* __restrict__ w2, long long row_bytes,
                                         const int* __restrict__ xq, const float* __restrict__ xd, int nT,
                                         const float* __restrict__ bias, const float* __restrict__ residual,
                                         float* __restrict__ out, int n_out, int n_in) {
    constexpr int G = F::MMA_G;
    __shared__ float part[NW][MMA_WARPS][MMA_ROWS][8 * TN];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
    const int row0 = blockIdx.x * MMA_ROWS;
    // rows past n_out read the last row (their sums are never written)
    const long long r0 = (long long)min(row0 + g, n_out - 1) * row_bytes,
                    r1 = (long long)min(row0 + g + 8, n_out - 1) * row_bytes;
    const u8* wr[NW][2];
#pragma unroll
    for (int v = 0; v < NW; ++v) {
        wr[v][0] = (v ? w2 : w) + r0;
        wr[v][1] = (v ? w2 : w) + r1;
    }
    const int nb = n_in / F::QK, n_chunks = n_in / (32 * G), xw = n_in / 4, xg = n_in / 32;
    float acc[NW][TN][4];
#pragma unroll
    for (int v = 0; v < NW; ++v)
#pragma unroll
        for (int n = 0; n < TN; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[v][n][i] = 0.f;
    // U chunks loaded before any is multiplied: a warp's loads in flight (one chunk at a
    // time left a short row's GEMV a chain of load latencies, 2-4x dp4a's time at T = 1)
    constexpr int U = G * NW >= 4 ? 1 : 4 / (G * NW);
    for (int c0 = warp; c0 < n_chunks; c0 += MMA_WARPS * U) {
        MmaChunk<G> k[U][NW][2];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = min(c0 + u * MMA_WARPS, n_chunks - 1);   // past the end: loaded, not summed
#pragma unroll
            for (int v = 0; v < NW; ++v) {
                k[u][v][0] = F::mma_chunk(wr[v][0], nb, c, q);
                k[u][v][1] = F::mma_chunk(wr[v][1], nb, c, q);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int c = c0 + u * MMA_WARPS;   // the lane's chunks in increasing order, as one at a time
            if (c >= n_chunks) break;
#pragma unroll
            for (int i = 0; i < G; ++i) {
                const int grp = c * G + i;
#pragma unroll
                for (int n = 0; n < TN; ++n) {
                    const int tb = 8 * n + g, t0 = 8 * n + 2 * q;   // B's token; this lane's C tokens
                    u32 b[2] = {0u, 0u};
                    if (tb < nT) {
                        b[0] = (u32)__ldg(xq + (long long)tb * xw + 8 * grp + q);
                        b[1] = (u32)__ldg(xq + (long long)tb * xw + 8 * grp + 4 + q);
                    }
                    const float dx[2] = {t0 < nT ? __ldg(xd + (long long)t0 * xg + grp) : 0.f,
                                         t0 + 1 < nT ? __ldg(xd + (long long)(t0 + 1) * xg + grp) : 0.f};
#pragma unroll
                    for (int v = 0; v < NW; ++v) mma_chunk_step<F>(acc[v][n], k[u][v], i, b, dx);
                }
            }
        }
    }
#pragma unroll
    for (int v = 0; v < NW; ++v)
#pragma unroll
        for (int n = 0; n < TN; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) part[v][warp][g + 8 * (i >> 1)][8 * n + 2 * q + (i & 1)] = acc[v][n][i];
    __syncthreads();
    for (int i = threadIdx.x; i < MMA_ROWS * nT; i += MMA_THREADS) {
        const int r = i % MMA_ROWS, t = i / MMA_ROWS, row = row0 + r;
        if (row >= n_out) continue;
        float s[NW];
#pragma unroll
        for (int v = 0; v < NW; ++v) {
            s[v] = part[v][0][r][t];
#pragma unroll
            for (int k = 1; k < MMA_WARPS; ++k) s[v] += part[v][k][r][t];
        }
        const long long at = (long long)t * n_out + row;
        out[at] = gemv_out(s[0], s[NW - 1], NW == 2, bias ? bias + row : nullptr, residual ? residual + at : nullptr);
    }
}

#define GEMV_MMA_ARGS const u8* w, long long row_bytes, const int* xq, const float* xd, int nT, \
    const float* bias, const float* residual, float* out, int n_out, int n_in
#define GEMV_MMA_KERNEL(NAME, F, TN)                                                                  \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS) gemv_mma_##NAME##_n##TN(GEMV_MMA_ARGS) { \
        orcd_prefetch_rows(w, row_bytes, (long long)blockIdx.x * MMA_ROWS, MMA_ROWS, n_out);           \
        orcd_prior_done();                                                                            \
        gemv_mma<F, TN, 1>(w, nullptr, row_bytes, xq, xd, nT, bias, residual, out, n_out, n_in);       \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS) gemv_mma_gated_##NAME##_n##TN(          \
        const u8* wg, const u8* wu, long long row_bytes, const int* xq, const float* xd, int nT,      \
        float* out, int n_ff, int n_in) {                                                             \
        orcd_prefetch_rows(wg, row_bytes, (long long)blockIdx.x * MMA_ROWS, MMA_ROWS, n_ff);          \
        orcd_prefetch_rows(wu, row_bytes, (long long)blockIdx.x * MMA_ROWS, MMA_ROWS, n_ff);          \
        orcd_prior_done();                                                                            \
        gemv_mma<F, TN, 2>(wg, wu, row_bytes, xq, xd, nT, nullptr, nullptr, out, n_ff, n_in);         \
    }
// tiles of 8 tokens per launch: 1, 2 or 4 (up to 32 rows, as the dp4a GEMV)
#define MMA_KERNELS(NAME, F, TYPE_ID) GEMV_MMA_KERNEL(NAME, F, 1) GEMV_MMA_KERNEL(NAME, F, 2) \
    GEMV_MMA_KERNEL(NAME, F, 4)
ORCD_MMA_FORMATS(MMA_KERNELS)
