// Device dequantizer for MXFP4 (GGML type 39); layout as in mxfp4.py, format
// struct shaped as described in simple.cuh.
//
// [e uint8][qs 16], 17 bytes, so rows are only byte aligned: a piece is the
// scale byte and 4 qs bytes read a byte at a time (values 4p..4p+3 from the
// low nibbles, 16+4p.. from the high). x = kvalue[q] * 2^(e - 128) with the
// E2M1 values doubled (0 1 2 3 4 6 8 12) and bit 3 of the nibble the sign.
#pragma once
#include "simple.cuh"

// GGML_E8M0_TO_FP32_HALF: e < 2 gives the float32 subnormals 2^-128, 2^-127.
__device__ __forceinline__ float e8m0_half(u32 e) {
    return __uint_as_float(e < 2 ? (0x00200000u << e) : ((e - 1) << 23));
}

// Doubled E2M1 magnitudes of codes 0..7 packed a nibble each: no table lookup in memory.
__device__ __forceinline__ float e2m1_doubled(u32 nibble) {
    const float mag = (float)((0xC8643210u >> (4 * (nibble & 7))) & 0xF);
    return (nibble & 8) ? -mag : mag;
}

struct FmtMXFP4 {
    static constexpr int QK = 32, BYTES = 17, PIECES = 4, RUNS = 2, RUN = 4, STRIDE = 16;
    __device__ static int base(int p) { return 4 * p; }
    __device__ static void load(const u8* b, int p, float* v) {
        const float d = e8m0_half(__ldg(b));
        const u32 qs = ld32_a1(b + 1 + 4 * p);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[i] = e2m1_doubled(byte_of(qs, i) & 0xF) * d;
            v[4 + i] = e2m1_doubled(byte_of(qs, i) >> 4) * d;
        }
    }
};
