// Programmatic dependent launch (sm_90 and later).
//
// A source that includes this header promises that every kernel in it calls
// orcd_grid_wait() (or orcd_prior_done()) before it reads anything an earlier
// kernel wrote and before it writes anything at all; KernelSource then marks the
// source `pdl` and the launcher lets its kernels start while the kernel before
// them in the stream is still running (CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_
// SERIALIZATION, kept by graph capture). What may come before the wait: reading
// the weights and other inputs no kernel of the step writes, and index math.
// In a decode step of ~200 small kernels this hides each launch's ramp-up (and,
// where a kernel loads its weights first, their latency) behind the previous
// kernel's tail. tests/backend/test_pdl.py checks the promise's textual half:
// before the wait a kernel body may only call orcd_prefetch_rows (and compute its
// block's segment, BLOCK_SEGMENT in fused.cu).
#pragma once

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Waits until every earlier grid of the stream has completed and its writes are visible.
__device__ __forceinline__ void orcd_grid_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
// Lets the next kernel's blocks be scheduled now (they still wait in orcd_grid_wait).
__device__ __forceinline__ void orcd_launch_next() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
#else
// Earlier architectures and the CPU simulator: launches are fully serialized anyway.
__device__ __forceinline__ void orcd_grid_wait() {}
__device__ __forceinline__ void orcd_launch_next() {}
#endif

// The usual prologue: wait for the previous kernel, then let the next one come.
// (Triggering after the wait keeps at most one kernel's blocks parked ahead.)
__device__ __forceinline__ void orcd_prior_done() { orcd_grid_wait(); orcd_launch_next(); }

// Rows [r0, r0 + n) (clipped to n_rows) of a weight of `row_bytes`-byte rows, fetched
// into L2 by the block's threads, one 128-byte line each: a hint that cannot fault
// (every line holds bytes of the range) and returns nothing. Called before
// orcd_grid_wait(), the weights stream in while the previous kernel finishes.
// Only rows of at most ORCD_PREFETCH_ROW_BYTES: on an H100 (bench_gemv.py --int8, one run)
// the prefetch made short-row GEMVs faster (Qwen's vocabulary, 952-byte rows, 8%; its
// 896-wide Q5_0, 5%) and long-row ones slower (Q4_0 16384 x 4096 22%, Q6_K 3072 x 8192
// 27%, Q4_K 9216 x 3072 11%). A bench variant may set it (0: no prefetch at all).
#ifndef ORCD_PREFETCH_ROW_BYTES
#define ORCD_PREFETCH_ROW_BYTES 1024
#endif
__device__ __forceinline__ void orcd_prefetch_rows(const void* w, long long row_bytes, long long r0,
                                                   long long n, long long n_rows) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const long long r1 = r0 + n < n_rows ? r0 + n : n_rows;
    if (r0 >= r1 || row_bytes > ORCD_PREFETCH_ROW_BYTES) return;
    const unsigned long long lo = (unsigned long long)w + r0 * row_bytes, hi = (unsigned long long)w + r1 * row_bytes;
    const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int nt = blockDim.x * blockDim.y * blockDim.z;
    for (unsigned long long a = (lo & ~127ull) + 128ull * tid; a < hi; a += 128ull * nt)
        asm volatile("prefetch.global.L2 [%0];" :: "l"(a));
#endif
}
