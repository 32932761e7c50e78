// The routing steps moe.cu's and moe_decode.cu's kernels share, so both give the same bits.
#pragma once

// Router row r . h, the warp's lanes striding over D then a butterfly (every lane gets it).
__device__ __forceinline__ float router_dot(const float* __restrict__ r, const float* h, int D, int lane) {
    float acc = 0.f;
    for (int i = lane; i < D; i += 32) acc = fmaf(r[i], h[i], acc);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, o);
    return acc;
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
    const float mx = weights[0];   // the first choice is the largest
    float sum = 0.f;
    for (int r = 0; r < k; ++r) { weights[r] = expf(weights[r] - mx); sum += weights[r]; }
    for (int r = 0; r < k; ++r) weights[r] /= sum;
}
