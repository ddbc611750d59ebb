"""Hook implementations of rustinfer-ops-cuda. Importing this never initialises CUDA."""

from __future__ import annotations

from rustinfer.hookspecs import hookimpl
from rustinfer.registry import RegisterDevice


@hookimpl
def rustinfer_register_devices(register: RegisterDevice) -> None:
    register("cuda", "rustinfer_ops_cuda.device:CudaDevice")
