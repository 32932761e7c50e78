// The routing steps of moe.cu's kernels: the decode router's norm, dot and warp top-k, and
// the prefill router's one-thread top-k (the same choice, route_ref's).
#pragma once

// h = x / sqrt(mean(x^2) + eps) * g into shared memory h [D]: the block's threads stride
// over x, each warp's sum a butterfly, the warps' sums added in order on every thread.
__device__ __forceinline__ void moe_norm_row(const float* __restrict__ x, const float* __restrict__ g, float eps,
                                             int D, float* h) {
    __shared__ float red[32];
    const int lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
    float ss = 0.f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) ss += x[i] * x[i];
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xFFFFFFFFu, ss, o);
    if (lane == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < n_warps; ++w) total += red[w];   // the same fixed order on every thread
    const float s = sqrtf(total / (float)D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x) h[i] = x[i] / s * g[i];
    __syncthreads();
}

// Router row r . h, the warp's lanes striding over D then a butterfly (every lane gets it).
__device__ __forceinline__ float router_dot(const float* __restrict__ r, const float* h, int D, int lane) {
    float acc = 0.f;
    for (int i = lane; i < D; i += 32) acc = fmaf(r[i], h[i], acc);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, o);
    return acc;
}

// weights [k]: the chosen logits, largest first -> their softmax, summed in choice order.
__device__ __forceinline__ void softmax_chosen(float* weights, int k) {
    const float mx = weights[0];
    float sum = 0.f;
    for (int r = 0; r < k; ++r) { weights[r] = expf(weights[r] - mx); sum += weights[r]; }
    for (int r = 0; r < k; ++r) weights[r] /= sum;
}

// One thread: the top k of E logits (logit(e) reads one) by repeated selection, strict
// '>' in expert order so ties go to the lower id (route_ref's stable sort), and the
// softmax over the chosen -> ids, weights [k] (only this thread writes them).
template <class Logit>
__device__ __forceinline__ void top_k_softmax(Logit logit, int E, int k, int* ids, float* weights) {
    for (int r = 0; r < k; ++r) {
        int best = -1;
        float bv = 0.f;
        for (int e = 0; e < E; ++e) {
            bool taken = false;
            for (int q = 0; q < r; ++q) taken |= ids[q] == e;
            const float v = logit(e);
            if (!taken && (best < 0 || v > bv)) { best = e; bv = v; }
        }
        ids[r] = best;
        weights[r] = bv;
    }
    softmax_chosen(weights, k);
}

// The same choice by a warp (all 32 lanes call it; E <= 1,024): each round every lane
// takes the best of its untaken experts (lane, lane + 32, ...), then a butterfly over
// (logit, id) pairs -- larger logit first, the lower id on a tie, a total order, so every
// lane ends on the one top_k_softmax's scan picks (for logits that are not NaN) -- in 5
// shuffles instead of one thread's E reads. Lane 0 writes ids, weights and the softmax.
template <class Logit>
__device__ __forceinline__ void top_k_softmax_warp(Logit logit, int E, int k, int* ids, float* weights) {
    const int lane = threadIdx.x & 31;
    unsigned taken = 0;   // bit j: expert lane + 32 j is chosen
    for (int r = 0; r < k; ++r) {
        float bv = 0.f;
        int be = -1;
        for (int j = 0, e = lane; e < E; ++j, e += 32) {
            const float v = logit(e);
            if (!(taken >> j & 1u) && (be < 0 || v > bv)) { bv = v; be = e; }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xFFFFFFFFu, bv, o);
            const int oe = __shfl_xor_sync(0xFFFFFFFFu, be, o);
            if (oe >= 0 && (be < 0 || ov > bv || (ov == bv && oe < be))) { bv = ov; be = oe; }
        }
        if ((be & 31) == lane) taken |= 1u << (be >> 5);
        if (lane == 0) { ids[r] = be; weights[r] = bv; }
    }
    if (lane == 0) softmax_chosen(weights, k);
}
