"""rustinfer's CUDA plugin: the ``cuda`` device type and its ops (Triton kernels, cuBLAS through torch)
in bf16, fp16 and fp32. It stands alone: nothing here imports another kernel plugin."""
