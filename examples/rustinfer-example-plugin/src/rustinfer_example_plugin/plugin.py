"""The hooks rustinfer calls once per process to learn what this plugin supplies.

Importing this module stays cheap: it registers ``"module:attr"`` strings, and rustinfer imports a
target only when a model needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rustinfer.hookspecs import hookimpl

if TYPE_CHECKING:
    from rustinfer.registry import RegisterModel, RegisterOp

# The name RUSTINFER_OP_IMPL pins (rmsnorm=example) and `rustinfer plugins` shows.
RMSNORM_IMPL = "example"
# Above the built-in torch kernels (priority 0), so a model built for cpu float32 gets this one;
# RUSTINFER_OP_IMPL=rmsnorm=torch brings the built-in back.
RMSNORM_PRIORITY = 10
# What a checkpoint's config.json names in "architectures" to be built by this plugin.
ARCHITECTURE = "ExampleSoftcapLlamaForCausalLM"


@hookimpl
def rustinfer_register_ops(register: RegisterOp) -> None:
    register(
        "rmsnorm",  # an op of rustinfer.ops.SPECS: this implementation meets its contract
        RMSNORM_IMPL,
        "rustinfer_example_plugin.norm:rmsnorm",
        device="cpu",
        dtypes=[torch.float32],  # other dtypes keep resolving to the built-in kernels
        priority=RMSNORM_PRIORITY,
    )


@hookimpl
def rustinfer_register_models(register: RegisterModel) -> None:
    register(ARCHITECTURE, "rustinfer_example_plugin.model:SoftcapLlamaForCausalLM")
