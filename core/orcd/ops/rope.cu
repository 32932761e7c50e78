// Rotary position embedding by table: cos/sin of every rotated pair at every
// position up to the context are computed once on the host (rope_cos_sin,
// YaRN and frequency factors included) and uploaded; the kernel reads each
// row's position from device memory, so a decode step replays as a graph.

#include "pdl.cuh"

// x, out: [T, n_head * hd]; pos: [T]; cos_t, sin_t: [n_pos, n_rot / 2].
// grid (n_head, T), block: any (threads stride over hd).
extern "C" __global__ void rope_f32(const float* __restrict__ x, float* __restrict__ out,
                                   const int* __restrict__ pos, const float* __restrict__ cos_t,
                                   const float* __restrict__ sin_t, int n_head, int hd, int n_rot,
                                   int neox, int n_pos) {
    orcd_prior_done();
    const int t = blockIdx.y;
    const size_t base = ((size_t)t * n_head + blockIdx.x) * hd;
    const float* xr = x + base;
    float* yr = out + base;
    int p = pos[t];
    p = p < 0 ? 0 : (p >= n_pos ? n_pos - 1 : p);  // the host checks positions; never read outside
    const int half = n_rot / 2;
    const float* c = cos_t + (size_t)p * half;
    const float* s = sin_t + (size_t)p * half;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float y;
        if (i >= n_rot) {
            y = xr[i];
        } else if (neox) {  // pairs (j, j + half)
            const int j = i < half ? i : i - half;
            const float a = xr[j], b = xr[j + half];
            y = i < half ? a * c[j] - b * s[j] : a * s[j] + b * c[j];
        } else {            // pairs (2j, 2j + 1)
            const int j = i >> 1;
            const float a = xr[2 * j], b = xr[2 * j + 1];
            y = (i & 1) ? a * s[j] + b * c[j] : a * c[j] - b * s[j];
        }
        yr[i] = y;
    }
}
