// attention.cu's prefill on the tensor cores (included at its end: it uses the
// paged-cache lookups, key windows and fp16 loads defined there).
#pragma once

// -- prefill on the tensor cores -----------------------------------------------------
// attn_prefill_tc_v<HDV>: one block of 4 warps per (tile of PF_BQ = 64 query rows,
// head); warp w owns rows 16w..16w+15 and walks the keys they may see in tiles of
// PF_BK = 64 held in shared memory, flash-attention style: S = Q K^T and
// O += P V with mma.sync m16n8k16 (fp16 operands, fp32 accumulation), the online
// softmax in fp32 in registers between them. Each K/V tile is read once per 64
// rows instead of once per row (attn_fwd). Q is rounded to fp16, and P (as
// llama.cpp's flash attention does); scores, statistics and O stay fp32.
// Register layouts are PTX's for mma.m16n8k16 (g = lane / 4, c = lane % 4):
//   A (16x16): {(g, 2c..2c+1), (g+8, 2c..), (g, 8+2c..), (g+8, 8+2c..)}
//   B (16x8):  {(k 2c..2c+1, n g), (k 8+2c.., n g)}      C (16x8): (g, 2c..), (g+8, 2c..)
// so the S accumulators of two adjacent 8-key tiles are exactly P's A fragment.
// Positions are read per row from device memory, so any causal chunk works.
#define PF_BQ 64
#define PF_BK 64
#define PF_THREADS 128

__device__ __forceinline__ u32 half2_bits(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const u32*>(&h);
}
__device__ __forceinline__ u32 ld_pair(const __half* p) { return *reinterpret_cast<const u32*>(p); }
__device__ __forceinline__ u32 two_halves(const __half* lo, const __half* hi) {
    return (u32)__half_as_ushort(*lo) | ((u32)__half_as_ushort(*hi) << 16);
}

// Copy the first `valid` of PF_BK consecutive cache rows from `src` (one KV head's
// columns of a block's first row; row stride `stride` halves, width w, a multiple of
// 8) into shared memory (ld halves); the rows after them are zero.
__device__ __forceinline__ void load_kv_tile(__half* dst, int ld, const __half* __restrict__ src,
                                             size_t stride, int w, int valid) {
    const int per_row = w / 8;
    for (int i = threadIdx.x; i < PF_BK * per_row; i += PF_THREADS) {
        const int r = i / per_row, c = (i % per_row) * 8;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (r < valid) val = *reinterpret_cast<const uint4*>(src + (size_t)r * stride + c);
        *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
    }
}

// Dynamic shared memory: Q and K tiles [64][hd + 8], V tile [64][HDV + 8] (halves).
template <int HDV>
__device__ __forceinline__ void prefill_tc(const float* __restrict__ q, const __half* __restrict__ kc,
                                           const __half* __restrict__ vc, const int* __restrict__ pos,
                                           const int* __restrict__ tables, int max_blocks,
                                           const int* __restrict__ seq,
                                           const float* __restrict__ sinks, float* __restrict__ out,
                                           int T, int n_head, int n_kv, int hd, float scale, int window) {
    extern __shared__ __align__(16) unsigned char pf_smem[];
    __shared__ int pos_s[PF_BQ];
    __shared__ int range[2];
    const int ldq = hd + 8, ldv = HDV + 8;
    __half* Qs = (__half*)pf_smem;
    __half* Ks = Qs + PF_BQ * ldq;
    __half* Vs = Ks + PF_BK * ldq;

    const int t0 = blockIdx.x * PF_BQ, h = blockIdx.y, tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, c = lane & 3;
    const int kvh = h / (n_head / n_kv);
    const int rows = min(PF_BQ, T - t0);
    for (int i = tid; i < PF_BQ * hd; i += PF_THREADS) {
        const int r = i / hd, d = i % hd;
        Qs[r * ldq + d] = __float2half_rn(r < rows ? q[((size_t)(t0 + r) * n_head + h) * hd + d] : 0.f);
    }
    for (int r = tid; r < PF_BQ; r += PF_THREADS) pos_s[r] = r < rows ? pos[t0 + r] : -1;
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
    const int ra = 16 * warp + g, rb = ra + 8;          // this thread's two rows
    const int pa = pos_s[ra], pb = pos_s[rb];
    float o[HDV / 8][4];
#pragma unroll
    for (int n = 0; n < HDV / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float ma = NEG_INF, mb = NEG_INF, la = 0.f, lb = 0.f;

    const int sq = seq[0];
    for (int j0 = lo / PF_BK * PF_BK; j0 < hi; j0 += PF_BK) {   // tiles = cache blocks
        const size_t row0 = kv_row(tables, max_blocks, sq, j0);
        load_kv_tile(Ks, ldq, kc + (row0 * n_kv + kvh) * hd, (size_t)n_kv * hd, hd, hi - j0);
        load_kv_tile(Vs, ldv, vc + (row0 * n_kv + kvh) * HDV, (size_t)n_kv * HDV, HDV, hi - j0);
        __syncthreads();

        float s[PF_BK / 8][4];
#pragma unroll
        for (int n = 0; n < PF_BK / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
        for (int d0 = 0; d0 < hd; d0 += 16) {
            const u32 a[4] = {ld_pair(Qs + ra * ldq + d0 + 2 * c), ld_pair(Qs + rb * ldq + d0 + 2 * c),
                              ld_pair(Qs + ra * ldq + d0 + 8 + 2 * c), ld_pair(Qs + rb * ldq + d0 + 8 + 2 * c)};
#pragma unroll
            for (int n = 0; n < PF_BK / 8; ++n) {
                const __half* kr = Ks + (n * 8 + g) * ldq + d0 + 2 * c;
                const u32 b[2] = {ld_pair(kr), ld_pair(kr + 8)};
                mma_f16_16816(s[n], a, b);
            }
        }
        // mask and scale; the rows' maxima over the 4 threads that share them
        float mxa = NEG_INF, mxb = NEG_INF;
#pragma unroll
        for (int n = 0; n < PF_BK / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = j0 + n * 8 + 2 * c + (e & 1), p = e < 2 ? pa : pb;
                const bool vis = p >= 0 && key <= p && key >= first_key(p, window);
                s[n][e] = vis ? s[n][e] * scale : NEG_INF;
                if (e < 2) mxa = fmaxf(mxa, s[n][e]); else mxb = fmaxf(mxb, s[n][e]);
            }
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            mxa = fmaxf(mxa, __shfl_xor_sync(0xFFFFFFFFu, mxa, off));
            mxb = fmaxf(mxb, __shfl_xor_sync(0xFFFFFFFFu, mxb, off));
        }
        const float na = fmaxf(ma, mxa), nb = fmaxf(mb, mxb);
        const float alpha_a = na == NEG_INF ? 1.f : expf(ma - na);
        const float alpha_b = nb == NEG_INF ? 1.f : expf(mb - nb);
        float suma = 0.f, sumb = 0.f;
#pragma unroll
        for (int n = 0; n < PF_BK / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float m = e < 2 ? na : nb;
                s[n][e] = s[n][e] == NEG_INF ? 0.f : expf(s[n][e] - m);
                if (e < 2) suma += s[n][e]; else sumb += s[n][e];
            }
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            suma += __shfl_xor_sync(0xFFFFFFFFu, suma, off);
            sumb += __shfl_xor_sync(0xFFFFFFFFu, sumb, off);
        }
        la = la * alpha_a + suma;
        lb = lb * alpha_b + sumb;
        ma = na;
        mb = nb;
#pragma unroll
        for (int n = 0; n < HDV / 8; ++n) {
            o[n][0] *= alpha_a; o[n][1] *= alpha_a;
            o[n][2] *= alpha_b; o[n][3] *= alpha_b;
        }
        // O += P V: P's A fragment for keys 16kt.. is the S accumulators of tiles 2kt, 2kt+1
#pragma unroll
        for (int kt = 0; kt < PF_BK / 16; ++kt) {
            const u32 a[4] = {half2_bits(s[2 * kt][0], s[2 * kt][1]), half2_bits(s[2 * kt][2], s[2 * kt][3]),
                              half2_bits(s[2 * kt + 1][0], s[2 * kt + 1][1]),
                              half2_bits(s[2 * kt + 1][2], s[2 * kt + 1][3])};
            const __half* v0 = Vs + (16 * kt + 2 * c) * ldv + g;
#pragma unroll
            for (int n = 0; n < HDV / 8; ++n) {
                const __half* vn = v0 + 8 * n;
                const u32 b[2] = {two_halves(vn, vn + ldv), two_halves(vn + 8 * ldv, vn + 9 * ldv)};
                mma_f16_16816(o[n], a, b);
            }
        }
        __syncthreads();  // Ks / Vs are rewritten by the next tile
    }

    // normalise (with the sink's share of the denominator) and write the two rows
    const float sk = sinks ? sinks[h] : 0.f;
#pragma unroll
    for (int half_row = 0; half_row < 2; ++half_row) {
        const int r = half_row ? rb : ra, p = half_row ? pb : pa;
        if (p < 0) continue;
        const float m = half_row ? mb : ma, l = half_row ? lb : la;
        float f = 1.f / l;
        if (sinks) {
            const float mm = fmaxf(m, sk);
            f = expf(m - mm) / (l * expf(m - mm) + expf(sk - mm));
        }
        float* y = out + ((size_t)(t0 + r) * n_head + h) * HDV;
#pragma unroll
        for (int n = 0; n < HDV / 8; ++n) {
            y[8 * n + 2 * c] = o[n][2 * half_row] * f;
            y[8 * n + 2 * c + 1] = o[n][2 * half_row + 1] * f;
        }
    }
}

// q: [T, n_head * hd] fp32; caches as attn_fwd; out: [T, n_head * HDV]. hd a
// multiple of 16. grid (ceil(T / 64), n_head), block PF_THREADS, dynamic shared
// 2 * (128 * (hd + 8) + 64 * (HDV + 8)) bytes.
#define PREFILL_TC(HDV)                                                                                  \
    extern "C" __global__ void __launch_bounds__(PF_THREADS) attn_prefill_tc_v##HDV(                      \
        const float* __restrict__ q, const __half* __restrict__ kc, const __half* __restrict__ vc,       \
        const int* __restrict__ pos, const int* __restrict__ tables, int max_blocks,                     \
        const int* __restrict__ seq, const float* __restrict__ sinks, float* __restrict__ out, int T,    \
        int n_head, int n_kv, int hd, float scale, int window) { orcd_prior_done();                      \
        prefill_tc<HDV>(q, kc, vc, pos, tables, max_blocks, seq, sinks, out, T, n_head, n_kv, hd, scale, \
                        window);                                                                         \
    }
PREFILL_TC(64)
PREFILL_TC(96)
PREFILL_TC(128)
