// sampling.cu's keys, draw counter and fixed-order block reductions and scans (included
// there, after its sizes: NT, NW, FULL, u64).
#pragma once

// -- keys -------------------------------------------------------------------------

// Monotone map float -> uint (-0 and +0 equal, as in numpy's comparisons).
__device__ __forceinline__ unsigned ordered(float v) {
    unsigned u = __float_as_uint(v == 0.0f ? 0.0f : v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float unordered(unsigned o) {
    return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}
__device__ __forceinline__ u64 make_key(float v, int id) {
    return ((u64)ordered(v) << 32) | (u64)(0xffffffffu - (unsigned)id);
}
__device__ __forceinline__ float key_value(u64 k) { return unordered((unsigned)(k >> 32)); }
__device__ __forceinline__ int key_id(u64 k) { return (int)(0xffffffffu - (unsigned)k); }

// (v, i) beats (bv, bi): larger value, lower id on ties; NaN never wins.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
    return v > bv || (v == bv && i < bi);
}

// Counter-based draw in [0, 1): splitmix64 keyed by (seed, step).
__device__ __forceinline__ u64 splitmix64(u64 z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
__device__ __forceinline__ float uniform(u64 seed, int step) {
    u64 h = splitmix64(seed ^ splitmix64((u64)(unsigned)step));
    return (float)(unsigned)(h >> 40) * 5.9604644775390625e-08f;  // 24 bits * 2^-24
}

// -- block reductions and scans (fixed order: bitwise reproducible) ----------------

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;
}

// Sum over the block, the same value on every thread.
__device__ float block_sum(float v) {
    __shared__ float red[NW];
    v = warp_sum(v);
    __syncthreads();                       // the previous call's readers are done
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    return warp_sum(red[threadIdx.x & 31]); // every warp reduces red identically
}

__device__ int block_sum_int(int v) {
    __shared__ int red[NW];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    int s = red[threadIdx.x & 31];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL, s, o);
    return s;
}

__device__ u64 block_min_u64(u64 v) {
    __shared__ u64 red[NW];
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(FULL, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    u64 s = red[threadIdx.x & 31];
    for (int o = 16; o > 0; o >>= 1) s = min(s, __shfl_xor_sync(FULL, s, o));
    return s;
}

__device__ int block_max_int(int v) {
    __shared__ int red[NW];
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(FULL, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    int s = red[threadIdx.x & 31];
    for (int o = 16; o > 0; o >>= 1) s = max(s, __shfl_xor_sync(FULL, s, o));
    return s;
}

// (max, lowest argmax) over the block, the same on every thread.
__device__ void block_argmax(float& v, int& i) {
    __shared__ float rv[NW];
    __shared__ int ri[NW];
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(FULL, v, o);
        int oi = __shfl_xor_sync(FULL, i, o);
        if (better(ov, oi, v, i)) { v = ov; i = oi; }
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) { rv[threadIdx.x >> 5] = v; ri[threadIdx.x >> 5] = i; }
    __syncthreads();
    const int nw = blockDim.x >> 5, lane = threadIdx.x & 31;
    v = lane < nw ? rv[lane] : NEG_INF;
    i = lane < nw ? ri[lane] : 0x7fffffff;
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(FULL, v, o);
        int oi = __shfl_xor_sync(FULL, i, o);
        if (better(ov, oi, v, i)) { v = ov; i = oi; }
    }
}

// Exclusive prefix over threads (thread order) and the block total.
template <typename T>
__device__ void block_scan(T v, T& excl, T& total) {
    __shared__ T wsum[NW];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    T incl = v;
    for (int o = 1; o < 32; o <<= 1) {
        T up = __shfl_up_sync(FULL, incl, o);
        if (lane >= o) incl += up;
    }
    T lane_excl = __shfl_up_sync(FULL, incl, 1);
    if (lane == 0) lane_excl = T(0);
    __syncthreads();
    if (lane == 31) wsum[warp] = incl;
    __syncthreads();
    T w = wsum[lane], winc = w;             // every warp scans the warp totals identically
    for (int o = 1; o < 32; o <<= 1) {
        T up = __shfl_up_sync(FULL, winc, o);
        if (lane >= o) winc += up;
    }
    T off = __shfl_sync(FULL, winc, (warp + 31) & 31);
    excl = (warp == 0 ? T(0) : off) + lane_excl;
    total = __shfl_sync(FULL, winc, 31);
}
