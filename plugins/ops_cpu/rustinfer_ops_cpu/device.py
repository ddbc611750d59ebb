"""The ``cpu`` device type."""

from __future__ import annotations

import os
import platform

import torch

from rustinfer.device import Device


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class CpuDevice(Device):
    type = "cpu"

    def __init__(self, index: int | None = None) -> None:
        super().__init__(None)  # torch has one CPU device

    @classmethod
    def is_available(cls) -> bool:
        return True

    def name(self) -> str:
        return f"{_cpu_model()} ({torch.get_num_threads()} threads)"

    def memory_info(self) -> tuple[int, int]:
        try:
            pages = os.sysconf("SC_AVPHYS_PAGES")
            total = os.sysconf("SC_PHYS_PAGES")
            size = os.sysconf("SC_PAGE_SIZE")
            return pages * size, total * size
        except (ValueError, OSError):
            return 0, 0

    def auto_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        # float16 matmuls are slow on most CPUs; quantized or half checkpoints run in float32 here.
        if checkpoint_dtype in (torch.bfloat16, torch.float32, torch.float64):
            return checkpoint_dtype
        return torch.float32
