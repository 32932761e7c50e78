// Attention over the fp16 KV cache with fp32 scores and softmax: causal, GQA,
// optional sliding window and learned sinks (GPT-OSS).
//
// attn_fwd: one block per (head, split, query row). The block walks the keys
// of its split that the query may see in tiles of ATT_TILE (one key per
// thread) with an online softmax. With one split it writes the final output
// (prefill); with several (decode over a long context) it writes a partial
// (o unnormalised, running max m, sum l) and attn_combine merges the splits
// in a fixed order: deterministic, no atomics. Positions, and from them the
// key count, are read from device memory, so the decode step is graph-capturable:
// its grid covers the whole context and splits past the last key exit at once.
//
// The cache is paged (kvcache.py): position p of sequence s is row
// kv_row(tables, max_blocks, s, p) of each layer's K and V, and each token of a
// forward names its sequence (seq[t]). A decode split and a prefill key tile are
// one block (KV_BLOCK keys), so each looks its block up once. A prefill forward
// (T > 1 on the tensor cores) holds one sequence: seq[0].

#include "pdl.cuh"
#include "mma.cuh"
#include "q8.cuh"
#include <cuda_fp16.h>

#define ATT_TILE 128      // keys per tile == threads per block
#define ATT_MAX_HD 256
#define NEG_INF __int_as_float(0xff800000)  // NVRTC has no math.h INFINITY

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// Block-wide max / sum over ATT_TILE threads, the same on every thread.
__device__ float block_max(float v, float* red) {
    v = warp_max(v);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = red[0];
    for (int w = 1; w < ATT_TILE / 32; ++w) r = fmaxf(r, red[w]);
    __syncthreads();
    return r;
}
__device__ float block_sum(float v, float* red) {
    v = warp_sum(v);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = red[0];
    for (int w = 1; w < ATT_TILE / 32; ++w) r += red[w];
    __syncthreads();
    return r;
}

// The keys query position p may see: [lo, p].
__device__ __forceinline__ int first_key(int p, int window) {
    return window > 0 ? max(0, p - window + 1) : 0;
}

#define KV_BLOCK 64
// The K/V row of position p of sequence s (kvcache.py's kv_rows).
__device__ __forceinline__ size_t kv_row(const int* __restrict__ tables, int max_blocks, int s, int p) {
    return (size_t)tables[(size_t)s * max_blocks + p / KV_BLOCK] * KV_BLOCK + p % KV_BLOCK;
}

// k, v: [T, n_kv * hd] fp32 -> caches [rows, n_kv, hd] fp16 at kv_row(seq[t], pos[t]).
// grid (ceil(max(n_k, n_v) / 256), T), block 256.
extern "C" __global__ void kv_store(__half* __restrict__ kc, __half* __restrict__ vc,
                                   const float* __restrict__ k, const float* __restrict__ v,
                                   const int* __restrict__ pos, const int* __restrict__ tables,
                                   int max_blocks, const int* __restrict__ seq, int n_k, int n_v) {
    orcd_prior_done();
    const int t = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
    const size_t row = kv_row(tables, max_blocks, seq[t], pos[t]);
    if (i < n_k) kc[row * n_k + i] = __float2half_rn(k[(size_t)t * n_k + i]);
    if (i < n_v) vc[row * n_v + i] = __float2half_rn(v[(size_t)t * n_v + i]);
}

// Element i of one head's RoPE (as rope.cu's rope_f32): xr the head's row, c/s
// the cos/sin row of its position.
__device__ __forceinline__ float rope_elem(const float* __restrict__ xr, int i, int n_rot, int neox,
                                           const float* __restrict__ c, const float* __restrict__ s) {
    const int half = n_rot / 2;
    if (i >= n_rot) return xr[i];
    if (neox) {  // pairs (j, j + half)
        const int j = i < half ? i : i - half;
        const float a = xr[j], b = xr[j + half];
        return i < half ? a * c[j] - b * s[j] : a * s[j] + b * c[j];
    }
    const int j = i >> 1;  // pairs (2j, 2j + 1)
    const float a = xr[2 * j], b = xr[2 * j + 1];
    return (i & 1) ? a * s[j] + b * c[j] : a * c[j] - b * s[j];
}

// RoPE on q and k, then k and v into the fp16 cache at kv_row(seq[t], pos[t]): what
// rope(q), rope(k) and kv_store do in three launches. q, q_out: [T, n_head * hd];
// k: [T, n_kv * hd]; v: [T, n_kv * hd_v]; cos_t, sin_t: [n_pos, n_rot / 2].
// grid (n_head + n_kv, T), block: any (threads stride over the head).
extern "C" __global__ void rope_kv_store(const float* __restrict__ q, float* __restrict__ q_out,
                                        const float* __restrict__ k, const float* __restrict__ v,
                                        __half* __restrict__ kc, __half* __restrict__ vc,
                                        const int* __restrict__ pos, const int* __restrict__ tables,
                                        int max_blocks, const int* __restrict__ seq,
                                        const float* __restrict__ cos_t,
                                        const float* __restrict__ sin_t, int n_head, int n_kv, int hd,
                                        int hd_v, int n_rot, int neox, int n_pos) {
    orcd_prior_done();
    const int t = blockIdx.y, h = blockIdx.x;
    const int p = pos[t];
    const int pc = p < 0 ? 0 : (p >= n_pos ? n_pos - 1 : p);  // the host checks positions
    const float* c = cos_t + (size_t)pc * (n_rot / 2);
    const float* s = sin_t + (size_t)pc * (n_rot / 2);
    if (h < n_head) {
        const size_t base = ((size_t)t * n_head + h) * hd;
        for (int i = threadIdx.x; i < hd; i += blockDim.x)
            q_out[base + i] = rope_elem(q + base, i, n_rot, neox, c, s);
        return;
    }
    const int kvh = h - n_head;
    const size_t row = kv_row(tables, max_blocks, seq[t], p);
    const float* kr = k + ((size_t)t * n_kv + kvh) * hd;
    __half* kd = kc + (row * n_kv + kvh) * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x)
        kd[i] = __float2half_rn(rope_elem(kr, i, n_rot, neox, c, s));
    const float* vr = v + ((size_t)t * n_kv + kvh) * hd_v;
    __half* vd = vc + (row * n_kv + kvh) * hd_v;
    for (int i = threadIdx.x; i < hd_v; i += blockDim.x) vd[i] = __float2half_rn(vr[i]);
}

// q: [T, n_head * hd]; kc: [rows, n_kv, hd]; vc: [rows, n_kv, hd_v]; pos, seq: [T];
// sinks: [n_head] or null; out: [T, n_head * hd_v] (n_splits == 1);
// part: [T, n_head, n_splits, hd_v + 2] (n_splits > 1).
// grid (n_head, n_splits, T), block ATT_TILE.
extern "C" __global__ void __launch_bounds__(ATT_TILE)
attn_fwd(const float* __restrict__ q, const __half* __restrict__ kc, const __half* __restrict__ vc,
         const int* __restrict__ pos, const int* __restrict__ tables, int max_blocks,
         const int* __restrict__ seq, const float* __restrict__ sinks, float* __restrict__ out,
         float* __restrict__ part, int n_head, int n_kv, int hd, int hd_v, float scale, int window,
         int keys_per_split, int n_splits) {
    orcd_prior_done();
    __shared__ float qs[ATT_MAX_HD];
    __shared__ float ps[ATT_TILE];
    __shared__ float acc_s[ATT_TILE * 2];
    __shared__ float red[ATT_TILE / 32];
    const int h = blockIdx.x, split = blockIdx.y, t = blockIdx.z, tid = threadIdx.x;
    const int kvh = h / (n_head / n_kv);
    const int p = pos[t], sq = seq[t];
    const int lo = max(first_key(p, window), split * keys_per_split);
    const int hi = min(p + 1, (split + 1) * keys_per_split);  // exclusive
    if (lo >= hi) return;  // only with several splits: attn_combine skips this one

    for (int d = tid; d < hd; d += ATT_TILE) qs[d] = q[((size_t)t * n_head + h) * hd + d];
    __syncthreads();

    // P·V layout: n_grp groups of hd_v threads, group g takes keys g, g + n_grp, ...
    // (hd_v > ATT_TILE: one group, each thread two dims d0 and d0 + ATT_TILE).
    const int n_grp = hd_v <= ATT_TILE ? ATT_TILE / hd_v : 1;
    const int g = hd_v <= ATT_TILE ? tid / hd_v : 0;
    const int d0 = hd_v <= ATT_TILE ? tid % hd_v : tid;
    const bool pv_active = g < n_grp;
    const bool two_dims = hd_v > ATT_TILE && d0 + ATT_TILE < hd_v;
    const size_t k_stride = (size_t)n_kv * hd, v_stride = (size_t)n_kv * hd_v;
    const __half* kh = kc + (size_t)kvh * hd;
    const __half* vh = vc + (size_t)kvh * hd_v;

    float m = NEG_INF, l = 0.f, acc0 = 0.f, acc1 = 0.f;
    for (int j0 = lo; j0 < hi; j0 += ATT_TILE) {
        const int j = j0 + tid;
        float s = NEG_INF;
        if (j < hi) {
            const __half2* kr = reinterpret_cast<const __half2*>(kh + kv_row(tables, max_blocks, sq, j) * k_stride);
            float dot = 0.f;
            for (int d = 0; d < hd / 2; ++d) {
                const float2 kf = __half22float2(kr[d]);
                dot += qs[2 * d] * kf.x + qs[2 * d + 1] * kf.y;
            }
            s = dot * scale;
        }
        const float m_new = fmaxf(m, block_max(s, red));   // finite: key j0 is visible
        const float alpha = expf(m - m_new);                // 0 on the first tile
        const float pj = j < hi ? expf(s - m_new) : 0.f;
        ps[tid] = pj;
        l = l * alpha + block_sum(pj, red);                 // block_sum syncs: ps is complete
        const int n_tile = min(ATT_TILE, hi - j0);
        if (pv_active) {
            float a0 = 0.f, a1 = 0.f;
            for (int jj = g; jj < n_tile; jj += n_grp) {
                const __half* vr = vh + kv_row(tables, max_blocks, sq, j0 + jj) * v_stride;
                a0 += ps[jj] * __half2float(vr[d0]);
                if (two_dims) a1 += ps[jj] * __half2float(vr[d0 + ATT_TILE]);
            }
            acc0 = acc0 * alpha + a0;
            acc1 = acc1 * alpha + a1;
        }
        m = m_new;
        __syncthreads();  // ps is rewritten by the next tile
    }

    // Sum the groups' partial outputs in group order.
    if (pv_active) { acc_s[tid] = acc0; if (two_dims) acc_s[ATT_TILE + tid] = acc1; }
    __syncthreads();
    if (g != 0 || !pv_active) return;
    float o0 = 0.f;
    for (int gg = 0; gg < n_grp; ++gg) o0 += acc_s[gg * hd_v + d0];
    const float o1 = two_dims ? acc_s[ATT_TILE + d0] : 0.f;

    if (n_splits == 1) {
        float mm = m, denom = l;
        if (sinks) {
            const float sk = sinks[h];
            mm = fmaxf(m, sk);
            denom = l * expf(m - mm) + expf(sk - mm);
        }
        const float f = expf(m - mm) / denom;
        float* y = out + ((size_t)t * n_head + h) * hd_v;
        y[d0] = o0 * f;
        if (two_dims) y[d0 + ATT_TILE] = o1 * f;
    } else {
        float* pp = part + (((size_t)t * n_head + h) * n_splits + split) * (hd_v + 2);
        pp[d0] = o0;
        if (two_dims) pp[d0 + ATT_TILE] = o1;
        if (d0 == 0) { pp[hd_v] = m; pp[hd_v + 1] = l; }
    }
}

// Decode (one query row): one block per (KV head, split) serves the whole GQA
// group of query heads, so each K/V row is read once per group, not once per
// query head. The block loads q, and its split's K and V rows into shared
// memory up front (every global load in flight together, coalesced), then
// scores, a per-head softmax and P.V from shared memory, and writes the same
// partials as attn_fwd (o unnormalised, m, l) for attn_combine.
// q: [T, n_head * hd], one row per token, each of its own sequence (seq[t]) at
// pos[t] (a batch of decodes); part: [T, n_head, n_splits, hd + 2]; kps == KV_BLOCK,
// so a split's keys are one block of the cache.
// Dynamic shared memory: q [G][hd] f32, p [G][kps] f32, K [kps][hd + 2] f16
// (rows padded: conflict-free per-key reads), V [kps][hd] f16.
#define DEC_THREADS 256

// The token's own k and v before RoPE (attn_decode_rope): q is rotated while it is
// staged, and the split that holds the position stores rope(k) and v into the cache
// and stages them from registers -- rope_kv_store's arithmetic (rope_elem, round to
// half), so the same bits. cos_t null: no RoPE.
struct Fresh {
    const float* k;
    const float* v;
    const float* cos_t;
    const float* sin_t;
    int n_rot, neox, n_pos;
    __half* kc;
    __half* vc;
};

// One split's partials; false once the split starts past the position (so do the later ones).
template <bool FRESH>
__device__ __forceinline__ bool decode_split(const float* __restrict__ q, const __half* kc, const __half* vc,
                                             const int* __restrict__ pos, const int* __restrict__ tables,
                                             int max_blocks, const int* __restrict__ seq,
                                             float* __restrict__ part, int n_head, int n_kv, int hd,
                                             float scale, int window, int kps, int n_splits, int split,
                                             const Fresh& f) {
    extern __shared__ float smem[];
    const int kvh = blockIdx.x, t = blockIdx.z, tid = threadIdx.x;
    const int G = n_head / n_kv, hd2 = hd / 2;
    const int p = pos[t];
    const int lo = max(first_key(p, window), split * kps);
    const int hi = min(p + 1, (split + 1) * kps);  // exclusive
    if (lo >= hi) return split * kps <= p;  // attn_combine skips this split
    const int n = hi - lo;
    const size_t row0 = kv_row(tables, max_blocks, seq[t], lo);   // the split's keys: rows row0 .. + n
    q += (size_t)t * n_head * hd;
    part += (size_t)t * n_head * n_splits * (hd + 2);
    float* qs = smem;                                   // [G][hd]
    float* ps = qs + G * hd;                            // [G][kps]
    __half2* ks = (__half2*)(ps + G * kps);             // [kps][hd2 + 1]
    __half2* vs = ks + kps * (hd2 + 1);                 // [kps][hd2]

    const float* qg = q + (size_t)kvh * G * hd;         // heads kvh * G .. + G - 1
    const float *c = nullptr, *sn = nullptr;
    int n_rot = 0;                                      // 0: rope_elem passes values through
    if (FRESH && f.cos_t) {
        const int pc = p < 0 ? 0 : (p >= f.n_pos ? f.n_pos - 1 : p);  // the host checks positions
        c = f.cos_t + (size_t)pc * (f.n_rot / 2);
        sn = f.sin_t + (size_t)pc * (f.n_rot / 2);
        n_rot = f.n_rot;
    }
    for (int i = tid; i < G * hd; i += DEC_THREADS) {
        if (FRESH) {
            const int g = i / hd;
            qs[i] = rope_elem(qg + g * hd, i - g * hd, n_rot, f.neox, c, sn);
        } else {
            qs[i] = qg[i];
        }
    }
    const __half2* k2 = (const __half2*)kc;
    const __half2* v2 = (const __half2*)vc;
    const int fresh_j = p - lo;                         // < n only in the split that holds p
    for (int i = tid; i < n * hd2; i += DEC_THREADS) {
        const int j = i / hd2, d = i - j * hd2;
        const size_t at = ((row0 + j) * n_kv + kvh) * hd2 + d;
        if (FRESH && j == fresh_j) {
            const float* kr = f.k + ((size_t)t * n_kv + kvh) * hd;
            const float* vr = f.v + ((size_t)t * n_kv + kvh) * hd;
            const __half2 kh = __floats2half2_rn(rope_elem(kr, 2 * d, n_rot, f.neox, c, sn),
                                                 rope_elem(kr, 2 * d + 1, n_rot, f.neox, c, sn));
            const __half2 vh = __floats2half2_rn(vr[2 * d], vr[2 * d + 1]);
            ((__half2*)f.kc)[at] = kh;
            ((__half2*)f.vc)[at] = vh;
            ks[j * (hd2 + 1) + d] = kh;
            vs[j * hd2 + d] = vh;
        } else {
            ks[j * (hd2 + 1) + d] = k2[at];
            vs[j * hd2 + d] = v2[at];
        }
    }
    __syncthreads();

    for (int i = tid; i < G * n; i += DEC_THREADS) {     // scores, key index fastest
        const int g = i / n, j = i - g * n;
        const __half2* kr = ks + j * (hd2 + 1);
        const float* qh = qs + g * hd;
        float dot = 0.f;
#pragma unroll 4
        for (int d = 0; d < hd2; ++d) {
            const float2 kf = __half22float2(kr[d]);
            dot += qh[2 * d] * kf.x + qh[2 * d + 1] * kf.y;
        }
        ps[g * kps + j] = dot * scale;
    }
    __syncthreads();

    const int lane = tid & 31, warp = tid >> 5;
    for (int g = warp; g < G; g += DEC_THREADS / 32) {   // softmax pieces, one warp per head
        float* pg = ps + g * kps;
        float m = NEG_INF;
        for (int j = lane; j < n; j += 32) m = fmaxf(m, pg[j]);
        m = warp_max(m);
        float l = 0.f;
        for (int j = lane; j < n; j += 32) {
            const float e = expf(pg[j] - m);
            pg[j] = e;
            l += e;
        }
        l = warp_sum(l);
        if (lane == 0) {
            float* pp = part + ((size_t)(kvh * G + g) * n_splits + split) * (hd + 2);
            pp[hd] = m;
            pp[hd + 1] = l;
        }
    }
    __syncthreads();

    for (int i = tid; i < G * hd2; i += DEC_THREADS) {   // P.V, two dims per thread
        const int g = i / hd2, d = i - g * hd2;
        const float* pg = ps + g * kps;
        float o0 = 0.f, o1 = 0.f;
#pragma unroll 4
        for (int j = 0; j < n; ++j) {
            const float2 vf = __half22float2(vs[j * hd2 + d]);
            o0 += pg[j] * vf.x;
            o1 += pg[j] * vf.y;
        }
        float* pp = part + ((size_t)(kvh * G + g) * n_splits + split) * (hd + 2);
        pp[2 * d] = o0;
        pp[2 * d + 1] = o1;
    }
    return true;
}

// Block y of the grid's splits dimension takes splits y, y + gridDim.y, ... (the host makes
// about one wave of blocks in all: a long context's blocks loop, not thousands of blocks
// of which most leave at once), each split as a block of its own would.
template <bool FRESH>
__device__ __forceinline__ void decode_splits(const float* __restrict__ q, const __half* kc, const __half* vc,
                                              const int* __restrict__ pos, const int* __restrict__ tables,
                                              int max_blocks, const int* __restrict__ seq,
                                              float* __restrict__ part, int n_head, int n_kv, int hd,
                                              float scale, int window, int kps, int n_splits, const Fresh& f) {
    for (int split = blockIdx.y; split < n_splits; split += gridDim.y) {
        if (!decode_split<FRESH>(q, kc, vc, pos, tables, max_blocks, seq, part, n_head, n_kv, hd, scale,
                                 window, kps, n_splits, split, f))
            break;
        __syncthreads();   // the next split stages into the same shared memory
    }
}

// grid (n_kv, S <= n_splits, T), block DEC_THREADS.
extern "C" __global__ void __launch_bounds__(DEC_THREADS)
attn_decode(const float* __restrict__ q, const __half* __restrict__ kc, const __half* __restrict__ vc,
            const int* __restrict__ pos, const int* __restrict__ tables, int max_blocks,
            const int* __restrict__ seq, float* __restrict__ part, int n_head, int n_kv, int hd,
            float scale, int window, int kps, int n_splits) {
    orcd_prior_done();
    decode_splits<false>(q, kc, vc, pos, tables, max_blocks, seq, part, n_head, n_kv, hd, scale, window, kps,
                         n_splits, Fresh{});
}

// Decodes with their q, k and v before RoPE: rope_kv_store and attn_decode in one
// launch (then attn_combine), the same bits. Only where no row of the launch reads the
// key another row stores: one sequence's single token, or a batch of distinct
// sequences (KVCache.apart; padding rows all store the spare block's row 0, and each
// takes it from its own registers, never from memory).
// k, v: [T, n_kv * hd] f32; cos_t, sin_t: [n_pos, n_rot / 2]. grid (n_kv, S <= n_splits, T).
extern "C" __global__ void __launch_bounds__(DEC_THREADS)
attn_decode_rope(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                 __half* kc, __half* vc, const int* __restrict__ pos, const int* __restrict__ tables,
                 int max_blocks, const int* __restrict__ seq, const float* __restrict__ cos_t,
                 const float* __restrict__ sin_t, int n_rot, int neox, int n_pos, float* __restrict__ part,
                 int n_head, int n_kv, int hd, float scale, int window, int kps, int n_splits) {
    orcd_prior_done();
    decode_splits<true>(q, kc, vc, pos, tables, max_blocks, seq, part, n_head, n_kv, hd, scale, window, kps,
                        n_splits, Fresh{k, v, cos_t, sin_t, n_rot, neox, n_pos, kc, vc});
}

// Merge the splits that hold visible keys, in split order, with the sink.
// part: [T, n_head, n_splits, hd_v + 2]; out: [T, n_head * hd_v]. grid (n_head, T), block 128,
// dynamic shared memory 3 * n_splits floats. The splits' (m, l) are loaded by the block's
// threads at once and each split's weight exp(m - max) made once, into shared memory: the
// loops over splits then read shared memory, and only the values' loads go to L2 (one
// round trip a split and thread before, for m, l and again m). The same sums in the same
// order, so the same bits.
// xq, xd (hd_v a multiple of 32, or null): out's int8 activations as quantize_q8 makes
// them, [T, n_head * hd_v] and [T, n_head * hd_v / 32] -- a warp holds one group.
extern "C" __global__ void attn_combine(const float* __restrict__ part, const int* __restrict__ pos,
                                       const float* __restrict__ sinks, float* __restrict__ out,
                                       signed char* __restrict__ xq, float* __restrict__ xd,
                                       int n_head, int hd_v, int window, int keys_per_split,
                                       int n_splits) {
    orcd_prior_done();
    extern __shared__ float cmb[];
    const int h = blockIdx.x, t = blockIdx.y;
    const int p = pos[t];
    const int s_lo = first_key(p, window) / keys_per_split;
    const int s_hi = min(p / keys_per_split, n_splits - 1);
    const int ns = s_hi - s_lo + 1;
    const float* pp = part + ((size_t)t * n_head + h) * n_splits * (hd_v + 2) + (size_t)s_lo * (hd_v + 2);
    float *sm = cmb, *sl = cmb + n_splits, *se = cmb + 2 * n_splits;   // m, l, weight of split s_lo + i
    for (int i = threadIdx.x; i < ns; i += blockDim.x) {
        sm[i] = pp[i * (hd_v + 2) + hd_v];
        sl[i] = pp[i * (hd_v + 2) + hd_v + 1];
    }
    __syncthreads();
    float mm = sinks ? sinks[h] : NEG_INF;
    for (int i = 0; i < ns; ++i) mm = fmaxf(mm, sm[i]);
    for (int i = threadIdx.x; i < ns; i += blockDim.x) se[i] = expf(sm[i] - mm);
    __syncthreads();
    float denom = sinks ? expf(sinks[h] - mm) : 0.f;
    for (int i = 0; i < ns; ++i) denom += sl[i] * se[i];
    const size_t row = ((size_t)t * n_head + h) * hd_v;   // this head's first value in out
    for (int d0 = 0; d0 < hd_v; d0 += blockDim.x) {       // rounds uniform per block, groups per warp
        const int d = d0 + threadIdx.x;
        float y = 0.f;
        if (d < hd_v) {
            float o = 0.f;
#pragma unroll 8
            for (int i = 0; i < ns; ++i) o += pp[i * (hd_v + 2) + d] * se[i];
            y = o / denom;
            out[row + d] = y;
        }
        const int g0 = d0 + (threadIdx.x & ~31);            // the warp's group, whole or not at all
        if (xq && g0 < hd_v) quantize_lane(y, xq + row + g0, xd + (row + g0) / 32);
    }
}

#include "attention_prefill.cuh"   // attn_prefill_tc_v<HDV>: the prompt's attention on the tensor cores
