// The int8 activations of the decode GEMVs (ops/matmul.cu's quantize_q8, base.cuh's
// quantize_group, matmul.py's quantize_q8_ref), made by a kernel that holds the values
// one a lane: a kernel whose output feeds an int8 GEMV writes them beside its fp32
// output, and the GEMV needs no quantize launch.
#pragma once

// The 32 values of a warp (v, one a lane; call with the whole warp) -> q[lane] =
// rint(v / d) (0 where d = 0) and, from lane 0, *d = amax / 127: quantize_group's
// arithmetic (a max is exact in any order), so the same bits.
__device__ __forceinline__ void quantize_lane(float v, signed char* __restrict__ q, float* __restrict__ d) {
    float amax = fabsf(v);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, off));
    const float dv = amax / 127.f;
    const int lane = threadIdx.x & 31;
    q[lane] = (signed char)(dv > 0.f ? (int)rintf(v / dv) : 0);
    if (lane == 0) *d = dv;
}
