// One row normed and quantized to the int8 activations of the decode GEMVs, by a block:
// fused.cu's rms_norm_q8 and own_q8 (a GEMV quantizing its own input), and norm_tail, with
// which a kernel whose blocks together write one row (a residual GEMV, the MoE's down sum)
// makes the next block's normed input in its last block. Needs base.cuh (quantize_group).
#pragma once

#define Q8_ROW_THREADS 128   // threads of a block that work in q8_row: its sums' fixed order

// One row x [n] (times 1 / sqrt(mean(x^2) + eps) * g when g is given) quantized per
// 32 values -> xq [n] int8 (as u32), xd [n / 32]: quantize_q8's and rms_norm_q8's
// arithmetic, by the first Q8_ROW_THREADS threads of a block (all of them reach its barrier), into
// global or shared memory.
// L2: x was written by other blocks of this launch (norm_tail), so read through L2.
template <bool L2 = false>
__device__ __forceinline__ void q8_row(const float* __restrict__ xr, const float* __restrict__ g, float eps,
                                       int n, u32* xq, float* xd) {
    float s = 1.f;
    if (g) {
        __shared__ float red[Q8_ROW_THREADS / 32];
        float ss = 0.f;
        for (int i = threadIdx.x; i < n && threadIdx.x < Q8_ROW_THREADS; i += Q8_ROW_THREADS) {
            const float v = L2 ? __ldcg(xr + i) : xr[i];
            ss = fmaf(v, v, ss);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, off);
        if ((threadIdx.x & 31) == 0 && threadIdx.x < Q8_ROW_THREADS) red[threadIdx.x >> 5] = ss;
        __syncthreads();
        float total = 0.f;
#pragma unroll
        for (int w = 0; w < Q8_ROW_THREADS / 32; ++w) total += red[w];
        s = sqrtf(total / (float)n + eps);
    }
    for (int grp = threadIdx.x; grp < n / 32 && threadIdx.x < Q8_ROW_THREADS; grp += Q8_ROW_THREADS) {
        float v[32];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const float4 f = L2 ? __ldcg((const float4*)(xr + 32 * grp) + i) : __ldg((const float4*)(xr + 32 * grp) + i);
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

// The last block of the launch to finish: rms_norm(out) * g of the whole output row
// (n values, written by every block) quantized into xq, xd, as rms_norm_q8 does -- the
// next GEMV's int8 input without a launch of its own. count: zero before, zero after.
__device__ __forceinline__ void norm_tail(const float* out, int n, const float* __restrict__ g, float eps,
                                          u32* xq, float* xd, int* count) {
    __shared__ int last;
    __threadfence();   // this block's outputs, before its count
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(count, 1) == (int)(gridDim.x * gridDim.y) - 1;
    __syncthreads();
    if (!last) return;   // uniform per block
    __threadfence();
    q8_row<true>(out, g, eps, n, xq, xd);
    if (threadIdx.x == 0) *count = 0;
}

