// RMSNorm and LayerNorm over the last axis: one block per row, fp32,
// a fixed-order block reduction (no atomics), so outputs are bitwise
// reproducible run to run.

#include "pdl.cuh"

#define NORM_THREADS 256

// Sum of v over the block, the same on every thread; deterministic.
__device__ float block_sum(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float s = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += red[w];
    __syncthreads();  // red is reused by the next reduction
    return s;
}

// x, out: [T, D]; w: [D]. grid T, block NORM_THREADS.
extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                        float* __restrict__ out, int D, float eps) {
    orcd_prior_done();
    __shared__ float red[32];
    const float* xr = x + (size_t)blockIdx.x * D;
    float* yr = out + (size_t)blockIdx.x * D;
    float ss = 0.f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) ss += xr[i] * xr[i];
    const float s = sqrtf(block_sum(ss, red) / (float)D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x) yr[i] = xr[i] / s * w[i];
}

// x, out: [T, D]; w: [D]; b: [D] or null. grid T, block NORM_THREADS.
extern "C" __global__ void layer_norm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                          const float* __restrict__ b, float* __restrict__ out,
                                          int D, float eps) {
    orcd_prior_done();
    __shared__ float red[32];
    const float* xr = x + (size_t)blockIdx.x * D;
    float* yr = out + (size_t)blockIdx.x * D;
    float sum = 0.f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) sum += xr[i];
    const float mu = block_sum(sum, red) / (float)D;
    float ss = 0.f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) { float c = xr[i] - mu; ss += c * c; }
    const float s = sqrtf(block_sum(ss, red) / (float)D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float y = (xr[i] - mu) / s * w[i];
        yr[i] = b ? y + b[i] : y;
    }
}
