"""The ``cuda`` device type."""

from __future__ import annotations

import contextlib

import torch

from rustinfer.device import Device


class CudaDevice(Device):
    type = "cuda"

    @classmethod
    def is_available(cls) -> bool:
        return torch.cuda.is_available()

    def name(self) -> str:
        return torch.cuda.get_device_name(self.torch_device)

    def memory_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info(self.torch_device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch_device)

    def make_current(self) -> None:
        torch.cuda.set_device(self.torch_device)

    def as_current(self) -> contextlib.AbstractContextManager[object]:
        return torch.cuda.device(self.torch_device)

    def auto_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        # GPUs run half precision natively; float32 checkpoints and quantized files run in bf16.
        if checkpoint_dtype in (torch.float16, torch.bfloat16):
            return checkpoint_dtype
        return torch.bfloat16
