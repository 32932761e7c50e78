// One decode token's expert gate/up block on int8 activations: matmul.cu's
// moe_gate_up_q8 (x from global memory, the ids from moe_norm_route_q8), apart from the
// launch around it. Needs base.cuh and the format structs.
#pragma once

// silu(min(gate, limit)) * (clamp(up, -limit, limit) + 1): GPT-OSS's SwiGLU (swiglu_oai_ref)
__device__ __forceinline__ float swiglu_oai(float gate, float up, float alpha, float limit) {
    const float g = fminf(gate, limit);
    const float u = fminf(fmaxf(up, -limit), limit);
    return g / (1.f + expf(-alpha * g)) * (u + 1.f);
}

// Warp sum of each of N partial sums (all lanes get them).
template <int N>
__device__ __forceinline__ void warp_sums(float* acc) {
#pragma unroll
    for (int j = 0; j < N; ++j)
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc[j] += __shfl_xor_sync(0xFFFFFFFFu, acc[j], off);
}

#define MOE_H_ROWS 32      // h rows per block: one int8 group, quantized by the block itself
#define MOE_WARPS 8        // 256 threads; a warp takes 4 rows of gate and of up
#define MOE_MAX_K 8        // experts per token the down kernel sums

// h rows 32 bx .. +31 of pair p = t * k + slot routed to expert e:
// h = swiglu(x_t . wg[e] + bg[e], x_t . wu[e] + bu[e]), quantized per 32 into
// hq [T * k, n_ff] int8 and hd [T * k, n_ff / 32]; xrow, drow: x_t's int8 words and
// scales. An e outside 0..n_expert-1 gives hd = NaN (the down kernel's sum for that
// token is NaN). Every thread of the block calls it (one barrier); 256 threads.
template <class F>
__device__ __forceinline__ void moe_gate_up_rows(const u8* __restrict__ wg, const u8* __restrict__ wu,
                                                 long long row_bytes, long long expert_bytes,
                                                 const int* xrow, const float* drow, int e, int n_expert,
                                                 const float* __restrict__ bg, const float* __restrict__ bu,
                                                 float alpha, float limit, signed char* __restrict__ hq,
                                                 float* __restrict__ hd, int n_ff, int n_in, int pair, int bx) {
    __shared__ float h[MOE_H_ROWS];
    const int r0 = bx * MOE_H_ROWS;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const bool ok = e >= 0 && e < n_expert;   // uniform per block
    const int row = r0 + 4 * warp;            // this warp's 4 rows
    if (ok) {
        float acc[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = 0.f;
        const int nb = n_in / F::QK;
        const u8* g = wg + e * expert_bytes + (long long)row * row_bytes;
        const u8* u = wu + e * expert_bytes + (long long)row * row_bytes;
        const int p = lane_piece<F>(lane);
        for (int blk = lane / F::PIECES; blk < nb; blk += 32 / F::PIECES) {
            const int* xb = xrow + blk * (F::QK / 4);
            const float* db = drow + blk * (F::QK / 32);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                acc[i] += F::dot8(g + i * row_bytes, nb, blk, p, xb, db);
                acc[4 + i] += F::dot8(u + i * row_bytes, nb, blk, p, xb, db);
            }
        }
        warp_sums<8>(acc);
        if (lane < 4) {
            const float* bge = bg + (long long)e * n_ff;
            const float* bue = bu + (long long)e * n_ff;
            const float gate = lane == 0 ? acc[0] : lane == 1 ? acc[1] : lane == 2 ? acc[2] : acc[3];
            const float up = lane == 0 ? acc[4] : lane == 1 ? acc[5] : lane == 2 ? acc[6] : acc[7];
            h[4 * warp + lane] = swiglu_oai(gate + bge[row + lane], up + bue[row + lane], alpha, limit);
        }
    }
    __syncthreads();
    if (warp == 0) {
        const float v = ok ? h[lane] : 0.f;
        float amax = fabsf(v);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, off));
        const float d = amax / 127.f;
        hq[(long long)pair * n_ff + r0 + lane] = (signed char)(d > 0.f ? (int)rintf(v / d) : 0);
        if (lane == 0) hd[(long long)pair * (n_ff / 32) + bx] = ok ? d : __int_as_float(0x7FC00000);
    }
}
