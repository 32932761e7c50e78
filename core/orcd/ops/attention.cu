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

// k, v: [T, n_kv * hd] fp32 -> caches [n_ctx, n_kv, hd] fp16 at rows pos[t].
// grid (ceil(max(n_k, n_v) / 256), T), block 256.
extern "C" __global__ void kv_store(__half* __restrict__ kc, __half* __restrict__ vc,
                                   const float* __restrict__ k, const float* __restrict__ v,
                                   const int* __restrict__ pos, int n_k, int n_v) {
    const int t = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
    const size_t row = (size_t)pos[t];
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

// RoPE on q and k, then k and v into the fp16 cache at rows pos[t]: what
// rope(q), rope(k) and kv_store do in three launches. q, q_out: [T, n_head * hd];
// k: [T, n_kv * hd]; v: [T, n_kv * hd_v]; cos_t, sin_t: [n_pos, n_rot / 2].
// grid (n_head + n_kv, T), block: any (threads stride over the head).
extern "C" __global__ void rope_kv_store(const float* __restrict__ q, float* __restrict__ q_out,
                                        const float* __restrict__ k, const float* __restrict__ v,
                                        __half* __restrict__ kc, __half* __restrict__ vc,
                                        const int* __restrict__ pos, const float* __restrict__ cos_t,
                                        const float* __restrict__ sin_t, int n_head, int n_kv, int hd,
                                        int hd_v, int n_rot, int neox, int n_pos) {
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
    const float* kr = k + ((size_t)t * n_kv + kvh) * hd;
    __half* kd = kc + ((size_t)p * n_kv + kvh) * hd;
    for (int i = threadIdx.x; i < hd; i += blockDim.x)
        kd[i] = __float2half_rn(rope_elem(kr, i, n_rot, neox, c, s));
    const float* vr = v + ((size_t)t * n_kv + kvh) * hd_v;
    __half* vd = vc + ((size_t)p * n_kv + kvh) * hd_v;
    for (int i = threadIdx.x; i < hd_v; i += blockDim.x) vd[i] = __float2half_rn(vr[i]);
}

// q: [T, n_head * hd]; kc: [n_ctx, n_kv, hd]; vc: [n_ctx, n_kv, hd_v]; pos: [T];
// sinks: [n_head] or null; out: [T, n_head * hd_v] (n_splits == 1);
// part: [T, n_head, n_splits, hd_v + 2] (n_splits > 1).
// grid (n_head, n_splits, T), block ATT_TILE.
extern "C" __global__ void __launch_bounds__(ATT_TILE)
attn_fwd(const float* __restrict__ q, const __half* __restrict__ kc, const __half* __restrict__ vc,
         const int* __restrict__ pos, const float* __restrict__ sinks, float* __restrict__ out,
         float* __restrict__ part, int n_head, int n_kv, int hd, int hd_v, float scale, int window,
         int keys_per_split, int n_splits) {
    __shared__ float qs[ATT_MAX_HD];
    __shared__ float ps[ATT_TILE];
    __shared__ float acc_s[ATT_TILE * 2];
    __shared__ float red[ATT_TILE / 32];
    const int h = blockIdx.x, split = blockIdx.y, t = blockIdx.z, tid = threadIdx.x;
    const int kvh = h / (n_head / n_kv);
    const int p = pos[t];
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
            const __half2* kr = reinterpret_cast<const __half2*>(kh + (size_t)j * k_stride);
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
                const __half* vr = vh + (size_t)(j0 + jj) * v_stride;
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
// q: [1, n_head * hd]; part: [1, n_head, n_splits, hd + 2]; n keys <= keys_per_split.
// Dynamic shared memory: q [G][hd] f32, p [G][kps] f32, K [kps][hd + 2] f16
// (rows padded: conflict-free per-key reads), V [kps][hd] f16.
// grid (n_kv, n_splits), block DEC_THREADS.
#define DEC_THREADS 256
extern "C" __global__ void __launch_bounds__(DEC_THREADS)
attn_decode(const float* __restrict__ q, const __half* __restrict__ kc, const __half* __restrict__ vc,
            const int* __restrict__ pos, float* __restrict__ part, int n_head, int n_kv, int hd,
            float scale, int window, int kps, int n_splits) {
    extern __shared__ float smem[];
    const int kvh = blockIdx.x, split = blockIdx.y, tid = threadIdx.x;
    const int G = n_head / n_kv, hd2 = hd / 2;
    const int p = pos[0];
    const int lo = max(first_key(p, window), split * kps);
    const int hi = min(p + 1, (split + 1) * kps);  // exclusive
    if (lo >= hi) return;  // attn_combine skips this split
    const int n = hi - lo;
    float* qs = smem;                                   // [G][hd]
    float* ps = qs + G * hd;                            // [G][kps]
    __half2* ks = (__half2*)(ps + G * kps);             // [kps][hd2 + 1]
    __half2* vs = ks + kps * (hd2 + 1);                 // [kps][hd2]

    const float* qg = q + (size_t)kvh * G * hd;         // heads kvh * G .. + G - 1
    for (int i = tid; i < G * hd; i += DEC_THREADS) qs[i] = qg[i];
    const __half2* k2 = (const __half2*)kc;
    const __half2* v2 = (const __half2*)vc;
    for (int i = tid; i < n * hd2; i += DEC_THREADS) {
        const int j = i / hd2, d = i - j * hd2;
        const size_t src = ((size_t)(lo + j) * n_kv + kvh) * hd2 + d;
        ks[j * (hd2 + 1) + d] = k2[src];
        vs[j * hd2 + d] = v2[src];
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
}

// Merge the splits that hold visible keys, in split order, with the sink.
// part: [T, n_head, n_splits, hd_v + 2]; out: [T, n_head * hd_v]. grid (n_head, T), block 128.
extern "C" __global__ void attn_combine(const float* __restrict__ part, const int* __restrict__ pos,
                                       const float* __restrict__ sinks, float* __restrict__ out,
                                       int n_head, int hd_v, int window, int keys_per_split,
                                       int n_splits) {
    const int h = blockIdx.x, t = blockIdx.y;
    const int p = pos[t];
    const int s_lo = first_key(p, window) / keys_per_split;
    const int s_hi = min(p / keys_per_split, n_splits - 1);
    const float* pp = part + ((size_t)t * n_head + h) * n_splits * (hd_v + 2);
    float mm = sinks ? sinks[h] : NEG_INF;
    for (int s = s_lo; s <= s_hi; ++s) mm = fmaxf(mm, pp[s * (hd_v + 2) + hd_v]);
    float denom = sinks ? expf(sinks[h] - mm) : 0.f;
    for (int s = s_lo; s <= s_hi; ++s) {
        const float* ps = pp + s * (hd_v + 2);
        denom += ps[hd_v + 1] * expf(ps[hd_v] - mm);
    }
    float* y = out + ((size_t)t * n_head + h) * hd_v;
    for (int d = threadIdx.x; d < hd_v; d += blockDim.x) {
        float o = 0.f;
        for (int s = s_lo; s <= s_hi; ++s) {
            const float* ps = pp + s * (hd_v + 2);
            o += ps[d] * expf(ps[hd_v] - mm);
        }
        y[d] = o / denom;
    }
}

// -- prefill on the tensor cores -----------------------------------------------------
// attn_prefill_tc: one block of 4 warps per (tile of PF_BQ query rows, head); the
// block walks the keys its rows may see in tiles of PF_BK, flash-attention style:
// S = Q K^T and O += P V on the tensor cores (WMMA 16x16x16, fp16 operands, fp32
// accumulation), an online softmax in fp32 between them. Each K/V tile is read
// once per 64 query rows instead of once per row (attn_fwd). Q is rounded to fp16
// and the probabilities too (as llama.cpp's flash attention); scores, softmax
// statistics and O stay fp32. Warp w owns query rows 16w..16w+15 of the tile.
// Positions are read per row from device memory, so any causal chunk works.
#include <mma.h>

#define PF_BQ 64
#define PF_BK 64
#define PF_THREADS 128

// Dynamic shared memory layout (bytes) for head dims hd, hd_v; every region
// 128-byte aligned, row strides padded so 16-row fragments stay 32-byte aligned.
struct PfLayout {
    int ldq, ldv, lds, ldp, ldo;             // leading dimensions (elements)
    int q, k, v, s, p, o, m, l, a, pos, total;  // byte offsets
    __device__ __host__ PfLayout(int hd, int hd_v) {
        ldq = hd + 8; ldv = hd_v + 8; lds = PF_BK + 4; ldp = PF_BK + 8; ldo = hd_v + 4;
        int at = 0;
        auto take = [&](int bytes) { const int here = at; at += (bytes + 127) / 128 * 128; return here; };
        q = take(PF_BQ * ldq * 2); k = take(PF_BK * ldq * 2); v = take(PF_BK * ldv * 2);
        s = take(PF_BQ * lds * 4); p = take(PF_BQ * ldp * 2); o = take(PF_BQ * ldo * 4);
        m = take(PF_BQ * 4); l = take(PF_BQ * 4); a = take(PF_BQ * 4); pos = take(PF_BQ * 4);
        total = at;
    }
};

// Copy rows [j0, j0 + PF_BK) of one KV head of a cache (row stride `stride`
// halves, width w, a multiple of 8) into shared memory (ld halves); rows at or
// past `end` are zero.
__device__ __forceinline__ void load_kv_tile(__half* dst, int ld, const __half* __restrict__ src,
                                             size_t stride, int w, int j0, int end) {
    const int per_row = w / 8;
    for (int i = threadIdx.x; i < PF_BK * per_row; i += PF_THREADS) {
        const int r = i / per_row, c = (i % per_row) * 8;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (j0 + r < end) val = *reinterpret_cast<const uint4*>(src + (size_t)(j0 + r) * stride + c);
        *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
    }
}

// q: [T, n_head * hd] fp32; caches as attn_fwd; out: [T, n_head * hd_v].
// grid (ceil(T / PF_BQ), n_head), block PF_THREADS, dynamic shared PfLayout(hd, hd_v).total.
// hd and hd_v multiples of 16.
extern "C" __global__ void __launch_bounds__(PF_THREADS)
attn_prefill_tc(const float* __restrict__ q, const __half* __restrict__ kc, const __half* __restrict__ vc,
                const int* __restrict__ pos, const float* __restrict__ sinks, float* __restrict__ out,
                int T, int n_head, int n_kv, int hd, int hd_v, float scale, int window) {
    using namespace nvcuda;
    extern __shared__ __align__(128) unsigned char pf_smem[];
    const PfLayout L(hd, hd_v);
    __half* Qs = (__half*)(pf_smem + L.q);
    __half* Ks = (__half*)(pf_smem + L.k);
    __half* Vs = (__half*)(pf_smem + L.v);
    float* Ss = (float*)(pf_smem + L.s);
    __half* Ps = (__half*)(pf_smem + L.p);
    float* Os = (float*)(pf_smem + L.o);
    float* m_s = (float*)(pf_smem + L.m);
    float* l_s = (float*)(pf_smem + L.l);
    float* a_s = (float*)(pf_smem + L.a);
    int* pos_s = (int*)(pf_smem + L.pos);
    __shared__ int range[2];

    const int t0 = blockIdx.x * PF_BQ, h = blockIdx.y, tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int kvh = h / (n_head / n_kv);
    const int rows = min(PF_BQ, T - t0);

    for (int i = tid; i < PF_BQ * hd; i += PF_THREADS) {
        const int r = i / hd, d = i % hd;
        Qs[r * L.ldq + d] = __float2half_rn(r < rows ? q[((size_t)(t0 + r) * n_head + h) * hd + d] : 0.f);
    }
    for (int i = tid; i < PF_BQ * L.ldo; i += PF_THREADS) Os[i] = 0.f;
    for (int r = tid; r < PF_BQ; r += PF_THREADS) {
        pos_s[r] = r < rows ? pos[t0 + r] : -1;
        m_s[r] = NEG_INF;
        l_s[r] = 0.f;
    }
    __syncthreads();
    if (tid == 0) {  // the keys any row of the tile sees: [lo, hi)
        int lo = 1 << 30, hi = 0;
        for (int r = 0; r < rows; ++r) {
            lo = min(lo, first_key(pos_s[r], window));
            hi = max(hi, pos_s[r] + 1);
        }
        range[0] = lo;
        range[1] = hi;
    }
    __syncthreads();
    const int lo = range[0], hi = range[1];
    const size_t k_stride = (size_t)n_kv * hd, v_stride = (size_t)n_kv * hd_v;
    const int r0 = 16 * warp;   // this warp's first row

    for (int j0 = lo; j0 < hi; j0 += PF_BK) {
        load_kv_tile(Ks, L.ldq, kc + (size_t)kvh * hd, k_stride, hd, j0, hi);
        load_kv_tile(Vs, L.ldv, vc + (size_t)kvh * hd_v, v_stride, hd_v, j0, hi);
        __syncthreads();

        // S[r0.., :] = Q[r0.., :] K^T
        for (int kb = 0; kb < PF_BK / 16; ++kb) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.f);
            for (int d0 = 0; d0 < hd; d0 += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
                wmma::load_matrix_sync(a, Qs + r0 * L.ldq + d0, L.ldq);
                wmma::load_matrix_sync(b, Ks + kb * 16 * L.ldq + d0, L.ldq);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(Ss + r0 * L.lds + kb * 16, acc, L.lds, wmma::mem_row_major);
        }
        __syncwarp();

        // online softmax of this warp's rows; P (fp16) and the rescale factor per row
        for (int r = r0; r < r0 + 16; ++r) {
            const int p = pos_s[r];
            float s[2], e[2];
            float mx = NEG_INF;
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                const int j = j0 + lane + 32 * u;
                const bool vis = p >= 0 && j <= p && j >= first_key(p, window);
                s[u] = vis ? Ss[r * L.lds + lane + 32 * u] * scale : NEG_INF;
                mx = fmaxf(mx, s[u]);
            }
            mx = warp_max(mx);
            const float m_old = m_s[r], m_new = fmaxf(m_old, mx);
            const bool any = m_new != NEG_INF;
            const float alpha = any ? expf(m_old - m_new) : 1.f;
#pragma unroll
            for (int u = 0; u < 2; ++u) {
                e[u] = (any && s[u] != NEG_INF) ? expf(s[u] - m_new) : 0.f;
                Ps[r * L.ldp + lane + 32 * u] = __float2half_rn(e[u]);
            }
            const float sum = warp_sum(e[0] + e[1]);
            if (lane == 0) {
                m_s[r] = m_new;
                l_s[r] = l_s[r] * alpha + sum;
                a_s[r] = alpha;
            }
        }
        __syncwarp();
        for (int i = lane; i < 16 * hd_v; i += 32) {
            const int r = r0 + i / hd_v, d = i % hd_v;
            Os[r * L.ldo + d] *= a_s[r];
        }
        __syncwarp();

        // O[r0.., :] += P[r0.., :] V
        for (int db = 0; db < hd_v; db += 16) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, Os + r0 * L.ldo + db, L.ldo, wmma::mem_row_major);
            for (int kb = 0; kb < PF_BK; kb += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> b;
                wmma::load_matrix_sync(a, Ps + r0 * L.ldp + kb, L.ldp);
                wmma::load_matrix_sync(b, Vs + kb * L.ldv + db, L.ldv);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(Os + r0 * L.ldo + db, acc, L.ldo, wmma::mem_row_major);
        }
        __syncthreads();  // Ks / Vs are rewritten by the next tile
    }

    // normalise (with the sink's share of the denominator) and write this warp's rows
    for (int i = lane; i < 16 * hd_v; i += 32) {
        const int r = r0 + i / hd_v, d = i % hd_v;
        if (pos_s[r] < 0) continue;
        const float m = m_s[r], l = l_s[r];
        float f;
        if (sinks) {
            const float sk = sinks[h], mm = fmaxf(m, sk);
            f = expf(m - mm) / (l * expf(m - mm) + expf(sk - mm));
        } else {
            f = 1.f / l;
        }
        out[((size_t)(t0 + r) * n_head + h) * hd_v + d] = Os[r * L.ldo + d] * f;
    }
}
