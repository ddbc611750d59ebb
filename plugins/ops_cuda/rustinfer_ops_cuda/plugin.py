"""Hook implementations of rustinfer-ops-cuda. Importing this never initialises CUDA."""

from __future__ import annotations

import torch

from rustinfer.hookspecs import hookimpl
from rustinfer.registry import RegisterDevice, RegisterOp

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def cuda_available() -> str | None:
    """Requirement: a usable CUDA device (None), else the reason."""
    return None if torch.cuda.is_available() else "no CUDA device is visible to torch"


@hookimpl
def rustinfer_register_devices(register: RegisterDevice) -> None:
    register("cuda", "rustinfer_ops_cuda.device:CudaDevice")


@hookimpl
def rustinfer_register_ops(register: RegisterOp) -> None:
    # The plain-torch kernels of rustinfer-ops-cpu are device-generic (cuBLAS matmuls, SDPA), so
    # they serve cuda too, registered here explicitly at priority 0: every op then has a cuda
    # implementation, and the Triton kernels of this package take over by registering at a higher
    # priority, op by op. Matmuls (linear) stay on cuBLAS by design.
    from rustinfer_ops_cpu.plugin import TARGETS

    for op, target in TARGETS.items():
        register(op, "torch", target, device="cuda", dtypes=DTYPES, requires=[cuda_available])
