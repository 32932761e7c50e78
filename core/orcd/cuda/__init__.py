"""orcd's GPU layer on the cuda-python driver API.

Nothing here imports ``cuda.bindings`` (or cupy, or nvmath) at module import
time: the driver is loaded only when a ``CudaDevice`` is created, so importing
orcd or a plugin never touches CUDA. Modules:

- ``driver``    checked driver and NVRTC calls -> ``CudaError``
- ``device``    discovery, primary context, the worker's stream
- ``memory``    plain ``cuMemAlloc`` allocator with per-purpose accounting
- ``upload``    mmap -> pinned staging -> device, chunked and overlapped
- ``nvrtc``     kernel compilation with an on-disk cubin cache
- ``launch``    validated kernel launches
- ``graph``     stream capture and graph replay
- ``residency`` periodic check that weights stay in device memory
- ``blas``      dense fp16/bf16 GEMM through nvmath-python (cuBLASLt)
"""
