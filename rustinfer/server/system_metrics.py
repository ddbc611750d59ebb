"""Host and GPU readings for ``GET /v1/metrics``, sampled in the background.

A request reads the latest sample instead of measuring: ``psutil.cpu_percent`` needs an interval
between two readings to mean anything, and NVML calls take milliseconds each, neither of which a
request handler on the event loop should pay.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import psutil

__all__ = ["SystemSampler"]

logger = logging.getLogger(__name__)

_MB = 1024 * 1024


class _Nvml:
    """The one GPU the engine uses, through nvidia-ml-py; absent (None readings) without one."""

    def __init__(self, device_index: int) -> None:
        self.device_index = device_index
        self._handle: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self._nvml = pynvml
        except Exception as exc:  # no driver, no package, no such GPU: report no GPU
            logger.info("GPU metrics unavailable: %s", exc)
            self._handle = None

    def read(self) -> dict[str, Any] | None:
        if self._handle is None:
            return None
        nv = self._nvml
        try:
            util = nv.nvmlDeviceGetUtilizationRates(self._handle)
            mem = nv.nvmlDeviceGetMemoryInfo(self._handle)
            temp = nv.nvmlDeviceGetTemperature(self._handle, nv.NVML_TEMPERATURE_GPU)
        except Exception as exc:
            logger.warning("GPU metrics read failed: %s", exc)
            return None
        return {
            "device_id": self.device_index,
            "utilization_percent": float(util.gpu),
            "memory_used_mb": round(mem.used / _MB, 1),
            "memory_total_mb": round(mem.total / _MB, 1),
            "temperature_celsius": float(temp),
        }

    def close(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()


class SystemSampler:
    """Samples CPU, memory and (for a CUDA device) GPU readings every ``interval_s`` seconds."""

    def __init__(self, gpu_index: int | None = None, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._gpu_index = gpu_index
        self._latest: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        psutil.cpu_percent(interval=None)  # the first call only starts the measurement
        self._sample(None)

    def set_gpu(self, index: int) -> None:
        """Report this GPU from the next sample on (the device is known once the model loads)."""
        self._gpu_index = index

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="rustinfer-system-metrics", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def latest(self) -> dict[str, Any]:
        """The newest sample in the original's ``/v1/metrics`` shape."""
        return self._latest

    def _run(self) -> None:
        nvml: _Nvml | None = None
        try:
            while not self._stop.wait(self.interval_s):
                if nvml is None and self._gpu_index is not None:
                    nvml = _Nvml(self._gpu_index)
                try:
                    self._sample(nvml)
                except Exception:  # a bad reading must not end the sampling for good
                    logger.exception("system metrics sample failed")
        finally:
            if nvml is not None:
                nvml.close()

    def _sample(self, nvml: _Nvml | None) -> None:
        mem = psutil.virtual_memory()
        # Replaced wholesale, so a reader on another thread never sees a half-written sample.
        self._latest = {
            "cpu": {
                "utilization_percent": psutil.cpu_percent(interval=None),
                "core_count": psutil.cpu_count(logical=True) or 0,
            },
            "memory": {
                "used_mb": round((mem.total - mem.available) / _MB, 1),
                "total_mb": round(mem.total / _MB, 1),
                "available_mb": round(mem.available / _MB, 1),
            },
            "gpu": nvml.read() if nvml is not None else None,
            "timestamp": time.time(),
        }
