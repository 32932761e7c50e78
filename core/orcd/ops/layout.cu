// Weights into their VRAM layout on the device, while uploading: GGUF rows (as the
// file stores them, copied to a device staging buffer) -> planar rows, the twin of
// QuantFormat.to_vram. Plane k of a row holds bytes [lo_k, lo_k + w_k) of each of its
// nb blocks (after the block's rewrite, if any), in block order, zero-padded to 16
// bytes; planes follow each other. One thread an output byte: the host's numpy
// gather of the same bytes ran at 1.5-3.3 GB/s a thread, the card does a chunk in
// microseconds, so the upload's copy threads only memcpy (bench/RESULTS.md).

#include "pdl.cuh"

#define LAYOUT_PLANES 4

// Byte j of a block as rewritten for VRAM. kscales (DeviceFormat.device_rewrite
// "kscales", kquants.scales_unpacked): Q4_K/Q5_K's 12 bytes of packed 6-bit scales and
// mins at offset 4 become 8 scale bytes then 8 min bytes (ggml's get_scale_min_k4),
// the block 4 bytes longer.
__device__ __forceinline__ unsigned char block_byte(const unsigned char* __restrict__ blk, int j, int kscales) {
    if (!kscales || j < 4) return blk[j];
    if (j >= 20) return blk[j - 4];
    const unsigned char* q = blk + 4;
    const int u = j - 4, k = u & 7;
    if (u < 8)   // a scale
        return k < 4 ? q[k] & 63 : (q[k + 4] & 15) | ((q[k - 4] >> 6) << 4);
    return k < 4 ? q[k + 4] & 63 : (q[k + 4] >> 4) | ((q[k] >> 6) << 4);   // a min
}

extern "C" __global__ void to_planes(const unsigned char* __restrict__ src, unsigned char* __restrict__ dst,
                                     long long rows, int nb, int block_bytes, long long vram_row, int kscales,
                                     int lo0, int w0, int lo1, int w1, int lo2, int w2, int lo3, int w3) {
    orcd_prior_done();
    const int lo[LAYOUT_PLANES] = {lo0, lo1, lo2, lo3}, w[LAYOUT_PLANES] = {w0, w1, w2, w3};
    const long long row_bytes = (long long)nb * block_bytes, n = rows * vram_row;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / vram_row;
        long long c = i - r * vram_row;          // byte c of row r's planes
        unsigned char v = 0;                     // a plane's padding is zeros
#pragma unroll
        for (int k = 0; k < LAYOUT_PLANES; ++k) {
            const long long width = (long long)nb * w[k], padded = (width + 15) / 16 * 16;
            if (c < padded) {
                if (c < width) {
                    const long long b = c / w[k];
                    v = block_byte(src + r * row_bytes + b * block_bytes, lo[k] + (int)(c - b * w[k]), kscales);
                }
                break;
            }
            c -= padded;
        }
        dst[i] = v;
    }
}
