// Element-wise ops on fp32: residual add, SiLU, GELU (tanh form), SwiGLU,
// GPT-OSS's clamped SwiGLU, and the column split copy. grid-stride loops.

#include "pdl.cuh"
#include "act.cuh"

#define EW_LOOP(n) for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
                        i += (long)gridDim.x * blockDim.x)


extern "C" __global__ void add_f32(const float* __restrict__ a, const float* __restrict__ b,
                                  float* __restrict__ out, int n) {
    orcd_prior_done();
    EW_LOOP(n) out[i] = a[i] + b[i];
}

extern "C" __global__ void silu_f32(const float* __restrict__ x, float* __restrict__ out, int n) {
    orcd_prior_done();
    EW_LOOP(n) out[i] = silu(x[i]);
}

extern "C" __global__ void gelu_f32(const float* __restrict__ x, float* __restrict__ out, int n) {
    orcd_prior_done();
    // 0.5 v (1 + tanh(u)) written as v / (1 + exp(-2u)): the same function, without the
    // cancellation of 1 + tanh(u) for negative v (where the tanh form loses every digit)
    const float c2 = 1.5957691216057308f;  // 2 sqrt(2 / pi)
    EW_LOOP(n) {
        const float v = x[i];
        out[i] = v / (1.f + expf(-c2 * (v + 0.044715f * v * v * v)));
    }
}

extern "C" __global__ void swiglu_f32(const float* __restrict__ gate, const float* __restrict__ up,
                                     float* __restrict__ out, int n) {
    orcd_prior_done();
    EW_LOOP(n) out[i] = silu(gate[i]) * up[i];
}

// GPT-OSS: gate clamped above at limit, up clamped to [-limit, limit], times (up + 1).
extern "C" __global__ void swiglu_oai_f32(const float* __restrict__ gate, const float* __restrict__ up,
                                         float* __restrict__ out, int n, float alpha, float limit) {
    orcd_prior_done();
    EW_LOOP(n) {
        const float g = fminf(gate[i], limit);
        const float u = fminf(fmaxf(up[i], -limit), limit);
        out[i] = g / (1.f + expf(-alpha * g)) * (u + 1.f);
    }
}

// out[t, :size] = x[t, offset:offset + size]; x: [T, width]. grid-stride over T * size.
extern "C" __global__ void split_copy_f32(const float* __restrict__ x, float* __restrict__ out,
                                         int T, int width, int offset, int size) {
    orcd_prior_done();
    EW_LOOP((long)T * size) {
        const long t = i / size, j = i - t * size;
        out[i] = x[t * width + offset + j];
    }
}
