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

#include "sample_keys.cuh"      // keys in the kept order, the draw counter, block sums and scans
#include "sample_filters.cuh"   // top-k, top-p and min-p cuts; the weights and the draw

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
