// Activation math the kernel files share (one definition, so the fused GEMVs and the
// standalone op round alike: the same expf, the same division).
#pragma once

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

// A GEMV output from its row sums, as the separate ops round it: gated, silu(gate) * up
// (swiglu_f32); else the sum (+ bias) (+ the residual, added as add_f32 adds it). bias and
// residual point at this output's element, or are null. Every GEMV epilogue calls it, so
// a fused launch gives the bits of the ops it replaces.
__device__ __forceinline__ float gemv_out(float sum, float up, bool gated, const float* bias,
                                          const float* residual) {
    if (gated) return silu(sum) * up;
    if (bias) sum += *bias;
    if (residual) sum = *residual + sum;
    return sum;
}
