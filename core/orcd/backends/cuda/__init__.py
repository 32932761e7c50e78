"""orcd's GPU side on the cuda-python driver API: the driver layer and the CUDA backend.

Nothing here imports ``cuda.bindings`` (or cupy, or nvmath) at module import
time: the driver is loaded only when a ``CudaDevice`` is created, so importing
orcd or a plugin never touches CUDA. This file imports nothing. Modules:

- ``driver``    checked driver and NVRTC calls -> ``CudaError``
- ``device``    discovery, primary context, the worker's stream
- ``memory``    plain ``cuMemAlloc`` allocator with per-purpose accounting
- ``upload``    mmap -> pinned staging -> device, chunked and overlapped
- ``nvrtc``     kernel compilation with an on-disk cubin cache (``aot``: cubins shipped)
- ``launch``    validated kernel launches
- ``graph``     stream capture and graph replay
- ``residency`` periodic check that weights stay in device memory
- ``blas``      dense fp16/bf16 GEMM through cuBLASLt (``cublaslt``) or nvmath-python
- ``tensor``    DeviceTensor, QWeight, bump arenas

and the backend on top of them (the driver modules never import these):

- ``backend``   CudaBackend: weights, KV caches, the decode graph, the runner
- ``ops``       CudaOps: the op contract on DeviceTensors, the scratch arenas
- ``steps``     pinned step inputs, the device samplers
- ``sampler``   which sampler takes a draw (CudaBackend's sampling methods)
- ``batch``     decode batches over the KV pool, a graph per rows bucket
- ``prefill``   a prompt's chunks as graphs
"""
