// One decode token's MoE block in two launches: this kernel (RMSNorm, router, top-k,
// softmax, and every chosen expert's gate, up and SwiGLU) and matmul.cu's
// moe_down_sum_q8 (down, the weighted sum and the residual). Before it the router ran
// in a launch of its own (moe.cu's moe_norm_route_q8): one block of 1,024 threads that
// read the router's E x D fp32 weights from one SM while the card waited, and a kernel
// boundary more per layer.
//
// The launch's blocks take tickets in the order they start (an atomic counter), not
// blockIdx: tickets 0 .. R-1 are router blocks, R .. the gate/up blocks. A gate/up
// block waits for the routing, which blocks that started before it make: each of them
// holds an SM already, so the wait always ends (the look-back argument of single-pass
// scans). Router block j takes rows 8 j .. 8 j + 7 of the router; the last to finish
// copies all E logits into its shared memory (one thread reading them through L2 one
// after another cost ~25 us a layer on an H100), takes the top-k there with a warp
// (moe_route.cuh's top_k_softmax_warp: shuffles, not one thread's k x E scan), publishes
// ids and weights, then raises the flag.
// Meanwhile every gate/up block has normed and quantized x into its own shared memory.
// The last block to leave zeroes the counters for the next launch (stream order).
//
// Bits: the norm is moe_norm_route_q8's (moe_route.cuh's moe_norm_row: each of the 256
// threads stands for 4 of its 1,024), each logit is the same warp sum, the top-k the same
// choice (the warp's order is the scan's for logits that are not NaN), so ids, weights
// and the int8 x are that kernel's; moe_gate_up_rows is
// moe_gate_up_q8's. The int8 x lives in shared memory: loads that may be shared.
#define ORCD_ACT_ANY_SPACE
#include "pdl.cuh"
#include "act.cuh"
#include "base.cuh"
#include "formats.cuh"
#include "moe_q8.cuh"
#include "moe_route.cuh"
#include "q8.cuh"

#define MOE_SYNC_SPINS (1 << 24)   // ~seconds: a wait that long is a broken launch, not a slow one

// x: [1, D] residual stream, g: [D] norm weight, rw: [E, D] F32 router, rb: [E];
// logits: [E] scratch; -> ids, weights: [k]; hq, hd: [k, n_ff] the experts' int8 h.
// sync: 4 ints, zero before the launch (and after it). grid R + k * n_ff / 32 with
// R = ceil(E / 8), block 256, dynamic shared memory 5 D + D / 8 + 4 E bytes.
template <class F>
__device__ __forceinline__ void moe_route_gate_up(const float* __restrict__ x, const float* __restrict__ g,
                                                  float eps, const float* __restrict__ rw,
                                                  const float* __restrict__ rb, int D, int E, int k,
                                                  float* logits, int* ids, float* weights, const u8* __restrict__ wg,
                                                  const u8* __restrict__ wu, long long row_bytes,
                                                  long long expert_bytes, int n_expert,
                                                  const float* __restrict__ bg, const float* __restrict__ bu,
                                                  float alpha, float limit, signed char* __restrict__ hq,
                                                  float* __restrict__ hd, int n_ff, int* sync) {
    extern __shared__ float moe_sh[];
    float* h = moe_sh;                                    // [D] the normed x
    signed char* xq = (signed char*)(moe_sh + D);         // [D] int8 x
    float* xd = (float*)(xq + D);                         // [D / 32] its scales
    __shared__ int ticket;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, R = (E + MOE_WARPS - 1) / MOE_WARPS;
    if (threadIdx.x == 0) ticket = atomicAdd(sync, 1);
    moe_norm_row(x, g, eps, D, h);   // its barriers publish the ticket
    if (ticket < R) {                                     // a router block
        const int e = ticket * MOE_WARPS + warp;
        if (e < E) {
            const float acc = router_dot(rw + (long long)e * D, h, D, lane);
            if (lane == 0) logits[e] = acc + rb[e];
        }
        __shared__ int last;
        __shared__ int sid[MOE_MAX_K];
        __shared__ float sw[MOE_MAX_K];
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) last = atomicAdd(sync + 1, 1) == R - 1;
        __syncthreads();
        if (last) {   // the last router block: every block's logits into shared memory
            __threadfence();
            float* lg = xd + D / 32;   // [E], after the int8 x's scales
            for (int e = threadIdx.x; e < E; e += blockDim.x) lg[e] = __ldcg(logits + e);
            __syncthreads();
            if (warp == 0) top_k_softmax_warp([&](int e) { return lg[e]; }, E, k, sid, sw);
            if (threadIdx.x == 0) {
                for (int r = 0; r < k; ++r) { ids[r] = sid[r]; weights[r] = sw[r]; }
                __threadfence();
                atomicExch(sync + 2, 1);
            }
        }
    } else {                                              // a gate/up block
        for (int grp = warp; grp < D / 32; grp += MOE_WARPS) quantize_lane(h[32 * grp + lane], xq + 32 * grp, xd + grp);
        if (threadIdx.x == 0) {
            int spins = 0;
            while (*(volatile int*)(sync + 2) == 0) {   // a plain read of L2, not an atomic: ~360 blocks poll
                __nanosleep(64);
                if (++spins == MOE_SYNC_SPINS) { __trap(); break; }   // (the simulator's trap returns)
            }
            __threadfence();
        }
        __syncthreads();
        const int j = ticket - R, blocks = n_ff / MOE_H_ROWS, pair = j / blocks;
        moe_gate_up_rows<F>(wg, wu, row_bytes, expert_bytes, (const int*)xq, xd, __ldcg(ids + pair), n_expert,
                            bg, bu, alpha, limit, hq, hd, n_ff, D, pair, j - pair * blocks);
    }
    __syncthreads();
    if (threadIdx.x == 0 && atomicAdd(sync + 3, 1) == (int)gridDim.x - 1) {   // the last block out
        sync[0] = sync[1] = sync[2] = sync[3] = 0;
    }
}

#define ROUTE_GATE_UP_KERNEL(NAME, F, TYPE_ID)                                                       \
    extern "C" __global__ void __launch_bounds__(256) moe_route_gate_up_q8_##NAME(                  \
        const float* x, const float* g, float eps, const float* rw, const float* rb, int D, int E,   \
        int k, float* logits, int* ids, float* weights, const u8* wg, const u8* wu,                 \
        long long row_bytes, long long expert_bytes, int n_expert, const float* bg, const float* bu, \
        float alpha, float limit, signed char* hq, float* hd, int n_ff, int* sync) {                \
        orcd_prior_done();                                                                         \
        moe_route_gate_up<F>(x, g, eps, rw, rb, D, E, k, logits, ids, weights, wg, wu, row_bytes,  \
                             expert_bytes, n_expert, bg, bu, alpha, limit, hq, hd, n_ff, sync);     \
    }
ORCD_INT8_FORMATS(ROUTE_GATE_UP_KERNEL)
#undef ROUTE_GATE_UP_KERNEL
