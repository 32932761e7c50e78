// Fallback dense GEMM without tensor cores: c[m, n] = a[m, k] @ b[n, k]^T.
// fp16 or bf16 in, fp32 accumulate, same dtype out. 16x16 output tile per
// block, k walked in 16-wide slabs through shared memory. Correct, not fast:
// the fast path is cuBLASLt (orcd.backends.cuda.blas, backend "nvmath").
// No headers: the half conversions are single PTX instructions (the CUDA simulator,
// which has no PTX, brings its own).

#define TILE 16

#ifdef __CUDACC__
__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ unsigned short f32_to_f16(float f) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float bf16_to_f32(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}
__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
    unsigned short h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
#endif

template <bool BF16>
__device__ void gemm_tile(const unsigned short* __restrict__ a, const unsigned short* __restrict__ b,
                          unsigned short* __restrict__ c, int m, int n, int k) {
    __shared__ float as[TILE][TILE + 1];  // as[row in tile][k in slab]; +1 avoids bank conflicts
    __shared__ float bs[TILE][TILE + 1];  // bs[col in tile][k in slab]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.y * TILE + ty;  // index into m
    const int col = blockIdx.x * TILE + tx;  // index into n
    const int brow = blockIdx.x * TILE + ty; // the b row this thread stages
    auto load = [](unsigned short h) { return BF16 ? bf16_to_f32(h) : f16_to_f32(h); };
    float acc = 0.f;
    for (int k0 = 0; k0 < k; k0 += TILE) {
        const int kk = k0 + tx;
        as[ty][tx] = (row < m && kk < k) ? load(a[(size_t)row * k + kk]) : 0.f;
        bs[ty][tx] = (brow < n && kk < k) ? load(b[(size_t)brow * k + kk]) : 0.f;
        __syncthreads();
#pragma unroll
        for (int j = 0; j < TILE; ++j) acc += as[ty][j] * bs[tx][j];
        __syncthreads();
    }
    if (row < m && col < n) c[(size_t)row * n + col] = BF16 ? f32_to_bf16(acc) : f32_to_f16(acc);
}

extern "C" __global__ void gemm_f16_simt(const unsigned short* a, const unsigned short* b,
                                         unsigned short* c, int m, int n, int k) {
    gemm_tile<false>(a, b, c, m, n, k);
}

extern "C" __global__ void gemm_bf16_simt(const unsigned short* a, const unsigned short* b,
                                          unsigned short* c, int m, int n, int k) {
    gemm_tile<true>(a, b, c, m, n, k);
}
