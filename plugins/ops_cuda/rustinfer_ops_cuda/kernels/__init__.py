"""The op implementations of rustinfer-ops-cuda, one module per op family.

Triton kernels (bf16 / fp16 / fp32) for the ops whose speed depends on fusing or on the paged
cache: norms, activation, rope with the KV store, attention. Each public function in those modules
has the op spec's signature: it checks its arguments (shapes, dtypes, strides, devices) and
launches one or more Triton kernels on its tensors' device (``launch.py``). Importing a module
compiles nothing; kernels are compiled on first launch for each set of constexpr values.

``torch_ops.py``: the ops torch's CUDA kernels already serve well (cuBLAS matmuls, the embedding
gather, argmax), without host syncs.
"""
