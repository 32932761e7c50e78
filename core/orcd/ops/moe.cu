// Mixture-of-experts routing and the weighted sum of the chosen experts.
// Top-k by repeated selection with a strict '>' scan in expert order, so
// ties go to the lower expert id, as route_ref's stable sort; softmax over
// the k chosen logits. One thread per token: n_expert is small (32 for GPT-OSS).

#include "pdl.cuh"
#include "moe_route.cuh"
#include "q8.cuh"

// logits: [T, n_expert] -> ids: [T, k] int32, weights: [T, k]. grid ceil(T / 128), block 128.
extern "C" __global__ void moe_route(const float* __restrict__ logits, int* __restrict__ ids,
                                    float* __restrict__ weights, int T, int n_expert, int k) {
    orcd_prior_done();
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float* lr = logits + (size_t)t * n_expert;
    top_k_softmax([&](int e) { return lr[e]; }, n_expert, k, ids + (size_t)t * k, weights + (size_t)t * k);
}

// Prefill groups the (token, slot) pairs p = t * k + slot by expert, so each
// expert's weights are read once per tile of its tokens (matmul.cu's moe_gemm)
// rather than once per pair. One block; warp w takes experts w, w + warps, ...
// and scans ids 32 at a time with a ballot, which keeps each group in pair
// order without atomics (as group_ref's stable sort).
// ids: [N] -> order [N], slot_of [N] (-1 for an id outside 0..n_expert-1),
// tiles [n_tiles, 3] = (expert, first row in order, rows <= tile), unused (0, 0, 0).
// Dynamic shared memory: 3 * n_expert + 1 ints.
extern "C" __global__ void moe_group(const int* __restrict__ ids, int N, int n_expert, int tile,
                                     int n_tiles, int* __restrict__ order, int* __restrict__ slot_of,
                                     int* __restrict__ tiles) {
    orcd_prior_done();
    extern __shared__ int sh[];
    int* count = sh;                 // [n_expert]
    int* start = sh + n_expert;      // [n_expert] first row of each group in order
    int* tile0 = sh + 2 * n_expert;  // [n_expert + 1] first tile of each group
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    for (int e = warp; e < n_expert; e += n_warps) {
        int c = 0;
        for (int base = 0; base < N; base += 32) {
            const int p = base + lane;
            c += __popc(__ballot_sync(0xFFFFFFFFu, p < N && ids[p] == e));
        }
        if (lane == 0) count[e] = c;
    }
    for (int p = threadIdx.x; p < N; p += blockDim.x)
        if (ids[p] < 0 || ids[p] >= n_expert) slot_of[p] = -1;
    __syncthreads();
    if (threadIdx.x == 0) {  // n_expert is small: a serial prefix sum
        int rows = 0, t = 0;
        for (int e = 0; e < n_expert; ++e) {
            start[e] = rows;
            tile0[e] = t;
            rows += count[e];
            t += (count[e] + tile - 1) / tile;
        }
        tile0[n_expert] = t;
    }
    __syncthreads();
    for (int e = warp; e < n_expert; e += n_warps) {
        int pos = start[e];
        for (int base = 0; base < N; base += 32) {
            const int p = base + lane;
            const bool mine = p < N && ids[p] == e;
            const unsigned hit = __ballot_sync(0xFFFFFFFFu, mine);
            if (mine) {
                const int i = pos + __popc(hit & ((1u << lane) - 1u));
                order[i] = p;
                slot_of[p] = i;
            }
            pos += __popc(hit);
        }
        for (int j = lane; j * tile < count[e]; j += 32) {
            int* tl = tiles + 3 * (tile0[e] + j);
            tl[0] = e;
            tl[1] = start[e] + j * tile;
            tl[2] = min(tile, count[e] - j * tile);
        }
    }
    for (int i = tile0[n_expert] + threadIdx.x; i < n_tiles; i += blockDim.x) {
        tiles[3 * i] = 0;
        tiles[3 * i + 1] = 0;
        tiles[3 * i + 2] = 0;
    }
}

// xg[i] = x[order[i] / k]: each pair's token row, in grouped order. grid-stride over N * D.
extern "C" __global__ void moe_gather(const float* __restrict__ x, const int* __restrict__ order, int k,
                                      int N, int D, float* __restrict__ xg) {
    orcd_prior_done();
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < (long)N * D;
         i += (long)gridDim.x * blockDim.x) {
        const long r = i / D, d = i - r * D;
        xg[i] = x[(long)(order[r] / k) * D + d];
    }
}

// y: each chosen expert's output (biases included), one row per pair: row
// slot_of[t * k + r] when slot_of is given (grouped order; -1 gives NaN), else
// row t * k + r. weights: [T, k] -> out: [T, D], summed in choice order.
// grid-stride over T * D.
extern "C" __global__ void moe_weighted_sum(const float* __restrict__ y, const float* __restrict__ weights,
                                           const int* __restrict__ slot_of, float* __restrict__ out,
                                           int T, int k, int D) {
    orcd_prior_done();
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < (long)T * D;
         i += (long)gridDim.x * blockDim.x) {
        const long t = i / D, d = i - t * D;
        float s = 0.f;
        for (int r = 0; r < k; ++r) {
            const long row = slot_of ? slot_of[t * k + r] : t * k + r;
            s += row < 0 ? __int_as_float(0x7FC00000) : weights[t * k + r] * y[row * D + d];
        }
        out[i] = s;
    }
}

// -- one token's MoE block in three kernels (decode) -----------------------------------
// moe_norm_route_q8: RMSNorm of the residual, the router, top-k and softmax, and the
// normed input quantized to int8 per 32 values for the expert GEMVs -- one block per
// token, in the order moe_ref computes them (matmul.cu's moe_gate_up_q8 and
// moe_down_sum_q8 are the other two). Quantized as quantize_q8_ref: d = amax / 127,
// q = rint(h / d), 0 where d = 0.
// x: [T, D] residual stream, g: [D] the norm weight, rw: [E, D] and rb: [E] the router
// (F32) -> ids, weights: [T, k]; xq: [T, D] int8, xd: [T, D / 32].
// grid T, block 1024 (32 warps), dynamic shared memory 4 * (D + E) bytes.
extern "C" __global__ void __launch_bounds__(1024)
moe_norm_route_q8(const float* __restrict__ x, const float* __restrict__ g, float eps,
                  const float* __restrict__ rw, const float* __restrict__ rb, int D, int E, int k,
                  int* __restrict__ ids, float* __restrict__ weights, signed char* __restrict__ xq,
                  float* __restrict__ xd) {
    orcd_prior_done();
    extern __shared__ float moe_sh[];
    float* h = moe_sh;          // [D] the normed input
    float* logits = moe_sh + D; // [E]
    const int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    moe_norm_row(x + (long long)t * D, g, eps, D, h);
    for (int grp = warp; grp < D / 32; grp += n_warps) {   // a warp per 32-value group
        quantize_lane(h[32 * grp + lane], xq + (long long)t * D + 32 * grp, xd + (long long)t * (D / 32) + grp);
    }
    for (int e = warp; e < E; e += n_warps) {               // a warp per router row
        const float acc = router_dot(rw + (long long)e * D, h, D, lane);
        if (lane == 0) logits[e] = acc + rb[e];
    }
    __syncthreads();
    if (warp == 0)   // the scan's choice by a butterfly (moe_route.cuh), not one thread's k x E reads
        top_k_softmax_warp([&](int e) { return logits[e]; }, E, k, ids + (long long)t * k,
                           weights + (long long)t * k);
}
