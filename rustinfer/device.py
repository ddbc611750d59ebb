"""The Device interface: what the engine needs to know about where tensors live.

Device types are registered by plugins (``rustinfer_register_devices``): rustinfer-ops-cpu registers
``cpu``, rustinfer-ops-cuda registers ``cuda``.
"""

from __future__ import annotations

import abc
import contextlib
from typing import ClassVar

import torch

from rustinfer.errors import RegistryError
from rustinfer.registry import Registries


class Device(abc.ABC):
    """One device of one type (``cpu``, ``cuda:1``)."""

    type: ClassVar[str]

    def __init__(self, index: int | None = None) -> None:
        self.index = index

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type if self.index is None else f"{self.type}:{self.index}")

    @classmethod
    @abc.abstractmethod
    def is_available(cls) -> bool:
        """Whether this device type can run here at all."""

    @abc.abstractmethod
    def name(self) -> str:
        """A human-readable description (CPU model and threads, GPU name)."""

    @abc.abstractmethod
    def memory_info(self) -> tuple[int, int]:
        """``(free_bytes, total_bytes)`` of the memory KV caches are allocated from."""

    def synchronize(self) -> None:  # noqa: B027  optional: synchronous devices have nothing to wait for
        """Wait for queued work (no-op on synchronous devices)."""

    def make_current(self) -> None:  # noqa: B027  optional: most device types have no notion of it
        """Make this the calling thread's current device of its type, for a thread that serves this
        device alone (the engine thread calls it first). Libraries that launch on "the current
        device" (Triton, CUDA graphs, streams and events made without one) then land here rather
        than on device 0, where every new thread starts. A no-op where the type has no such notion.
        """

    def as_current(self) -> contextlib.AbstractContextManager[object]:
        """A scope in which this is the current device of its type, the previous one restored on
        exit: for work on this device from a thread that serves others too (a caller's thread)."""
        return contextlib.nullcontext()

    def auto_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        """The dtype ``--dtype auto`` picks on this device for a checkpoint stored in ``checkpoint_dtype``."""
        return checkpoint_dtype or torch.float32

    def __str__(self) -> str:
        return str(self.torch_device)


def resolve_device(spec: str, registries: Registries) -> Device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (a GPU when one is usable, else the CPU)."""
    spec = spec.strip().lower()
    if spec == "auto":
        for candidate in ("cuda",):
            if candidate in registries.devices and registries.devices.get(candidate).is_available():
                return registries.devices.get(candidate)(0)
        spec = "cpu"
    dev_type, _, index_text = spec.partition(":")
    if index_text and not index_text.isdigit():
        raise ValueError(f"bad device {spec!r}: expected cpu, cuda, cuda:N or auto")
    try:
        cls = registries.devices.get(dev_type)
    except RegistryError as exc:
        raise RegistryError(f"device {spec!r}: {exc}") from None
    if not cls.is_available():
        raise RegistryError(f"device {spec!r} is registered but not available on this machine")
    index = int(index_text) if index_text else (0 if dev_type != "cpu" else None)
    return cls(index)
