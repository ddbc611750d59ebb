"""rustinfer's CUDA plugin: the ``cuda`` device type and (soon) Triton bf16/fp16 kernels."""
