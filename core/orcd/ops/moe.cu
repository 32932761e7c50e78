// Mixture-of-experts routing and the weighted sum of the chosen experts.
// Top-k by repeated selection with a strict '>' scan in expert order, so
// ties go to the lower expert id, as route_ref's stable sort; softmax over
// the k chosen logits. One thread per token: n_expert is small (32 for GPT-OSS).

// logits: [T, n_expert] -> ids: [T, k] int32, weights: [T, k]. grid ceil(T / 128), block 128.
extern "C" __global__ void moe_route(const float* __restrict__ logits, int* __restrict__ ids,
                                    float* __restrict__ weights, int T, int n_expert, int k) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float* lr = logits + (size_t)t * n_expert;
    int* ir = ids + (size_t)t * k;
    float* wr = weights + (size_t)t * k;
    for (int r = 0; r < k; ++r) {
        int best = -1;
        float bv = 0.f;
        for (int e = 0; e < n_expert; ++e) {
            bool taken = false;
            for (int q = 0; q < r; ++q) taken |= ir[q] == e;
            if (!taken && (best < 0 || lr[e] > bv)) { best = e; bv = lr[e]; }
        }
        ir[r] = best;
        wr[r] = bv;
    }
    const float mx = wr[0];  // the first choice is the largest
    float sum = 0.f;
    for (int r = 0; r < k; ++r) { wr[r] = expf(wr[r] - mx); sum += wr[r]; }
    for (int r = 0; r < k; ++r) wr[r] /= sum;
}

// y: [T, k, D] (each chosen expert's output, biases included), weights: [T, k] -> out: [T, D],
// summed in choice order. grid-stride over T * D.
extern "C" __global__ void moe_weighted_sum(const float* __restrict__ y, const float* __restrict__ weights,
                                           float* __restrict__ out, int T, int k, int D) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < (long)T * D;
         i += (long)gridDim.x * blockDim.x) {
        const long t = i / D, d = i - t * D;
        float s = 0.f;
        for (int r = 0; r < k; ++r) s += weights[t * k + r] * y[(t * k + r) * D + d];
        out[i] = s;
    }
}
