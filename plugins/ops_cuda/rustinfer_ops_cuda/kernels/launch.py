"""Where a Triton kernel launches: on its tensors' device, whatever the thread's current one is.

Triton launches on the calling thread's *current* CUDA device and that device's current stream; it
never looks at the devices of the pointers it is handed. A model on ``cuda:1`` driven from a thread
whose current device is still 0 (every new thread starts there) would launch its kernels on GPU 0
with GPU 1's addresses. Torch's own ops set the device from their tensors; the launchers here do
the same by launching inside :func:`launch_on`.
"""

from __future__ import annotations

import contextlib

import torch

_ALREADY_CURRENT = contextlib.nullcontext()


def _current_index() -> int:
    # The raw getter: torch.cuda.current_device() adds a lazy-init check on every launch.
    getter = getattr(torch._C, "_cuda_getDevice", None)
    return getter() if getter is not None else torch.cuda.current_device()


def launch_on(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """The context to launch kernels for tensors on ``device`` in: that device made current (and
    with it its current stream, which is what CUDA-graph capture and ``torch.cuda.stream`` set),
    the previous one restored on exit. When it is current already (the common case: one GPU, or
    a worker pinned to its own) nothing is switched and nothing is entered. The CPU tensors of
    Triton's interpreter need nothing."""
    if device.type != "cuda" or device.index is None or device.index == _current_index():
        return _ALREADY_CURRENT
    return torch.cuda.device(device)
