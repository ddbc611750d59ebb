"""Hook implementations of rustinfer-ops-cuda. Importing this never initialises CUDA."""

from __future__ import annotations

import importlib.util

import torch

from rustinfer.hookspecs import hookimpl
from rustinfer.registry import BATCH_INVARIANT_IMPL, RegisterDevice, RegisterOp

# Every op in every dtype a model runs in on cuda: the 16-bit ones for speed, float32 as the
# accurate path.
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# bf16 tensor-core dots (tl.dot on bf16) need Ampere (compute capability 8.0) or newer.
MIN_COMPUTE_CAPABILITY = (8, 0)

# op name -> "module:attr" of its torch implementation (cuBLAS, torch's CUDA kernels; no host
# syncs). Matmuls stay on cuBLAS by design.
TORCH_TARGETS = {
    "embedding": "rustinfer_ops_cuda.kernels.torch_ops:embedding",
    "linear": "rustinfer_ops_cuda.kernels.torch_ops:linear",
    "logits": "rustinfer_ops_cuda.kernels.torch_ops:logits",
    "prepare_linear_weight": "rustinfer_ops_cuda.kernels.torch_ops:prepare_linear_weight",
    "argmax": "rustinfer_ops_cuda.kernels.torch_ops:argmax",
}
# op name -> "module:attr" of its Triton implementation (imported lazily by the registry).
TRITON_TARGETS = {
    "rmsnorm": "rustinfer_ops_cuda.kernels.norm:rmsnorm",
    "fused_add_rmsnorm": "rustinfer_ops_cuda.kernels.norm:fused_add_rmsnorm",
    "silu_and_mul": "rustinfer_ops_cuda.kernels.activation:silu_and_mul",
    "rope_kv_store": "rustinfer_ops_cuda.kernels.rope_store:rope_kv_store",
    "attention_decode": "rustinfer_ops_cuda.kernels.decode_attention:attention_decode",
    "attention_prefill": "rustinfer_ops_cuda.kernels.prefill_attention:attention_prefill",
}
# Ops with a Triton implementation beside the torch one, in the 16-bit dtypes only, chosen over it
# (higher priority); ``RUSTINFER_OP_IMPL=linear=torch`` pins cuBLAS back.
TRITON_PREFERRED = {
    # The register-tile GEMV for decode's few rows (cuBLAS for the rest): it loads its weights
    # while the kernel ahead still runs (kernels/gemv.py).
    "linear": "rustinfer_ops_cuda.kernels.gemv:linear",
    "logits": "rustinfer_ops_cuda.kernels.gemv:logits",
}
TRITON_PREFERRED_PRIORITY = 10
# Forms of the batch-dependent ops whose results do not depend on the batch, picked only by
# ``--batch-invariant`` (kernels/batch_invariant.py): below every default, never chosen otherwise.
BATCH_INVARIANT = {
    "linear": "rustinfer_ops_cuda.kernels.batch_invariant:linear",
    "logits": "rustinfer_ops_cuda.kernels.batch_invariant:logits",
    "attention_decode": "rustinfer_ops_cuda.kernels.batch_invariant:attention_decode",
    "attention_prefill": "rustinfer_ops_cuda.kernels.batch_invariant:attention_prefill",
}
BATCH_INVARIANT_PRIORITY = -10
# Quantized matmul weights (rustinfer.ops.quant): Triton kernels that dequantize inside the
# matmul, in every cuda dtype (float32 activations included: the GEMV is float32 throughout and the
# tiles run tf32x3). Registering them is what makes ``--quantization auto`` keep a GGUF file's
# quantized tensors as shipped on cuda (``rustinfer.runtime.loading`` asks the registry).
QUANTIZED_TARGETS = {
    "quantized_linear": "rustinfer_ops_cuda.kernels.quant_linear:quantized_linear",
    "prepare_quantized_weight": "rustinfer_ops_cuda.kernels.quant_linear:prepare_quantized_weight",
}


def cuda_available() -> str | None:
    """Requirement: a usable CUDA device (None), else the reason."""
    return None if torch.cuda.is_available() else "no CUDA device is visible to torch"


def triton_importable() -> str | None:
    """Requirement: the triton package is installed (CUDA builds of torch bring it)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def compute_capability_supported() -> str | None:
    """Requirement: the current CUDA device is Ampere or newer."""
    reason = cuda_available()
    if reason:
        return reason
    cap = torch.cuda.get_device_capability()
    if cap < MIN_COMPUTE_CAPABILITY:
        want = ".".join(map(str, MIN_COMPUTE_CAPABILITY))
        return f"compute capability {cap[0]}.{cap[1]} is below {want} (bf16 tensor cores)"
    return None


@hookimpl
def rustinfer_register_devices(register: RegisterDevice) -> None:
    register("cuda", "rustinfer_ops_cuda.device:CudaDevice")


@hookimpl
def rustinfer_register_ops(register: RegisterOp) -> None:
    # One implementation per op but those of TRITON_PREFERRED: the ops of rustinfer.ops that no model calls
    # on cuda (``rope``, ``kv_cache_store``: Llama runs ``rope_kv_store``) are not registered.
    for op, target in TORCH_TARGETS.items():
        register(op, "torch", target, device="cuda", dtypes=DTYPES, requires=[cuda_available])
    triton_requires = [triton_importable, compute_capability_supported]
    for op, target in {**TRITON_TARGETS, **QUANTIZED_TARGETS}.items():
        register(op, "triton", target, device="cuda", dtypes=DTYPES, requires=triton_requires)
    for op, target in TRITON_PREFERRED.items():
        register(
            op,
            "triton",
            target,
            device="cuda",
            dtypes=(torch.bfloat16, torch.float16),
            priority=TRITON_PREFERRED_PRIORITY,
            requires=triton_requires,
        )
    for op, target in BATCH_INVARIANT.items():
        register(
            op,
            BATCH_INVARIANT_IMPL,
            target,
            device="cuda",
            dtypes=DTYPES,
            priority=BATCH_INVARIANT_PRIORITY,
            requires=triton_requires,
        )
