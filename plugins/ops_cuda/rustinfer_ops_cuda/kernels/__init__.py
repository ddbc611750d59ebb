"""Triton kernels (bf16/fp16) for the ops of ``rustinfer.ops``, one module per op family.

Each public function here is an op implementation with the op spec's signature: it checks its
arguments (shapes, dtypes, strides, devices) and launches one or more Triton kernels. Importing a
module compiles nothing; kernels are compiled on first launch for each set of constexpr values.
"""
