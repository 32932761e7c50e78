// Sampling on the device: grammar mask -> logit_bias -> repetition penalty ->
// frequency/presence penalty -> temperature -> top-k -> top-p -> min-p -> a
// seeded categorical draw, so only the chosen id leaves the GPU (and, when
// asked, the top-N logprobs).
//
// Two launches per token (orcd.ops.sampling.CudaSampler):
//   sample_prepare  many blocks: x = processed(logits) / T into a padded
//                   scratch, and each block's (max, lowest argmax).
//   sample_select   one block of 1024 threads: the filters and the draw, reading
//                   x from L2, then out_id, seen[out_id] = 1, counts[out_id] += 1.
// With logprobs, two more: sample_logprobs (between the two, before select marks
// the chosen id: the processed logits y, their log-sum-exp and the N best) and
// sample_logprob_pick (after select: y[out_id]).
// Every parameter comes from a small device struct (SampleArgs) the host writes
// before the launch, so both kernels can sit inside a captured CUDA graph.
//
// Every filter keeps a prefix of the order "larger value first, lower id first"
// (numpy's stable argsort of -x). Each element gets a unique 64-bit key in
// that order, key = ordered_bits(x) << 32 | (0xffffffff - id), so a prefix is
// "key >= cut": top-k's cut is the k-th largest key (radix select over the
// float bits); top-p's is found in the CAP best candidates sorted in shared
// memory, else by a binary search over value thresholds; min-p is a value
// threshold. No full sort, no atomics: histograms are warp-private and
// filled with __match_any_sync; every float sum has a fixed order.

#include "pdl.cuh"

#define NT 1024             // threads of sample_select
#define NW (NT / 32)
#define PREP_NT 256         // threads of sample_prepare
#define PREP_TILE 2048      // elements per sample_prepare block
#define PAD 16384           // x is padded (with -inf) to a multiple of 16 elements per thread
#define CAP 4096            // top-p candidates sorted in shared memory (4 per thread)
#define FULL 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)  // NVRTC has no math.h
#define MAX_TOP 20          // orcd.ops.sampling.MAX_TOP_LOGPROBS
#define USE_MASK 1          // SampleArgs.flags: allowed[] holds a grammar's bitmask
#define USE_BIAS 2          //   bias[] holds the request's logit_bias
#define USE_COUNTS 4        //   counts[] (output ids so far) feed the frequency/presence penalty

typedef unsigned long long u64;

struct SampleArgs {         // written by the host before each launch
    float temperature;      // <= 0: greedy (argmax after the penalties, no temperature)
    float penalty;          // repetition: 1 off
    float top_p;            // 1: off
    float min_p;            // 0: off
    float presence;         // subtracted once from every id in the output so far
    float frequency;        // subtracted per occurrence in the output so far
    int top_k;              // 0: off (the host sends 0 for k >= n_vocab)
    int step;               // token index in the request: the draw's counter
    int flags;              // USE_MASK | USE_BIAS | USE_COUNTS
    int n_top;              // logprobs: how many best ids sample_logprobs reports
    u64 seed;
};

struct LogprobOut {         // written by sample_logprobs and sample_logprob_pick
    float lse;              // log-sum-exp of the processed logits y
    float chosen;           // y[chosen_id]
    int chosen_id;
    int n_top;
    int top_id[MAX_TOP];    // the n_top best ids, larger y first, lower id on ties
    float top_val[MAX_TOP]; // their y
};

struct SampleInfo {         // written by sample_select, for tests and diagnostics
    u64 klast;              // smallest kept key: kept = {key >= klast}
    float xmax;
    float z;                // weight of the kept set, sum of exp(x - xmax)
    int n_kept;
    int slow;               // 1 when top-p's cut lay beyond the CAP candidates
};

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

// -- passes over x (padded, 16 elements per thread per step) ------------------------

// f(value, id) for every element; element order (step, thread, 16 of the thread).
template <typename F>
__device__ __forceinline__ void for_each16(const float4* x4, int npad, F f) {
    for (int b = 0; b < npad / 4; b += 4 * NT) {
        float4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = x4[b + u * NT + threadIdx.x];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int id = 4 * (b + u * NT + threadIdx.x);
            f(v[u].x, id); f(v[u].y, id + 1); f(v[u].z, id + 2); f(v[u].w, id + 3);
        }
    }
}

// Warp-private histogram row += one digit per lane (d < 0: none). No atomics:
// lanes with equal digits elect one writer, which adds the group's size.
__device__ __forceinline__ void hist_add(int* row, int d) {
    if (!__any_sync(FULL, d >= 0)) return;
    const unsigned peers = __match_any_sync(FULL, d);
    if (d >= 0 && (threadIdx.x & 31) == __ffs(peers) - 1) row[d] += __popc(peers);
    __syncwarp();
}

struct Smem {
    union {
        int hist[NW][256];   // radix select
        u64 keys[CAP];       // top-p candidates
    } big;
    int bins[256];
    int digit, rem, ties, found;
};

// The r-th (1-based) lowest id among elements whose ordered value is o.
__device__ int nth_tie(const float4* x4, int npad, unsigned o, int r, Smem& sm) {
    int carry = 0;
    for (int b = 0; b < npad / 4; b += NT) {            // index order: 4 ids per thread
        const float4 v = x4[b + threadIdx.x];
        const bool t0 = ordered(v.x) == o, t1 = ordered(v.y) == o,
                   t2 = ordered(v.z) == o, t3 = ordered(v.w) == o;
        const int c = t0 + t1 + t2 + t3;
        int excl, total;
        block_scan<int>(c, excl, total);
        int need = r - carry - excl;                    // ties still to pass before the r-th
        if (need >= 1 && need <= c) {
            const bool t[4] = {t0, t1, t2, t3};
            for (int j = 0; j < 4; ++j)
                if (t[j] && --need == 0) { sm.found = 4 * (b + threadIdx.x) + j; break; }
        }
        carry += total;
        if (carry >= r) break;                          // block-uniform
    }
    __syncthreads();
    return sm.found;
}

// The k-th largest key (1 <= k <= npad): radix select over the value bits,
// 8 at a time, then the id cut among the values equal to the k-th.
__device__ u64 select_key(const float4* x4, int npad, int k, Smem& sm) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned prefix = 0, mask = 0;
    int remaining = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        int* row = sm.big.hist[warp];
        for (int j = lane; j < 256; j += 32) row[j] = 0;
        __syncwarp();
        for_each16(x4, npad, [&](float v, int) {
            const unsigned o = ordered(v);
            hist_add(row, (o & mask) == prefix ? (int)((o >> shift) & 255u) : -1);
        });
        __syncthreads();
        if (threadIdx.x < 256) {
            int s = 0;
            for (int w = 0; w < NW; ++w) s += sm.big.hist[w][threadIdx.x];
            sm.bins[threadIdx.x] = s;
        }
        __syncthreads();
        if (warp == 0) {                 // lane l owns bins 255-8l down to 248-8l
            int c[8], tot = 0;
            for (int j = 0; j < 8; ++j) { c[j] = sm.bins[255 - 8 * lane - j]; tot += c[j]; }
            int incl = tot;
            for (int o = 1; o < 32; o <<= 1) {
                int up = __shfl_up_sync(FULL, incl, o);
                if (lane >= o) incl += up;
            }
            int above = incl - tot;
            if (above < remaining && remaining <= incl) {
                for (int j = 0; j < 8; ++j) {
                    if (remaining <= above + c[j]) {
                        sm.digit = 255 - 8 * lane - j;
                        sm.rem = remaining - above;
                        sm.ties = c[j];
                        break;
                    }
                    above += c[j];
                }
            }
        }
        __syncthreads();
        prefix |= (unsigned)sm.digit << shift;
        mask |= 255u << shift;
        remaining = sm.rem;
    }
    const int ties = sm.ties;            // elements whose value equals the k-th
    if (remaining == ties) return (u64)prefix << 32;   // all of them are in
    return ((u64)prefix << 32) | (u64)(0xffffffffu - (unsigned)nth_tie(x4, npad, prefix, remaining, sm));
}

// Weight and size of {key >= kk and ordered(x) >= t}; fixed order, the same on every thread.
__device__ float mass_above(const float4* x4, int npad, u64 kk, unsigned t, float xmax, int& count) {
    float s = 0.0f;
    int c = 0;
    for_each16(x4, npad, [&](float v, int id) {
        if (make_key(v, id) >= kk && ordered(v) >= t) { s += expf(v - xmax); ++c; }
    });
    count = block_sum_int(c);
    return block_sum(s);
}

// Sort keys[0..L) descending (bitonic; padded with 0, below every real key).
__device__ void sort_desc(u64* keys, int L) {
    int P = 2;
    while (P < L) P <<= 1;
    for (int i = L + threadIdx.x; i < P; i += NT) keys[i] = 0;
    __syncthreads();
    for (int k = 2; k <= P; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < P; i += NT) {
                const int p = i ^ j;
                if (p > i) {
                    const u64 a = keys[i], b = keys[p];
                    const bool down = (i & k) == 0;    // this run descending
                    if (down ? a < b : a > b) { keys[i] = b; keys[p] = a; }
                }
            }
            __syncthreads();
        }
    }
}

// Copy the elements with klo <= key < khi (at most CAP) into keys, any order.
__device__ void gather(const float4* x4, int npad, u64 klo, u64 khi, u64* keys) {
    int carry = 0;
    for (int b = 0; b < npad / 4; b += 4 * NT) {
        float4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = x4[b + u * NT + threadIdx.x];
        const float* f = reinterpret_cast<const float*>(v);
        int c = 0;
        for (int j = 0; j < 16; ++j) {
            const u64 key = make_key(f[j], 4 * (b + (j >> 2) * NT + threadIdx.x) + (j & 3));
            c += key >= klo && key < khi;
        }
        int excl, total;
        block_scan<int>(c, excl, total);
        int pos = carry + excl;
        for (int j = 0; j < 16; ++j) {
            const u64 key = make_key(f[j], 4 * (b + (j >> 2) * NT + threadIdx.x) + (j & 3));
            if (key >= klo && key < khi && pos < CAP) keys[pos++] = key;
        }
        carry += total;
    }
    __syncthreads();
}

// Weights of sorted keys[4t..4t+3] (0 past L) and their block scan.
__device__ __forceinline__ void weigh_sorted(const u64* keys, int L, float xmax, float w[4], float& excl, float& total) {
    float s = 0.0f;
    for (int j = 0; j < 4; ++j) {
        const int p = 4 * threadIdx.x + j;
        w[j] = p < L ? expf(key_value(keys[p]) - xmax) : 0.0f;
        s += w[j];
    }
    block_scan<float>(s, excl, total);
}

// The first sorted position whose cumulative weight (from run) reaches target,
// 0x7fffffff if none; run is this thread's start (base + its exclusive prefix).
__device__ __forceinline__ int first_reaching(const float w[4], float run, int L, float target) {
    int first = 0x7fffffff;
    for (int j = 0; j < 4; ++j) {
        const int p = 4 * threadIdx.x + j;
        run += w[j];
        if (p < L && run >= target) { first = p; break; }
    }
    return -block_max_int(-first);
}

// Slow path of top-p (its cut lies beyond the CAP best): bisect value
// thresholds (one pass each) keeping mass(lo) >= target > mass(hi), until the
// set's elements in [lo, hi) fit the CAP candidates; then sort that band and
// scan it from mass(hi). A band of one value with more ties than CAP is cut in
// id order instead.
__device__ u64 top_p_search(const float4* x4, int npad, u64 kk, int set_size, float target,
                            float xmax, Smem& sm) {
    u64 lo = 0, hi = (u64)ordered(xmax) + 1;
    float m_hi = 0.0f;
    int c_lo = set_size, c_hi = 0;
    while (c_lo - c_hi > CAP && hi - lo > 1) {
        const u64 mid = (lo + hi) >> 1;
        int c;
        const float m = mass_above(x4, npad, kk, (unsigned)mid, xmax, c);
        if (m >= target) { lo = mid; c_lo = c; }
        else { hi = mid; m_hi = m; c_hi = c; }
    }
    const int band = c_lo - c_hi;
    if (band <= CAP) {
        gather(x4, npad, max(kk, lo << 32), hi << 32, sm.big.keys);
        sort_desc(sm.big.keys, band);
        float w[4], excl, total;
        weigh_sorted(sm.big.keys, band, xmax, w, excl, total);
        const int first = first_reaching(w, m_hi + excl, band, target);
        return sm.big.keys[first != 0x7fffffff ? first : band - 1];  // none: rounding, take the band
    }
    const unsigned t = (unsigned)lo;             // one value, more than CAP ties
    const float wt = expf(unordered(t) - xmax);
    int r = band;                                // ties needed, taken in id order
    if (wt > 0.0f) {
        const float rf = ceilf((target - m_hi) / wt);
        r = rf >= (float)band ? band : max(1, (int)rf);
    }
    return ((u64)t << 32) | (u64)(0xffffffffu - (unsigned)nth_tie(x4, npad, t, r, sm));
}

// top-p's cut within the set {key >= kk} of set_size elements: the key of the
// first element (in key order) at which the cumulative weight reaches top_p of
// the set's; 0 (keep all) when it never does, as numpy keeps all then.
__device__ u64 top_p_cut(const float4* x4, int npad, u64 kk, int set_size, float top_p,
                         float xmax, Smem& sm, int& slow) {
    const int L = min(set_size, CAP);
    const u64 kc = L == set_size ? kk : select_key(x4, npad, L, sm);
    gather(x4, npad, kc, ~0ull, sm.big.keys);
    sort_desc(sm.big.keys, L);
    float w[4], excl, total;
    weigh_sorted(sm.big.keys, L, xmax, w, excl, total);
    int unused;
    const float z_set = L == set_size ? total : mass_above(x4, npad, kk, 0u, xmax, unused);
    const float target = top_p * z_set;
    const int first = first_reaching(w, excl, L, target);
    if (first != 0x7fffffff) return sm.big.keys[first];
    if (L == set_size) return 0;
    slow = 1;
    return top_p_search(x4, npad, kk, set_size, target, xmax, sm);
}

// w = exp(x - xmax) on the kept set, 0 elsewhere, into w4; returns Z summed
// exactly as draw() accumulates it, so a target below Z is always found.
__device__ float weigh(const float4* x4, float4* w4, int npad, u64 kcut, float lmin, float xmax,
                       u64& klast, int& n_kept) {
    float z = 0.0f;
    u64 kmin = ~0ull;
    int cnt = 0;
    for (int b = 0; b < npad / 4; b += 4 * NT) {
        float4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = x4[b + u * NT + threadIdx.x];
        float s = 0.0f;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            float* f = reinterpret_cast<float*>(&v[u]);
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const u64 key = make_key(f[c], 4 * (b + u * NT + threadIdx.x) + c);
                const bool kept = key >= kcut && f[c] - xmax >= lmin;
                f[c] = kept ? expf(f[c] - xmax) : 0.0f;
                s += f[c];
                if (kept) { kmin = min(kmin, key); ++cnt; }
            }
            w4[b + u * NT + threadIdx.x] = v[u];
        }
        float excl, total;
        block_scan<float>(s, excl, total);
        z += total;
    }
    klast = block_min_u64(kmin);
    n_kept = block_sum_int(cnt);
    return z;
}

// The element at which the running weight (in weigh's order) first exceeds
// target; within the chosen thread's 16, its last positive one if rounding
// leaves the crossing short. -1 only if target >= Z.
__device__ int draw(const float4* w4, int npad, float target, Smem& sm) {
    float carry = 0.0f;
    for (int b = 0; b < npad / 4; b += 4 * NT) {
        float4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = w4[b + u * NT + threadIdx.x];
        const float* f = reinterpret_cast<const float*>(v);
        float s = 0.0f;
        for (int j = 0; j < 16; ++j) s += f[j];
        float excl, total;
        block_scan<float>(s, excl, total);
        if (carry + total > target) {            // block-uniform
            const float base = carry + excl;
            const int t = block_max_int(s > 0.0f && base <= target ? (int)threadIdx.x : -1);
            if ((int)threadIdx.x == t) {
                float run = base;
                int pick = -1;
                for (int j = 0; j < 16; ++j) {
                    if (f[j] > 0.0f) {
                        pick = 4 * (b + (j >> 2) * NT + threadIdx.x) + (j & 3);
                        run += f[j];
                        if (run > target) break;
                    }
                }
                sm.found = pick;
            }
            __syncthreads();
            return sm.found;
        }
        carry += total;
    }
    return -1;
}

// -- the processed logits ----------------------------------------------------------------

// logits[i] through the mask, the bias and the penalties (not the temperature),
// each step rounded on its own (the _rn intrinsics are never fused into an FMA),
// as orcd.ops.sampling.process does in float32.
__device__ __forceinline__ float processed(const float* __restrict__ logits,
                                           const int* __restrict__ seen,
                                           const int* __restrict__ counts,
                                           const float* __restrict__ bias,
                                           const unsigned* __restrict__ allowed,
                                           const SampleArgs& a, int i) {
    if ((a.flags & USE_MASK) && !((allowed[i >> 5] >> (i & 31)) & 1u)) return NEG_INF;
    float v = logits[i];
    if (a.flags & USE_BIAS) v = __fadd_rn(v, bias[i]);
    if (a.penalty != 1.0f && seen[i])                                   // as llama.cpp
        v = v > 0.0f ? __fdiv_rn(v, a.penalty) : __fmul_rn(v, a.penalty);
    if (a.flags & USE_COUNTS) {
        const int c = counts[i];
        if (c > 0) v = __fsub_rn(__fsub_rn(v, __fmul_rn((float)c, a.frequency)), a.presence);
    }
    return v;
}

// -- kernels --------------------------------------------------------------------------

// x[i] = processed(i) / T for i < n (greedy: no temperature), -inf up to
// the padding; each block's (max, lowest argmax). grid npad / PREP_TILE, block PREP_NT.
__device__ __forceinline__ void
prepare_part(const float* __restrict__ logits, const int* __restrict__ seen,
             const int* __restrict__ counts, const float* __restrict__ bias,
             const unsigned* __restrict__ allowed,
             const SampleArgs* __restrict__ args, float* __restrict__ x,
             float* __restrict__ part_max, int* __restrict__ part_arg, int n, int part) {
    const SampleArgs a = *args;
    const float temp = a.temperature;
    const bool greedy = temp <= 0.0f;
    float best = NEG_INF;
    int arg = 0x7fffffff;
    const int base = part * PREP_TILE;
    for (int j = threadIdx.x; j < PREP_TILE; j += PREP_NT) {
        const int i = base + j;
        float v = NEG_INF;
        if (i < n) {
            v = processed(logits, seen, counts, bias, allowed, a, i);
            if (!greedy) v = __fdiv_rn(v, temp);
            if (better(v, i, best, arg)) { best = v; arg = i; }
        }
        x[i] = v;
    }
    block_argmax(best, arg);
    if (threadIdx.x == 0) { part_max[part] = best; part_arg[part] = arg; }
}

extern "C" __global__ void __launch_bounds__(PREP_NT)
sample_prepare(const float* __restrict__ logits, const int* __restrict__ seen,
               const int* __restrict__ counts, const float* __restrict__ bias,
               const unsigned* __restrict__ allowed,
               const SampleArgs* __restrict__ args, float* __restrict__ x,
               float* __restrict__ part_max, int* __restrict__ part_arg, int n) {
    orcd_prior_done();
    prepare_part(logits, seen, counts, bias, allowed, args, x, part_max, part_arg, n, blockIdx.x);
}

// The filters and the draw; writes out_id[0], marks seen[out_id], counts it and
// fills info. grid 1, block NT. x, w: [npad] (npad a multiple of PAD); part_*: [n_part].
__device__ __forceinline__ void
select_row(const float* __restrict__ x, float* w,   // w: written, then read back
           const float* __restrict__ part_max, const int* __restrict__ part_arg, int n_part,
           const SampleArgs* __restrict__ args, int* __restrict__ seen,
           int* __restrict__ counts,
           int* __restrict__ out_id, SampleInfo* __restrict__ info, int n, int npad, Smem& sm) {
    const SampleArgs a = *args;
    float xmax = NEG_INF;
    int arg = 0x7fffffff;
    for (int i = threadIdx.x; i < n_part; i += NT)
        if (better(part_max[i], part_arg[i], xmax, arg)) { xmax = part_max[i]; arg = part_arg[i]; }
    block_argmax(xmax, arg);

    const int top_k = a.top_k > 0 && a.top_k < n ? a.top_k : 0;
    int id = arg, n_kept = 1, slow = 0;
    u64 klast = make_key(xmax, arg);
    float z = 1.0f;
    if (!(a.temperature <= 0.0f) && top_k != 1) {
        const float4* x4 = reinterpret_cast<const float4*>(x);
        // every real key is >= kbase, every padding key (-inf, id >= n) below it
        const u64 kbase = ((u64)ordered(NEG_INF) << 32) | (u64)(0xffffffffu - (unsigned)(n - 1));
        const u64 kk = top_k ? max(select_key(x4, npad, top_k, sm), kbase) : kbase;
        u64 kcut = kk;
        if (a.top_p < 1.0f)
            kcut = max(kcut, top_p_cut(x4, npad, kk, top_k ? top_k : n, a.top_p, xmax, sm, slow));
        const float lmin = a.min_p > 0.0f ? logf(a.min_p) : NEG_INF;
        z = weigh(x4, reinterpret_cast<float4*>(w), npad, kcut, lmin, xmax, klast, n_kept);
        __syncthreads();                           // w written by all before the draw reads it
        const int d = draw(reinterpret_cast<const float4*>(w), npad, uniform(a.seed, a.step) * z, sm);
        id = d >= 0 ? d : arg;
    }
    if (threadIdx.x == 0) {
        *out_id = id;
        seen[id] = 1;
        counts[id] += 1;
        info->klast = klast;
        info->xmax = xmax;
        info->z = z;
        info->n_kept = n_kept;
        info->slow = slow;
    }
}

extern "C" __global__ void __launch_bounds__(NT)
sample_select(const float* __restrict__ x, float* w,
              const float* __restrict__ part_max, const int* __restrict__ part_arg, int n_part,
              const SampleArgs* __restrict__ args, int* __restrict__ seen,
              int* __restrict__ counts,
              int* __restrict__ out_id, SampleInfo* __restrict__ info, int n, int npad) {
    orcd_prior_done();
    __shared__ Smem sm;
    select_row(x, w, part_max, part_arg, n_part, args, seen, counts, out_id, info, n, npad, sm);
}

// -- a batch's rows in two launches (orcd.ops.sampling_rows) -----------------------------
// Each row is one sampler's draw, exactly as sample_prepare + sample_select make
// it (the same code), with every pointer its own: a batch of B decodes costs two
// launches, not 2B, and the rows' prepare blocks run side by side.

struct SampleRow {          // sampling_rows.SAMPLE_ROW
    const float* logits;    // the row's logits [n]
    int* seen;
    int* counts;
    const float* bias;
    const unsigned* allowed;
    const SampleArgs* args;
    float* x;
    float* w;
    float* part_max;
    int* part_arg;
    int* out_id;
    SampleInfo* info;
};

// grid (n_part, B), block PREP_NT.
extern "C" __global__ void __launch_bounds__(PREP_NT)
sample_prepare_rows(const SampleRow* __restrict__ rows, int n) {
    orcd_prior_done();
    const SampleRow r = rows[blockIdx.y];
    prepare_part(r.logits, r.seen, r.counts, r.bias, r.allowed, r.args, r.x, r.part_max,
                 r.part_arg, n, blockIdx.x);
}

// grid B, block NT.
extern "C" __global__ void __launch_bounds__(NT)
sample_select_rows(const SampleRow* __restrict__ rows, int n_part, int n, int npad) {
    orcd_prior_done();
    __shared__ Smem sm;
    const SampleRow r = rows[blockIdx.x];
    select_row(r.x, r.w, r.part_max, r.part_arg, n_part, r.args, r.seen, r.counts, r.out_id,
               r.info, n, npad, sm);
}

// y[i] = processed(i) for i < n; out: log-sum-exp of y and its n_top best (id,
// value), larger first, lower id on ties. Runs before sample_select marks the
// chosen id, so y is what the draw saw before temperature. grid 1, block NT.
extern "C" __global__ void __launch_bounds__(NT)
sample_logprobs(const float* __restrict__ logits, const int* __restrict__ seen,
                const int* __restrict__ counts, const float* __restrict__ bias,
                const unsigned* __restrict__ allowed, const SampleArgs* __restrict__ args,
                float* __restrict__ y, LogprobOut* __restrict__ out, int n) {
    orcd_prior_done();
    const SampleArgs a = *args;
    float m = NEG_INF;
    int unused = 0;
    for (int i = threadIdx.x; i < n; i += NT) {
        const float v = processed(logits, seen, counts, bias, allowed, a, i);
        y[i] = v;
        m = fmaxf(m, v);
    }
    block_argmax(m, unused);
    float s = 0.0f;
    if (m != NEG_INF)
        for (int i = threadIdx.x; i < n; i += NT) s += expf(y[i] - m);   // this thread's own y
    s = block_sum(s);
    const int n_top = min(max(a.n_top, 0), min(MAX_TOP, n));
    u64 prev = ~0ull;                        // keys are unique: take each next below prev
    for (int r = 0; r < n_top; ++r) {
        u64 best = 0;                        // below every real key
        for (int i = threadIdx.x; i < n; i += NT) {
            const u64 k = make_key(y[i], i);
            if (k < prev && k > best) best = k;
        }
        best = ~block_min_u64(~best);        // the block's largest
        if (threadIdx.x == 0) { out->top_id[r] = key_id(best); out->top_val[r] = y[key_id(best)]; }
        prev = best;
    }
    if (threadIdx.x == 0) {
        out->lse = m == NEG_INF ? NEG_INF : m + logf(s);
        out->n_top = n_top;
    }
}

// out->chosen = y[out_id] once sample_select has chosen. grid 1, block 32.
extern "C" __global__ void sample_logprob_pick(const float* __restrict__ y,
                                               const int* __restrict__ out_id,
                                               LogprobOut* __restrict__ out) {
    orcd_prior_done();
    if (threadIdx.x == 0) {
        const int id = *out_id;
        out->chosen_id = id;
        out->chosen = y[id];
    }
}

// A pipelined decode step's token ids (the scheduler queues step k+1 before the ids
// of step k reach the host): ids[i] = prev[src[i]] where src[i] >= 0, the id drawn for
// that row's sequence in the step before; other rows keep the id the host wrote.
extern "C" __global__ void follow_ids(int* __restrict__ ids, const int* __restrict__ src,
                                      const int* __restrict__ prev, int n) {
    orcd_prior_done();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n && src[i] >= 0) ids[i] = prev[src[i]];
}
