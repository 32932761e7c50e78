// Activation math the kernel files share (one definition, so the fused GEMVs and the
// standalone op round alike: the same expf, the same division).
#pragma once

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }
