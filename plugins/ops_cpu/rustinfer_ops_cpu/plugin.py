"""The ``rustinfer`` entry point of rustinfer-ops-cpu: registers every op for device "cpu"."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rustinfer.hookspecs import hookimpl

if TYPE_CHECKING:
    from rustinfer.registry import RegisterDevice, RegisterOp

IMPL_NAME = "torch"
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# op name -> "module:attr" of its implementation (imported lazily by the registry).
TARGETS = {
    "embedding": "rustinfer_ops_cpu.basic:embedding",
    "linear": "rustinfer_ops_cpu.basic:linear",
    "logits": "rustinfer_ops_cpu.basic:logits",
    "prepare_linear_weight": "rustinfer_ops_cpu.basic:prepare_linear_weight",
    "argmax": "rustinfer_ops_cpu.basic:argmax",
    "rmsnorm": "rustinfer_ops_cpu.norm:rmsnorm",
    "fused_add_rmsnorm": "rustinfer_ops_cpu.norm:fused_add_rmsnorm",
    "rope": "rustinfer_ops_cpu.rope:rope",
    "rope_kv_store": "rustinfer_ops_cpu.rope:rope_kv_store",
    "silu_and_mul": "rustinfer_ops_cpu.activation:silu_and_mul",
    "kv_cache_store": "rustinfer_ops_cpu.kv_cache:kv_cache_store",
    "attention_prefill": "rustinfer_ops_cpu.attention:attention_prefill",
    "attention_decode": "rustinfer_ops_cpu.attention:attention_decode",
}
# torch's packed int4 kernel in bf16 (quant.py says why and what it measured): it serves float32
# activations too, rounded to bf16 as the spec allows. The C kernels below lead wherever they could
# be built; these serve machines without a compiler. float16 and float64 have no fast kernel and
# are refused at load with the registry's error.
QUANTIZED_TARGETS = {
    "quantized_linear": "rustinfer_ops_cpu.quant:quantized_linear",
    "prepare_quantized_weight": "rustinfer_ops_cpu.quant:prepare_quantized_weight",
}
QUANTIZED_DTYPES = (torch.float32, torch.bfloat16)
# Our C kernels (quant_native.py), ahead of torch's wherever a C compiler could build them; a
# machine without one resolves to the torch implementations above (the requirement says why).
NATIVE_NAME = "native"
NATIVE_PRIORITY = 10
NATIVE_TARGETS = {
    "quantized_linear": "rustinfer_ops_cpu.quant_native:quantized_linear",
    "prepare_quantized_weight": "rustinfer_ops_cpu.quant_native:prepare_quantized_weight",
    "quantized_logits": "rustinfer_ops_cpu.quant_native:quantized_logits",
}
# The per-layer small ops in C for float32 (layer_native.py), the dtype quantized models run in.
NATIVE_F32_TARGETS = {
    "fused_add_rmsnorm": "rustinfer_ops_cpu.layer_native:fused_add_rmsnorm",
    "silu_and_mul": "rustinfer_ops_cpu.layer_native:silu_and_mul",
    "rope_kv_store": "rustinfer_ops_cpu.layer_native:rope_kv_store",
    "attention_decode": "rustinfer_ops_cpu.layer_native:attention_decode",
    # A whole decode step's layers in one C call (step_native.py).
    "decode_layers": "rustinfer_ops_cpu.step_native:decode_layers",
}
NATIVE_REQUIRES = ("rustinfer_ops_cpu.native:unavailable_reason",)


@hookimpl
def rustinfer_register_ops(register: RegisterOp) -> None:
    for op, target in TARGETS.items():
        register(op, IMPL_NAME, target, device="cpu", dtypes=DTYPES)
    for op, target in QUANTIZED_TARGETS.items():
        register(op, IMPL_NAME, target, device="cpu", dtypes=QUANTIZED_DTYPES)
    for op, target in NATIVE_TARGETS.items():
        register(
            op,
            NATIVE_NAME,
            target,
            device="cpu",
            dtypes=QUANTIZED_DTYPES,
            priority=NATIVE_PRIORITY,
            requires=NATIVE_REQUIRES,
        )
    for op, target in NATIVE_F32_TARGETS.items():
        register(
            op,
            NATIVE_NAME,
            target,
            device="cpu",
            dtypes=(torch.float32,),
            priority=NATIVE_PRIORITY,
            requires=NATIVE_REQUIRES,
        )


@hookimpl
def rustinfer_register_devices(register: RegisterDevice) -> None:
    register("cpu", "rustinfer_ops_cpu.device:CpuDevice")
