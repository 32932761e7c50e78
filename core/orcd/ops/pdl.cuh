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
// kernel's tail. tests/backend/test_pdl.py checks the promise's textual half.
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
