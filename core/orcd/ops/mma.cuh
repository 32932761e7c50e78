// The warp-level tensor-core instructions the kernels use, each with the CUDA
// simulator's stand-in (sim.h) where there is no PTX: fp16 m16n8k16 with fp32
// accumulators (prefill attention, the grouped expert GEMM) and int8 m16n8k32 /
// m16n8k16 with int32 accumulators (gemv_mma.cuh). Fragments as PTX's mma.sync lays
// them out: a 4 (k16: 2) registers of A, b 2 (k16: 1) of B, c 4 accumulators.
#pragma once

typedef unsigned int u32;

__device__ __forceinline__ void mma_f16_16816(float* c, const u32* a, const u32* b) {
#ifdef __CUDACC__
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    orcd_sim::mma_m16n8k16(c, a, b);   // the CUDA simulator's stand-in (no PTX on the host)
#endif
}

__device__ __forceinline__ void mma_s8_k32(int* c, const u32* a, const u32* b) {
#ifdef __CUDACC__
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    orcd_sim::mma_s8<32>(c, a, b);   // the CUDA simulator's stand-in
#endif
}

__device__ __forceinline__ void mma_s8_k16(int* c, const u32* a, const u32* b) {
#ifdef __CUDACC__
    asm volatile("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 "
                 "{%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b[0]));
#else
    orcd_sim::mma_s8<16>(c, a, b);
#endif
}
