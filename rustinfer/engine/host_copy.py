"""Host <-> device copies that never make the host wait for the GPU.

``torch.tensor(values, device="cuda")`` and ``tensor.tolist()`` on a CUDA tensor both block the
host until everything queued on the stream has run. The engine keeps one step in flight while it
prepares the next, so its copies go through pinned memory instead: an upload is queued behind the
work already on the stream and returns at once; a download is queued right after the tensors it
reads are produced, and the host waits on its event only when it needs the values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["HostTensors", "copy_rows", "upload", "upload_packed"]


def upload(
    values: Sequence | np.ndarray | torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """``values`` as a tensor on ``device``; on CUDA through pinned memory, without a host wait.

    The pinned staging tensor comes from torch's caching host allocator, which does not hand it
    out again before the queued copy has read it.
    """
    host = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


# Each packed segment starts on a 128-byte boundary: Triton specializes a kernel on whether its
# pointer arguments are 16-byte aligned, so a segment that started wherever the previous one ended
# would, for an odd token count, compile a second variant of the kernel mid-serving.
_SEGMENT_ALIGN_BYTES = 128


def upload_packed(
    arrays: Sequence[np.ndarray], dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """Several 1-D host arrays as contiguous device tensors of ``dtype``, through one pinned
    buffer and one host-to-device copy (each copy costs ~15 us of host time and a DMA launch;
    a prefill step uploads six arrays). The returned tensors are views of one device buffer."""
    align = max(1, _SEGMENT_ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += -(-len(a) // align) * align
    host = torch.empty(max(total, 1), dtype=dtype, pin_memory=device.type == "cuda")
    view = host.numpy()
    for a, off in zip(arrays, offsets, strict=True):
        view[off : off + len(a)] = a
    packed = host.to(device, non_blocking=True) if device.type == "cuda" else host
    return [packed[off : off + len(a)] for a, off in zip(arrays, offsets, strict=True)]


class HostTensors:
    """Pinned host copies of device tensors, queued now and readable after :meth:`wait`."""

    def __init__(self, tensors: Sequence[torch.Tensor | None], device: torch.device) -> None:
        self._event: torch.cuda.Event | None = None
        if device.type != "cuda":
            self.tensors = [t if t is None else t.detach() for t in tensors]
            return
        self.tensors = []
        for t in tensors:
            if t is None:
                self.tensors.append(None)
                continue
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            self.tensors.append(host)
        self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(device))

    def wait(self) -> list[torch.Tensor | None]:
        """Block until the copies have landed; the host tensors, in the order given."""
        if self._event is not None:
            self._event.synchronize()
        return self.tensors


def copy_rows(
    dst: torch.Tensor, dst_rows: list[int], src: torch.Tensor, src_rows: list[int]
) -> None:
    """``dst[dst_rows] = src[src_rows]`` on the device, with one copy when rows line up (the
    steady decode: the same sequences in the same order, step after step)."""
    n = len(dst_rows)
    if dst_rows == src_rows == list(range(n)):
        dst[:n].copy_(src[:n])
        return
    device = dst.device
    dst.index_copy_(
        0, upload(dst_rows, torch.int64, device), src[upload(src_rows, torch.int64, device)]
    )
