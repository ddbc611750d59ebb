"""Programmatic dependent launch (Hopper and later): a kernel launched as a dependent of the one
before it on the stream starts while that one still runs, and waits inside (``gdc_wait``) until
the earlier kernel's memory writes are visible. What it saves is the launch latency between two
short kernels: an empty Triton kernel costs 1.0 us per launch in a CUDA graph on an H100
(bench/kernels.py measures it with the card's ceilings).

A kernel taking part gets one or both of two constexprs: ``WAIT_PRIOR`` (it was launched as a
dependent, so it waits before reading anything) and ``TRIGGER`` (it lets its own dependent launch
early). Both
instructions are harmless when the launch was not a dependent one, but only exist from sm_90 on
and not at all in Triton's interpreter, hence the flags.
"""

from __future__ import annotations

import functools

import torch

from rustinfer_ops_cuda.kernels.checks import interpreting

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without grid dependency control: never launch dependents
    gdc_launch_dependents = gdc_wait = None

# Compute capability from which griddepcontrol exists.
MIN_CAPABILITY = (9, 0)


def dependent_launch_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` can be launched as programmatic dependents."""
    if device.type != "cuda" or interpreting() or gdc_wait is None:
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capability(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= MIN_CAPABILITY


__all__ = ["dependent_launch_supported", "gdc_launch_dependents", "gdc_wait"]
