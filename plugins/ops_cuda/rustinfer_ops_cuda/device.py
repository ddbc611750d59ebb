"""The ``cuda`` device type."""

from __future__ import annotations

import contextlib
import logging

import torch

from rustinfer.device import Device

logger = logging.getLogger(__name__)


def accumulate_matmuls_in_float32() -> None:
    """Forbid cuBLAS's reduced-precision split-K reductions for bf16 and fp16 matmuls, process-wide.

    By default torch lets cuBLAS sum split-K partial products in the 16-bit dtype, which leaves 2-4
    output ulps of error in 10-20% of outputs (measured on an H200) where the ``linear`` spec asks
    for float32 accumulation, and makes a row's result depend on how many rows share the matmul
    (cuBLAS picks its split per shape): on SmolLM2 in bf16, chat prompts decoded six at once
    agreed with each decoded alone on 2 of 6. With float32 reductions a row rounds once, as the
    one-row GEMV rounds it. The flags are global to the process; an engine on a GPU owns it.
    """
    matmul = torch.backends.cuda.matmul
    if (
        matmul.allow_bf16_reduced_precision_reduction
        or matmul.allow_fp16_reduced_precision_reduction
    ):
        logger.info("cuBLAS: 16-bit matmuls reduce in float32 (reduced-precision reductions off)")
    matmul.allow_bf16_reduced_precision_reduction = False
    matmul.allow_fp16_reduced_precision_reduction = False


class CudaDevice(Device):
    type = "cuda"

    def __init__(self, index: int | None = None) -> None:
        super().__init__(index)
        accumulate_matmuls_in_float32()

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
