// sampling.cu's filters over the padded x: passes, radix select (top-k's cut), the
// top-p cut, and the weights and draw of the kept set (included there, after
// sample_keys.cuh and its sizes: NT, NW, CAP, PAD).
#pragma once

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
